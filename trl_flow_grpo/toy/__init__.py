"""A synthetic "shapes" text-to-image world and its rule-based GenEval-like evaluator.

`trl_flow_grpo.toy.shapes` defines the world (captions, scenes, rendering, held-out split, datasets) and
`trl_flow_grpo.toy.geneval` scores generated images against prompts (`shapes_geneval` is a reward function).
Neither needs torch; importing this package is cheap.
"""

from .geneval import (
    Detection,
    ParsedPrompt,
    Requirement,
    detect_objects,
    evaluate,
    parse_prompt,
    score_image,
    shapes_geneval,
)
from .shapes import (
    BACKGROUND,
    CATEGORIES,
    CIRCLE_INSET,
    COLORS,
    NUMBERS,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    all_captions,
    caption_category,
    caption_split,
    make_image_dataset,
    make_prompt_dataset,
    relation_holds,
    render,
    sample_scene,
    shape_mask,
    sprite_widths,
)

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "CIRCLE_INSET",
    "COLORS",
    "NUMBERS",
    "RELATIONS",
    "SHAPES",
    "Detection",
    "ParsedPrompt",
    "Requirement",
    "Scene",
    "ShapeObject",
    "all_captions",
    "caption_category",
    "caption_split",
    "detect_objects",
    "evaluate",
    "make_image_dataset",
    "make_prompt_dataset",
    "parse_prompt",
    "relation_holds",
    "render",
    "sample_scene",
    "score_image",
    "shape_mask",
    "shapes_geneval",
    "sprite_widths",
]
