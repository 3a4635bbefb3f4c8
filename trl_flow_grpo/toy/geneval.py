"""A rule-based GenEval-like evaluator (and RL reward) for the synthetic shapes world of `trl_flow_grpo.toy.shapes`.

GenEval checks generated images with an object detector; here the world is simple enough for rules.

Detection (`detect_objects`):

1. Colour segmentation. Each pixel ``p`` is matched to the palette colour ``c`` (`shapes.COLORS`) whose hue is
   closest (largest cosine between the RGB vectors ``p`` and ``c``). It is foreground when that angle is at most
   `MAX_HUE_ANGLE` (30 degrees) and its intensity along ``c``, ``t = p.c / |c|^2``, is at least `MIN_INTENSITY`
   (0.4); everything else (dark pixels, greys, white) is background. Matching hues rather than RGB distances keeps
   the dim edges of a blurry yellow shape yellow (half-intensity yellow is equally far from red, green and yellow).
2. 4-connected components of each colour; components smaller than `MIN_AREA` (4 px at 32x32, scaled with the image
   area) are specks and ignored. Touching objects of one colour merge into one component.
3. Shape classification by template matching: for each shape, the template of that shape with the component's area
   and centroid (a triangle's centroid sits a third of its half-size below its centre) is rasterised exactly as
   `shapes.render` does, and the shape whose template has the highest IoU with the component wins. This uses every
   pixel, is scale-free and copes with the pixel-level irregularities of small discs (fill ratios alone do not).
   The vertical mass balance then overrides it: a component with at most 40% of its pixels in the upper half of
   its bounding box is a triangle (pointing up: ~25-33% when crisp, up to ~40% when blurred, while discs and
   squares stay at 42-60%), and one with at least 45% there is never a triangle.
4. The centroid is the mean of the component's pixel centres.

Scoring (`score_image`), GenEval-style partial credit in [0, 1]. The credit of a detection for a requested object
is 1 if both its colour and its shape match, 0.5 if exactly one of them matches, 0 otherwise.

- ``single_object`` "a red circle": the best credit over all detections (extra objects are not penalised).
- ``counting`` "three green triangles": with k the number of detections of the right colour *and* shape (objects
  of another colour or shape are ignored, they neither count nor penalise), ``max(0, 1 - |k - n| / n)``.
- ``two_object`` "a red circle and a blue square": the mean of the two objects' credits, maximised over assignments
  of two *different* detections to the two objects (a missing object gets 0).
- ``position`` "a red circle left of a blue square": for each assignment of two different detections (A, B),
  ``mean credit * (1 if the relation holds between their centroids else 0.5)``; the score is the maximum over
  assignments. With fewer than two detections the relation cannot hold (factor 0.5). "A left of B" holds when
  A's centroid is left of B's by at least `MIN_OFFSET` (2 px at 32x32, scaled with the image) and that horizontal
  offset is at least half of the centroid distance (within 60 degrees of the axis; like GenEval, which also rejects
  mostly-vertical arrangements for "left of"); likewise for the other relations.

A sample is ``correct`` when its score is 1, e.g. a counting sample with exactly n matching objects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .shapes import CATEGORIES, COLORS, NUMBERS, RELATIONS, SHAPES, ShapeObject, relation_holds, shape_mask

__all__ = [
    "Detection",
    "ParsedPrompt",
    "Requirement",
    "detect_objects",
    "evaluate",
    "parse_prompt",
    "score_image",
    "shapes_geneval",
]

MAX_HUE_ANGLE = 30.0
"""Largest angle (degrees) between a pixel's RGB vector and its palette colour for the pixel to be foreground."""
MIN_INTENSITY = 0.4
"""Smallest intensity ``p.c / |c|^2`` along the palette colour for a pixel to be foreground (0.5 = half-way)."""
MIN_AREA = 4
"""Smallest component (pixels at 32x32, scaled with the image area) that counts as an object."""
MIN_OFFSET = 2.0
"""Smallest centroid offset (pixels at 32x32, scaled with the image size) along a relation's axis."""
MIN_AXIS_FRACTION = 0.5
"""Smallest fraction of the centroid distance that must lie along the relation's axis."""
TRIANGLE_MAX_UPPER_FRACTION = 0.40
"""A component with at most this fraction of its pixels in the upper half of its bounding box is a triangle."""
ROUND_MIN_UPPER_FRACTION = 0.45
"""A component with at least this fraction of its pixels in the upper half is never a triangle."""
REFERENCE_SIZE = 32
"""Image side (pixels) at which the pixel thresholds above hold; they scale with the image for other sizes."""


@dataclass
class Requirement:
    """One kind of object a prompt asks for: `count` objects of `color` and `shape`."""

    color: str
    shape: str
    count: int = 1


@dataclass
class ParsedPrompt:
    """A prompt of the shapes grammar: its category, the requested objects and, for ``position``, the relation.

    For ``position`` the relation reads "``requirements[0]`` `relation` ``requirements[1]``".
    """

    prompt: str
    category: str
    requirements: list[Requirement]
    relation: str | None = None


@dataclass
class Detection:
    """An object found in an image.

    Attributes:
        color: Palette colour (a key of `shapes.COLORS`).
        shape: Classified shape (one of `shapes.SHAPES`).
        area: Number of pixels.
        centroid: ``(x, y)`` mean of the pixel centres (pixel ``(row i, column j)`` has centre ``(j + .5, i + .5)``).
        bbox: ``(x0, y0, x1, y1)``, inclusive pixel indices.
        shape_scores: IoU of the component with each shape's template (the largest gives `shape`).
    """

    color: str
    shape: str
    area: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    shape_scores: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- parsing

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_OBJECT = rf"a ({_COLOR}) ({_SHAPE})"
_PATTERNS = {
    "single_object": re.compile(rf"^{_OBJECT}$"),
    "counting": re.compile(rf"^({'|'.join(NUMBERS.values())}) ({_COLOR}) ({_SHAPE})(s?)$"),
    "two_object": re.compile(rf"^{_OBJECT} and {_OBJECT}$"),
    "position": re.compile(rf"^{_OBJECT} ({'|'.join(RELATIONS)}) {_OBJECT}$"),
}
_GRAMMAR = (
    "'a <colour> <shape>', '<two|three|four> <colour> <shape>s', 'a <colour> <shape> and a <colour> <shape>' or "
    f"'a <colour> <shape> <{'|'.join(RELATIONS)}> a <colour> <shape>' with colours {tuple(COLORS)} and shapes "
    f"{SHAPES}"
)


def _normalize(prompt: str) -> str:
    return " ".join(prompt.strip().lower().rstrip(".").split())


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a prompt of the shapes grammar (case, repeated spaces and a final period are ignored).

    Besides the captions of the world, "one <colour> <shape>" is accepted as a ``counting`` prompt with n = 1.

    Raises:
        ValueError: If the prompt is outside the grammar, or names the same object twice in a two-object or
            position prompt.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    text = _normalize(prompt)
    if match := _PATTERNS["single_object"].match(text):
        return ParsedPrompt(text, "single_object", [Requirement(match[1], match[2])])
    if match := _PATTERNS["counting"].match(text):
        count = next(number for number, word in NUMBERS.items() if word == match[1])
        if (count > 1) != (match[4] == "s"):
            raise ValueError(f"prompt {prompt!r}: the noun must be plural exactly when the count is above one")
        return ParsedPrompt(text, "counting", [Requirement(match[2], match[3], count)])
    for category in ("two_object", "position"):
        if match := _PATTERNS[category].match(text):
            groups = match.groups()
            relation = groups[2] if category == "position" else None
            a, b = (groups[0], groups[1]), groups[-2:]
            if a == b:
                raise ValueError(f"prompt {prompt!r} names the same object twice; {category} needs two different ones")
            return ParsedPrompt(text, category, [Requirement(*a), Requirement(*b)], relation)
    raise ValueError(f"prompt {prompt!r} is outside the shapes grammar; expected {_GRAMMAR}")


# -------------------------------------------------------------------------------------------------------- detection


def _to_rgb_array(image: Any) -> np.ndarray:
    """`image` (PIL image of any mode, or uint8 array ``(H, W)`` / ``(H, W, 3|4)``) as a float ``(H, W, 3)`` array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must have dtype uint8 (values 0-255), got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"numpy images must have shape (H, W), (H, W, 3) or (H, W, 4); got {image.shape}")
        return image[..., :3].astype(np.float64)
    raise TypeError(f"expected a PIL.Image.Image or a uint8 numpy array, got {type(image).__name__}")


def _segment(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel colour index into ``list(COLORS)``, or -1 for background."""
    palette = np.array(list(COLORS.values()), dtype=np.float64)  # (K, 3)
    norms = np.linalg.norm(palette, axis=1)  # (K,)
    dots = rgb @ palette.T  # (H, W, K)
    pixel_norms = np.linalg.norm(rgb, axis=-1, keepdims=True)
    cosines = dots / np.maximum(pixel_norms * norms, 1e-9)
    best = cosines.argmax(axis=-1)
    best_cosine = np.take_along_axis(cosines, best[..., None], axis=-1)[..., 0]
    intensity = np.take_along_axis(dots / norms**2, best[..., None], axis=-1)[..., 0]
    foreground = (best_cosine >= math.cos(math.radians(MAX_HUE_ANGLE))) & (intensity >= MIN_INTENSITY)
    return np.where(foreground, best, -1)


def background_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels the detector calls background (dark pixels, greys, white and colours off
    the palette): the pixels no detection can be made of."""
    return _segment(_to_rgb_array(image)) == -1


def _label_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels: each pixel gets its component's smallest flat index."""
    height, width = labels.shape
    index = np.arange(height * width).reshape(height, width)
    comp = np.where(labels >= 0, index, -1)
    same_right = (labels[:, :-1] >= 0) & (labels[:, :-1] == labels[:, 1:])
    same_down = (labels[:-1, :] >= 0) & (labels[:-1, :] == labels[1:, :])
    while True:
        previous = comp.copy()
        # Hook: every pixel takes the smallest component id among its same-coloured neighbours...
        left, right = comp[:, :-1], comp[:, 1:]
        np.minimum(left, np.where(same_right, right, left), out=left)
        np.minimum(right, np.where(same_right, left, right), out=right)
        up, down = comp[:-1, :], comp[1:, :]
        np.minimum(up, np.where(same_down, down, up), out=up)
        np.minimum(down, np.where(same_down, up, down), out=down)
        # ... then pointer jumping: an id is a pixel of the same component with a smaller index.
        flat = comp.reshape(-1)
        mask = flat >= 0
        while True:
            jumped = np.where(mask, flat[np.where(mask, flat, 0)], -1)
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        comp = flat.reshape(height, width)
        if np.array_equal(comp, previous):
            return comp


def _classify(mask: np.ndarray, x0: int, y0: int) -> dict[str, float]:
    """IoU of `mask` (the component in the window at ``(x0, y0)``) with the area- and centroid-matched templates."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    gx, gy = float(xs.mean()) + 0.5 + x0, float(ys.mean()) + 0.5 + y0
    scores: dict[str, float] = {}
    for shape in SHAPES:
        if shape == "circle":
            half, cy = math.sqrt(area / math.pi), gy
        elif shape == "square":
            half, cy = math.sqrt(area) / 2, gy
        else:  # area 2 s^2, centroid s / 3 below the centre of the bounding square
            half = math.sqrt(area / 2)
            cy = gy - half / 3
        template = shape_mask(ShapeObject(shape, "", gx, cy, half), window=(x0, y0, mask.shape[1], mask.shape[0]))
        union = np.count_nonzero(template | mask)
        scores[shape] = float(np.count_nonzero(template & mask) / union) if union else 0.0
    return scores


def _upper_fraction(ys: np.ndarray) -> float:
    """Fraction of a component's pixels in the upper half of its bounding box (pixels on the middle count half)."""
    centres = ys + 0.5
    middle = (ys.min() + ys.max() + 1) / 2
    return float((np.count_nonzero(centres < middle) + 0.5 * np.count_nonzero(centres == middle)) / len(ys))


def detect_objects(image: Image.Image | np.ndarray) -> list[Detection]:
    """Find the coloured shapes in `image` (see the module docstring), sorted by area (largest first).

    Args:
        image: A PIL image (any mode; converted to RGB) or a uint8 numpy array ``(H, W)``, ``(H, W, 3)`` or
            ``(H, W, 4)``, of any size (the thresholds in pixels scale with it).
    """
    return _detect(_to_rgb_array(image))


def _detect(rgb: np.ndarray) -> list[Detection]:
    height, width = rgb.shape[:2]
    labels = _segment(rgb)
    comp = _label_components(labels)
    min_area = max(1, round(MIN_AREA * height * width / REFERENCE_SIZE**2))
    ids, counts = np.unique(comp[comp >= 0], return_counts=True)
    color_names = list(COLORS)
    detections: list[Detection] = []
    for comp_id, area in zip(ids.tolist(), counts.tolist()):
        if area < min_area:
            continue
        ys, xs = np.nonzero(comp == comp_id)
        bx0, bx1, by0, by1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        # A window around the component wide enough for every template (a template spans at most ~1.5x the
        # component's extent for the shapes of this world).
        pad = max(bx1 - bx0, by1 - by0) + 2
        x0, y0 = bx0 - pad, by0 - pad
        window = np.zeros((by1 - by0 + 1 + 2 * pad, bx1 - bx0 + 1 + 2 * pad), dtype=bool)
        window[ys - y0, xs - x0] = True
        scores = _classify(window, x0, y0)
        shape = max(scores, key=scores.__getitem__)
        upper = _upper_fraction(ys)
        if upper <= TRIANGLE_MAX_UPPER_FRACTION:
            shape = "triangle"
        elif upper >= ROUND_MIN_UPPER_FRACTION and shape == "triangle":
            shape = "circle" if scores["circle"] >= scores["square"] else "square"
        detections.append(
            Detection(
                color=color_names[int(labels[ys[0], xs[0]])],
                shape=shape,
                area=int(area),
                centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                bbox=(bx0, by0, bx1, by1),
                shape_scores=scores,
            )
        )
    detections.sort(key=lambda d: (-d.area, d.centroid[1], d.centroid[0]))
    return detections


# ---------------------------------------------------------------------------------------------------------- scoring


def _credit(requirement: Requirement, detection: Detection) -> float:
    """1 if colour and shape match, 0.5 if one of them does, 0 otherwise."""
    return ((requirement.color == detection.color) + (requirement.shape == detection.shape)) / 2


def _detection_dict(detection: Detection) -> dict[str, Any]:
    return {
        "color": detection.color,
        "shape": detection.shape,
        "area": detection.area,
        "centroid": detection.centroid,
        "bbox": detection.bbox,
    }


def _score_parsed(
    parsed: ParsedPrompt, detections: list[Detection], image_size: tuple[int, int]
) -> tuple[float, dict]:
    details: dict[str, Any] = {"category": parsed.category}
    if parsed.category == "single_object":
        requirement = parsed.requirements[0]
        score = max((_credit(requirement, d) for d in detections), default=0.0)
        details["object_credit"] = score
    elif parsed.category == "counting":
        requirement = parsed.requirements[0]
        detected = sum(d.color == requirement.color and d.shape == requirement.shape for d in detections)
        score = max(0.0, 1.0 - abs(detected - requirement.count) / requirement.count)
        details.update(expected_count=requirement.count, detected_count=detected)
    else:
        a, b = parsed.requirements
        min_offset = MIN_OFFSET * min(image_size) / REFERENCE_SIZE
        best = (0.0, (0.0, 0.0), None)  # score, object credits, relation holds
        if len(detections) == 1:
            credits = (_credit(a, detections[0]), _credit(b, detections[0]))
            credits = (credits[0], 0.0) if credits[0] >= credits[1] else (0.0, credits[1])
            factor = 0.5 if parsed.relation is not None else 1.0
            best = (sum(credits) / 2 * factor, credits, False if parsed.relation is not None else None)
        for i, det_a in enumerate(detections):
            for j, det_b in enumerate(detections):
                if i == j:
                    continue
                credits = (_credit(a, det_a), _credit(b, det_b))
                holds = None
                factor = 1.0
                if parsed.relation is not None:
                    holds = relation_holds(
                        parsed.relation, det_a.centroid, det_b.centroid, min_offset, MIN_AXIS_FRACTION
                    )
                    factor = 1.0 if holds else 0.5
                candidate = sum(credits) / 2 * factor
                if candidate > best[0]:
                    best = (candidate, credits, holds)
        score, credits, holds = best
        details["object_credits"] = list(credits)
        if parsed.relation is not None:
            details["relation_holds"] = bool(holds)
    details["score"] = score
    details["correct"] = score == 1.0
    details["detections"] = [_detection_dict(d) for d in detections]
    return score, details


def score_image(prompt: str, image: Image.Image | np.ndarray) -> tuple[float, dict]:
    """Score how well `image` depicts `prompt` (partial credit in [0, 1], rules in the module docstring).

    Returns:
        ``(score, details)`` where `details` holds ``"category"``, ``"score"``, ``"correct"`` (score == 1),
        ``"detections"`` (colour, shape, area, centroid, bbox of each detected object) and per category
        ``"object_credit"`` (single_object), ``"expected_count"`` / ``"detected_count"`` (counting),
        ``"object_credits"`` (two_object, position) and ``"relation_holds"`` (position).

    Raises:
        ValueError: If `prompt` is outside the grammar.
    """
    parsed = parse_prompt(prompt)
    rgb = _to_rgb_array(image)
    detections = _detect(rgb)
    return _score_parsed(parsed, detections, rgb.shape[:2])


def shapes_geneval(prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any) -> list[float]:
    """Reward function (TRL convention): the `score_image` partial credit of each (prompt, image) pair.

    Args:
        prompts: Prompts of the shapes grammar.
        images: PIL images or uint8 numpy arrays, one per prompt.
        **kwargs: Other dataset columns and `trainer_state`; ignored.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts and {len(images)} images")
    return [score_image(prompt, image)[0] for prompt, image in zip(prompts, images)]


def requested_objects(prompt: str) -> int:
    """How many objects `prompt` asks for (1 or 2, or the count of a counting caption)."""
    return sum(requirement.count for requirement in parse_prompt(prompt).requirements)


def _scores_with_counts(prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray]):
    """`(score, detected, asked)` of each image: `score_image`'s score, its number of detections, and how many
    objects its prompt asks for."""
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts and {len(images)} images")
    for prompt, image in zip(prompts, images):
        score, details = score_image(prompt, image)
        yield score, len(details["detections"]), requested_objects(prompt)


def shapes_geneval_no_extras(
    prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any
) -> list[float]:
    """`shapes_geneval` with the extra-object hole narrowed: an image with more detected objects than its prompt asks
    for gets its score times ``asked / detected`` (a spray of 6 shapes for "a red circle and a blue square" keeps a
    third of its credit). GenEval's rules, and `shapes_geneval`, let extra objects pass outside counting; a policy
    trained on them learns to draw many objects (docs/toy_world.md, "Why images fail").

    Args:
        prompts: Prompts of the shapes grammar.
        images: PIL images or uint8 numpy arrays, one per prompt.
        **kwargs: Other dataset columns and `trainer_state`; ignored.
    """
    return [
        score * asked / detected if detected > asked else score
        for score, detected, asked in _scores_with_counts(prompts, images)
    ]


def shapes_geneval_strict(
    prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any
) -> list[float]:
    """`shapes_geneval` with the extra-object hole closed: 0 for an image with more detected objects than its prompt
    asks for, the score otherwise. Its 1.0 is the held-out evaluation's `strict_accuracy` verdict; images without
    extras keep their partial credit (one of two objects right: 0.5).

    Args:
        prompts: Prompts of the shapes grammar.
        images: PIL images or uint8 numpy arrays, one per prompt.
        **kwargs: Other dataset columns and `trainer_state`; ignored.
    """
    return [0.0 if detected > asked else score for score, detected, asked in _scores_with_counts(prompts, images)]


def evaluate(prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray]) -> dict[str, float]:
    """GenEval-style summary of a set of generations.

    Returns:
        ``"accuracy"`` (fraction of samples with score 1) and ``"score"`` (mean partial credit) over all samples,
        and ``"accuracy/<category>"`` / ``"score/<category>"`` for each category present among the prompts.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts and {len(images)} images")
    if not prompts:
        raise ValueError("evaluate needs at least one sample")
    per_category: dict[str, list[float]] = {}
    for prompt, image in zip(prompts, images):
        score, details = score_image(prompt, image)
        per_category.setdefault(details["category"], []).append(score)
    all_scores = [score for scores in per_category.values() for score in scores]
    results = {
        "accuracy": float(np.mean([score == 1.0 for score in all_scores])),
        "score": float(np.mean(all_scores)),
    }
    for category in CATEGORIES:
        if category in per_category:
            scores = per_category[category]
            results[f"accuracy/{category}"] = float(np.mean([score == 1.0 for score in scores]))
            results[f"score/{category}"] = float(np.mean(scores))
    return results
