"""Small helpers shared by the trainer and the CLI: image grids."""

import math

from PIL import Image, ImageDraw, ImageFont


def image_grid(images: list[Image.Image], captions: list[str] | None = None, ncols: int | None = None) -> Image.Image:
    """Tile `images` into one picture, each with its caption (wrapped) underneath.

    Tiles smaller than 128 px are upscaled (nearest neighbour) so that tiny test images stay visible.
    """
    if not images:
        raise ValueError("image_grid needs at least one image.")
    ncols = ncols or min(len(images), 4)
    nrows = math.ceil(len(images) / ncols)
    width, height = images[0].size
    scale = max(1, math.ceil(128 / max(width, height)))
    tile_w, tile_h = width * scale, height * scale
    font = ImageFont.load_default()
    chars_per_line = max(8, tile_w // 7)
    lines = [_wrap(c, chars_per_line) for c in captions] if captions else [[] for _ in images]
    text_h = 12 * max((len(x) for x in lines), default=0) + (4 if captions else 0)
    grid = Image.new("RGB", (ncols * tile_w, nrows * (tile_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption_lines) in enumerate(zip(images, lines)):
        x, y = (i % ncols) * tile_w, (i // ncols) * (tile_h + text_h)
        grid.paste(image.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x, y))
        for j, line in enumerate(caption_lines):
            draw.text((x + 2, y + tile_h + 2 + 12 * j), line, fill="black", font=font)
    return grid


def _wrap(text: str, width: int, max_lines: int = 3) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 3] + "..."
    return lines
