"""A synthetic "shapes" text-to-image world: small RGB images of coloured shapes on black, with captions.

The world is small enough to pretrain a tiny text-to-image model on a single GPU in minutes, and it comes with a
rule-based GenEval-like evaluator (`trl_flow_grpo.toy.geneval`) that serves both as a benchmark and as an RL reward.

Grammar (every caption of the world; `<object>` is `<colour> <shape>`, colours `red green blue yellow`, shapes
`circle square triangle`):

- ``single_object``: ``a <colour> <shape>`` (e.g. "a red circle"), 12 captions;
- ``counting``: ``<two|three|four> <colour> <shape>s`` (e.g. "three green triangles"), 36 captions;
- ``two_object``: ``a <object A> and a <object B>`` with A != B (e.g. "a red circle and a blue square"),
  132 captions;
- ``position``: ``a <object A> <left of|right of|above|below> a <object B>`` with A != B
  (e.g. "a yellow triangle above a green circle"), 528 captions.

Held-out split: `caption_split` puts about 20% of the *compositions* of every category in ``"test"``. A composition
is what a caption means, so equivalent captions share a split: "a red circle and a blue square" and "a blue square and
a red circle" are one composition, as are "A left of B" and "B right of A" (and "A above B" / "B below A"). Within
each category the compositions are ordered by a SHA-256 hash of a canonical key and the first
``round(0.2 * n)`` of them are held out, so the split is deterministic and every category has test captions.

Scenes: `sample_scene` draws a category, a caption of the requested split and object placements that make the
caption true (pixel-aligned sprites 7-12 px wide, non-overlapping, separated by a gap, inside the canvas; for
``position`` the relation holds clearly). `render` draws a scene with crisp, non-anti-aliased filled shapes
(triangles point up). Coordinates are in pixels with x to the right and y down; pixel ``(row i, column j)`` has its
centre at ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "CIRCLE_INSET",
    "COLORS",
    "NUMBERS",
    "RELATIONS",
    "SHAPES",
    "Scene",
    "ShapeObject",
    "all_captions",
    "caption_category",
    "caption_split",
    "make_image_dataset",
    "make_prompt_dataset",
    "relation_holds",
    "render",
    "sample_scene",
    "shape_mask",
    "sprite_widths",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
"""The palette: four saturated colours, pairwise at least 255 apart (and 255 from the black background) in RGB."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
"""Number words. Captions write a single object with "a"; ``counting`` captions use 2, 3 and 4."""
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "counting", "two_object", "position")
MIXES: tuple[str, ...] = ("balanced", "captions")
"""`make_prompt_dataset` mixes: balanced over categories, or every caption equally likely (the held-out mix)."""
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

COUNTING_NUMBERS: tuple[int, ...] = (2, 3, 4)
TEST_FRACTION = 0.2
REFERENCE_SIZE = 32
"""Geometry below is given in pixels at this canvas size and scaled linearly for other sizes."""

# Sampled objects are pixel-aligned sprites: their bounding square is W x W whole pixels (W an integer, so the
# half-size is W / 2 and the centre sits on a pixel centre or corner). This keeps every rendered shape symmetric and
# makes the set of sprites finite (3 shapes x 6 widths at 32x32), so the evaluator can be checked on all of them.
_MIN_WIDTH = 7
# Largest width by number of objects in the scene, so that four objects always fit on a 32x32 canvas.
_MAX_WIDTH = {1: 12, 2: 11, 3: 10, 4: 9}
_MARGIN = 1  # free pixels between every object and the border
_GAP = 2  # free pixels between the bounding squares of two objects
CIRCLE_INSET = 0.1
"""A circle of half-size ``s`` has radius ``s - CIRCLE_INSET``: this keeps small discs round (no one-pixel tips)."""
# Sampled ``position`` scenes satisfy the relation by a wider margin than the evaluator requires
# (`trl_flow_grpo.toy.geneval` uses 2 px and an axis fraction of 0.5), so that blur and noise do not flip it.
_SAMPLER_MIN_OFFSET = 4.0
_SAMPLER_MIN_AXIS_FRACTION = 0.7
_MAX_TRIES = 10_000


@dataclass
class ShapeObject:
    """One filled shape: `shape` in `SHAPES`, `color` in `COLORS`, centre `(cx, cy)` and half-size `size` (pixels).

    The shape lies in the square ``[cx - size, cx + size] x [cy - size, cy + size]``: a square fills it, a circle
    of radius ``size - CIRCLE_INSET`` is centred in it, and a triangle pointing up has its apex at the top centre and
    its base on the bottom edge. A pixel belongs to the shape when its centre does.
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass
class Scene:
    """A caption, its category (one of `CATEGORIES`) and the objects that make the caption true."""

    caption: str
    category: str
    objects: list[ShapeObject]


# --------------------------------------------------------------------------------------------------------- captions


def _noun(color: str, shape: str, count: int = 1) -> str:
    """``"red circle"`` or, for ``count > 1``, ``"red circles"``."""
    return f"{color} {shape}s" if count > 1 else f"{color} {shape}"


def _objects() -> list[tuple[str, str]]:
    """Every ``(colour, shape)`` of the world, in a fixed order."""
    return [(color, shape) for color in COLORS for shape in SHAPES]


@functools.lru_cache(maxsize=1)
def _world() -> dict[str, tuple[str, str]]:
    """Map every caption of the world to ``(category, composition key)``.

    Equivalent captions share a composition key: two-object captions use the unordered pair, and ``position``
    captions are rewritten with "left of" / "above" (so "B right of A" has the key of "A left of B").
    """
    world: dict[str, tuple[str, str]] = {}
    for color, shape in _objects():
        caption = f"a {_noun(color, shape)}"
        world[caption] = ("single_object", f"single_object|{color} {shape}")
    for number in COUNTING_NUMBERS:
        for color, shape in _objects():
            caption = f"{NUMBERS[number]} {_noun(color, shape, number)}"
            world[caption] = ("counting", f"counting|{number} {color} {shape}")
    for a in _objects():
        for b in _objects():
            if a == b:
                continue
            name_a, name_b = _noun(*a), _noun(*b)
            pair = "|".join(sorted((name_a, name_b)))
            world[f"a {name_a} and a {name_b}"] = ("two_object", f"two_object|{pair}")
            for relation in RELATIONS:
                if relation == "left of":
                    key = f"position|left of|{name_a}|{name_b}"
                elif relation == "right of":
                    key = f"position|left of|{name_b}|{name_a}"
                elif relation == "above":
                    key = f"position|above|{name_a}|{name_b}"
                else:
                    key = f"position|above|{name_b}|{name_a}"
                world[f"a {name_a} {relation} a {name_b}"] = ("position", key)
    return world


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _test_keys() -> frozenset[str]:
    """The held-out composition keys: per category, the first ``round(TEST_FRACTION * n)`` keys by hash."""
    keys_by_category: dict[str, set[str]] = {category: set() for category in CATEGORIES}
    for category, key in _world().values():
        keys_by_category[category].add(key)
    test: set[str] = set()
    for keys in keys_by_category.values():
        ordered = sorted(keys, key=lambda k: (_stable_hash(k), k))
        test.update(ordered[: max(1, round(TEST_FRACTION * len(ordered)))])
    return frozenset(test)


def _normalize(caption: str) -> str:
    return " ".join(caption.strip().lower().split())


def _lookup(caption: str) -> tuple[str, str]:
    entry = _world().get(_normalize(caption))
    if entry is None:
        raise ValueError(
            f"{caption!r} is not a caption of the shapes world (see trl_flow_grpo.toy.shapes for the grammar)"
        )
    return entry


def caption_category(caption: str) -> str:
    """The category (one of `CATEGORIES`) of a caption of the world; `ValueError` for any other text."""
    return _lookup(caption)[0]


def caption_split(caption: str) -> str:
    """``"train"`` or ``"test"``: the split of a caption's composition (deterministic, ~20% test per category).

    Raises:
        ValueError: If `caption` is not a caption of the world (case and surrounding/repeated spaces are ignored).
    """
    return "test" if _lookup(caption)[1] in _test_keys() else "train"


def _check_split(split: str | None, allow_none: bool = False) -> None:
    if split is None and allow_none:
        return
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def all_captions(split: str | None = None) -> list[str]:
    """Every caption of the world, or of one split (``"train"`` / ``"test"``), sorted."""
    _check_split(split, allow_none=True)
    return sorted(caption for caption in _world() if split is None or caption_split(caption) == split)


@functools.lru_cache(maxsize=8)
def _captions_by_category(split: str) -> dict[str, tuple[str, ...]]:
    by_category: dict[str, list[str]] = {category: [] for category in CATEGORIES}
    for caption in all_captions(split):
        by_category[caption_category(caption)].append(caption)
    return {category: tuple(captions) for category, captions in by_category.items()}


def _parse_caption(caption: str, category: str) -> tuple[list[tuple[str, str]], str | None]:
    """The objects a caption asks for (one ``(colour, shape)`` per instance) and its relation (``position``)."""
    words = caption.split()
    if category == "single_object":
        return [(words[1], words[2])], None
    if category == "counting":
        number = next(n for n, word in NUMBERS.items() if word == words[0])
        return [(words[1], words[2][:-1])] * number, None
    if category == "two_object":  # a C S and a C S
        return [(words[1], words[2]), (words[5], words[6])], None
    relation = " ".join(words[3:-3])  # a C S <relation> a C S
    return [(words[1], words[2]), (words[-2], words[-1])], relation


# ---------------------------------------------------------------------------------------------------------- drawing


def shape_mask(
    obj: ShapeObject, size: int = REFERENCE_SIZE, window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """The boolean mask of the pixels whose centres lie inside `obj` (no anti-aliasing).

    Args:
        obj: The shape.
        size: Canvas size; the mask is ``(size, size)`` unless `window` is given.
        window: ``(x0, y0, width, height)``: rasterise only this window of the (unbounded) pixel grid, returning a
            ``(height, width)`` mask whose pixel ``[i, j]`` is pixel ``(row y0 + i, column x0 + j)`` of the canvas.
    """
    x0, y0, width, height = (0, 0, size, size) if window is None else window
    ys, xs = np.mgrid[y0 : y0 + height, x0 : x0 + width].astype(np.float64) + 0.5
    dx, dy = xs - obj.cx, ys - obj.cy
    s = obj.size
    if obj.shape == "square":
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if obj.shape == "circle":
        radius = max(s - CIRCLE_INSET, 0.0)
        return dx * dx + dy * dy <= radius * radius
    if obj.shape == "triangle":  # apex (cx, cy - s), base from (cx - s, cy + s) to (cx + s, cy + s)
        return (dy <= s) & (np.abs(dx) <= (dy + s) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = REFERENCE_SIZE) -> Image.Image:
    """Draw `scene` as an RGB image of ``size x size`` pixels: black background, crisp filled shapes."""
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[...] = BACKGROUND
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {tuple(COLORS)}")
        canvas[shape_mask(obj, size)] = COLORS[obj.color]
    return Image.fromarray(canvas, mode="RGB")


def relation_holds(
    relation: str,
    centroid_a: tuple[float, float],
    centroid_b: tuple[float, float],
    min_offset: float,
    min_axis_fraction: float = 0.5,
) -> bool:
    """Whether "A <relation> B" holds for the centroids ``(x, y)`` of A and B (y grows downwards).

    The offset of A from B along the relation's axis, in the relation's direction, must be at least `min_offset`
    pixels and at least `min_axis_fraction` of the centroid distance (0.5: within 60 degrees of the axis).
    """
    dx = centroid_a[0] - centroid_b[0]
    dy = centroid_a[1] - centroid_b[1]
    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}.get(relation)
    if along is None:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    distance = (dx * dx + dy * dy) ** 0.5
    return along >= min_offset and along >= min_axis_fraction * distance


def _mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def sprite_widths(size: int = REFERENCE_SIZE, num_objects: int = 1) -> range:
    """The widths W (pixels) that `sample_scene` draws for a scene of `num_objects` objects on a `size` canvas."""
    scale = size / REFERENCE_SIZE
    return range(round(_MIN_WIDTH * scale), round(_MAX_WIDTH[min(max(num_objects, 1), 4)] * scale) + 1)


def _place(rng: random.Random, specs: list[tuple[str, str]], size: int) -> list[ShapeObject]:
    """Random non-overlapping pixel-aligned placements of `specs` on a ``size x size`` canvas ([] on failure)."""
    scale = size / REFERENCE_SIZE
    margin, gap = max(1, round(_MARGIN * scale)), max(2, round(_GAP * scale))
    widths = sprite_widths(size, len(specs))
    boxes: list[tuple[int, int, int]] = []  # (x0, y0, width): pixels [x0, x0 + width) x [y0, y0 + width)
    objects: list[ShapeObject] = []
    for color, shape in specs:
        for _ in range(200):
            width = rng.choice(widths)
            x0 = rng.randint(margin, size - margin - width)
            y0 = rng.randint(margin, size - margin - width)
            if all(
                x0 >= ox + ow + gap or ox >= x0 + width + gap or y0 >= oy + ow + gap or oy >= y0 + width + gap
                for ox, oy, ow in boxes
            ):
                boxes.append((x0, y0, width))
                half = width / 2
                objects.append(ShapeObject(shape=shape, color=color, cx=x0 + half, cy=y0 + half, size=half))
                break
        else:
            return []
    return objects


def sample_scene(
    rng: random.Random, split: str = "train", size: int = REFERENCE_SIZE, category: str | None = None
) -> Scene:
    """Draw a random scene whose caption belongs to `split` and whose objects make the caption true.

    The category is uniform over `CATEGORIES` unless given; the caption is uniform over the captions of that
    category in `split`. Objects are pixel-aligned sprites (see `sprite_widths`): a W x W bounding square with W
    uniform in 7..12 pixels for one object, 7..11 for two, 7..10 for three and 7..9 for four (half-size 3.5 to 6;
    all scaled by ``size / 32``), at least 1 px inside the canvas, with at least 2 free pixels between the bounding
    squares of two objects. ``counting`` scenes hold exactly n identical (colour, shape) objects, ``two_object``
    scenes the two named objects, and ``position`` scenes two objects whose pixel centroids satisfy the relation by
    at least 4 px along its axis and within ~45 degrees of it (`relation_holds` with ``min_offset=4``,
    ``min_axis_fraction=0.7``).
    """
    _check_split(split)
    if category is None:
        category = rng.choice(CATEGORIES)
    _check_category(category)
    caption = rng.choice(_captions_by_category(split)[category])
    specs, relation = _parse_caption(caption, category)
    scale = size / REFERENCE_SIZE
    for _ in range(_MAX_TRIES):
        objects = _place(rng, specs, size)
        if not objects:
            continue
        if relation is not None:
            centroid_a, centroid_b = (_mask_centroid(shape_mask(obj, size)) for obj in objects)
            if not relation_holds(
                relation, centroid_a, centroid_b, _SAMPLER_MIN_OFFSET * scale, _SAMPLER_MIN_AXIS_FRACTION
            ):
                continue
        return Scene(caption=caption, category=category, objects=objects)
    raise RuntimeError(f"could not place the objects of {caption!r} on a {size}x{size} canvas")


# --------------------------------------------------------------------------------------------------------- datasets


def make_prompt_dataset(
    num_prompts: int,
    seed: int,
    split: str,
    categories: Sequence[str] | None = None,
    mix: str = "balanced",
) -> Dataset:
    """A `datasets.Dataset` of `num_prompts` prompts of `split`, with columns ``"prompt"`` and ``"category"``.

    With ``mix="balanced"`` the rows are balanced over `categories` (all of `CATEGORIES` by default; counts differ by
    at most one), and within a category the prompts cycle through a shuffled list of its captions. With
    ``mix="captions"`` every caption of those categories is equally likely, so the categories come in the proportions
    of their captions (the held-out evaluation's mix: position has 422 of the 567 training captions). Either way the
    prompts cycle through a shuffled list (reshuffled after each pass), so every caption appears before any repeats.
    Row order is shuffled; everything is deterministic given `seed`.
    """
    from datasets import Dataset

    _check_split(split)
    categories = tuple(CATEGORIES if categories is None else categories)
    if not categories:
        raise ValueError("categories must not be empty")
    for category in categories:
        _check_category(category)
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}.")
    rng = random.Random(seed)
    pools = {category: list(_captions_by_category(split)[category]) for category in categories}
    if mix == "captions":  # one pool of every caption: categories in the proportions of their captions
        pools = {"all": [caption for category in categories for caption in pools[category]]}
        categories = ("all",)
    queues: dict[str, list[str]] = {category: [] for category in categories}
    rows: list[tuple[str, str]] = []
    for index in range(num_prompts):
        category = categories[index % len(categories)]
        if not queues[category]:
            queues[category] = pools[category][:]
            rng.shuffle(queues[category])
        caption = queues[category].pop()
        rows.append((caption, caption_category(caption) if mix == "captions" else category))
    rng.shuffle(rows)
    return Dataset.from_dict({"prompt": [row[0] for row in rows], "category": [row[1] for row in rows]})


def make_image_dataset(
    num_images: int, seed: int, split: str = "train", size: int = REFERENCE_SIZE
) -> tuple[list[Image.Image], list[str]]:
    """`num_images` rendered scenes of `split` and their captions (for pretraining); deterministic given `seed`."""
    rng = random.Random(seed)
    images: list[Image.Image] = []
    captions: list[str] = []
    for _ in range(num_images):
        scene = sample_scene(rng, split=split, size=size)
        images.append(render(scene, size))
        captions.append(scene.caption)
    return images, captions
