"""JPEG compressibility rewards (DDPO / Flow-GRPO), which need no model download.

The size of an image saved as JPEG is a cheap proxy for its visual complexity: flat, smooth images compress well and
detailed, noisy ones do not. Following DDPO and Flow-GRPO, each image is converted to RGB and saved at quality 95;
its size is measured in kilobytes (1 kB = 1000 bytes).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["jpeg_compressibility", "jpeg_incompressibility", "jpeg_size_kb"]

JPEG_QUALITY = 95


def _to_rgb_image(image: Any) -> Image.Image:
    """Return `image` as an RGB PIL image.

    Accepts a PIL image (any mode) or a `numpy.uint8` array of shape `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or
    `(H, W, 4)`.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must have dtype uint8 (values 0-255), got {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4)):
            return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
        raise ValueError(f"numpy images must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {image.shape}")
    raise TypeError(f"expected a PIL.Image.Image or a uint8 numpy array (H, W, C), got {type(image).__name__}")


def jpeg_size_kb(image: Image.Image | np.ndarray) -> float:
    """Size in kilobytes (1000 bytes) of `image` encoded as an RGB JPEG at quality 95."""
    buffer = io.BytesIO()
    _to_rgb_image(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


def jpeg_compressibility(
    prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any
) -> list[float]:
    """Reward images that compress well: minus the JPEG size (kB, quality 95, RGB) of each image.

    Higher is more compressible (flatter, simpler images). This is the DDPO / Flow-GRPO "compressibility" reward.

    Args:
        prompts: The prompts the images were generated from (unused; part of the reward-function convention).
        images: PIL images (any mode; converted to RGB) or `uint8` numpy arrays of shape `(H, W[, C])`.
        **kwargs: Other dataset columns and `trainer_state`; ignored.

    Returns:
        One float per image: `-size_in_kB`.
    """
    return [-jpeg_size_kb(image) for image in images]


def jpeg_incompressibility(
    prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any
) -> list[float]:
    """Reward images that compress badly: the JPEG size (kB, quality 95, RGB) of each image.

    Higher is less compressible (more detailed, busier images). This is the DDPO / Flow-GRPO "incompressibility"
    reward, the negation of :func:`jpeg_compressibility`.

    Args:
        prompts: The prompts the images were generated from (unused; part of the reward-function convention).
        images: PIL images (any mode; converted to RGB) or `uint8` numpy arrays of shape `(H, W[, C])`.
        **kwargs: Other dataset columns and `trainer_state`; ignored.

    Returns:
        One float per image: `size_in_kB`.
    """
    return [jpeg_size_kb(image) for image in images]
