"""Hybrid inference (MixGRPO's released inference): the trained model for the first `k` ODE steps of the grid, the
base model for the rest.

MixGRPO (Li et al., 2025) renders its evaluation images this way: its `sample_flux.py` takes `mix_sampling_steps`, a
number of steps (30 of 50 in `inference_flux.sh`), and calls the trained transformer at steps `i < k` and the base
transformer at the others. The trained model lays out the composition at high noise, where the reward shaped it;
the base model paints the detail at low noise, where reward hacking (saturated colours, texture artefacts) lives.
"""

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .rollout import Trajectory, rollout

if TYPE_CHECKING:
    from ..pipelines.base import Conditioning, PipelineAdapter


@torch.no_grad()
def hybrid_rollout(
    adapter: "PipelineAdapter",
    transformer: torch.nn.Module,
    base_transformer: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]],
    cond: "Conditioning",
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    *,
    hybrid_steps: int,
    guidance_scale: float,
) -> Trajectory:
    """Euler ODE from `noise` over `sigmas` (T + 1 points): `transformer` for steps `0 .. hybrid_steps - 1`, the base
    model for steps `hybrid_steps .. T - 1`.

    `base_transformer()` is a context manager that yields the base model (for a LoRA: the same network with its
    adapter disabled) and restores the trained one on exit; it is only entered when a step needs it. The result has
    no recorded step, like `rollout` with `sde_steps=[]`: with `hybrid_steps = T` it is exactly that rollout, with
    `0` the base model's.
    """
    num_steps = sigmas.numel() - 1
    if not 0 <= hybrid_steps <= num_steps:
        raise ValueError(
            f"hybrid_steps must be in [0, {num_steps}] (the number of the {num_steps} ODE steps made by the trained "
            f"model), got {hybrid_steps}."
        )

    def ode(model: torch.nn.Module, grid: torch.Tensor, x: torch.Tensor) -> Trajectory:
        return rollout(
            adapter, model, cond, grid, x, sde_steps=[], noise_level=0.0, sde_type="sde", guidance_scale=guidance_scale
        )

    parts = []
    if hybrid_steps > 0:
        parts.append(ode(transformer, sigmas[: hybrid_steps + 1], noise))
    if hybrid_steps < num_steps:
        with base_transformer() as base:
            parts.append(ode(base, sigmas[hybrid_steps:], parts[-1].final_latents if parts else noise))
    last = parts[-1]  # no recorded step: its empty tensors have the right shapes
    return Trajectory(
        latents=last.latents,
        next_latents=last.next_latents,
        log_probs=last.log_probs,
        step_indices=[],
        final_latents=last.final_latents,
        transformer_calls=sum(part.transformer_calls for part in parts),
    )
