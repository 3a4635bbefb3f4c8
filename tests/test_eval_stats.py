"""The evaluation's statistics (`trl_flow_grpo.eval_stats`) on synthetic scores whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from trl_flow_grpo.eval_stats import _resample_indices, cluster_bootstrap, paired_cluster_bootstrap


def test_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    # 60 prompts of differing difficulty, 4 seeds each; a fresh evaluation (new prompts, new seeds) per trial.
    rng = np.random.default_rng(1)
    covered, trials = 0, 150
    for trial in range(trials):
        difficulty = rng.beta(2, 3, size=60)  # prompts drawn from a population with mean 0.4
        values = (rng.random((60, 4)) < difficulty[:, None]).astype(float)
        estimate = cluster_bootstrap(values, num_resamples=500, seed=trial)
        covered += estimate.low <= 0.4 <= estimate.high
    assert 0.88 <= covered / trials <= 0.99


def test_interval_widens_when_seeds_of_one_prompt_agree():
    # Half the prompts always fail, half always succeed: 8 seeds per prompt carry no more information than one.
    values = np.repeat(np.array([0.0, 1.0] * 50)[:, None], 8, axis=1)
    clustered = cluster_bootstrap(values)
    naive = 1.96 * np.sqrt(0.25 / values.size)  # as if all 800 images were independent
    assert clustered.value == 0.5
    assert clustered.half_width > 2.5 * naive
    assert clustered.half_width == pytest.approx(1.96 * 0.5 / np.sqrt(100), rel=0.15)


def test_more_seeds_narrow_the_interval_when_prompts_are_alike():
    rng = np.random.default_rng(0)
    few = cluster_bootstrap((rng.random((100, 2)) < 0.5).astype(float))
    many = cluster_bootstrap((rng.random((100, 32)) < 0.5).astype(float))
    assert many.half_width < few.half_width / 2.5


def test_resampling_keeps_each_stratum_size():
    strata = ["a"] * 3 + ["b"] * 10 + ["c"]
    index = _resample_indices(strata, len(strata), num_resamples=200, seed=0)
    labels = np.array(strata)[index]
    assert (labels == "a").sum(axis=1).tolist() == [3] * 200
    assert (labels == "c").sum(axis=1).tolist() == [1] * 200
    # a stratum of one prompt never varies: category c's prompt is in every resample
    assert (index == 13).sum(axis=1).min() == 1


def test_paired_change_is_narrower_than_the_two_intervals_and_exactly_zero_for_no_change():
    rng = np.random.default_rng(3)
    difficulty = rng.random(80)
    before = (rng.random((80, 4)) < difficulty[:, None]).astype(float)
    after = np.maximum(before, (rng.random((80, 4)) < 0.15).astype(float))  # the same images, some fixed
    change = paired_cluster_bootstrap(before, after)
    separate = cluster_bootstrap(before).half_width + cluster_bootstrap(after).half_width
    assert change.value == pytest.approx(after.mean() - before.mean())
    assert change.excludes_zero() and change.low > 0
    assert change.half_width < separate / 2
    same = paired_cluster_bootstrap(before, before)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    assert not same.excludes_zero()


def test_interval_is_reproducible_and_depends_on_the_seed_only_through_resampling():
    values = np.random.default_rng(0).random((30, 3))
    assert cluster_bootstrap(values, seed=5) == cluster_bootstrap(values, seed=5)
    assert cluster_bootstrap(values, seed=5).value == cluster_bootstrap(values, seed=6).value


def test_uneven_images_per_prompt_weigh_by_image():
    estimate = cluster_bootstrap([[1.0, 1.0, 1.0], [0.0]])
    assert estimate.value == 0.75 and estimate.num_images == 4 and estimate.num_prompts == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cluster_bootstrap([]), "empty"),
        (lambda: cluster_bootstrap([[1.0], []]), r"values\[1\]"),
        (lambda: cluster_bootstrap([[1.0], [float("nan")]]), "non-finite"),
        (lambda: cluster_bootstrap([[1.0], [0.0]], strata=["a"]), "one per prompt"),
        (lambda: cluster_bootstrap([[1.0]], level=1.5), "level"),
        (lambda: cluster_bootstrap([[1.0]], num_resamples=10), "num_resamples"),
        (lambda: paired_cluster_bootstrap([[1.0]], [[1.0], [0.0]]), "pair them"),
        (lambda: paired_cluster_bootstrap([[1.0, 0.0]], [[1.0]]), "same seeds"),
    ],
)
def test_bad_inputs_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
