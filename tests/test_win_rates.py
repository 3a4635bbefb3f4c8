"""Pref-GRPO maths (trl_flow_grpo.advantages): pairs, win rates, win-rate advantages, mixing (ALGORITHMS.md s. 2)."""

import itertools
import math

import pytest
import torch

from trl_flow_grpo.advantages import (
    mix_advantages,
    preference_pairs,
    symmetric_preference,
    win_rate_advantages,
    win_rates,
)


def groups(*sizes: int) -> torch.Tensor:
    """Group ids for consecutive groups, shuffled so that no code can rely on groups being contiguous."""
    ids = torch.cat([torch.full((n,), 10 * g + 7) for g, n in enumerate(sizes)])
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]


def test_all_pairs_are_every_unordered_pair_within_each_group_once():
    ids = groups(8, 8, 3)
    pairs = preference_pairs(ids, generator=torch.Generator().manual_seed(0))
    assert len(pairs) == 28 + 28 + 3
    unordered = {tuple(sorted(p)) for p in pairs.tolist()}
    assert len(unordered) == len(pairs)
    expected = set()
    for g in ids.unique():
        members = (ids == g).nonzero().flatten().tolist()
        expected |= {tuple(sorted(p)) for p in itertools.combinations(members, 2)}
    assert unordered == expected


def test_which_image_comes_first_is_random_and_reproducible():
    ids = groups(8, 8)
    first = preference_pairs(ids, generator=torch.Generator().manual_seed(1))
    again = preference_pairs(ids, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    lower_first = (first[:, 0] < first[:, 1]).float().mean().item()
    assert 0.2 < lower_first < 0.8  # not always the lower index first (position bias would follow sample order)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_opponents_gives_every_image_at_least_k_opponents_from_its_group(k):
    ids = groups(8, 8, 8)
    pairs = preference_pairs(ids, num_opponents=k, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ids[pairs[:, 0]], ids[pairs[:, 1]])
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == len(pairs)
    meetings = torch.bincount(pairs.flatten(), minlength=len(ids))
    assert meetings.min().item() >= k
    assert len(pairs) <= min(len(ids) * k, 3 * 28)
    if k <= 2:
        assert len(pairs) < 3 * 28  # fewer judge calls than all pairs


def test_win_rate_is_the_mean_probability_of_winning_with_ties_half():
    # 3 images: a beats b, a ties c, b beats c (soft 0.8), given in mixed positions.
    pairs = torch.tensor([[0, 1], [2, 0], [2, 1]])
    probs = torch.tensor([1.0, 0.5, 0.2])  # P(first preferred)
    rates = win_rates(3, pairs, probs)
    torch.testing.assert_close(rates, torch.tensor([(1.0 + 0.5) / 2, (0.0 + 0.8) / 2, (0.5 + 0.2) / 2]))


def test_with_all_pairs_the_group_mean_win_rate_is_exactly_half():
    ids = groups(8, 6)
    pairs = preference_pairs(ids, generator=torch.Generator().manual_seed(0))
    probs = torch.rand(len(pairs), generator=torch.Generator().manual_seed(1))
    rates = win_rates(len(ids), pairs, probs)
    for g in ids.unique():
        assert rates[ids == g].double().mean().item() == pytest.approx(0.5, abs=1e-6)


def test_symmetric_query_cancels_a_judge_that_always_prefers_the_first_image():
    p_ab, p_ba = torch.ones(5), torch.ones(5)  # "Image 1 is better", whatever the order
    assert torch.equal(symmetric_preference(p_ab, p_ba), torch.full((5,), 0.5))
    consistent = symmetric_preference(torch.tensor([1.0, 0.7]), torch.tensor([0.0, 0.3]))
    torch.testing.assert_close(consistent, torch.tensor([1.0, 0.7]))


def test_indistinguishable_images_get_zero_advantage():
    ids = groups(8)
    pairs = preference_pairs(ids, generator=torch.Generator().manual_seed(0))
    adv = win_rate_advantages(win_rates(8, pairs, torch.full((len(pairs),), 0.5)), ids)
    assert torch.equal(adv, torch.zeros(8))


@pytest.mark.parametrize("size", [4, 8, 24])
def test_strict_ranking_gives_standardised_ranks_bounded_by_sqrt3(size):
    ids = torch.zeros(size, dtype=torch.long)
    quality = torch.randperm(size, generator=torch.Generator().manual_seed(size)).float()
    pairs = preference_pairs(ids, generator=torch.Generator().manual_seed(0))
    probs = (quality[pairs[:, 0]] > quality[pairs[:, 1]]).float()
    adv = win_rate_advantages(win_rates(size, pairs, probs), ids)
    ranks = quality  # quality is a permutation of 0..G-1: it is the rank
    expected = (ranks - ranks.mean()) / ranks.std(unbiased=False)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    bound = math.sqrt(3 * (size - 1) / (size + 1))
    assert adv.abs().max().item() == pytest.approx(bound, rel=1e-5)


def test_win_rate_advantages_ignore_score_magnitudes_unlike_std_normalisation():
    """An outlier score (e.g. a reward hack) dominates a std-normalised group; ranks keep the others' order."""
    from trl_flow_grpo.advantages import compute_advantages

    ids = torch.zeros(8, dtype=torch.long)
    scores = torch.tensor([0.500, 0.501, 0.502, 0.503, 0.504, 0.505, 0.506, 5.0])
    grpo = compute_advantages(scores[:, None], ids).advantages
    pairs = preference_pairs(ids, generator=torch.Generator().manual_seed(0))
    probs = (scores[pairs[:, 0]] > scores[pairs[:, 1]]).float()
    pref = win_rate_advantages(win_rates(8, pairs, probs), ids)
    assert grpo[:7].max() - grpo[:7].min() < 0.01  # the 7 ordinary images become indistinguishable
    assert pref[:7].max() - pref[:7].min() > 2.0  # their order still carries signal
    assert pref.abs().max() < grpo.abs().max()


WIN_RATES = torch.tensor([1.0, 0.5, 0.0, 0.75, 0.25, 0.5])  # two groups of 3, written out below
GROUP_IDS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_win_rate_advantages_group_population_std_is_the_default():
    # Group 0: mean 0.5, population std sqrt((0.25 + 0 + 0.25) / 3); group 1: mean 0.5, sqrt((0.0625 * 2) / 3).
    std0, std1 = math.sqrt(0.5 / 3), math.sqrt(0.125 / 3)
    expected = torch.tensor([0.5 / std0, 0.0, -0.5 / std0, 0.25 / std1, -0.25 / std1, 0.0])
    torch.testing.assert_close(win_rate_advantages(WIN_RATES, GROUP_IDS), expected, rtol=1e-6, atol=1e-6)
    explicit = win_rate_advantages(WIN_RATES, GROUP_IDS, scope="group", unbiased=False)
    assert torch.equal(explicit, win_rate_advantages(WIN_RATES, GROUP_IDS))


def test_win_rate_advantages_bessel_corrected_group_std():
    # The released Pref-GRPO code with --use_group: (w - group mean) / (torch.std(group) + 1e-8), std over n - 1.
    expected = torch.cat([(g - g.mean()) / (g.std() + 1e-8) for g in (WIN_RATES[:3], WIN_RATES[3:])])
    torch.testing.assert_close(win_rate_advantages(WIN_RATES, GROUP_IDS, unbiased=True), expected)
    # Bessel's correction shrinks every advantage by sqrt((n - 1) / n) = sqrt(2 / 3) here.
    ratio = win_rate_advantages(WIN_RATES, GROUP_IDS, unbiased=True)[0] / win_rate_advantages(WIN_RATES, GROUP_IDS)[0]
    assert ratio.item() == pytest.approx(math.sqrt(2 / 3), rel=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
def test_win_rate_advantages_over_the_batch(unbiased):
    # Without --use_group: (w - batch mean) / (batch std + 1e-8), over all 6 samples.
    wins = torch.tensor([1.0, 0.5, 0.0, 0.9, 0.6, 0.3])  # group means 0.5 and 0.6: the batch mean is 0.55
    batch_std = wins.std(unbiased=unbiased)
    expected = (wins - 0.55) / (batch_std + 1e-8)
    got = win_rate_advantages(wins, GROUP_IDS, scope="batch", unbiased=unbiased)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got[0].item() != pytest.approx(win_rate_advantages(wins, GROUP_IDS, unbiased=unbiased)[0].item())


def test_win_rate_advantages_bessel_on_a_single_sample_group_is_zero_not_nan():
    adv = win_rate_advantages(torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0, 1, 1]), unbiased=True)
    assert torch.isfinite(adv).all() and adv[0].item() == 0.0


def test_win_rate_advantages_reject_an_unknown_scope():
    with pytest.raises(ValueError, match="scope must be 'group' or 'batch', got 'global'"):
        win_rate_advantages(WIN_RATES, GROUP_IDS, scope="global")


def test_mix_advantages_is_a_clipped_weighted_sum():
    a, b = torch.tensor([1.0, -1.0, 4.0]), torch.tensor([2.0, 0.0, 4.0])
    torch.testing.assert_close(mix_advantages([a, b], [0.4, 0.6], adv_clip_max=3.0), torch.tensor([1.6, -0.4, 3.0]))
    with pytest.raises(ValueError, match="2 advantage vectors and 1 weights"):
        mix_advantages([a, b], [1.0])
