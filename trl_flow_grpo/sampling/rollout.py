"""Drive a pipeline adapter over the denoising grid: SDE steps are recorded, the others are ODE steps.

`rollout` samples (no gradient) and returns a `Trajectory`; `step_log_prob` recomputes the log-probability of one
recorded step with gradients, through the very same code path, so that on the first on-policy pass the ratio of
new to old probabilities is exactly 1.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .steps import ode_step, sde_step_with_logprob

if TYPE_CHECKING:
    from ..pipelines.base import Conditioning, PipelineAdapter


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


def first_steps(num_inference_steps: int, timestep_fraction: float) -> list[int]:
    """Flow-GRPO's SDE steps: the first floor(T * timestep_fraction) steps of the grid."""
    return list(range(int(num_inference_steps * timestep_fraction)))


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
    progress: bool = False,
) -> Trajectory:
    """Sample B latents from `noise` over the grid `sigmas` (T + 1 points).

    Steps in `sde_steps` are stochastic and recorded; all others are deterministic Euler steps. With no SDE steps
    this is plain ODE sampling.
    """
    sde_set = set(sde_steps)
    x = noise.float()
    batch = x.shape[0]
    recorded, recorded_next, log_probs = [], [], []
    num_steps = sigmas.numel() - 1
    for i in tqdm(range(num_steps), desc="denoising", leave=False, disable=not progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = adapter.velocity(transformer, x, sigma.expand(batch), cond, guidance_scale)
        if i in sde_set:
            x_next, log_prob, _, _ = sde_step_with_logprob(
                v, x, sigma, sigma_next, noise_level, sde_type, generator=generator, sigma_1=sigmas[1]
            )
            recorded.append(x)
            recorded_next.append(x_next)
            log_probs.append(log_prob)
        else:
            x_next = ode_step(v, x, sigma, sigma_next)
        x = x_next

    steps = sorted(sde_set)
    empty = x.new_zeros((batch, 0, *x.shape[1:]))
    return Trajectory(
        latents=torch.stack(recorded, dim=1) if recorded else empty,
        next_latents=torch.stack(recorded_next, dim=1) if recorded else empty,
        log_probs=torch.stack(log_probs, dim=1) if log_probs else x.new_zeros((batch, 0)),
        step_indices=steps,
        final_latents=x,
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
