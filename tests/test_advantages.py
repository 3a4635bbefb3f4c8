"""Tests for trl_flow_grpo.advantages: rewards -> group-relative advantages.

Expected values come from a naive per-group python loop written from the spec (ALGORITHMS.md section 2), not from
the vectorised implementation.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from trl_flow_grpo.advantages import compute_advantages, group_stats

EPS = 1e-4
NAN = float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Naive reference (python floats, one group at a time)
# ---------------------------------------------------------------------------------------------------------------------


def _is_missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _pstd(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def naive_normalize(values: list, group_ids: list, scale: str) -> list:
    """Centre each value on its group's mean (missing values ignored), then scale. Missing stays None."""
    finite_all = [v for v in values if not _is_missing(v)]
    batch_std = _pstd(finite_all) if finite_all else 0.0
    out = [None] * len(values)
    for g in set(group_ids):
        members = [i for i, gid in enumerate(group_ids) if gid == g]
        finite = [values[i] for i in members if not _is_missing(values[i])]
        if not finite:
            continue
        mean, std = _mean(finite), _pstd(finite)
        for i in members:
            if _is_missing(values[i]):
                continue
            centred = values[i] - mean
            if scale == "group":
                out[i] = centred / (std + EPS)
            elif scale == "batch":
                out[i] = centred / (batch_std + EPS)
            else:
                out[i] = centred
    return out


def naive_weighted_sum(rewards: list[list], weights: list[float]) -> list[float]:
    return [sum(w * r for w, r in zip(weights, row) if not _is_missing(r)) for row in rewards]


def naive_advantages(
    rewards: list[list],
    group_ids: list,
    weights: list[float] | None = None,
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
    clip: float = 5.0,
) -> list[float]:
    num_funcs = len(rewards[0])
    weights = [1.0] * num_funcs if weights is None else weights
    if aggregation == "sum_then_normalize":
        adv = naive_normalize(naive_weighted_sum(rewards, weights), group_ids, scale)
    else:
        columns = [naive_normalize([row[k] for row in rewards], group_ids, scale) for k in range(num_funcs)]
        adv = [
            sum(weights[k] * columns[k][i] for k in range(num_funcs) if columns[k][i] is not None)
            for i in range(len(rewards))
        ]
    return [max(-clip, min(clip, a)) for a in adv]


def to_tensor(rewards: list[list]) -> torch.Tensor:
    return torch.tensor([[NAN if _is_missing(r) else r for r in row] for row in rewards], dtype=torch.float32)


def interleaved_batch(num_groups: int, group_size: int, num_funcs: int = 1, seed: int = 0, scales=None):
    """Random rewards for `num_groups` groups whose samples arrive shuffled (non-contiguous, non-sequential ids)."""
    rng = random.Random(seed)
    ids = [100 + 7 * g for g in range(num_groups)]  # arbitrary, unsorted once shuffled
    group_ids = [gid for gid in ids for _ in range(group_size)]
    rng.shuffle(group_ids)
    scales = scales or [1.0] * num_funcs
    rewards = [[rng.uniform(0, scales[k]) for k in range(num_funcs)] for _ in group_ids]
    return rewards, group_ids


def assert_close(actual: torch.Tensor, expected: list[float], atol: float = 1e-4, rtol: float = 1e-4):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------------
# group_stats
# ---------------------------------------------------------------------------------------------------------------------


def test_group_stats_matches_naive_mean_and_population_std_in_any_order():
    rewards, group_ids = interleaved_batch(num_groups=5, group_size=6, seed=1)
    values = [row[0] for row in rewards]
    mean, std = group_stats(torch.tensor(values), torch.tensor(group_ids))
    expected_mean, expected_std = [], []
    for gid in group_ids:
        members = [v for v, g in zip(values, group_ids) if g == gid]
        expected_mean.append(_mean(members))
        expected_std.append(_pstd(members))  # population std (ddof=0), not the unbiased one
    assert_close(mean, expected_mean, atol=1e-5)
    assert_close(std, expected_std, atol=1e-5)


def test_group_stats_ignores_nan_and_empty_group_gets_zero():
    values = torch.tensor([1.0, NAN, 3.0, NAN, NAN, 5.0])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2])
    mean, std = group_stats(values, group_ids)
    # group 0: finite {1, 3} -> mean 2, pop std 1; group 1: nothing finite -> 0, 0; group 2: {5} -> 5, 0.
    assert_close(mean, [2.0, 2.0, 2.0, 0.0, 0.0, 5.0])
    assert_close(std, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------------------------------
# compute_advantages: normalisation
# ---------------------------------------------------------------------------------------------------------------------


def test_small_hand_computed_group():
    # Group [1, 2, 3]: mean 2, population std sqrt(2/3).
    out = compute_advantages(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 0, 0]))
    a = 1 / (math.sqrt(2 / 3) + EPS)
    assert_close(out.advantages, [-a, 0.0, a])
    assert_close(out.rewards, [1.0, 2.0, 3.0])
    assert_close(out.group_std, [math.sqrt(2 / 3)] * 3)


def test_group_advantages_match_naive_loop_with_interleaved_groups():
    rewards, group_ids = interleaved_batch(num_groups=4, group_size=6, seed=0)
    assert group_ids != sorted(group_ids)
    out = compute_advantages(to_tensor(rewards), torch.tensor(group_ids), scale_rewards="group")
    assert_close(out.advantages, naive_advantages(rewards, group_ids, scale="group"))


def test_permuting_samples_permutes_advantages():
    rewards, group_ids = interleaved_batch(num_groups=3, group_size=5, seed=2)
    r, g = to_tensor(rewards), torch.tensor(group_ids)
    perm = torch.randperm(len(group_ids), generator=torch.Generator().manual_seed(0))
    base = compute_advantages(r, g)
    permuted = compute_advantages(r[perm], g[perm])
    torch.testing.assert_close(permuted.advantages, base.advantages[perm])
    torch.testing.assert_close(permuted.group_std, base.group_std[perm])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_modes_match_naive_and_groups_sum_to_zero(scale):
    # Rewards in [0, 10] so that "batch" and "group" std differ markedly from 1 and from each other.
    rewards, group_ids = interleaved_batch(num_groups=4, group_size=8, seed=3, scales=[10.0])
    out = compute_advantages(to_tensor(rewards), torch.tensor(group_ids), scale_rewards=scale, adv_clip_max=1e6)
    assert_close(out.advantages, naive_advantages(rewards, group_ids, scale=scale, clip=1e6))
    for gid in set(group_ids):
        mask = torch.tensor(group_ids) == gid
        assert out.advantages[mask].sum().abs().item() < 1e-4


def test_batch_and_none_scaling_relation():
    rewards, group_ids = interleaved_batch(num_groups=3, group_size=4, seed=4, scales=[10.0])
    r, g = to_tensor(rewards), torch.tensor(group_ids)
    none = compute_advantages(r, g, scale_rewards="none", adv_clip_max=1e6).advantages
    batch = compute_advantages(r, g, scale_rewards="batch", adv_clip_max=1e6).advantages
    batch_std = _pstd([row[0] for row in rewards])
    # "none" keeps the centred rewards as they are; "batch" divides all of them by the same (whole batch) std.
    assert none.abs().max() > 1.0
    torch.testing.assert_close(batch, none / (batch_std + EPS), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------------------------------------------------


def test_advantages_are_clipped_at_adv_clip_max():
    # One outlier in a group of 50: its group-normalised advantage is about sqrt(49) = 7.
    n = 50
    rewards = [[1.0]] + [[0.0]] * (n - 1) + [[0.0]] + [[1.0]] * (n - 1)
    group_ids = [0] * n + [1] * n
    r, g = to_tensor(rewards), torch.tensor(group_ids)
    unclipped = naive_advantages(rewards, group_ids, clip=math.inf)
    assert unclipped[0] > 6.9 and unclipped[n] < -6.9

    out = compute_advantages(r, g, adv_clip_max=5.0)
    assert out.advantages[0].item() == pytest.approx(5.0)
    assert out.advantages[n].item() == pytest.approx(-5.0)
    assert out.advantages.abs().max().item() <= 5.0
    # The other samples are well inside the bound and unchanged.
    assert_close(out.advantages[1:n], unclipped[1:n])

    out = compute_advantages(r, g, adv_clip_max=0.1)
    assert_close(out.advantages, naive_advantages(rewards, group_ids, clip=0.1))
    assert out.advantages.abs().max().item() == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------------------
# multiple reward functions, weights, NaN
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_nan_rewards_are_ignored(aggregation):
    rewards, group_ids = interleaved_batch(num_groups=3, group_size=6, num_funcs=2, seed=5, scales=[1.0, 3.0])
    # The second function does not apply to some samples (None), the first to one other sample.
    for i in (0, 4, 7, 11):
        rewards[i][1] = None
    rewards[2][0] = None
    weights = [1.5, 0.5]
    out = compute_advantages(
        to_tensor(rewards), torch.tensor(group_ids), torch.tensor(weights), aggregation=aggregation, adv_clip_max=1e6
    )
    assert torch.isfinite(out.advantages).all()
    assert torch.isfinite(out.rewards).all()
    expected_sum = naive_weighted_sum(rewards, weights)
    assert_close(out.rewards, expected_sum)
    # A function that is NaN for a sample contributes nothing: its reward is the other function's weighted reward.
    assert out.rewards[0].item() == pytest.approx(1.5 * rewards[0][0], rel=1e-6)
    assert out.rewards[2].item() == pytest.approx(0.5 * rewards[2][1], rel=1e-6)
    expected = naive_advantages(rewards, group_ids, weights, aggregation=aggregation, clip=1e6)
    assert_close(out.advantages, expected)


def test_nan_reward_does_not_shift_group_statistics_of_that_function():
    # normalize_then_sum: a NaN must be left out of its group's mean/std, not counted as 0.
    rewards = [[1.0], [2.0], [3.0], [None]]
    out = compute_advantages(to_tensor(rewards), torch.tensor([0, 0, 0, 0]), aggregation="normalize_then_sum")
    a = 1 / (math.sqrt(2 / 3) + EPS)
    assert_close(out.advantages, [-a, 0.0, a, 0.0])


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_weight_drops_a_function(aggregation, scale):
    rewards, group_ids = interleaved_batch(num_groups=3, group_size=5, num_funcs=2, seed=6, scales=[1.0, 100.0])
    r, g = to_tensor(rewards), torch.tensor(group_ids)
    kwargs = {"aggregation": aggregation, "scale_rewards": scale, "adv_clip_max": 1e6}
    weighted = compute_advantages(r, g, torch.tensor([2.0, 0.0]), **kwargs)
    if aggregation == "sum_then_normalize":
        # The weight scales the reward, before normalisation.
        expected = compute_advantages(2.0 * r[:, :1], g, **kwargs).advantages
    else:
        # The weight scales the normalised reward.
        expected = 2.0 * compute_advantages(r[:, :1], g, **kwargs).advantages
    torch.testing.assert_close(weighted.advantages, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weighted.rewards, 2.0 * r[:, 0])
    assert_close(weighted.advantages, naive_advantages(rewards, group_ids, [2.0, 0.0], scale, aggregation, clip=1e6))


def test_default_weights_are_ones():
    rewards, group_ids = interleaved_batch(num_groups=2, group_size=4, num_funcs=3, seed=7)
    r, g = to_tensor(rewards), torch.tensor(group_ids)
    torch.testing.assert_close(compute_advantages(r, g).advantages, compute_advantages(r, g, torch.ones(3)).advantages)
    assert_close(compute_advantages(r, g).rewards, [sum(row) for row in rewards])


def test_normalize_then_sum_lets_a_small_scale_reward_matter():
    # One reward in [0, 1000], one in [0, 1].
    rewards, group_ids = interleaved_batch(num_groups=4, group_size=8, num_funcs=2, seed=8, scales=[1000.0, 1.0])
    r, g = to_tensor(rewards), torch.tensor(group_ids)
    big = naive_normalize([row[0] for row in rewards], group_ids, "group")
    small = naive_normalize([row[1] for row in rewards], group_ids, "group")

    nts = compute_advantages(r, g, aggregation="normalize_then_sum", adv_clip_max=1e6).advantages
    stn = compute_advantages(r, g, aggregation="sum_then_normalize", adv_clip_max=1e6).advantages
    assert_close(nts, naive_advantages(rewards, group_ids, aggregation="normalize_then_sum", clip=1e6))
    assert_close(stn, naive_advantages(rewards, group_ids, aggregation="sum_then_normalize", clip=1e6))

    # normalize_then_sum: each reward normalised in its group, then summed -> both count equally.
    assert_close(nts, [b + s for b, s in zip(big, small)])
    # sum_then_normalize: the big reward drowns the small one.
    assert (stn - torch.tensor(big)).abs().max().item() < 0.05
    assert (nts - stn).abs().max().item() > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# zero-std groups
# ---------------------------------------------------------------------------------------------------------------------


def test_frac_zero_std_counts_groups_with_identical_rewards():
    # Groups 5 and 9 are constant (group 9 via two functions that sum to a constant), group 2 varies.
    rewards = [[2.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.5], [0.25, 0.75], [2.0, 0.0], [4.0, 0.0], [0.0, 1.0]]
    group_ids = [5, 2, 5, 9, 9, 5, 2, 9]
    out = compute_advantages(to_tensor(rewards), torch.tensor(group_ids))
    assert out.frac_zero_std == pytest.approx(2 / 3)
    mask = torch.tensor([gid in (5, 9) for gid in group_ids])
    assert torch.equal(out.advantages[mask], torch.zeros(int(mask.sum())))
    assert torch.equal(out.group_std[mask], torch.zeros(int(mask.sum())))
    assert (out.advantages[~mask].abs() > 0.5).all()


def test_frac_zero_std_is_zero_when_all_groups_vary_and_one_when_none_do():
    rewards, group_ids = interleaved_batch(num_groups=3, group_size=4, seed=9)
    assert compute_advantages(to_tensor(rewards), torch.tensor(group_ids)).frac_zero_std == 0.0
    constant = [[float(gid)] for gid in group_ids]
    out = compute_advantages(to_tensor(constant), torch.tensor(group_ids))
    assert out.frac_zero_std == 1.0
    assert torch.equal(out.advantages, torch.zeros(len(group_ids)))


@pytest.mark.parametrize("value, group_size", [(0.9, 3), (0.7, 24), (123.456, 24)])
def test_identical_float_rewards_give_zero_advantages(value, group_size):
    rewards = [[value]] * group_size + [[float(i)] for i in range(group_size)]
    group_ids = [0] * group_size + [1] * group_size
    out = compute_advantages(to_tensor(rewards), torch.tensor(group_ids))
    assert out.frac_zero_std == 0.5
    assert out.advantages[:group_size].abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------


def test_invalid_aggregation_raises_naming_the_value():
    with pytest.raises(ValueError, match="mean_of_ranks"):
        compute_advantages(torch.rand(4, 2), torch.tensor([0, 0, 1, 1]), aggregation="mean_of_ranks")


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_invalid_scale_rewards_raises_naming_the_value(aggregation):
    with pytest.raises(ValueError, match="global_std"):
        compute_advantages(
            torch.rand(4, 2), torch.tensor([0, 0, 1, 1]), scale_rewards="global_std", aggregation=aggregation
        )


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="rewards"):
        compute_advantages(torch.rand(4), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(torch.rand(4, 1), torch.tensor([0, 0, 1]))
