"""Drive a pipeline adapter over the denoising grid: SDE steps are recorded, the others are ODE steps.

Which steps are SDE comes from `windows` (the trainer asks its `WindowSchedule` for the iteration's window); the ODE
steps after the window may use a compressed schedule and DPM-Solver++(2M) (`dpm`).

`rollout` samples (no gradient) and returns a `Trajectory`; `step_log_prob` recomputes the log-probability of one
recorded step with gradients, through the very same code path, so that on the first on-policy pass the ratio of
new to old probabilities is exactly 1. `steps_log_prob` recomputes several recorded steps in one batched forward
(`steps_per_backward`).
"""

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .dpm import ODE_SOLVERS, compressed_schedule, solve_ode
from .steps import ode_step, sde_step_with_logprob

if TYPE_CHECKING:
    from ..pipelines.base import Conditioning, PipelineAdapter


def _select(cond: "Conditioning", index: list[int]) -> "Conditioning":
    """The conditioning of a subset of the samples (`pipelines.base.select`, without importing diffusers here)."""
    return {key: value[index] for key, value in cond.items()}


@dataclass
class Trajectory:
    """The recorded part of a batch of rollouts (B samples, K recorded steps)."""

    latents: torch.Tensor
    """(B, K, *latent): input of each recorded step, float32."""
    next_latents: torch.Tensor
    """(B, K, *latent): sampled output of each recorded step, float32."""
    log_probs: torch.Tensor
    """(B, K): log p_old(next_latents | latents), per-element mean."""
    step_indices: list[int]
    """The K grid steps that were recorded (indices into the sigma grid)."""
    final_latents: torch.Tensor
    """(B, *latent): the denoised latents."""
    transformer_calls: int = 0
    """Transformer forward passes of the rollout, counted per sample (a CFG evaluation of a sample counts 2)."""
    transformer_calls_saved: int = 0
    """Forward passes the shared prefix saved, compared with computing it for every sample (same unit)."""
    means: torch.Tensor | None = None
    """(B, K, *latent): the mean of each recorded step's Gaussian, float32; only with `record_means`."""


def _prefix_representatives(prefix_groups: Sequence[Hashable], batch: int) -> tuple[list[int], list[int]]:
    """For each distinct group id, the first row that has it; and for each row, the index of its representative."""
    if len(prefix_groups) != batch:
        raise ValueError(f"prefix_groups has {len(prefix_groups)} entries for a batch of {batch} samples.")
    first: dict[Hashable, int] = {}
    inverse = [first.setdefault(group, len(first)) for group in prefix_groups]
    representatives = [0] * len(first)
    for row in reversed(range(batch)):
        representatives[inverse[row]] = row
    return representatives, inverse


@torch.no_grad()
def rollout(
    adapter: "PipelineAdapter",
    transformer: torch.nn.Module,
    cond: "Conditioning",
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    *,
    sde_steps: Sequence[int],
    noise_level: float,
    sde_type: str,
    guidance_scale: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    ode_solver: str = "euler",
    ode_compression: float = 1.0,
    prefix_groups: Sequence[Hashable] | None = None,
    record_means: bool = False,
) -> Trajectory:
    """Sample B latents from `noise` over the grid `sigmas` (T + 1 points).

    Steps in `sde_steps` are stochastic and recorded; all others are deterministic. The rollout has three parts:

    1. **Prefix**, the steps before the first SDE step: Euler steps on the grid. With `prefix_groups`, rows with the
       same group id must start from the same noise with the same conditioning (`same_latent`); their prefix is
       identical, so it is computed once per group and the group branches from there: `U * s` forward passes instead
       of `B * s` (U groups in the batch, s prefix steps).
    2. **Window**, from the first to the last SDE step, on the grid: SDE steps (recorded), Euler steps in any gap.
    3. **Tail**, the steps after the last SDE step (all steps when there is none): `ode_solver` (`"euler"` or
       `"dpm_solver++_2m"`) on the grid, or on `compressed_schedule(sigmas, end, ode_compression)` when
       `ode_compression < 1` (MixGRPO-Flash).

    `prefix_groups` (one hashable id per row, e.g. the dataset row of its prompt) promises that rows with the same id
    have the same prompt and the same noise; the noise is checked, and the group's prefix uses its first row's
    conditioning.

    With `record_means` the mean of each recorded step's Gaussian is kept too (GRPO-Guard's RatioNorm needs the
    sampling policy's means; one more latent-sized tensor per recorded step).

    With the defaults (Euler, no compression, no groups) every ODE step is the plain Euler step on the grid, as it
    was before windows existed. The SDE noise is drawn from `generator` for the whole batch at each SDE step, so the
    shared prefix does not change which noise a sample gets: images are the same with or without it (up to the
    batch-size dependence of the model's kernels).
    """
    num_steps = sigmas.numel() - 1
    sde_list = sorted(set(sde_steps))
    if sde_list and not 0 <= sde_list[0] <= sde_list[-1] < num_steps:
        raise ValueError(f"sde_steps must be grid steps in [0, {num_steps}), got {sde_list}.")
    if ode_solver not in ODE_SOLVERS:
        raise ValueError(f"Unknown ode_solver {ode_solver!r}; expected one of {', '.join(map(repr, ODE_SOLVERS))}.")
    sde_set = set(sde_list)
    prefix_end = sde_list[0] if sde_list else 0
    tail_start = sde_list[-1] + 1 if sde_list else 0

    x = noise.float()
    batch = x.shape[0]
    forwards_per_sample = adapter.forwards_per_sample(guidance_scale)
    calls = 0
    tail_sigmas = compressed_schedule(sigmas, tail_start, ode_compression)

    # 1. Prefix: deterministic Euler steps, once per group when the groups share their starting point.
    rows, prefix_x, prefix_cond, inverse = list(range(batch)), x, cond, None
    if prefix_groups is not None and prefix_end > 0:
        rows, inverse = _prefix_representatives(prefix_groups, batch)
        # The noise must match exactly. The conditioning is not compared: text encoders can give the same prompt
        # embeddings that differ in the last bit at different batch positions; the group uses its first row's.
        for row, rep in enumerate(inverse):
            if not torch.equal(noise[row], noise[rows[rep]]):
                raise ValueError(
                    f"prefix_groups puts rows {rows[rep]} and {row} in one group, but their noise differs: a prefix "
                    "can only be shared by samples of one prompt that start from the same noise (`same_latent=True`)."
                )
        if len(rows) < batch:
            prefix_x, prefix_cond = x[rows], _select(cond, rows)
        else:
            inverse = None
    for i in range(prefix_end):
        sigma = sigmas[i]
        v = adapter.velocity(transformer, prefix_x, sigma.expand(prefix_x.shape[0]), prefix_cond, guidance_scale)
        prefix_x = ode_step(v, prefix_x, sigma, sigmas[i + 1])
    calls += prefix_end * len(rows) * forwards_per_sample
    saved = prefix_end * (batch - len(rows)) * forwards_per_sample
    x = prefix_x[inverse] if inverse is not None else prefix_x

    # 2. Window: SDE steps are recorded; gaps between them are Euler steps.
    recorded, recorded_next, log_probs, means = [], [], [], []
    for i in range(prefix_end, tail_start):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = adapter.velocity(transformer, x, sigma.expand(batch), cond, guidance_scale)
        if i in sde_set:
            x_next, log_prob, mean, _ = sde_step_with_logprob(
                v, x, sigma, sigma_next, noise_level, sde_type, generator=generator, sigma_1=sigmas[1]
            )
            if record_means:
                means.append(mean)
            recorded.append(x)
            recorded_next.append(x_next)
            log_probs.append(log_prob)
        else:
            x_next = ode_step(v, x, sigma, sigma_next)
        x = x_next
    calls += (tail_start - prefix_end) * batch * forwards_per_sample

    # 3. Tail: the ODE after the window, possibly on a compressed schedule with a higher-order solver.
    def velocity(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return adapter.velocity(transformer, latents, sigma.expand(batch), cond, guidance_scale)

    x = solve_ode(velocity, x, tail_sigmas, ode_solver)
    calls += (tail_sigmas.numel() - 1) * batch * forwards_per_sample

    empty = x.new_zeros((batch, 0, *x.shape[1:]))
    return Trajectory(
        latents=torch.stack(recorded, dim=1) if recorded else empty,
        next_latents=torch.stack(recorded_next, dim=1) if recorded else empty,
        log_probs=torch.stack(log_probs, dim=1) if log_probs else x.new_zeros((batch, 0)),
        step_indices=sde_list,
        final_latents=x,
        transformer_calls=calls,
        transformer_calls_saved=saved,
        means=(torch.stack(means, dim=1) if means else empty) if record_means else None,
    )


def step_log_prob(
    adapter: "PipelineAdapter",
    transformer: torch.nn.Module,
    cond: "Conditioning",
    sigmas: torch.Tensor,
    step: int,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    *,
    noise_level: float,
    sde_type: str,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of a recorded transition under `transformer`, differentiable.

    Returns `(log_prob (B,), mean, std_dev_t, velocity)`: the step's Gaussian mean and diffusion coefficient feed
    the KL to a reference policy.
    """
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    v = adapter.velocity(transformer, latents, sigma.expand(latents.shape[0]), cond, guidance_scale)
    _, log_prob, mean, std = sde_step_with_logprob(
        v, latents, sigma, sigma_next, noise_level, sde_type, prev_sample=next_latents, sigma_1=sigmas[1]
    )
    return log_prob, mean, std, v


def steps_log_prob(
    adapter: "PipelineAdapter",
    transformer: torch.nn.Module,
    cond: "Conditioning",
    sigmas: torch.Tensor,
    steps: Sequence[int],
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    *,
    noise_level: float,
    sde_type: str,
    guidance_scale: float,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`step_log_prob` of K recorded steps of the same B samples in one batched forward of K * B samples.

    `latents` and `next_latents` are (B, K, *latent), the recorded transitions of `steps` (K grid steps, in that
    order); `cond` is the B samples' conditioning. The K steps are stacked step-major (rows `k * B ... k * B + B - 1`
    are step `k`), each row with its own sigma, and the result is split back: one `(log_prob, mean, std_dev_t,
    velocity)` per step, equal to `step_log_prob`'s up to the batch-size dependence of the model's kernels. The
    activations of the K steps are alive together: memory grows with K.
    """
    batch, num = latents.shape[0], len(steps)
    if latents.shape[1] != num or next_latents.shape[1] != num:
        raise ValueError(
            f"latents {tuple(latents.shape)} and next_latents {tuple(next_latents.shape)} must hold the {num} steps "
            f"{list(steps)} in their second dimension."
        )
    index = torch.as_tensor(list(steps), device=sigmas.device)
    sigma = sigmas[index].repeat_interleave(batch)
    sigma_next = sigmas[index + 1].repeat_interleave(batch)
    x = latents.transpose(0, 1).reshape(num * batch, *latents.shape[2:])
    x_next = next_latents.transpose(0, 1).reshape(num * batch, *next_latents.shape[2:])
    stacked = {key: value.repeat(num, *([1] * (value.dim() - 1))) for key, value in cond.items()}
    v = adapter.velocity(transformer, x, sigma, stacked, guidance_scale)
    _, log_prob, mean, std = sde_step_with_logprob(
        v, x, sigma, sigma_next, noise_level, sde_type, prev_sample=x_next, sigma_1=sigmas[1]
    )
    return list(zip(log_prob.split(batch), mean.split(batch), std.split(batch), v.split(batch)))
