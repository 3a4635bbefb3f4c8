"""Tests for the GenEval reward (`trl_flow_grpo.rewards.geneval`).

The rule engine is checked on synthetic detections, one test per GenEval rule, against GenEval's published rules
(djghosh13/geneval `evaluation/evaluate_images.py`) and Flow-GRPO's partial credit (yifan123/reward-server
`reward_server/gen_eval.py`). The model path runs on a tiny random Mask2Former and a tiny random CLIP built in code
(offline).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from trl_flow_grpo.rewards import REWARD_FUNCS, call_reward_funcs, reward_func_name
from trl_flow_grpo.rewards import geneval as geneval_module
from trl_flow_grpo.rewards.geneval import (
    COLOR_TEMPLATES,
    COUNTING_THRESHOLD,
    DEFAULT_CLIP_ID,
    DEFAULT_DETECTOR_ID,
    GENEVAL_COLORS,
    MAX_OBJECTS,
    NMS_THRESHOLD,
    POSITION_THRESHOLD,
    THRESHOLD,
    Detection,
    GenEvalResult,
    GenEvalReward,
    GenEvalScorer,
    evaluate_detections,
    parse_metadata,
    relative_position,
    select_detections,
    summarize,
)


def det(name: str, score: float = 0.95, box=(0, 0, 10, 10), color: str | None = None) -> Detection:
    return Detection(class_name=name, score=score, box=box, color=color)


def meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    return {"tag": tag, "include": include, **({"exclude": exclude} if exclude is not None else {})}


# ------------------------------------------------------------------------------------------------ the constants


def test_constants_are_genevals_defaults():
    # evaluate_images.py: threshold 0.3, counting_threshold 0.9, max_objects 16, max_overlap 1.0,
    # position_threshold 0.1; the ten colours and three prompt templates of color_classification.
    assert (THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, NMS_THRESHOLD, POSITION_THRESHOLD) == (0.3, 0.9, 16, 1.0, 0.1)
    assert GENEVAL_COLORS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
    assert [t.format(color="red", object="car") for t in COLOR_TEMPLATES] == [
        "a photo of a red car",
        "a photo of a red-colored car",
        "a photo of a red object",
    ]
    assert DEFAULT_DETECTOR_ID == "facebook/mask2former-swin-small-coco-instance"  # GenEval's Swin-S Mask2Former
    assert DEFAULT_CLIP_ID == "openai/clip-vit-large-patch14"  # GenEval's open_clip ViT-L-14 "openai"


# ---------------------------------------------------------------------------------------------------- selection


def test_presence_needs_confidence_above_the_threshold():
    single = meta("single_object", [{"class": "cat", "count": 1}])
    assert evaluate_detections(single, [det("cat", 0.31)]).correct
    at_threshold = evaluate_detections(single, [det("cat", 0.3)])  # "> threshold", so 0.3 itself is dropped
    assert not at_threshold.correct and at_threshold.score == 0.0
    assert at_threshold.reason == "expected cat>=1, found 0"
    assert not evaluate_detections(single, [det("dog", 0.99)]).correct  # another class does not count


def test_counting_uses_the_stricter_threshold():
    two_cats = [det("cat", 0.95), det("cat", 0.85, box=(20, 0, 30, 10))]
    counting = meta("counting", [{"class": "cat", "count": 2}], [{"class": "cat", "count": 3}])
    result = evaluate_detections(counting, two_cats)
    assert not result.correct  # the 0.85 cat is under 0.9 for counting
    assert result.score == pytest.approx(0.5)  # 1 of 2: 1 - |2 - 1| / 2
    two_object = meta("two_object", [{"class": "cat", "count": 2}])  # same clause, other task: threshold 0.3
    assert evaluate_detections(two_object, two_cats).correct


def test_select_keeps_max_objects_most_confident_per_class_and_optional_nms():
    many = [det("cat", 0.5 + i / 100, box=(i * 20, 0, i * 20 + 10, 10)) for i in range(20)]
    kept = select_detections(many, "two_object")["cat"]
    assert len(kept) == MAX_OBJECTS
    assert [d.score for d in kept] == sorted((d.score for d in many), reverse=True)[:MAX_OBJECTS]
    overlapping = [det("cat", 0.9, box=(0, 0, 10, 10)), det("cat", 0.8, box=(1, 0, 11, 10)), det("dog", 0.7)]
    assert len(select_detections(overlapping, "two_object")["cat"]) == 2  # NMS_THRESHOLD 1.0: no suppression
    nms = select_detections(overlapping, "two_object", nms_threshold=0.5)
    assert [d.score for d in nms["cat"]] == [0.9]  # IoU 110/132 >= 0.5 with the more confident cat
    assert [d.score for d in nms["dog"]] == [0.7]  # other classes are not suppressed


# ------------------------------------------------------------------------------------------------------- counts


def test_counting_is_exact_through_the_exclude_clause():
    counting = meta("counting", [{"class": "dog", "count": 3}], [{"class": "dog", "count": 4}])
    dogs = [det("dog", 0.95, box=(i * 20, 0, i * 20 + 10, 10)) for i in range(5)]
    exact = evaluate_detections(counting, dogs[:3])
    assert exact.correct and exact.score == 1.0 and exact.reason == ""
    too_few = evaluate_detections(counting, dogs[:2])
    assert not too_few.correct and too_few.score == pytest.approx(1 - 1 / 3)
    too_many = evaluate_detections(counting, dogs[:4])
    assert not too_many.correct and too_many.score == pytest.approx(1 - 1 / 3)
    assert "expected dog<4, found 4" in too_many.reason  # the exclude clause fails
    way_too_many = evaluate_detections(counting, dogs + [det("dog", 0.95, box=(200, 0, 210, 10))] * 2)
    assert way_too_many.score == 0.0  # 1 - |3 - 7| / 3 < 0 is clipped at 0


def test_extra_objects_pass_genevals_check_but_lose_partial_credit():
    # GenEval only asks for *at least* count (the count most confident); Flow-GRPO's partial credit asks for exactly.
    single = meta("single_object", [{"class": "cat", "count": 1}])
    result = evaluate_detections(single, [det("cat", 0.9), det("cat", 0.8, box=(20, 0, 30, 10))])
    assert result.correct
    assert result.score == 0.0  # 1 - |1 - 2| / 1
    assert result.reason == "expected cat==1, found 2"


def test_two_objects_need_both():
    two = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert evaluate_detections(two, [det("cat"), det("dog")]).correct
    one = evaluate_detections(two, [det("cat")])
    assert not one.correct and one.score == pytest.approx(0.5) and one.reason == "expected dog>=1, found 0"


# ------------------------------------------------------------------------------------------------------ colours


def test_colour_of_the_most_confident_objects():
    colors = meta("colors", [{"class": "car", "count": 1, "color": "red"}])
    assert evaluate_detections(colors, [det("car", color="red")]).correct
    wrong = evaluate_detections(colors, [det("car", color="blue")])
    assert not wrong.correct and wrong.score == pytest.approx(0.5)  # count term 1, colour term 0
    assert wrong.reason == "expected red car>=1, found 0 red; and 1 blue"
    # GenEval checks the colour of the most confident car only; a red car behind a blue one does not help.
    both = [det("car", 0.9, color="blue"), det("car", 0.8, box=(20, 0, 30, 10), color="red")]
    assert not evaluate_detections(colors, both).correct
    missing = evaluate_detections(colors, [])
    assert missing.score == 0.0  # count term 0 and one 0 for the colour that could not be checked


def test_colour_attribution_binds_each_colour_to_its_object():
    attr = meta(
        "color_attr",
        [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "white"}],
    )
    assert evaluate_detections(attr, [det("car", color="red"), det("bench", color="white")]).correct
    swapped = evaluate_detections(attr, [det("car", color="white"), det("bench", color="red")])
    assert not swapped.correct
    assert swapped.score == pytest.approx(0.5)  # terms: car 1, red 0, bench 1, white 0


def test_colours_come_from_the_classifier_only_when_a_rule_needs_them():
    calls = []

    def classify(class_name, detections):
        calls.append((class_name, len(detections)))
        return ["green"] * len(detections)

    colors = meta("colors", [{"class": "apple", "count": 1, "color": "green"}])
    assert evaluate_detections(colors, [det("apple"), det("cat")], classify_colors=classify).correct
    assert calls == [("apple", 1)]  # once (both passes share it), only for the class with a colour clause
    calls.clear()
    evaluate_detections(
        meta("single_object", [{"class": "apple", "count": 1}]), [det("apple")], classify_colors=classify
    )
    assert calls == []
    with pytest.raises(ValueError, match="needs the colour"):
        evaluate_detections(colors, [det("apple")])  # no colour and no classifier
    with pytest.raises(ValueError, match="one of"):
        evaluate_detections(colors, [det("apple")], classify_colors=lambda name, dets: ["teal"])


# ---------------------------------------------------------------------------------------------------- positions


def test_relative_position_uses_centres_with_the_margin():
    a, b = (0, 0, 10, 10), (30, 0, 40, 10)  # A's centre 30 px left of B's
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}  # y grows downwards
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    # The margin: 0.1 x (10 + 10) = 2 px per axis; a 1.5 px offset is no relation at all.
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    # Diagonal at 45 degrees: the shrunk offsets (30 - 2) / (30 sqrt 2) = 0.66 > 0.5 on both axes.
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    # Mostly vertical (dx = 10, dy = 40): not "left of".
    assert relative_position((0, 0, 10, 10), (10, 40, 20, 50)) == {"above"}
    # Large boxes widen the margin: centres 12 px apart, margin 0.1 x (100 + 100) = 20 px.
    assert relative_position((0, 0, 100, 100), (12, 0, 112, 100)) == set()


def test_position_clause():
    position = meta(
        "position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}]
    )
    dog_left, cat_right = det("dog", box=(0, 0, 10, 10)), det("cat", box=(30, 0, 40, 10))
    assert evaluate_detections(position, [dog_left, cat_right]).correct
    wrong = evaluate_detections(position, [det("dog", box=(30, 0, 40, 10)), det("cat", box=(0, 0, 10, 10))])
    assert not wrong.correct
    assert wrong.reason == "expected cat right of target, found left of target"
    assert wrong.score == pytest.approx(2 / 3)  # dog count 1, cat count 1, position 0
    no_target = evaluate_detections(position, [cat_right])
    assert not no_target.correct
    assert "expected dog>=1, found 0" in no_target.reason and "no target for cat to be right of" in no_target.reason
    assert no_target.score == pytest.approx(1 / 3)  # dog 0, cat 1, position 0 (no target)


def test_position_must_hold_for_every_pair():
    position = meta("position", [{"class": "dog", "count": 2}, {"class": "cat", "count": 1, "position": ["above", 0]}])
    dogs = [det("dog", box=(0, 50, 10, 60)), det("dog", box=(40, 50, 50, 60))]
    assert evaluate_detections(position, [*dogs, det("cat", box=(20, 0, 30, 10))]).correct
    beside_one = [det("dog", box=(0, 50, 10, 60)), det("dog", box=(40, 0, 50, 10)), det("cat", box=(20, 0, 30, 10))]
    assert not evaluate_detections(position, beside_one).correct


# ---------------------------------------------------------------------------------------------------- exclusion


def test_exclusion():
    excluding = meta("single_object", [{"class": "cat", "count": 1}], [{"class": "dog", "count": 1}])
    assert evaluate_detections(excluding, [det("cat")]).correct
    with_dog = evaluate_detections(excluding, [det("cat"), det("dog")])
    assert not with_dog.correct and with_dog.reason == "expected dog<1, found 1"
    assert with_dog.score == 1.0  # exclude clauses are not part of Flow-GRPO's partial credit
    assert evaluate_detections(excluding, [det("cat"), det("dog", 0.2)]).correct  # under the threshold: absent


# ----------------------------------------------------------------------------------------------------- metadata


def test_parse_metadata_accepts_genevals_jsonl_lines_and_rejects_malformed_ones():
    line = (
        '{"tag": "position", "include": [{"class": "bench", "count": 1}, {"class": "bear", "count": 1, '
        '"position": ["left of", 0]}], "prompt": "a photo of a bear left of a bench"}'
    )
    parsed = parse_metadata(line)
    assert parsed["tag"] == "position" and parsed["exclude"] == [] and parsed["prompt"].startswith("a photo")
    assert evaluate_detections(line, [det("bench", box=(50, 0, 60, 10)), det("bear")]).correct
    # As a `datasets` column of dicts gives it: keys a row lacks are None.
    from_arrow = {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red", "position": None}],
        "exclude": None,
    }
    assert parse_metadata(from_arrow)["include"] == [{"class": "car", "count": 1, "color": "red"}]
    assert evaluate_detections(from_arrow, [det("car", color="red")]).correct
    bad = {
        '{"tag": "position"': "not JSON",
        '["a list"]': "must be a dict",
        json.dumps(meta("Counting", [{"class": "cat", "count": 1}])): "'tag' must be one of",
        json.dumps(meta("counting", [])): "non-empty list",
        json.dumps(meta("counting", [{"class": "cat", "count": 0}])): r"include\[0\]: 'count' must be a positive",
        json.dumps(meta("colors", [{"class": "cat", "count": 1, "color": "teal"}])): "'color' 'teal' is not one of",
        json.dumps(meta("position", [{"class": "cat", "count": 1, "position": ["near", 0]}])): "relation in",
        json.dumps(meta("position", [{"class": "cat", "count": 1, "position": ["above", 0]}])): "earlier include",
        json.dumps(meta("counting", [{"class": "cat", "count": 1}], [{"count": 2}])): r"exclude\[0\] must be a dict",
    }
    for value, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_metadata(value)
    with pytest.raises(ValueError, match="x2 < x1"):
        Detection("cat", 0.9, (10, 0, 0, 10))


def test_summarize_is_the_mean_of_task_accuracies():
    results = [
        GenEvalResult(True, 1.0, "", "single_object"),
        GenEvalResult(True, 1.0, "", "single_object"),
        GenEvalResult(False, 0.5, "x", "single_object"),
        GenEvalResult(False, 0.0, "x", "counting"),
    ]
    summary = summarize(results)
    assert summary["accuracy/single_object"] == pytest.approx(2 / 3)
    assert summary["accuracy/counting"] == 0.0
    assert summary["geneval"] == pytest.approx((2 / 3 + 0) / 2)  # each task weighs the same
    assert summary["accuracy"] == pytest.approx(0.5)  # while images weigh the same here
    assert summary["score"] == pytest.approx(2.5 / 4)
    assert "accuracy/position" not in summary
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


# ----------------------------------------------------------------------------------------------- reward columns


class FakeScorer:
    """Stands in for the models: returns fixed results and records what it was asked."""

    def __init__(self, results):
        self.results, self.calls = results, []

    def score(self, images, metadatas):
        self.calls.append(([parse_metadata(m) for m in metadatas], len(images)))
        return self.results[: len(images)]


def test_reward_reads_the_metadata_column_or_genevals_fields():
    results = [
        GenEvalResult(False, 0.5, "expected dog>=1, found 0", "two_object"),
        GenEvalResult(True, 1.0, "", "colors"),
    ]
    images = [Image.new("RGB", (8, 8))] * 2
    m0 = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    m1 = meta("colors", [{"class": "car", "count": 1, "color": "red"}])

    scorer = FakeScorer(results)
    partial, strict = GenEvalReward(scorer), GenEvalReward(scorer, strict=True)
    assert partial(prompts=["a", "b"], images=images, metadata=[m0, json.dumps(m1)]) == [0.5, 1.0]
    assert strict(prompts=["a", "b"], images=images, metadata=[m0, m1]) == [0.0, 1.0]
    assert scorer.calls[0][0] == [parse_metadata(m0), parse_metadata(m1)]

    fields = {"tag": ["two_object", "colors"], "include": [json.dumps(m0["include"]), m1["include"]]}
    assert partial(prompts=["a", "b"], images=images, **fields) == [0.5, 1.0]
    assert scorer.calls[-1][0][0]["exclude"] == []

    logged = {}
    custom = GenEvalReward(scorer, metadata_column="geneval_meta")
    rewards = custom(prompts=["a", "b"], images=images, geneval_meta=[None, m1], log_extra=logged.__setitem__)
    assert rewards == [None, 0.5]  # a row without metadata is not applicable; the scorer saw only the other
    assert scorer.calls[-1][1] == 1
    assert logged == {"geneval_reason": [None, "expected dog>=1, found 0"]}

    with pytest.raises(ValueError, match=r"'metadata'.*got the columns \['difficulty'\]"):
        partial(prompts=["a", "b"], images=images, difficulty=[1, 2], trainer_state=None)
    with pytest.raises(ValueError, match="1 entries for 2 images"):
        partial(prompts=["a", "b"], images=images, metadata=[m0])


def test_builtins_share_one_lazy_scorer():
    partial, strict = REWARD_FUNCS["geneval"], REWARD_FUNCS["geneval_strict"]
    assert isinstance(partial, GenEvalReward) and isinstance(strict, GenEvalReward)
    assert not partial.strict and strict.strict
    assert partial.scorer is strict.scorer  # the models load once for training and evaluation
    assert (partial.scorer.detector_id, partial.scorer.clip_id) == (DEFAULT_DETECTOR_ID, DEFAULT_CLIP_ID)
    assert reward_func_name("geneval") == "geneval" and reward_func_name(strict) == "geneval_strict"
    code = (
        "import sys; from trl_flow_grpo.rewards import REWARD_FUNCS; "
        "assert not REWARD_FUNCS['geneval'].scorer.is_loaded; "
        "assert not any(m.startswith('transformers.models.mask2former') for m in sys.modules), 'mask2former imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------- the model path (tiny)

TINY_LABELS = {0: "cat", 1: "dog", 2: "mouse"}  # "mouse" is GenEval's "computer mouse"
IMAGE_SIZE = 64


@pytest.fixture
def no_scipy_check(monkeypatch):
    """transformers' Mask2Former builds its training loss at construction, which checks for scipy (unused at
    inference); the test environment may lack scipy, so the check is skipped."""
    from transformers.models.mask2former import modeling_mask2former

    monkeypatch.setattr(modeling_mask2former, "requires_backends", lambda *args, **kwargs: None)


def _tiny_detector():
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        feature_size=32,  # GroupNorm(32, ...) in the pixel decoder
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=6,
        id2label=TINY_LABELS,
        label2id={name: i for i, name in TINY_LABELS.items()},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    processor = Mask2FormerImageProcessor(size={"shortest_edge": IMAGE_SIZE, "longest_edge": IMAGE_SIZE})
    return model, processor


def _tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from trl_flow_grpo.tiny_tokenizers import make_tiny_clip_tokenizer

    tokenizer = make_tiny_clip_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config).eval()
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture
def tiny_scorer(no_scipy_check):
    detector, detector_processor = _tiny_detector()
    clip_model, clip_processor = _tiny_clip()
    # The random detector's confidences are small: thresholds of 0 let its instances reach the rules.
    return GenEvalScorer(
        detector=detector,
        detector_processor=detector_processor,
        clip_model=clip_model,
        clip_processor=clip_processor,
        threshold=0.0,
        counting_threshold=0.0,
        batch_size=2,
    )


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (64, 64), (40, 56)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


def test_detect_turns_post_processed_instances_into_detections(tiny_scorer):
    images = _images()
    assert tiny_scorer.class_names() == ["cat", "dog", "computer mouse"]
    detections = tiny_scorer.detect(images)
    assert len(detections) == len(images)
    # Reference: the processor's own instance post-processing of the model's outputs, image by image.
    for image, found in zip(images, detections):
        inputs = tiny_scorer.detector_processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            outputs = tiny_scorer.detector(**inputs)
        reference = tiny_scorer.detector_processor.post_process_instance_segmentation(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width)], return_binary_maps=True
        )[0]
        expected = sorted(
            (
                (segment["score"], ["cat", "dog", "computer mouse"][segment["label_id"]], reference["segmentation"][i])
                for i, segment in enumerate(reference["segments_info"])
            ),
            key=lambda item: -item[0],
        )
        assert len(found) == len(expected) > 0
        for detection, (score, name, mask) in zip(found, expected):
            assert detection.class_name == name
            assert detection.score == pytest.approx(score, abs=1e-5)
            assert detection.mask.shape == (image.height, image.width)
            np.testing.assert_array_equal(detection.mask, mask.numpy() > 0)
            ys, xs = np.nonzero(detection.mask)
            assert detection.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # mmdet's mask2bbox


def test_score_passes_the_detections_to_the_rules_and_classifies_colours(tiny_scorer, monkeypatch):
    images = _images()
    seen = []
    original = geneval_module.evaluate_detections

    def spy(metadata, detections, **kwargs):
        seen.append((metadata, list(detections), kwargs))
        return original(metadata, detections, **kwargs)

    monkeypatch.setattr(geneval_module, "evaluate_detections", spy)
    metadatas = [
        meta("colors", [{"class": "cat", "count": 1, "color": "red"}]),
        meta("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}]),
        json.dumps(meta("two_object", [{"class": "computer mouse", "count": 1}, {"class": "cat", "count": 1}])),
    ]
    results = tiny_scorer.score(images, metadatas)
    assert len(results) == 3 and all(isinstance(r, GenEvalResult) for r in results)
    assert all(0.0 <= r.score <= 1.0 for r in results)
    detections = tiny_scorer.detect(images)
    for (metadata, received, kwargs), expected, given in zip(seen, detections, metadatas):
        assert metadata == parse_metadata(given)
        assert [(d.class_name, d.score, d.box) for d in received] == [(d.class_name, d.score, d.box) for d in expected]
        assert kwargs["threshold"] == 0.0 and kwargs["position_threshold"] == POSITION_THRESHOLD
    # Each result is the rules' verdict on those detections, with the colours the CLIP classifier gives.
    for image, metadata, found, result in zip(images, metadatas, detections, results):
        colored = [
            Detection(d.class_name, d.score, d.box, d.mask, tiny_scorer.classify_colors(image, d.class_name, [d])[0])
            for d in found
        ]
        rules = {k: v for k, v in tiny_scorer.rules.items()}
        assert original(metadata, colored, **rules) == result

    with pytest.raises(ValueError, match="does not detect; its classes"):
        tiny_scorer.score(images[:1], [meta("single_object", [{"class": "giraffe", "count": 1}])])
    with pytest.raises(ValueError, match="2 images for 1"):
        tiny_scorer.score(images[:2], metadatas[:1])


def test_colour_classifier_sees_the_masked_crop_on_grey(tiny_scorer, monkeypatch):
    image = Image.fromarray(np.full((20, 30, 3), (200, 10, 10), dtype=np.uint8))
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 10:20] = True
    mask[5:8, 10:13] = False  # a hole in the object, inside its box
    detection = Detection("cat", 0.9, (10, 5, 20, 15), mask)
    crops = []
    original = tiny_scorer.clip_processor.image_processor.__class__.__call__

    def spy(self, images, **kwargs):
        crops.extend(images)
        return original(self, images, **kwargs)

    monkeypatch.setattr(tiny_scorer.clip_processor.image_processor.__class__, "__call__", spy)
    colors = tiny_scorer.classify_colors(image, "cat", [detection, Detection("cat", 0.8, (0, 0, 30, 20))])
    assert len(colors) == 2 and all(c in GENEVAL_COLORS for c in colors)
    first = np.asarray(crops[0])
    assert first.shape == (10, 10, 3)  # cropped to the box
    assert (first[3:, 3:] == (200, 10, 10)).all()  # the object's pixels
    assert (first[:3, :3] == (153, 153, 153)).all()  # outside the mask: GenEval's #999 grey
    assert np.asarray(crops[1]).shape == (20, 30, 3)  # no mask: the box of the original image

    # The decision: argmax of cosine similarity to the normalised mean of the three templates' text embeddings.
    model, processor = tiny_scorer.clip_model, tiny_scorer.clip_processor
    with torch.no_grad():
        texts = [t.format(color=c, object="cat") for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
        text = model.get_text_features(**processor.tokenizer(texts, padding=True, return_tensors="pt"))
        text = getattr(text, "pooler_output", text)
        text = torch.nn.functional.normalize(text, dim=-1).reshape(10, 3, -1).mean(1)
        pixels = processor.image_processor(crops[:2], return_tensors="pt")["pixel_values"]
        image_embeds = model.get_image_features(pixel_values=pixels)
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        sims = torch.nn.functional.normalize(image_embeds, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    assert colors == [GENEVAL_COLORS[i] for i in sims.argmax(-1).tolist()]


def test_reward_end_to_end_through_call_reward_funcs(tiny_scorer):
    images = _images()
    metadatas = [
        json.dumps(meta("single_object", [{"class": "cat", "count": 1}])),
        json.dumps(meta("colors", [{"class": "dog", "count": 1, "color": "blue"}])),
        None,
    ]
    with pytest.warns(UserWarning, match="sample 2"):  # no reward applies to the row without metadata
        rewards = call_reward_funcs(
            [GenEvalReward(tiny_scorer), GenEvalReward(tiny_scorer, strict=True)],
            ["a photo of a cat", "a photo of a blue dog", "a photo"],
            images,
            columns={"metadata": metadatas},
        )
    assert rewards.shape == (3, 2)
    expected = tiny_scorer.score(images[:2], metadatas[:2])
    torch.testing.assert_close(rewards[:2, 0], torch.tensor([r.score for r in expected]))
    torch.testing.assert_close(rewards[:2, 1], torch.tensor([float(r.correct) for r in expected]))
    assert torch.isnan(rewards[2]).all()  # no metadata: not applicable


def test_loads_lazily_with_safetensors_once(tmp_path, no_scipy_check, monkeypatch):
    import transformers

    detector, detector_processor = _tiny_detector()
    clip_model, clip_processor = _tiny_clip()
    detector.save_pretrained(tmp_path / "detector")
    detector_processor.save_pretrained(tmp_path / "detector")
    clip_model.save_pretrained(tmp_path / "clip")
    clip_processor.save_pretrained(tmp_path / "clip")
    calls = []
    for cls in (transformers.Mask2FormerForUniversalSegmentation, transformers.CLIPModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            calls.append((klass.__name__, kwargs.get("use_safetensors"), kwargs.get("dtype")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    scorer = GenEvalScorer(str(tmp_path / "detector"), str(tmp_path / "clip"), device="cpu", threshold=0.0)
    assert not scorer.is_loaded and calls == []
    reward = GenEvalReward(scorer)
    metadata = [meta("colors", [{"class": "cat", "count": 1, "color": "red"}])] * 2
    rewards = reward(prompts=["a", "b"], images=_images(2), metadata=metadata)
    assert len(rewards) == 2 and all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in rewards)
    reward(prompts=["a"], images=_images(1), metadata=metadata[:1])
    assert scorer.is_loaded and not scorer.detector.training and not scorer.clip_model.training
    assert not any(p.requires_grad for p in scorer.detector.parameters())
    assert sorted(calls) == [
        ("CLIPModel", True, torch.float32),
        ("Mask2FormerForUniversalSegmentation", True, torch.float32),
    ]


def test_dtype_applies_to_both_models_and_scores_stay_in_range(tmp_path, no_scipy_check):
    detector, detector_processor = _tiny_detector()
    clip_model, clip_processor = _tiny_clip()
    detector.save_pretrained(tmp_path / "detector")
    detector_processor.save_pretrained(tmp_path / "detector")
    clip_model.save_pretrained(tmp_path / "clip")
    clip_processor.save_pretrained(tmp_path / "clip")
    scorer = GenEvalScorer(
        str(tmp_path / "detector"), str(tmp_path / "clip"), device="cpu", dtype=torch.bfloat16, threshold=0.0
    )
    metadata = [meta("colors", [{"class": "cat", "count": 1, "color": "red"}])] * 2
    results = scorer.score(_images(2), metadata)
    assert next(scorer.detector.parameters()).dtype == torch.bfloat16
    assert next(scorer.clip_model.parameters()).dtype == torch.bfloat16
    assert len(results) == 2 and all(0.0 <= r.score <= 1.0 for r in results)
    assert all(len(found) > 0 for found in scorer.detect(_images(2)))  # bf16 logits still post-process


def test_missing_scipy_gives_the_install_hint(tmp_path, no_scipy_check, monkeypatch):
    from transformers.models.mask2former import modeling_mask2former

    detector, processor = _tiny_detector()
    detector.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    def requires_scipy(*args, **kwargs):
        raise ImportError("Mask2FormerLoss requires the scipy library but it was not found in your environment.")

    monkeypatch.setattr(modeling_mask2former, "requires_backends", requires_scipy)
    with pytest.raises(ImportError, match="needs scipy even for inference.*pip install scipy"):
        GenEvalScorer(str(tmp_path), device="cpu").detect(_images(1))


def test_offload_keeps_both_models_on_the_cpu_between_calls(tiny_scorer, no_scipy_check):
    from trl_flow_grpo.testing import record_device_moves

    # "cuda:3" is recorded, not moved to (`record_device_moves`), so the check runs without a GPU.
    (detector, detector_processor), (clip_model, clip_processor) = _tiny_detector(), _tiny_clip()
    detector_moves, detector_runs = record_device_moves(detector, "forward")
    clip_moves, clip_runs = record_device_moves(clip_model, "get_text_features", "get_image_features")
    scorer = GenEvalScorer(
        detector=detector,
        detector_processor=detector_processor,
        clip_model=clip_model,
        clip_processor=clip_processor,
        device="cuda:3",
        offload=True,
        threshold=0.0,
        counting_threshold=0.0,
        batch_size=2,
    )
    images = _images()
    present = tiny_scorer.detect(images[:1])[0][0].class_name  # a class the detector finds: its colour is asked
    plain = meta("single_object", [{"class": present, "count": 1}])
    assert scorer.score(images, [plain] * 3) == tiny_scorer.score(images, [plain] * 3)
    assert detector_moves == ["cpu", "cuda:3", "cpu"]  # parked at load, on the device for the call, back after it
    assert detector_runs == ["cuda:3", "cuda:3"]  # both batches
    assert clip_moves == []  # no colour asked: CLIP is not even loaded

    colors = meta("colors", [{"class": present, "count": 1, "color": "red"}])
    assert scorer.score(images, [colors] * 3) == tiny_scorer.score(images, [colors] * 3)
    assert detector_moves == ["cpu", "cuda:3", "cpu", "cuda:3", "cpu"]
    assert clip_moves == ["cpu", "cuda:3", "cpu"]  # once per call, however many colours it asks
    assert clip_runs and set(clip_runs) == {"cuda:3"}
    scorer.classify_colors(images[0], present, tiny_scorer.detect(images[:1])[0][:1])
    assert clip_moves == ["cpu", "cuda:3", "cpu", "cuda:3", "cpu"]  # the public methods offload too
    assert GenEvalScorer().offload is False


def test_scorer_argument_checks():
    with pytest.raises(ValueError, match="batch_size"):
        GenEvalScorer(batch_size=0)
    with pytest.raises(ValueError, match="counting_threshold must be in"):
        GenEvalScorer(counting_threshold=1.0)
    assert math.isclose(GenEvalScorer().rules["counting_threshold"], COUNTING_THRESHOLD)


def test_metadata_survives_a_datasets_column():
    from datasets import Dataset

    rows = [
        meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}]),
        meta("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}]),
        meta("colors", [{"class": "car", "count": 1, "color": "red"}]),
    ]
    # JSON strings hold any metadata (Arrow cannot store the mixed [relation, index] list of a position).
    as_json = Dataset.from_dict({"prompt": ["a", "b", "c"], "metadata": [json.dumps(r) for r in rows]})
    assert [parse_metadata(m) for m in as_json["metadata"]] == [parse_metadata(r) for r in rows]
    # A column of dicts (no positions) comes back with the keys a row lacks set to None.
    as_dicts = Dataset.from_dict({"prompt": ["b", "c"], "metadata": rows[1:]})
    assert as_dicts[0]["metadata"]["include"][0]["color"] is None
    assert [parse_metadata(m) for m in as_dicts["metadata"]] == [parse_metadata(r) for r in rows[1:]]
