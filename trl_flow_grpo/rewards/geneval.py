"""GenEval (Ghosh et al., 2023) as a reward and an evaluator, on transformers' Mask2Former and CLIP (no mmdet / mmcv).

GenEval checks a generated image against the prompt's *metadata*, not its text:

```json
{"tag": "position",
 "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}],
 "exclude": []}
```

`include` lists what must be there (`count` objects of `class`, optionally of a `color`, optionally at a `position`
relative to the objects of an earlier `include` entry), `exclude` what must not (`count` or more objects of `class`).
`tag` is the task: single_object, two_object, counting, colors, position or color_attr.

The module has two layers:

1. A pure rule engine, `evaluate_detections(metadata, detections)`, on a list of `Detection`s (class name,
   confidence, box, optional mask, optional colour). It returns a `GenEvalResult` with

   - `correct`: GenEval's benchmark verdict (`evaluation/evaluate_images.py` of djghosh13/geneval);
   - `score`: Flow-GRPO's partial credit in [0, 1] (its reward server, `reward_server/gen_eval.py` of
     yifan123/reward-server, which Flow-GRPO trains on);
   - `reason`: one line per failed check.

   The rules and constants are GenEval's (see `THRESHOLD` etc. and `docs/rewards.md`).

2. The model path, `GenEvalScorer`: Mask2Former instance segmentation on COCO (`DEFAULT_DETECTOR_ID`, Swin-S as
   GenEval's mmdet checkpoint) gives the detections, CLIP ViT-L/14 (`DEFAULT_CLIP_ID`, OpenAI's weights as GenEval's
   open_clip model) classifies the colour of each object that needs one, zero-shot on its masked crop.
   `GenEvalReward` reads the metadata from a dataset column and returns the score (`geneval`) or the verdict as
   1.0 / 0.0 (`geneval_strict`).

Models are loaded lazily, on the first call, so importing this module downloads nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._models import RewardModel, check_batch_size, offloaded
from .compression import _to_rgb_image

__all__ = [
    "COCO_TO_GENEVAL_NAMES",
    "COLOR_TEMPLATES",
    "COUNTING_THRESHOLD",
    "DEFAULT_CLIP_ID",
    "DEFAULT_DETECTOR_ID",
    "Detection",
    "GENEVAL_COLORS",
    "GENEVAL_TAGS",
    "GenEvalResult",
    "GenEvalReward",
    "GenEvalScorer",
    "MAX_OBJECTS",
    "NMS_THRESHOLD",
    "POSITION_THRESHOLD",
    "RELATIONS",
    "THRESHOLD",
    "evaluate_detections",
    "geneval_reward",
    "geneval_strict_reward",
    "parse_metadata",
    "relative_position",
    "select_detections",
    "summarize",
]

THRESHOLD = 0.3
"""GenEval keeps a detection whose confidence is above this (`--options threshold`, default 0.3)."""
COUNTING_THRESHOLD = 0.9
"""... or above this for `tag == "counting"` (`counting_threshold`, default 0.9): counts need confident objects."""
MAX_OBJECTS = 16
"""At most this many detections per class are kept, the most confident first (`max_objects`, default 16)."""
NMS_THRESHOLD = 1.0
"""A detection whose box overlaps a more confident one of its class with IoU at or above this is dropped
(`max_overlap`, default 1.0: no suppression)."""
POSITION_THRESHOLD = 0.1
"""Margin of the relative-position rule, as a fraction of the two boxes' summed sizes (`position_threshold`)."""

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""GenEval's colours, the classes of its zero-shot colour classifier."""
COLOR_TEMPLATES = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
"""GenEval's prompts for the colour classifier; a colour's text embedding is the mean over these (normalised)."""
RELATIONS = ("left of", "right of", "above", "below")
"""GenEval's relative positions (`position: [relation, index]`)."""
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's tasks; the overall GenEval score is the mean of the per-task accuracies."""
CROP_BACKGROUND = "#999"
"""GenEval pastes an object's mask on this grey before cropping its box for the colour classifier."""

DEFAULT_DETECTOR_ID = "facebook/mask2former-swin-small-coco-instance"
"""Mask2Former, Swin-S backbone, COCO instance segmentation: the transformers port of the mmdet checkpoint GenEval
uses (`mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`). `facebook/mask2former-swin-large-coco-instance` is larger."""
DEFAULT_CLIP_ID = "openai/clip-vit-large-patch14"
"""CLIP ViT-L/14 with OpenAI's weights, GenEval's colour classifier (open_clip `ViT-L-14`, `pretrained="openai"`)."""

COCO_TO_GENEVAL_NAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
"""COCO's class names (the detector's `id2label`) that GenEval's metadata spells differently."""


# ------------------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        class_name: GenEval class name (e.g. `"tv remote"`).
        score: Detector confidence in [0, 1].
        box: `(x1, y1, x2, y2)` in pixels, `x1 <= x2`, `y1 <= y2` (y grows downwards).
        mask: Optional boolean `(H, W)` instance mask of the whole image (used to crop the object for colour).
        color: Optional colour (one of `GENEVAL_COLORS`); when `None`, a colour rule asks the classifier.
    """

    class_name: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        if len(self.box) != 4:
            raise ValueError(f"Detection box must be (x1, y1, x2, y2), got {self.box!r}")
        x1, y1, x2, y2 = self.box
        if x2 < x1 or y2 < y1:
            raise ValueError(f"Detection box {self.box!r} has x2 < x1 or y2 < y1; expected (x1, y1, x2, y2)")
        if self.color is not None and self.color not in GENEVAL_COLORS:
            raise ValueError(f"Detection color {self.color!r} is not one of GenEval's colours {GENEVAL_COLORS}")


@dataclass(frozen=True)
class GenEvalResult:
    """The verdict of the GenEval rules on one image.

    Attributes:
        correct: GenEval's benchmark verdict: every `include` clause holds (at least `count` objects, the `count`
            most confident of the right colour and position) and no `exclude` clause does.
        score: Flow-GRPO's partial credit in [0, 1]: the mean of the per-clause terms (see `evaluate_detections`).
            It is 1 exactly when every count is exact and every colour and position holds (Flow-GRPO's
            `strict_correct`).
        reason: The failed checks, one per line (`""` when there are none).
        tag: The metadata's task.
    """

    correct: bool
    score: float
    reason: str
    tag: str


# ------------------------------------------------------------------------------------------------------- metadata


def _load_json(value: Any, what: str) -> Any:
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"GenEval {what} is a string but not JSON ({error}): {value!r:.200}") from None
    return value


def _check_count(clause: Mapping[str, Any], where: str) -> int:
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"GenEval metadata {where}: 'count' must be a positive integer, got {count!r}")
    return count


def _drop_none(clause: Any) -> Any:
    return {k: v for k, v in clause.items() if v is not None} if isinstance(clause, Mapping) else clause


def parse_metadata(metadata: Mapping[str, Any] | str) -> dict[str, Any]:
    """Check GenEval metadata (a dict, or its JSON string) and return it as a dict.

    Expected: `{"tag": str, "include": [{"class": str, "count": int >= 1, "color"?: str, "position"?: [relation,
    index]}, ...], "exclude"?: [{"class": str, "count": int >= 1}, ...]}` with `tag` in `GENEVAL_TAGS`, `color` in
    `GENEVAL_COLORS`, `relation` in `RELATIONS` and `index` the position of an *earlier* `include` entry. Other keys
    (e.g. `prompt`) are kept and ignored. Keys whose value is `None` count as absent (a `datasets` column of dicts
    fills the keys a row lacks with `None`).

    Raises:
        ValueError: naming the first key or value that does not fit.
    """
    metadata = _load_json(metadata, "metadata")
    if not isinstance(metadata, Mapping):
        raise ValueError(f"GenEval metadata must be a dict (or its JSON string), got {type(metadata).__name__}")
    tag = metadata.get("tag")
    if tag not in GENEVAL_TAGS:
        raise ValueError(f"GenEval metadata 'tag' must be one of {GENEVAL_TAGS}, got {tag!r}")
    include = _load_json(metadata.get("include"), "'include'")
    if not isinstance(include, list) or not include:
        raise ValueError(f"GenEval metadata 'include' must be a non-empty list of clauses, got {include!r:.200}")
    exclude = _load_json(metadata.get("exclude") or [], "'exclude'")
    if not isinstance(exclude, list):
        raise ValueError(f"GenEval metadata 'exclude' must be a list of clauses, got {exclude!r:.200}")
    # A `datasets` column of dicts stores absent keys as None (Arrow structs): treat them as absent.
    include = [_drop_none(clause) for clause in include]
    exclude = [_drop_none(clause) for clause in exclude]
    for index, clause in enumerate(include):
        where = f"include[{index}]"
        if not isinstance(clause, Mapping) or not isinstance(clause.get("class"), str):
            raise ValueError(f"GenEval metadata {where} must be a dict with a 'class' string, got {clause!r:.200}")
        _check_count(clause, where)
        if "color" in clause and clause["color"] not in GENEVAL_COLORS:
            raise ValueError(f"GenEval metadata {where}: 'color' {clause['color']!r} is not one of {GENEVAL_COLORS}")
        if "position" in clause:
            position = clause["position"]
            if not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS:
                raise ValueError(
                    f"GenEval metadata {where}: 'position' must be [relation, index] with relation in {RELATIONS}, "
                    f"got {position!r}"
                )
            target = position[1]
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < index:
                raise ValueError(
                    f"GenEval metadata {where}: the position's index {target!r} must name an earlier include entry "
                    f"(0 to {index - 1})"
                )
    for index, clause in enumerate(exclude):
        where = f"exclude[{index}]"
        if not isinstance(clause, Mapping) or not isinstance(clause.get("class"), str):
            raise ValueError(f"GenEval metadata {where} must be a dict with a 'class' string, got {clause!r:.200}")
        _check_count(clause, where)
    return {**metadata, "include": include, "exclude": exclude}


# ---------------------------------------------------------------------------------------------------------- rules


def _box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two `(x1, y1, x2, y2)` boxes with GenEval's inclusive-pixel areas (`x2 - x1 + 1`)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_detections(
    detections: Sequence[Detection],
    tag: str,
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """GenEval's choice of detections: per class, those with confidence above the threshold (`counting_threshold`
    for the counting task, `threshold` otherwise), the `max_objects` most confident, most confident first, without
    those whose box has an IoU of at least `nms_threshold` with a more confident kept one (1.0: none dropped).
    Classes without a kept detection are absent."""
    minimum = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: -d.score):  # stable: ties keep their order
        if detection.score > minimum:
            by_class.setdefault(detection.class_name, []).append(detection)
    kept: dict[str, list[Detection]] = {}
    for class_name, candidates in by_class.items():
        candidates = candidates[:max_objects]
        chosen: list[Detection] = []
        while candidates:
            best = candidates.pop(0)
            chosen.append(best)
            if nms_threshold < 1:
                candidates = [d for d in candidates if _box_iou(best.box, d.box) < nms_threshold]
        kept[class_name] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relations of box A to box B (a subset of `RELATIONS`; image y grows downwards).

    The centre offset `A - B` is shrunk, on each axis, by `margin` times the sum of the two boxes' sizes on that axis
    (not past 0); a relation holds when the shrunk offset along its direction exceeds half the length of the
    *unshrunk* offset. So "left of" needs A's centre clearly left (beyond the margin) and mostly sideways (within
    about 60 degrees of the horizontal). Boxes whose centres are within the margin on both axes have no relation.
    """
    a, b = np.asarray(box_a[:4], dtype=np.float64), np.asarray(box_b[:4], dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - margin * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


ColorClassifier = Callable[[str, Sequence[Detection]], Sequence[str]]
"""`classify(class_name, detections)` -> one colour of `GENEVAL_COLORS` per detection."""


class _Colors:
    """Colours of the kept detections of each class, asked once per detection (the classifier is the costly part)."""

    def __init__(self, groups: dict[str, list[Detection]], classify: ColorClassifier | None) -> None:
        self.groups, self.classify, self.known = groups, classify, {}

    def __call__(self, class_name: str, count: int) -> list[str]:
        """The colours of the `count` most confident kept detections of `class_name`."""
        known = self.known.setdefault(class_name, [])
        missing = self.groups[class_name][len(known) : count]
        if missing:
            if all(d.color is not None for d in missing):
                known.extend(d.color for d in missing)
            elif self.classify is None:
                raise ValueError(
                    f"GenEval needs the colour of {class_name!r} detections that have none: set Detection.color or "
                    "pass classify_colors"
                )
            else:
                colors = list(self.classify(class_name, missing))
                if len(colors) != len(missing) or any(c not in GENEVAL_COLORS for c in colors):
                    raise ValueError(
                        f"classify_colors returned {colors!r} for {len(missing)} {class_name!r} detection(s); "
                        f"expected one of {GENEVAL_COLORS} per detection"
                    )
                known.extend(d.color if d.color is not None else c for d, c in zip(missing, colors))
        return known[:count]


def _count_term(expected: int, found: int) -> float:
    return max(0.0, 1.0 - abs(expected - found) / expected)


def _positions_hold(
    objects: Sequence[Detection], targets: Sequence[Detection], relation: str, margin: float
) -> tuple[bool, set[str]]:
    """Whether `relation` holds from every object to every target; else the relations of the first failing pair."""
    for obj in objects:
        for target in targets:
            relations = relative_position(obj.box, target.box, margin)
            if relation not in relations:
                return False, relations
    return True, set()


def evaluate_detections(
    metadata: Mapping[str, Any] | str,
    detections: Sequence[Detection],
    *,
    classify_colors: ColorClassifier | None = None,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
) -> GenEvalResult:
    """Apply GenEval's rules to the detections of one image.

    The detections are first selected with `select_detections` (confidence threshold, at most `max_objects` per
    class, optional NMS). Then, for `correct` (GenEval's `evaluate`), each `include` clause, in order, with `found`
    its class's `count` most confident detections:

    - presence / count: fails when fewer than `count` are found;
    - colour: fails when fewer than `count` of `found` have the clause's colour;
    - position `[relation, i]` (checked only if the above passed): fails when include clause `i` failed, or when
      `relative_position(obj, target)` lacks the relation for any pair of an object of `found` and an object found
      for clause `i`;

    and each `exclude` clause fails when `count` or more detections of its class are kept. `correct` is True when
    nothing failed.

    `score` is Flow-GRPO's partial credit: per include clause, with `n` its count and `k` the number of kept
    detections of its class (all of them, not the `n` most confident), a count term `max(0, 1 - |n - k| / n)`; if
    `k != n` and the clause has a colour or a position, one more term of 0; otherwise a colour term
    `1 - |n - c| / n` with `c` the number of them with the right colour, and, when the colour held (or there is
    none), a position term of 1 if the relation holds for every pair and 0 if not. The score is the mean of the
    terms. Exclude clauses do not enter it (exact counts already penalise extra objects).

    Args:
        metadata: GenEval metadata (see `parse_metadata`).
        detections: The detections of the image, in any order.
        classify_colors: `classify(class_name, detections)` -> colours, called for detections without `color`,
            only when a colour rule needs them.
        threshold, counting_threshold, max_objects, nms_threshold: See `select_detections` (GenEval's defaults).
        position_threshold: The margin of `relative_position`.
    """
    metadata = parse_metadata(metadata)
    tag = metadata["tag"]
    groups = select_detections(
        detections,
        tag,
        threshold=threshold,
        counting_threshold=counting_threshold,
        max_objects=max_objects,
        nms_threshold=nms_threshold,
    )
    colors_of = _Colors(groups, classify_colors)
    reasons: list[str] = []

    # GenEval's benchmark verdict.
    correct = True
    matched: list[list[Detection] | None] = []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = groups.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = colors_of(name, count)
                if colors.count(clause["color"]) < count:
                    ok = False
                    others = ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors)
                    reasons.append(
                        f"expected {clause['color']} {name}>={count}, found {colors.count(clause['color'])} "
                        f"{clause['color']}; and {others}"
                    )
            if "position" in clause and ok:
                relation, target = clause["position"]
                if matched[target] is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    holds, found_relations = _positions_hold(found, matched[target], relation, position_threshold)
                    if not holds:
                        ok = False
                        reasons.append(
                            f"expected {name} {relation} target, found {' and '.join(sorted(found_relations))} target"
                        )
        correct = correct and ok
        matched.append(found if ok else None)
    for clause in metadata["exclude"]:
        name, count = clause["class"], clause["count"]
        if len(groups.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(groups[name])}")

    # Flow-GRPO's partial credit.
    terms: list[float] = []
    matched = []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = groups.get(name, [])
        terms.append(_count_term(count, len(found)))
        ok = len(found) == count
        if not ok:
            if len(found) > count:  # fewer is already explained above
                reasons.append(f"expected {name}=={count}, found {len(found)}")
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                right = colors_of(name, count).count(clause["color"])
                terms.append(_count_term(count, right))
                ok = right == count
            if "position" in clause and ok:
                relation, target = clause["position"]
                holds = (
                    matched[target] is not None
                    and _positions_hold(found, matched[target], relation, position_threshold)[0]
                )
                terms.append(1.0 if holds else 0.0)
                ok = holds
        matched.append(found if ok else None)
    score = sum(terms) / len(terms)
    return GenEvalResult(correct=correct, score=score, reason="\n".join(dict.fromkeys(reasons)), tag=tag)


def summarize(results: Sequence[GenEvalResult]) -> dict[str, float]:
    """GenEval's summary of a set of results (`evaluation/summary_scores.py`).

    Returns:
        `"geneval"`: the overall GenEval score, the mean over the tasks present of each task's accuracy;
        `"accuracy"`: the fraction of correct images; `"score"`: the mean partial credit; and
        `"accuracy/<tag>"`, `"score/<tag>"` for each task present.

    Raises:
        ValueError: if `results` is empty.
    """
    if not results:
        raise ValueError("summarize needs at least one GenEvalResult")
    summary = {
        "accuracy": float(np.mean([r.correct for r in results])),
        "score": float(np.mean([r.score for r in results])),
    }
    task_accuracies = []
    for tag in GENEVAL_TAGS:
        of_tag = [r for r in results if r.tag == tag]
        if of_tag:
            summary[f"accuracy/{tag}"] = float(np.mean([r.correct for r in of_tag]))
            summary[f"score/{tag}"] = float(np.mean([r.score for r in of_tag]))
            task_accuracies.append(summary[f"accuracy/{tag}"])
    summary["geneval"] = float(np.mean(task_accuracies))
    return summary


# ----------------------------------------------------------------------------------------------------- the models


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The box of a boolean mask as mmdet's Mask2Former gives it: `(min x, min y, max x + 1, max y + 1)`."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


class GenEvalScorer(RewardModel):
    """GenEval on images: Mask2Former detections -> CLIP colours where a rule needs them -> `evaluate_detections`.

    The detector (`transformers.Mask2FormerForUniversalSegmentation` + `AutoImageProcessor`) and CLIP
    (`transformers.CLIPModel` + `AutoProcessor`) are loaded on first use with `use_safetensors=True`, moved to
    `device`, put in eval mode and run under `torch.no_grad()`; they stay loaded.

    Detection: the processor's `post_process_instance_segmentation(..., return_binary_maps=True)` (Mask2Former's
    instance inference: the top `num_queries` (query, class) pairs, scored by class probability times mean mask
    probability) at the image's own size; each instance gives a `Detection` with its class name (the model config's
    `id2label`, with COCO's `mouse` / `remote` / `keyboard` renamed as GenEval spells them, `COCO_TO_GENEVAL_NAMES`),
    its score, its binary mask and the mask's box.

    Colour (GenEval's `color_classification`): the image is pasted through the object's mask on a `#999` grey
    background, cropped to the object's box and classified zero-shot among `GENEVAL_COLORS`, each colour's text
    embedding being the normalised mean of the normalised embeddings of `COLOR_TEMPLATES` (cached per class).

    Args:
        detector_id: Hub id or folder of a Mask2Former instance-segmentation checkpoint on COCO.
        clip_id: Hub id or folder of a CLIP model with its processor.
        device: Where to run both models. `None`: the current CUDA device if available, else the CPU; injected
            models then stay where they are.
        dtype: dtype of the weights when loading (ignored for injected models); embeddings are compared in float32.
        batch_size: Images per detector forward pass (object crops per CLIP forward pass too).
        offload: Keep both models on the CPU between calls and move each to `device` only while it runs: the
            detector for the detection pass of a call, CLIP from the first colour a call asks to the end of the call
            (frees accelerator memory for sampling and training, costs one copy of the weights per call).
        detector_revision, clip_revision: Hub revisions (branch, tag or commit), e.g. a `refs/pr/N` branch holding
            safetensors weights.
        detector, detector_processor, clip_model, clip_processor: Already loaded models / processors to use instead
            of loading the ids (e.g. tiny random ones in tests).
        threshold, counting_threshold, max_objects, nms_threshold, position_threshold: GenEval's rule constants
            (see `evaluate_detections`); the defaults are GenEval's.
    """

    def __init__(
        self,
        detector_id: str = DEFAULT_DETECTOR_ID,
        clip_id: str = DEFAULT_CLIP_ID,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        offload: bool = False,
        detector_revision: str | None = None,
        clip_revision: str | None = None,
        detector: torch.nn.Module | None = None,
        detector_processor: Any = None,
        clip_model: torch.nn.Module | None = None,
        clip_processor: Any = None,
        threshold: float = THRESHOLD,
        counting_threshold: float = COUNTING_THRESHOLD,
        max_objects: int = MAX_OBJECTS,
        nms_threshold: float = NMS_THRESHOLD,
        position_threshold: float = POSITION_THRESHOLD,
    ) -> None:
        check_batch_size(batch_size)
        for name, value in (("threshold", threshold), ("counting_threshold", counting_threshold)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be a positive integer, got {max_objects}")
        super().__init__(device=device, offload=offload)
        self.detector_id, self.clip_id = detector_id, clip_id
        self.dtype = dtype
        self.batch_size = batch_size
        self.detector_revision, self.clip_revision = detector_revision, clip_revision
        self.detector, self.detector_processor = detector, detector_processor
        self.clip_model, self.clip_processor = clip_model, clip_processor
        self.rules = {
            "threshold": threshold,
            "counting_threshold": counting_threshold,
            "max_objects": max_objects,
            "nms_threshold": nms_threshold,
            "position_threshold": position_threshold,
        }
        # Each model's compute device once it is loaded and placed (the base's single `_compute_device` is unused).
        self._detector_device: torch.device | None = None
        self._clip_device: torch.device | None = None
        self._color_embeddings: dict[str, torch.Tensor] = {}

    @property
    def is_loaded(self) -> bool:
        """Whether both models and processors are in memory (loaded or injected)."""
        return all(
            x is not None for x in (self.detector, self.detector_processor, self.clip_model, self.clip_processor)
        )

    def _load_detector(self) -> None:
        if self._detector_device is not None:
            return
        if self.detector_processor is None:
            from transformers import AutoImageProcessor

            self.detector_processor = AutoImageProcessor.from_pretrained(
                self.detector_id, revision=self.detector_revision
            )
        loaded_here = self.detector is None
        if loaded_here:
            from transformers import Mask2FormerForUniversalSegmentation

            try:
                model = Mask2FormerForUniversalSegmentation.from_pretrained(
                    self.detector_id, revision=self.detector_revision, dtype=self.dtype, use_safetensors=True
                )
            except ImportError as error:  # transformers builds Mask2Former's training loss, which needs scipy
                raise ImportError(
                    f"The GenEval detector (Mask2Former) failed to load: {error}. transformers' Mask2Former needs "
                    "scipy even for inference (it builds its training loss): pip install scipy."
                ) from error
            self.detector = model
        self._detector_device = self._place([self.detector], loaded_here)

    def _load_clip(self) -> None:
        if self._clip_device is not None:
            return
        if self.clip_processor is None:
            from transformers import AutoProcessor

            self.clip_processor = AutoProcessor.from_pretrained(self.clip_id, revision=self.clip_revision)
        loaded_here = self.clip_model is None
        if loaded_here:
            from transformers import CLIPModel

            self.clip_model = CLIPModel.from_pretrained(
                self.clip_id, revision=self.clip_revision, dtype=self.dtype, use_safetensors=True
            )
        self._clip_device = self._place([self.clip_model], loaded_here)

    def _detector_on_device(self) -> contextlib.AbstractContextManager[None]:
        self._load_detector()
        return offloaded([self.detector], self._detector_device, self.offload)

    def _clip_on_device(self) -> contextlib.AbstractContextManager[None]:
        self._load_clip()
        return offloaded([self.clip_model], self._clip_device, self.offload)

    def load(self) -> None:
        """Load both models and processors if they are not loaded yet (otherwise done on first use)."""
        self._load_detector()
        self._load_clip()

    def class_names(self) -> list[str]:
        """The detector's classes as GenEval names them (`id2label` with `COCO_TO_GENEVAL_NAMES` applied)."""
        self._load_detector()
        id2label = self.detector.config.id2label
        return [COCO_TO_GENEVAL_NAMES.get(id2label[i], id2label[i]) for i in sorted(id2label)]

    def detect(self, images: Sequence[Image.Image | np.ndarray]) -> list[list[Detection]]:
        """Mask2Former's instances in each image with a score of at least the lowest rule threshold, as
        `Detection`s (class name, score, box, mask; no colour), most confident first."""
        with self._detector_on_device():
            return self._detect(images)

    @torch.no_grad()
    def _detect(self, images: Sequence[Image.Image | np.ndarray]) -> list[list[Detection]]:
        parameter = next(self.detector.parameters())
        names = {i: COCO_TO_GENEVAL_NAMES.get(label, label) for i, label in self.detector.config.id2label.items()}
        minimum = min(self.rules["threshold"], self.rules["counting_threshold"])
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            batch = [_to_rgb_image(image) for image in images[start : start + self.batch_size]]
            inputs = self.detector_processor(images=batch, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
            pixel_mask = inputs.get("pixel_mask")
            outputs = self.detector(
                pixel_values=pixel_values, pixel_mask=None if pixel_mask is None else pixel_mask.to(parameter.device)
            )
            outputs.class_queries_logits = outputs.class_queries_logits.float()
            outputs.masks_queries_logits = outputs.masks_queries_logits.float()
            processed = self.detector_processor.post_process_instance_segmentation(
                outputs,
                threshold=minimum,
                target_sizes=[(image.height, image.width) for image in batch],
                return_binary_maps=True,
            )
            for item in processed:
                maps = item["segmentation"]
                detections = []
                for index, segment in enumerate(item["segments_info"]):
                    mask = maps[index].cpu().numpy() > 0
                    if not mask.any():
                        continue
                    detections.append(
                        Detection(
                            class_name=names[segment["label_id"]],
                            score=float(segment["score"]),
                            box=_mask_box(mask),
                            mask=mask,
                        )
                    )
                detections.sort(key=lambda d: -d.score)
                results.append(detections)
        return results

    @torch.no_grad()
    def _color_text_embeddings(self, class_name: str) -> torch.Tensor:
        """`(len(GENEVAL_COLORS), dim)` normalised class embeddings of the colour classifier for `class_name`."""
        if class_name not in self._color_embeddings:
            parameter = next(self.clip_model.parameters())
            texts = [t.format(color=c, object=class_name) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            tokens = self.clip_processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            embeds = self.clip_model.get_text_features(**{k: v.to(parameter.device) for k, v in tokens.items()})
            embeds = getattr(embeds, "pooler_output", embeds)  # a tensor, or an output object in newer transformers
            embeds = torch.nn.functional.normalize(embeds.float(), dim=-1)
            embeds = embeds.reshape(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._color_embeddings[class_name] = torch.nn.functional.normalize(embeds, dim=-1)
        return self._color_embeddings[class_name]

    def classify_colors(
        self, image: Image.Image | np.ndarray, class_name: str, detections: Sequence[Detection]
    ) -> list[str]:
        """GenEval's colour of each detection of `class_name` in `image` (one of `GENEVAL_COLORS`)."""
        if not detections:
            return []
        with self._clip_on_device():
            return self._classify_colors(image, class_name, detections)

    @torch.no_grad()
    def _classify_colors(
        self, image: Image.Image | np.ndarray, class_name: str, detections: Sequence[Detection]
    ) -> list[str]:
        image = _to_rgb_image(image)
        blank = Image.new("RGB", image.size, CROP_BACKGROUND)
        crops = []
        for detection in detections:
            if detection.mask is not None:
                if detection.mask.shape != (image.height, image.width):
                    raise ValueError(
                        f"detection mask of shape {detection.mask.shape} for an image of {image.height}x{image.width}"
                    )
                pasted = Image.composite(image, blank, Image.fromarray(detection.mask.astype(np.uint8) * 255))
            else:
                pasted = image
            x1, y1, x2, y2 = detection.box
            crops.append(pasted.crop((math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2))))
        parameter = next(self.clip_model.parameters())
        text = self._color_text_embeddings(class_name)
        colors: list[str] = []
        for start in range(0, len(crops), self.batch_size):
            pixels = self.clip_processor.image_processor(crops[start : start + self.batch_size], return_tensors="pt")
            embeds = self.clip_model.get_image_features(
                pixel_values=pixels["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
            )
            embeds = getattr(embeds, "pooler_output", embeds)
            embeds = torch.nn.functional.normalize(embeds.float(), dim=-1)
            colors.extend(GENEVAL_COLORS[i] for i in (embeds @ text.T).argmax(dim=-1).tolist())
        return colors

    def score(
        self, images: Sequence[Image.Image | np.ndarray], metadatas: Sequence[Mapping[str, Any] | str]
    ) -> list[GenEvalResult]:
        """The GenEval result of each image for its metadata (dict or JSON string; see `parse_metadata`).

        Raises:
            ValueError: if the lengths differ, a metadata is malformed, or it names a class the detector does not
                know (the error lists the detector's classes).
        """
        if len(images) != len(metadatas):
            raise ValueError(f"got {len(images)} images for {len(metadatas)} GenEval metadata entries")
        parsed = [parse_metadata(metadata) for metadata in metadatas]
        if not images:
            return []
        known = set(self.class_names())
        for index, metadata in enumerate(parsed):
            for clause in (*metadata["include"], *metadata["exclude"]):
                if clause["class"] not in known:
                    raise ValueError(
                        f"GenEval metadata {index} names class {clause['class']!r}, which the detector "
                        f"{self.detector_id!r} does not detect; its classes: {sorted(known)}"
                    )
        found = self.detect(images)
        # CLIP is loaded and moved to the device on the first colour a rule asks for, and stays there to the end.
        with contextlib.ExitStack() as clip_on_device:
            clip_ready = False

            def classify(image: Any, class_name: str, objects: Sequence[Detection]) -> list[str]:
                nonlocal clip_ready
                if not objects:
                    return []
                if not clip_ready:
                    clip_on_device.enter_context(self._clip_on_device())
                    clip_ready = True
                return self._classify_colors(image, class_name, objects)

            return [
                evaluate_detections(
                    metadata, detections, classify_colors=functools.partial(classify, image), **self.rules
                )
                for image, metadata, detections in zip(images, parsed, found)
            ]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(detector_id={self.detector_id!r}, clip_id={self.clip_id!r}, "
            f"loaded={self.is_loaded})"
        )


# ------------------------------------------------------------------------------------------------------ the reward

_FIELD_COLUMNS = ("tag", "include", "exclude")


class GenEvalReward:
    """GenEval as a reward function: Flow-GRPO's partial credit (default) or GenEval's verdict (`strict=True`).

    Each prompt's GenEval metadata comes from a dataset column, passed as a keyword (TRL's convention): the column
    `metadata_column` (default `"metadata"`) holding the whole metadata, as a dict or its JSON string; or, when there
    is no such column, GenEval's own fields as columns `tag`, `include` and (optionally) `exclude` (lists as such or
    as JSON strings). A row whose metadata is `None` gets `None` (not applicable).

    Args:
        scorer: The `GenEvalScorer` that runs the models (shared by the two built-ins, so that they load them once).
            Default: a new one with the default checkpoints.
        strict: Return 1.0 / 0.0 for GenEval's benchmark verdict (for evaluation) instead of the partial credit (for
            training).
        metadata_column: The column holding the whole metadata.
    """

    def __init__(
        self, scorer: GenEvalScorer | None = None, *, strict: bool = False, metadata_column: str = "metadata"
    ) -> None:
        self.scorer = scorer if scorer is not None else GenEvalScorer()
        self.strict = strict
        self.metadata_column = metadata_column

    def metadata_from_columns(self, count: int, columns: Mapping[str, Any]) -> list[Any]:
        """The metadata of each of `count` samples from the dataset columns (see the class docstring).

        Raises:
            ValueError: if neither the metadata column nor the `tag` and `include` columns are there, or a column
                does not have one entry per sample.
        """
        if self.metadata_column in columns:
            values = list(columns[self.metadata_column])
            source = f"column {self.metadata_column!r}"
        elif "tag" in columns and "include" in columns:
            tags, includes = list(columns["tag"]), list(columns["include"])
            excludes = list(columns["exclude"]) if "exclude" in columns else [None] * len(tags)
            if not len(tags) == len(includes) == len(excludes):
                raise ValueError(
                    f"GenEval columns 'tag', 'include', 'exclude' have {len(tags)}, {len(includes)}, "
                    f"{len(excludes)} entries; expected one per sample"
                )
            values = [
                None if include is None else {"tag": tag, "include": include, "exclude": exclude or []}
                for tag, include, exclude in zip(tags, includes, excludes)
            ]
            source = "columns 'tag' / 'include' / 'exclude'"
        else:
            available = sorted(k for k in columns if k not in ("trainer_state", "log_extra", "log_metric"))
            raise ValueError(
                "The GenEval reward needs each prompt's GenEval metadata in a dataset column: "
                f"{self.metadata_column!r} "
                '(a dict or JSON string {"tag": ..., "include": [...], "exclude": [...]}, as in GenEval\'s '
                "evaluation_metadata.jsonl), or the columns 'tag' and 'include' (and optionally 'exclude'). The "
                f"reward got the columns {available}. Add the column to the prompt dataset, or pass "
                "GenEvalReward(metadata_column=...) naming the one that holds it."
            )
        if len(values) != count:
            raise ValueError(f"GenEval metadata ({source}) has {len(values)} entries for {count} images")
        return values

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any
    ) -> list[float | None]:
        """Reward-function entry point: one value per image, `None` where the row has no metadata.

        Args:
            prompts: One prompt per image (not read: GenEval scores against the metadata).
            images: PIL images (any mode) or uint8 numpy arrays.
            **kwargs: The dataset columns (the metadata, see the class docstring), `trainer_state`, and TRL's
                `log_extra`: when given, the reason of each verdict is logged as the column `geneval_reason`.
        """
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        metadatas = self.metadata_from_columns(len(images), kwargs)
        indices = [i for i, metadata in enumerate(metadatas) if metadata is not None]
        results = self.scorer.score([images[i] for i in indices], [metadatas[i] for i in indices])
        rewards: list[float | None] = [None] * len(images)
        reasons: list[str | None] = [None] * len(images)
        for i, result in zip(indices, results):
            rewards[i] = float(result.correct) if self.strict else result.score
            reasons[i] = result.reason
        log_extra = kwargs.get("log_extra")
        if callable(log_extra):
            log_extra("geneval_reason", reasons)
        return rewards

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(strict={self.strict}, metadata_column={self.metadata_column!r}, {self.scorer!r})"
        )


_SHARED_SCORER = GenEvalScorer()
geneval_reward = GenEvalReward(_SHARED_SCORER)
"""The built-in `"geneval"` reward: Flow-GRPO's partial credit, for training. Models are loaded on first use."""
geneval_strict_reward = GenEvalReward(_SHARED_SCORER, strict=True)
"""The built-in `"geneval_strict"` reward: GenEval's verdict as 1.0 / 0.0, for evaluation (the same models)."""
