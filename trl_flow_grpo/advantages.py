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


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and population standard deviation of `values` within each sample's group.

    NaN entries (not applicable) are ignored; a group with no finite value gets mean 0 and std 0.

    Args:
        values: shape (N,).
        group_ids: shape (N,), any integer ids.

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
    var = torch.zeros_like(count).index_add_(0, inverse, sq_dev) / count.clamp(min=1)
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
