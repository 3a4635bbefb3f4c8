"""Tests for the rule-based GenEval-like evaluator of the shapes world (`trl_flow_grpo.toy.geneval`)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from trl_flow_grpo.toy import (
    CATEGORIES,
    COLORS,
    SHAPES,
    Requirement,
    Scene,
    ShapeObject,
    all_captions,
    detect_objects,
    evaluate,
    parse_prompt,
    render,
    sample_scene,
    score_image,
    shapes_geneval,
    sprite_widths,
)
from trl_flow_grpo.toy.geneval import (
    background_mask,
    requested_objects,
    shapes_geneval_no_extras,
    shapes_geneval_strict,
)


def _image(*objects: tuple[str, str, float, float, float]) -> Image.Image:
    """Render objects given as ``(colour, shape, cx, cy, half_size)``."""
    return render(Scene("", "", [ShapeObject(shape, color, cx, cy, s) for color, shape, cx, cy, s in objects]))


def _score(prompt: str, *objects: tuple[str, str, float, float, float]) -> float:
    return score_image(prompt, _image(*objects))[0]


def _scenes(per_category: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [
        sample_scene(rng, split, category=category)
        for category in CATEGORIES
        for split in ("train", "test")
        for _ in range(per_category)
    ]


def _noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) + np.random.default_rng(seed).normal(
        0, sigma, (image.height, image.width, 3)
    )
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _shift(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """Translate by (dx, dy) pixels, filling with black (no wrap-around)."""
    pixels = np.asarray(image)
    shifted = np.zeros_like(pixels)
    h, w = pixels.shape[:2]
    shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = pixels[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return Image.fromarray(shifted)


# ---------------------------------------------------------------------------------------------------------- parsing


def test_parse_prompt():
    parsed = parse_prompt("three green triangles")
    assert parsed.category == "counting" and parsed.requirements == [Requirement("green", "triangle", 3)]
    parsed = parse_prompt("  A Red   Circle. ")
    assert parsed.category == "single_object" and parsed.requirements == [Requirement("red", "circle", 1)]
    parsed = parse_prompt("a red circle and a blue square")
    assert parsed.category == "two_object" and parsed.relation is None
    assert parsed.requirements == [Requirement("red", "circle"), Requirement("blue", "square")]
    parsed = parse_prompt("a yellow triangle above a green circle")
    assert parsed.category == "position" and parsed.relation == "above"
    assert parsed.requirements == [Requirement("yellow", "triangle"), Requirement("green", "circle")]
    assert parse_prompt("one blue square").requirements == [Requirement("blue", "square", 1)]
    for caption in all_captions():  # the whole world parses
        parse_prompt(caption)


@pytest.mark.parametrize(
    "prompt",
    [
        "a purple circle",
        "a red hexagon",
        "two red circle",
        "one red circles",
        "five red circles",
        "a red circle and a red circle",
        "a red circle left of a red circle",
        "a red circle near a blue square",
        "a photo of a cat",
        "",
    ],
)
def test_parse_prompt_rejects_prompts_outside_the_grammar(prompt):
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(prompt)
    with pytest.raises(ValueError):
        score_image(prompt, Image.new("RGB", (32, 32)))


# -------------------------------------------------------------------------------------------------------- detection


def test_detect_objects():
    image = _image(("red", "circle", 8, 8, 5), ("blue", "square", 24, 8, 4), ("yellow", "triangle", 16, 24, 5.5))
    detections = detect_objects(image)
    found = sorted((d.color, d.shape) for d in detections)
    assert found == [("blue", "square"), ("red", "circle"), ("yellow", "triangle")]
    square = next(d for d in detections if d.shape == "square")
    assert square.area == 64 and square.bbox == (20, 4, 27, 11)
    assert square.centroid == pytest.approx((24.0, 8.0))
    # numpy input works too, and gives the same answer
    assert detect_objects(np.asarray(image)) == detections


def test_detect_objects_ignores_specks_and_off_palette_pixels():
    pixels = np.asarray(_image(("green", "circle", 16, 16, 5))).copy()
    pixels[2, 2:4] = COLORS["red"]  # a 2-pixel speck
    pixels[28:31, 2:5] = (128, 128, 128)  # grey is no palette colour
    pixels[28:31, 27:30] = (255, 255, 255)  # neither is white
    detections = detect_objects(Image.fromarray(pixels))
    assert [(d.color, d.shape) for d in detections] == [("green", "circle")]
    # the background mask is what no detection is made of: black, grey and white, not the circle nor the speck
    mask = background_mask(pixels)
    assert mask.shape == (32, 32) and mask[0, 0] and mask[29, 3] and mask[29, 28]
    assert not mask[16, 16] and not mask[2, 2]


@pytest.mark.parametrize("size", [32, 64])
def test_every_sprite_is_recognised(size):
    """`sample_scene` draws pixel-aligned sprites from a finite set; every one of them (and its blurred and noisy
    versions) is detected with the right colour and shape."""
    perturbations = {
        "exact": lambda image: image,
        "blur0.6": lambda image: image.filter(ImageFilter.GaussianBlur(0.6 * size / 32)),
        "blur1.0": lambda image: image.filter(ImageFilter.GaussianBlur(1.0)),
        "noise20": lambda image: _noise(image, 20, seed=size),
    }
    for shape in SHAPES:
        for width in sprite_widths(size):
            for color in COLORS:
                offset = 5 * size // 32
                obj = ShapeObject(shape, color, offset + width / 2, offset + width / 2, width / 2)
                image = render(Scene("", "", [obj]), size)
                for name, perturb in perturbations.items():
                    detections = detect_objects(perturb(image))
                    assert [(d.color, d.shape) for d in detections] == [(color, shape)], (name, obj, detections)


def test_off_grid_shapes_are_recognised():
    """Shapes at arbitrary sub-pixel positions and sizes (as a generator may draw them) are recognised too."""
    rng = random.Random(0)
    hits = []
    for i in range(300):
        obj = ShapeObject(SHAPES[i % 3], "blue", rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3.5, 6))
        detections = detect_objects(render(Scene("", "", [obj])))
        hits.append([(d.color, d.shape) for d in detections] == [("blue", obj.shape)])
    assert np.mean(hits) >= 0.98


def test_black_image_scores_zero():
    black = Image.new("RGB", (32, 32))
    assert detect_objects(black) == []
    for prompt in (
        "a red circle",
        "three green triangles",
        "a red circle and a blue square",
        "a red circle above a blue square",
    ):
        score, details = score_image(prompt, black)
        assert score == 0.0 and details["correct"] is False


# ---------------------------------------------------------------------------------------------------------- scoring


def test_exact_renders_score_one():
    scenes = _scenes(per_category=25, seed=0)
    for scene in scenes:
        score, details = score_image(scene.caption, render(scene))
        assert score == 1.0 and details["correct"] and details["category"] == scene.category, (scene, details)


def test_single_object_partial_credit():
    prompt = "a red circle"
    assert _score(prompt, ("red", "circle", 16, 16, 5)) == 1.0
    assert _score(prompt, ("blue", "circle", 16, 16, 5)) == 0.5  # wrong colour
    assert _score(prompt, ("red", "square", 16, 16, 5)) == 0.5  # wrong shape
    assert _score(prompt, ("blue", "square", 16, 16, 5)) == 0.0  # both wrong
    # the best detection counts; extra objects are not penalised
    assert _score(prompt, ("blue", "square", 8, 8, 4), ("red", "circle", 22, 22, 5)) == 1.0
    assert _score(prompt, ("blue", "square", 8, 8, 4), ("red", "triangle", 22, 22, 5)) == 0.5


def test_counting_partial_credit():
    corners = [(8, 8), (24, 8), (8, 24), (24, 24)]
    prompt = "three green triangles"

    def triangles(n, color="green", shape="triangle"):
        return [(color, shape, x, y, 4.5) for x, y in corners[:n]]

    assert _score(prompt, *triangles(3)) == 1.0
    assert _score(prompt, *triangles(2)) == pytest.approx(1 - 1 / 3)  # one missing
    assert _score(prompt, *triangles(4)) == pytest.approx(1 - 1 / 3)  # one extra
    assert _score(prompt, *triangles(1)) == pytest.approx(1 - 2 / 3)
    assert _score(prompt, *triangles(3, shape="circle")) == 0.0  # wrong shape does not count
    assert _score(prompt, *triangles(3, color="red")) == 0.0  # nor does wrong colour
    # same colour, other shape: ignored (neither counted nor penalised)
    assert _score(prompt, *triangles(3), ("green", "circle", *corners[3], 4.5)) == 1.0
    assert _score("two red squares", *triangles(4, color="red", shape="square")) == 0.0  # |4 - 2| / 2 = 1
    score, details = score_image(prompt, _image(*triangles(2)))
    assert details["expected_count"] == 3 and details["detected_count"] == 2 and not details["correct"]


def test_two_object_partial_credit():
    prompt = "a red circle and a blue square"
    assert _score(prompt, ("red", "circle", 8, 16, 5), ("blue", "square", 24, 16, 5)) == 1.0
    assert _score(prompt, ("red", "circle", 8, 16, 5), ("blue", "circle", 24, 16, 5)) == 0.75  # (1 + 0.5) / 2
    assert _score(prompt, ("red", "triangle", 8, 16, 5), ("yellow", "square", 24, 16, 5)) == 0.5  # (.5 + .5) / 2
    assert _score(prompt, ("red", "circle", 8, 16, 5)) == 0.5  # (1 + 0) / 2: one object missing
    # One detection cannot serve both objects: a red square alone is (0.5 + 0) / 2.
    assert _score(prompt, ("red", "square", 16, 16, 5)) == 0.25
    assert _score(prompt, ("green", "triangle", 8, 16, 5), ("yellow", "triangle", 24, 16, 5)) == 0.0


def test_position_partial_credit():
    prompt = "a red circle left of a blue square"
    left, right = (8, 16), (24, 16)
    assert _score(prompt, ("red", "circle", *left, 5), ("blue", "square", *right, 5)) == 1.0
    assert _score(prompt, ("red", "circle", *right, 5), ("blue", "square", *left, 5)) == 0.5  # swapped: 1 * 0.5
    # Swapped, and a blue circle instead of the square: (1 + 0.5) / 2 * 0.5 = 0.375 beats the crossed assignment
    # (blue circle as the red circle, red circle as the blue square: (0.5 + 0) / 2 * 1 = 0.25).
    score, details = score_image(prompt, _image(("red", "circle", *right, 5), ("blue", "circle", *left, 5)))
    assert score == 0.375 and details["object_credits"] == [1.0, 0.5] and details["relation_holds"] is False
    # Mostly vertical arrangement: 4 px to the left but 20 px above, so not "left of".
    assert _score(prompt, ("red", "circle", 10, 6, 4), ("blue", "square", 14, 26, 4)) == 0.5
    assert (
        _score("a red circle above a blue square", ("red", "circle", 10, 6, 4), ("blue", "square", 14, 26, 4)) == 1.0
    )
    # One object only: the relation cannot hold: (1 + 0) / 2 * 0.5.
    assert _score(prompt, ("red", "circle", *left, 5)) == 0.25
    # Vertical relations, exact and swapped.
    prompt = "a yellow triangle above a green circle"
    assert _score(prompt, ("yellow", "triangle", 16, 8, 5), ("green", "circle", 16, 24, 5)) == 1.0
    assert _score(prompt, ("yellow", "triangle", 16, 24, 5), ("green", "circle", 16, 8, 5)) == 0.5
    assert (
        _score(
            "a green circle below a yellow triangle", ("yellow", "triangle", 16, 8, 5), ("green", "circle", 16, 24, 5)
        )
        == 1.0
    )


# ------------------------------------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "name",
    ["noise10", "noise20", "shift", "blur0.6", "blur0.6+noise15"],
)
def test_perturbed_renders_still_score_one(name):
    perturb = {
        "noise10": lambda image, i: _noise(image, 10, i),
        "noise20": lambda image, i: _noise(image, 20, i),
        "shift": lambda image, i: _shift(image, *[(1, 0), (-1, 0), (0, 1), (0, -1)][i % 4]),
        "blur0.6": lambda image, i: image.filter(ImageFilter.GaussianBlur(0.6)),
        "blur0.6+noise15": lambda image, i: _noise(image.filter(ImageFilter.GaussianBlur(0.6)), 15, i),
    }[name]
    scenes = _scenes(per_category=15, seed=1)
    correct = {category: [] for category in CATEGORIES}
    for i, scene in enumerate(scenes):
        correct[scene.category].append(score_image(scene.caption, perturb(render(scene), i))[0] == 1.0)
    for category, flags in correct.items():
        assert np.mean(flags) >= 0.9, (name, category, np.mean(flags))


def test_off_colour_renders_still_score_one():
    """Dimmed and tinted colours (a generator's typical error) are still matched to the palette."""
    rng = np.random.default_rng(0)
    scenes = _scenes(per_category=10, seed=2)
    correct = []
    for scene in scenes:
        pixels = np.asarray(render(scene), dtype=np.float64)
        foreground = pixels.max(axis=-1, keepdims=True) > 0
        tinted = np.where(foreground, pixels * rng.uniform(0.6, 1.0) + rng.uniform(-40, 40, 3), pixels)
        image = Image.fromarray(np.clip(tinted, 0, 255).round().astype(np.uint8))
        correct.append(score_image(scene.caption, image)[0] == 1.0)
    assert np.mean(correct) >= 0.9


# ------------------------------------------------------------------------------------------------- reward, evaluate


def test_shapes_geneval_reward_function():
    prompts = ["a red circle", "a red circle", "two blue squares"]
    images = [_image(("red", "circle", 16, 16, 5)), _image(("red", "square", 16, 16, 5)), Image.new("RGB", (32, 32))]
    rewards = shapes_geneval(prompts=prompts, images=images, category=["single_object"] * 3, trainer_state=None)
    assert rewards == [1.0, 0.5, 0.0] and all(isinstance(r, float) for r in rewards)
    with pytest.raises(ValueError, match="prompts"):
        shapes_geneval(prompts=prompts, images=images[:2])


def test_no_extras_reward_scales_the_score_by_the_share_of_asked_objects():
    prompt = "a red circle and a blue square"
    pair = [("red", "circle", 8, 8, 4), ("blue", "square", 24, 8, 4)]
    spray = pair + [("green", "triangle", 8, 24, 4), ("yellow", "circle", 24, 24, 4)]
    images = [_image(*pair), _image(*spray), _image(pair[0])]
    assert shapes_geneval(prompts=[prompt] * 3, images=images) == [1.0, 1.0, 0.5]  # the hole: extras pass
    assert shapes_geneval_no_extras(prompts=[prompt] * 3, images=images) == [1.0, 0.5, 0.5]  # 2 asked of 4 seen
    three = [("red", "circle", x, 16, 3) for x in (5, 16, 27)]
    counting = [_image(*three), _image(*three, ("red", "circle", 16, 27, 3))]
    assert shapes_geneval_no_extras(prompts=["three red circles"] * 2, images=counting) == [1.0, 2 / 3 * 3 / 4]
    assert [requested_objects(p) for p in ("a red circle", prompt, "four blue squares")] == [1, 2, 4]
    with pytest.raises(ValueError, match="prompts"):
        shapes_geneval_no_extras(prompts=[prompt], images=images)
    assert shapes_geneval_strict(prompts=[prompt] * 3, images=images) == [1.0, 0.0, 0.5]  # extras: no credit
    assert shapes_geneval_strict(prompts=["three red circles"] * 2, images=counting) == [1.0, 0.0]
    with pytest.raises(ValueError, match="prompts"):
        shapes_geneval_strict(prompts=[prompt], images=images)


def test_evaluate():
    black = Image.new("RGB", (32, 32))
    prompts = [
        "a red circle",
        "a red circle",
        "two blue squares",
        "a red circle and a blue square",
        "a red circle left of a blue square",
    ]
    images = [
        _image(("red", "circle", 16, 16, 5)),
        _image(("red", "square", 16, 16, 5)),
        _image(("blue", "square", 8, 16, 4), ("blue", "square", 24, 16, 4)),
        black,
        _image(("red", "circle", 24, 16, 5), ("blue", "square", 8, 16, 5)),
    ]
    results = evaluate(prompts, images)
    assert results["accuracy"] == pytest.approx(2 / 5)
    assert results["score"] == pytest.approx((1 + 0.5 + 1 + 0 + 0.5) / 5)
    assert results["accuracy/single_object"] == 0.5 and results["score/single_object"] == 0.75
    assert results["accuracy/counting"] == 1.0
    assert results["accuracy/two_object"] == 0.0 and results["score/two_object"] == 0.0
    assert results["accuracy/position"] == 0.0 and results["score/position"] == 0.5
    assert set(results) == {"accuracy", "score"} | {f"{k}/{c}" for k in ("accuracy", "score") for c in CATEGORIES}
    only_counting = evaluate(["two blue squares"], [images[2]])
    assert set(only_counting) == {"accuracy", "score", "accuracy/counting", "score/counting"}
