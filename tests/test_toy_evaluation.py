"""The shapes world's held-out evaluation: per-category estimates with intervals, pairing, and the real pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trl_flow_grpo.toy import all_captions
from trl_flow_grpo.toy.evaluation import HeldoutResult, evaluate_heldout, format_comparison, format_result
from trl_flow_grpo.toy.geneval import requested_objects, score_image
from trl_flow_grpo.toy.model import load_shapes_pipeline


def _result(scores) -> HeldoutResult:
    prompts = ["a red circle", "two blue squares", "three red circles", "a red circle left of a blue square"]
    categories = ["single_object", "counting", "counting", "position"]
    return HeldoutResult(prompts, categories, np.asarray(scores, dtype=float))


def test_estimates_per_category_count_captions_and_images():
    result = _result([[1, 1], [0.5, 1], [0, 0], [1, 0.5]])
    assert result.keys()[:4] == ["accuracy", "accuracy/single_object", "accuracy/counting", "accuracy/position"]
    assert "accuracy/two_object" not in result.keys()  # absent categories are not reported as 0
    counting = result.estimate("accuracy/counting")
    assert (counting.value, counting.num_prompts, counting.num_images) == (0.25, 2, 4)
    assert result.estimate("accuracy").value == pytest.approx(4 / 8)
    assert result.estimate("score").value == pytest.approx(5.0 / 8)
    assert result.summary()["score/position"] == 0.75
    with pytest.raises(KeyError, match="two_object"):
        result.estimate("accuracy/two_object")


def test_change_is_paired_and_refuses_different_evaluations():
    before = _result([[0, 0], [0, 1], [0, 0], [1, 0]])
    after = _result([[1, 1], [0, 1], [1, 0], [1, 1]])
    change = after.change(before, "accuracy")
    assert change.value == pytest.approx(after.estimate("accuracy").value - before.estimate("accuracy").value)
    table = format_comparison(before, after)
    assert "accuracy/counting" in table and "+0.250" in table and "2 images per caption" in table
    with pytest.raises(ValueError, match="same prompts"):
        after.change(HeldoutResult(["a red circle"], ["single_object"], [[1.0, 1.0]]), "accuracy")


def test_strict_accuracy_counts_a_correct_image_with_extra_objects_as_wrong():
    scores = [[1, 1], [0.5, 1], [0, 0], [1, 0.5]]
    extras = [[1, 0], [1, 0], [0, 1], [1, 1]]  # the first image of "a red circle" is correct but shows more
    plain = _result(scores)
    result = HeldoutResult(plain.prompts, plain.categories, plain.scores, extras=np.asarray(extras, dtype=float))
    assert result.estimate("accuracy").value == pytest.approx(4 / 8)
    assert result.estimate("strict_accuracy").value == pytest.approx(2 / 8)  # only two correct images are clean
    assert result.estimate("strict_accuracy/position").value == 0.0
    assert result.estimate("extra_objects").value == pytest.approx(5 / 8)
    assert "strict_accuracy/counting" in result.keys() and "extra_objects/single_object" in result.keys()
    assert result.to_dict()["extras"] == extras
    loaded = HeldoutResult.from_dict(json.loads(json.dumps(result.to_dict())))  # what a results.json gives back
    assert loaded.prompts == result.prompts and loaded.categories == result.categories
    assert (loaded.scores == result.scores).all() and (loaded.extras == result.extras).all()
    assert loaded.estimates() == result.estimates() and HeldoutResult.from_dict(plain.to_dict()).extras is None
    assert "strict_accuracy" not in _result(scores).keys()  # not recorded: not reported as 0
    with pytest.raises(KeyError, match="strict_accuracy"):
        _result(scores).estimate("strict_accuracy")
    with pytest.raises(ValueError, match="extras has shape"):
        HeldoutResult(["a red circle"], ["single_object"], [[1.0, 1.0]], extras=[[0.0]])


def test_result_checks_its_shape():
    with pytest.raises(ValueError, match="one row of scores"):
        HeldoutResult(["a red circle"], ["single_object"], [[1.0], [0.0]])


def test_evaluate_heldout_on_the_shipped_model_is_reproducible_and_covers_every_heldout_caption():
    pipe = load_shapes_pipeline()
    captions = all_captions("test")
    first = evaluate_heldout(pipe, images_per_prompt=1, num_inference_steps=2, prompts=captions[:6])
    again = evaluate_heldout(pipe, images_per_prompt=1, num_inference_steps=2, prompts=captions[:6])
    assert np.array_equal(first.scores, again.scores)
    assert [np.asarray(a).tolist() for a in first.images] == [np.asarray(b).tolist() for b in again.images]
    assert first.scores.shape == (6, 1) and first.settings["num_inference_steps"] == 2
    assert first.extras.shape == (6, 1) and np.array_equal(first.extras, again.extras)
    for prompt, image, extra in zip(captions[:6], first.images, first.extras[:, 0]):  # the reward's own detections
        assert extra == (len(score_image(prompt, image)[1]["detections"]) > requested_objects(prompt))
    assert "accuracy" in format_result(first)
    with pytest.raises(ValueError, match="images_per_prompt"):
        evaluate_heldout(pipe, images_per_prompt=0)
    default = evaluate_heldout(pipe, images_per_prompt=1, num_inference_steps=1, keep_images=False)
    assert default.prompts == captions and default.images == []
