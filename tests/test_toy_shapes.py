"""Tests for the synthetic shapes world (`trl_flow_grpo.toy.shapes`)."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from trl_flow_grpo.toy import (
    BACKGROUND,
    CATEGORIES,
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
    score_image,
    shape_mask,
    sprite_widths,
)

_C = "(red|green|blue|yellow)"
_S = "(circle|square|triangle)"
GRAMMAR = {
    "single_object": re.compile(rf"^a {_C} {_S}$"),
    "counting": re.compile(rf"^(two|three|four) {_C} {_S}s$"),
    "two_object": re.compile(rf"^a {_C} {_S} and a {_C} {_S}$"),
    "position": re.compile(rf"^a {_C} {_S} (left of|right of|above|below) a {_C} {_S}$"),
}
EXPECTED_SIZES = {"single_object": 12, "counting": 36, "two_object": 132, "position": 528}
EXPECTED_TEST_SIZES = {"single_object": 2, "counting": 7, "two_object": 26, "position": 106}


def _scenes(split: str, per_category: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, split, category=category) for category in CATEGORIES for _ in range(per_category)]


def test_constants():
    assert set(COLORS) == {"red", "green", "blue", "yellow"}
    colors = np.array(list(COLORS.values()), dtype=float)
    distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() >= 250  # well separated
    assert np.linalg.norm(colors - np.array(BACKGROUND), axis=-1).min() >= 250
    assert BACKGROUND == (0, 0, 0)
    assert SHAPES == ("circle", "square", "triangle")
    assert NUMBERS == {1: "one", 2: "two", 3: "three", 4: "four"}
    assert RELATIONS == ("left of", "right of", "above", "below")
    assert CATEGORIES == ("single_object", "counting", "two_object", "position")


def test_all_captions_obey_the_grammar():
    captions = all_captions()
    assert captions == sorted(captions) and len(set(captions)) == len(captions)
    by_category = Counter(caption_category(caption) for caption in captions)
    assert dict(by_category) == EXPECTED_SIZES
    for caption in captions:
        category = caption_category(caption)
        match = GRAMMAR[category].match(caption)
        assert match, caption
        if category in ("two_object", "position"):
            groups = match.groups()
            assert groups[:2] != groups[-2:], caption  # two different objects
    assert all_captions() == captions  # deterministic
    with pytest.raises(ValueError, match="not a caption"):
        caption_split("a purple circle")
    with pytest.raises(ValueError, match="split"):
        all_captions("validation")


def test_held_out_split():
    train, test = set(all_captions("train")), set(all_captions("test"))
    assert not train & test
    assert train | test == set(all_captions())
    assert 0.17 <= len(test) / (len(train) + len(test)) <= 0.23
    test_sizes = Counter(caption_category(caption) for caption in test)
    assert dict(test_sizes) == EXPECTED_TEST_SIZES  # every category has held-out captions
    for category, size in test_sizes.items():
        assert 0.15 <= size / EXPECTED_SIZES[category] <= 0.25
    for caption in train:
        assert caption_split(caption) == "train" and caption_split(caption) == caption_split(caption.upper() + "  ")
    # Equivalent captions are one composition and share a split.
    for caption in all_captions():
        words = caption.split()
        if caption_category(caption) == "two_object":
            swapped = " ".join(words[4:] + ["and"] + words[:3])
        elif caption_category(caption) == "position":
            relation = " ".join(words[3:-3])
            inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
            swapped = " ".join(words[-3:] + [inverse] + words[:3])
        else:
            continue
        assert caption_split(swapped) == caption_split(caption), (caption, swapped)


def test_sample_scene_is_deterministic_and_covers_categories():
    first = [sample_scene(random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng_a, rng_b = random.Random(3), random.Random(3)
    scenes_a = [sample_scene(rng_a) for _ in range(200)]
    scenes_b = [sample_scene(rng_b) for _ in range(200)]
    assert scenes_a == scenes_b
    assert set(Counter(scene.category for scene in scenes_a)) == set(CATEGORIES)
    assert scenes_a != [sample_scene(random.Random(4)) for _ in range(200)]
    for category in CATEGORIES:
        scene = sample_scene(random.Random(0), category=category)
        assert scene.category == category == caption_category(scene.caption)
    with pytest.raises(ValueError, match="category"):
        sample_scene(random.Random(0), category="counting_objects")


@pytest.mark.parametrize("split", ["train", "test"])
def test_scenes_match_their_captions(split):
    for scene in _scenes(split, per_category=40, seed=1):
        assert caption_split(scene.caption) == split
        assert GRAMMAR[scene.category].match(scene.caption)
        words = scene.caption.split()
        pairs = [(obj.color, obj.shape) for obj in scene.objects]
        if scene.category == "single_object":
            assert pairs == [(words[1], words[2])]
        elif scene.category == "counting":
            count = {"two": 2, "three": 3, "four": 4}[words[0]]
            assert pairs == [(words[1], words[2][:-1])] * count
        else:
            assert pairs == [(words[1], words[2]), (words[-2], words[-1])]
            assert pairs[0] != pairs[1]
        if scene.category == "position":
            relation = " ".join(words[3:-3])
            centroids = []
            for obj in scene.objects:
                ys, xs = np.nonzero(shape_mask(obj))
                centroids.append((xs.mean() + 0.5, ys.mean() + 0.5))
            assert relation_holds(relation, *centroids, min_offset=4.0, min_axis_fraction=0.7)
        # The evaluator agrees that the rendered scene shows its caption.
        score, details = score_image(scene.caption, render(scene))
        assert score == 1.0 and details["correct"], (scene, details)


@pytest.mark.parametrize("size", [32, 64])
def test_objects_inside_canvas_and_apart(size):
    rng = random.Random(size)
    for scene in [sample_scene(rng, size=size, category=category) for category in CATEGORIES for _ in range(25)]:
        masks = [shape_mask(obj, size) for obj in scene.objects]
        widths = sprite_widths(size, len(scene.objects))
        for obj, mask in zip(scene.objects, masks):
            assert 3.5 * size / 32 <= obj.size <= 6 * size / 32
            # pixel-aligned sprite: a whole number of pixels wide, its bounding square on pixel boundaries
            assert 2 * obj.size in widths and float(obj.cx - obj.size).is_integer()
            assert float(obj.cy - obj.size).is_integer()
            assert mask.any()
            # at least one free pixel between each object and the border
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            ys, xs = np.nonzero(mask)
            assert np.ptp(xs) + 1 >= 7 * size / 32 and np.ptp(ys) + 1 >= 6 * size / 32  # recognisable
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & masks[j]).any()
                # not even 4-adjacent (or one pixel apart): dilate one mask twice and compare
                grown = masks[i].copy()
                for _ in range(2):
                    grown[1:] |= grown[:-1].copy()
                    grown[:-1] |= grown[1:].copy()
                    grown[:, 1:] |= grown[:, :-1].copy()
                    grown[:, :-1] |= grown[:, 1:].copy()
                assert not (grown & masks[j]).any()


def test_sprite_widths():
    assert list(sprite_widths()) == list(range(7, 13))
    assert [max(sprite_widths(32, n)) for n in (1, 2, 3, 4)] == [12, 11, 10, 9]
    assert list(sprite_widths(64, 4)) == list(range(14, 19))


def test_render():
    scene = Scene(
        "a red triangle and a blue square",
        "two_object",
        [ShapeObject("triangle", "red", 8.0, 8.0, 5.0), ShapeObject("square", "blue", 24.0, 24.0, 4.0)],
    )
    image = render(scene)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    colours = {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}
    assert colours == {BACKGROUND, COLORS["red"], COLORS["blue"]}  # crisp: no blended pixels
    # The square covers pixel centres 20.5..27.5: an 8x8 block.
    blue = np.all(pixels == COLORS["blue"], axis=-1)
    assert blue.sum() == 64 and blue[20:28, 20:28].all()
    # The triangle points up: rows get wider downwards.
    red = np.all(pixels == COLORS["red"], axis=-1)
    widths = [int(row.sum()) for row in red if row.any()]
    assert widths == sorted(widths) and widths[0] < widths[-1] / 3
    assert render(scene, size=64).size == (64, 64)


def test_make_prompt_dataset():
    dataset = make_prompt_dataset(40, seed=0, split="train")
    assert dataset.column_names == ["prompt", "category"] and len(dataset) == 40
    assert Counter(dataset["category"]) == {category: 10 for category in CATEGORIES}
    train = set(all_captions("train"))
    for prompt, category in zip(dataset["prompt"], dataset["category"]):
        assert prompt in train and caption_category(prompt) == category
    # Within a category, every caption appears before any repeats (10 single-object training captions).
    singles = [p for p, c in zip(dataset["prompt"], dataset["category"]) if c == "single_object"]
    assert len(set(singles)) == 10
    assert make_prompt_dataset(40, seed=0, split="train")["prompt"] == dataset["prompt"]
    assert make_prompt_dataset(40, seed=1, split="train")["prompt"] != dataset["prompt"]

    test = make_prompt_dataset(9, seed=3, split="test", categories=["counting", "position"])
    assert len(test) == 9 and set(test["category"]) == {"counting", "position"}
    assert Counter(test["category"])["counting"] in (4, 5)
    assert set(test["prompt"]) <= set(all_captions("test"))
    with pytest.raises(ValueError, match="category"):
        make_prompt_dataset(4, seed=0, split="train", categories=["colors"])
    with pytest.raises(ValueError, match="split"):
        make_prompt_dataset(4, seed=0, split="val")


def test_make_prompt_dataset_caption_mix():
    """mix="captions": every training caption exactly once per pass, so the categories come in the proportions of the
    held-out evaluation (position dominates), with the right category column; an unknown mix names the choices."""
    train = all_captions("train")
    dataset = make_prompt_dataset(len(train), seed=0, split="train", mix="captions")
    assert sorted(dataset["prompt"]) == sorted(train)
    assert Counter(dataset["category"]) == Counter(caption_category(c) for c in train)
    assert all(caption_category(p) == c for p, c in zip(dataset["prompt"], dataset["category"]))
    counting = make_prompt_dataset(30, seed=1, split="test", categories=["counting", "position"], mix="captions")
    assert set(counting["category"]) <= {"counting", "position"} and len(set(counting["prompt"])) == 30
    with pytest.raises(ValueError, match="'balanced', 'captions'"):
        make_prompt_dataset(4, seed=0, split="train", mix="uniform")


def test_make_image_dataset():
    images, captions = make_image_dataset(12, seed=5)
    assert len(images) == len(captions) == 12
    assert all(isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB" for image in images)
    assert all(caption_split(caption) == "train" for caption in captions)
    images_again, captions_again = make_image_dataset(12, seed=5)
    assert captions_again == captions
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, images_again))
    assert make_image_dataset(12, seed=6)[1] != captions
    test_images, test_captions = make_image_dataset(5, seed=0, split="test", size=48)
    assert all(image.size == (48, 48) for image in test_images)
    assert all(caption_split(caption) == "test" for caption in test_captions)
