"""benchmarks/shapes_sampler_gap.py: its rollout sampler starts every image from the evaluation's noise, so the two
samplers differ only in the SDE steps and guidance, not in the seeds."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

from trl_flow_grpo.toy.evaluation import evaluate_heldout
from trl_flow_grpo.toy.model import load_shapes_pipeline

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("shapes_sampler_gap", ROOT / "benchmarks" / "shapes_sampler_gap.py")
gap = importlib.util.module_from_spec(_spec)
sys.modules["shapes_sampler_gap"] = gap
_spec.loader.exec_module(gap)

CAPTIONS = ["a red circle above a blue square", "two green triangles"]


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


def test_noiseless_rollout_sampler_reproduces_the_evaluations_images():
    pipe = load_shapes_pipeline()
    kwargs = {"images_per_prompt": 2, "batch_size": 3}  # a batch boundary inside a caption's images
    evaluation = evaluate_heldout(pipe, guidance_scale=4.5, prompts=CAPTIONS, **kwargs)
    rollout = gap.rollout_result(pipe, CAPTIONS, guidance_scale=4.5, noise_level=0.0, **kwargs)
    assert rollout.prompts == CAPTIONS and rollout.scores.shape == (2, 2) and rollout.extras is not None
    assert np.abs(_pixels(rollout.images) - _pixels(evaluation.images)).max() <= 2  # float noise only (0-255)
    np.testing.assert_array_equal(rollout.scores, evaluation.scores)


def test_rollout_noise_changes_the_images_and_is_reproducible():
    pipe = load_shapes_pipeline()
    kwargs = {"images_per_prompt": 2, "batch_size": 4, "guidance_scale": 1.0}
    first = gap.rollout_result(pipe, CAPTIONS, noise_level=0.8, **kwargs)
    again = gap.rollout_result(pipe, CAPTIONS, noise_level=0.8, **kwargs)
    noiseless = gap.rollout_result(pipe, CAPTIONS, noise_level=0.0, **kwargs)
    np.testing.assert_array_equal(_pixels(first.images), _pixels(again.images))
    assert np.abs(_pixels(first.images) - _pixels(noiseless.images)).mean() > 5
    assert first.settings["sampler"] == "cps noise_level 0.8 on steps [0, 1, 2, 3, 4]"
