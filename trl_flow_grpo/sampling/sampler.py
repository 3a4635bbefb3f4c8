"""`sample`: prompts + initial noise -> images + the recorded trajectory, for training and for evaluation alike.

Training samples with the SDE window of the iteration (`sde_steps`), its `noise_level` and the rollout guidance;
evaluation passes no SDE step (a deterministic ODE sample) and the evaluation guidance, and with `hybrid_steps` the
base model takes over after that many steps (`hybrid.hybrid_rollout`). Everything else (prompt encoding, the
rollout, decoding) is the same code.
"""

import contextlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..rollout_batch import RolloutBatch
from .hybrid import hybrid_rollout
from .rollout import rollout

if TYPE_CHECKING:
    from ..pipelines.base import PipelineAdapter


@dataclass
class Samples:
    """The outcome of `sample` for one batch of prompts."""

    images: list[Image.Image]
    """The decoded images, one per prompt."""
    batch: RolloutBatch
    """The conditioning and the recorded SDE steps (no advantages yet)."""
    transformer_calls: int = 0
    """Transformer forward passes of the rollout, counted per sample (a CFG evaluation of a sample counts 2)."""
    transformer_calls_saved: int = 0
    """Forward passes the shared prefix saved (same unit)."""


@torch.no_grad()
def sample(
    adapter: "PipelineAdapter",
    transformer: torch.nn.Module,
    prompts: list[str],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sde_steps: Sequence[int],
    noise_level: float,
    sde_type: str,
    guidance_scale: float,
    max_sequence_length: int,
    generator: torch.Generator | None = None,
    ode_solver: str = "euler",
    ode_compression: float = 1.0,
    prefix_groups: Sequence[Hashable] | None = None,
    record_means: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    source_images: list[Image.Image] | None = None,
    hybrid_steps: int | None = None,
    base_transformer: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]] | None = None,
) -> Samples:
    """Encode `prompts`, roll out from `noise` (B, *latent) over `sigmas`, and decode the final latents.

    The keyword arguments are those of `sampling.rollout` (`sde_steps=[]` and `noise_level=0.0` give an ODE sample);
    `autocast` is entered around the transformer calls (the trainer's `compute_loss_context_manager`). An editing
    adapter (`adapter.edits_images`) is conditioned on `source_images`, one per prompt (`adapter.encode_edit`); their
    conditioning is part of the batch's, so that training recomputes every step on the same source.

    `hybrid_steps` (an ODE sample only: no SDE step, Euler on the grid) makes a hybrid-inference sample: `transformer`
    for the first `hybrid_steps` steps, then the model `base_transformer()` yields (see `hybrid.hybrid_rollout`).
    """
    device = noise.device
    if hybrid_steps is not None:
        if sde_steps or ode_solver != "euler" or ode_compression != 1.0 or prefix_groups is not None:
            raise ValueError(
                "hybrid_steps makes an ODE sample with Euler steps on the grid: pass no sde_steps, "
                f"ode_solver='euler', ode_compression=1.0 and no prefix_groups (got sde_steps={list(sde_steps)}, "
                f"ode_solver={ode_solver!r}, ode_compression={ode_compression}, prefix_groups={prefix_groups})."
            )
        if base_transformer is None:
            raise ValueError("hybrid_steps needs base_transformer, the base model's context manager.")
    with adapter.text_encoders_on(device):  # on the device only while encoding with `offload_text_encoders`
        if source_images is None:
            cond = adapter.encode_prompts(prompts, device, guidance_scale > 1, max_sequence_length)
        else:  # the instructions with their sources (a vision-language text encoder may see both)
            cond = adapter.encode_edit(prompts, source_images, noise, device, guidance_scale > 1, max_sequence_length)
    with autocast():
        if hybrid_steps is not None:
            trajectory = hybrid_rollout(
                adapter,
                transformer,
                base_transformer,
                cond,
                sigmas,
                noise,
                hybrid_steps=hybrid_steps,
                guidance_scale=guidance_scale,
            )
        else:
            trajectory = rollout(
                adapter,
                transformer,
                cond,
                sigmas,
                noise,
                sde_steps=sde_steps,
                noise_level=noise_level,
                sde_type=sde_type,
                guidance_scale=guidance_scale,
                generator=generator,
                ode_solver=ode_solver,
                ode_compression=ode_compression,
                prefix_groups=prefix_groups,
                record_means=record_means,
            )
    batch = RolloutBatch(
        cond=cond,
        latents=trajectory.latents,
        next_latents=trajectory.next_latents,
        log_probs=trajectory.log_probs,
        step_indices=trajectory.step_indices,
        means=trajectory.means,
    )
    return Samples(
        images=adapter.decode(trajectory.final_latents),
        batch=batch,
        transformer_calls=trajectory.transformer_calls,
        transformer_calls_saved=trajectory.transformer_calls_saved,
    )
