"""Rewards -> group-relative advantages (pure tensor functions, no model).

A *group* is the set of images sampled for one prompt. Samples carry a group id, so groups may arrive in any order
and span processes (gather first, then call these functions on the whole batch).
"""

from dataclasses import dataclass

import torch

STD_EPS = 1e-4


@dataclass
class AdvantageOutput:
    """What the advantage computation hands back to the trainer (all tensors are per sample, shape (N,))."""

    advantages: torch.Tensor
    """Clipped advantages."""
    rewards: torch.Tensor
    """The aggregated (weighted) reward of each sample, before normalisation."""
    group_std: torch.Tensor
    """Standard deviation of the aggregated reward within each sample's group."""
    frac_zero_std: float
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""


def group_stats(
    values: torch.Tensor, group_ids: torch.Tensor, *, unbiased: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and standard deviation of `values` within each sample's group.

    NaN entries (not applicable) are ignored; a group with no finite value gets mean 0 and std 0.

    Args:
        values: shape (N,).
        group_ids: shape (N,), any integer ids.
        unbiased: divide the squared deviations by `n - 1` (Bessel's correction, `torch.std`'s default) instead of
            `n` (the population std); a group with a single finite value then gets std 0.

    Returns:
        `(mean, std)`, each of shape (N,), broadcast back to the samples.
    """
    out_dtype = values.dtype
    values = values.double()  # float32 sums leave ~1e-7 residues that `/ (std + 1e-4)` would amplify
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    valid = ~torch.isnan(values)
    filled = torch.where(valid, values, torch.zeros_like(values))
    count = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, valid.to(values))
    total = torch.zeros_like(count).index_add_(0, inverse, filled)
    mean = total / count.clamp(min=1)
    sq_dev = torch.where(valid, (values - mean[inverse]) ** 2, torch.zeros_like(values))
    divisor = (count - 1).clamp(min=1) if unbiased else count.clamp(min=1)
    var = torch.zeros_like(count).index_add_(0, inverse, sq_dev) / divisor
    return mean[inverse].to(out_dtype), var.sqrt()[inverse].to(out_dtype)


def _normalize(values: torch.Tensor, group_ids: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    mean, std = group_stats(values, group_ids)
    centred = values - mean
    if scale_rewards == "group":
        return centred / (std + STD_EPS)
    if scale_rewards == "batch":
        finite = values[~torch.isnan(values)]
        batch_std = finite.std(unbiased=False) if finite.numel() else values.new_zeros(())
        return centred / (batch_std + STD_EPS)
    if scale_rewards == "none":
        return centred
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    reward_weights: torch.Tensor | None = None,
    *,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
    adv_clip_max: float = 5.0,
) -> AdvantageOutput:
    """Group-relative advantages, as in Flow-GRPO / TRL's GRPO.

    `A_i = (r_i - mean_group) / (std + 1e-4)`, with the population standard deviation of the group (`"group"`), of the
    whole batch (`"batch"`, Flow-GRPO's `global_std`), or 1 (`"none"`), then clipped to `+-adv_clip_max`.

    Args:
        rewards: shape (N, F), one column per reward function; NaN means "not applicable" and is ignored.
        group_ids: shape (N,), equal for the samples of one prompt group.
        reward_weights: shape (F,); defaults to ones.
        scale_rewards: `"group"`, `"batch"` or `"none"`.
        aggregation: `"sum_then_normalize"` (weighted sum of the raw rewards, then normalise) or
            `"normalize_then_sum"` (normalise each reward within its group, then weighted sum).
        adv_clip_max: clip bound of the advantages.
    """
    if rewards.dim() != 2 or rewards.shape[0] != group_ids.shape[0]:
        raise ValueError(
            f"rewards must be (N, F) and group_ids (N,), got {tuple(rewards.shape)} and {group_ids.shape}"
        )
    rewards = rewards.float()
    if reward_weights is None:
        reward_weights = torch.ones(rewards.shape[1], device=rewards.device)
    reward_weights = reward_weights.to(rewards)

    weighted = torch.nansum(rewards * reward_weights, dim=1)
    if aggregation == "sum_then_normalize":
        advantages = _normalize(weighted, group_ids, scale_rewards)
    elif aggregation == "normalize_then_sum":
        per_func = torch.stack(
            [_normalize(rewards[:, k], group_ids, scale_rewards) for k in range(rewards.shape[1])], dim=1
        )
        advantages = torch.nansum(per_func * reward_weights, dim=1)
    else:
        raise ValueError(f"aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got {aggregation!r}.")

    _, group_std = group_stats(weighted, group_ids)
    first_of_group = _first_index_of_each_group(group_ids)
    zero_std = torch.isclose(group_std[first_of_group], torch.zeros_like(group_std[first_of_group]))
    return AdvantageOutput(
        advantages=advantages.clamp(-adv_clip_max, adv_clip_max),
        rewards=weighted,
        group_std=group_std,
        frac_zero_std=zero_std.float().mean().item() if zero_std.numel() else 0.0,
    )


def _first_index_of_each_group(group_ids: torch.Tensor) -> torch.Tensor:
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    positions = torch.arange(group_ids.numel(), device=group_ids.device)
    first = torch.full((num_groups,), group_ids.numel(), dtype=torch.long, device=group_ids.device)
    return first.scatter_reduce_(0, inverse, positions, reduce="amin")


# --------------------------------------------------------------------------------------------------------------------
# Pref-GRPO: pairwise preferences -> win rates -> advantages
# --------------------------------------------------------------------------------------------------------------------
WIN_RATE_STD_EPS = 1e-8


def preference_pairs(
    group_ids: torch.Tensor, num_opponents: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The pairs of samples to compare: within each group, every unordered pair, or `num_opponents` random opponents
    per sample (the union of those pairs, so a sample may meet more than `num_opponents` opponents).

    Which image of a pair is shown first is random (`generator`), so a judge's position bias is not tied to the
    samples' order. The result depends only on `group_ids`, `num_opponents` and the generator's state: seed it the
    same way on every process.

    Args:
        group_ids: shape (N,), equal for the samples of one prompt group.
        num_opponents: `None` for all pairs (`G (G - 1) / 2` per group), else the number of random opponents of each
            sample (at most `G - 1`).
        generator: a CPU generator for the random choices.

    Returns:
        A long tensor of shape (P, 2): indices `(a, b)` into the batch, each pair once.
    """
    group_ids = group_ids.cpu()
    pairs: list[tuple[int, int]] = []
    for group in torch.unique(group_ids, sorted=True):
        members = (group_ids == group).nonzero().flatten().tolist()
        size = len(members)
        if num_opponents is None or num_opponents >= size - 1:
            chosen = {(i, j) for i in range(size) for j in range(i + 1, size)}
        else:
            chosen = set()
            for i in range(size):
                others = [j for j in range(size) if j != i]
                picks = torch.randperm(len(others), generator=generator)[:num_opponents].tolist()
                chosen.update((min(i, others[p]), max(i, others[p])) for p in picks)
        for i, j in sorted(chosen):
            swap = bool(torch.randint(2, (1,), generator=generator).item())
            pairs.append((members[j], members[i]) if swap else (members[i], members[j]))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def symmetric_preference(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """P(a > b) from both query orders, `(p_ab + 1 - p_ba) / 2`: a judge that always prefers the first image gives
    0.5 (a tie), whatever the images."""
    return 0.5 * (p_ab + 1.0 - p_ba)


def win_rates(num_samples: int, pairs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Win rate of each sample: the mean of P(sample wins) over the pairs it took part in.

    With all pairs of a group of G this is `w_i = 1/(G-1) sum_{j != i} p(i > j)`, and the group's mean win rate is
    exactly 0.5. Samples in no pair get 0.5.

    Args:
        num_samples: N.
        pairs: shape (P, 2), indices `(a, b)`.
        probs: shape (P,), P(a preferred over b): hard verdicts 1 / 0.5 / 0 or probabilities.
    """
    probs = probs.double().cpu()
    pairs = pairs.cpu()
    wins = torch.zeros(num_samples, dtype=torch.float64)
    games = torch.zeros(num_samples, dtype=torch.float64)
    wins.index_add_(0, pairs[:, 0], probs)
    wins.index_add_(0, pairs[:, 1], 1.0 - probs)
    games.index_add_(0, pairs[:, 0], torch.ones_like(probs))
    games.index_add_(0, pairs[:, 1], torch.ones_like(probs))
    return torch.where(games > 0, wins / games.clamp(min=1), torch.full_like(wins, 0.5)).float()


def win_rate_advantages(
    win_rate: torch.Tensor, group_ids: torch.Tensor, *, scope: str = "group", unbiased: bool = False
) -> torch.Tensor:
    """Pref-GRPO's advantage: `A_i = (w_i - mean(w)) / (std(w) + 1e-8)`.

    Win rates move on a grid set by the number of opponents and reflect ranks, not score gaps: a group whose images
    are indistinguishable (all ties) gets advantages of exactly 0 where `(r - mean) / (std + eps)` of near-equal scores
    is unit-size noise, and a strict ranking gives at most `sqrt(3 (G-1)/(G+1)) < sqrt(3)` whatever the score gaps
    (with the population std of the group).

    Args:
        win_rate: shape (N,).
        group_ids: shape (N,), equal for the samples of one prompt group.
        scope: `"group"`: mean and std of the sample's group (the released code with `--use_group`); `"batch"`: mean
            and std of the whole gathered batch (without it). With every pair compared, both means are exactly 0.5.
        unbiased: Bessel-corrected std (`n - 1`, `torch.std` as in the released code) instead of the population std.
    """
    if scope == "group":
        mean, std = group_stats(win_rate, group_ids, unbiased=unbiased)
    elif scope == "batch":
        everything = torch.zeros_like(group_ids)
        mean, std = group_stats(win_rate, everything, unbiased=unbiased)
    else:
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}.")
    return (win_rate - mean) / (std + WIN_RATE_STD_EPS)


def mix_advantages(
    parts: list[torch.Tensor], weights: list[float] | torch.Tensor, adv_clip_max: float = 5.0
) -> torch.Tensor:
    """Weighted sum of per-sample advantages from several sources (pointwise rewards, preference functions), clipped
    to `+-adv_clip_max`: Pref-GRPO's mixing at the advantage level."""
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"mix_advantages got {len(parts)} advantage vectors and {len(weights)} weights.")
    total = sum(float(w) * part.float() for w, part in zip(weights, parts))
    return total.clamp(-adv_clip_max, adv_clip_max)
