"""`RolloutBatch`: what sampling hands to training, as typed tensors.

One `RolloutBatch` is one micro-batch of B rollouts with K recorded SDE steps. `sampling.sample` returns it (without
advantages), `scoring` adds the advantages, and `FlowGRPOTrainer.training_step` consumes it. With
`num_iterations > 1` the step's batches are written to a checkpoint and read back on resume
(`save_rollout_batches` / `load_rollout_batches`, safetensors only), bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch

__all__ = ["RolloutBatch", "load_rollout_batches", "save_rollout_batches"]


@dataclass
class RolloutBatch:
    """The recorded rollouts of one micro-batch (B samples, K recorded steps)."""

    cond: dict[str, torch.Tensor]
    """The text conditioning (`pipelines.base.Conditioning`): named tensors, batch dimension first."""
    latents: torch.Tensor
    """(B, K, *latent): input of each recorded step, float32."""
    next_latents: torch.Tensor
    """(B, K, *latent): sampled output of each recorded step, float32."""
    log_probs: torch.Tensor
    """(B, K): log p_old(next_latents | latents) under the sampling policy."""
    step_indices: list[int]
    """The K grid steps that were recorded (indices into the sigma grid), the same for every sample."""
    advantages: torch.Tensor | None = None
    """(B,): the advantage of each sample; `None` until the batch is scored."""
    means: torch.Tensor | None = None
    """(B, K, *latent): the sampling policy's mean of each recorded step, float32; recorded only for
    `loss_type="grpo_guard"` (its RatioNorm compares them with the current policy's means)."""

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with every tensor on `device`."""
        return dataclasses.replace(
            self,
            cond={name: tensor.to(device) for name, tensor in self.cond.items()},
            latents=self.latents.to(device),
            next_latents=self.next_latents.to(device),
            log_probs=self.log_probs.to(device),
            advantages=None if self.advantages is None else self.advantages.to(device),
            means=None if self.means is None else self.means.to(device),
        )

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat named tensors for safetensors (cloned: the trajectory tensors may be views of one another)."""
        state = {f"{prefix}cond.{name}": tensor.detach().clone() for name, tensor in self.cond.items()}
        state[f"{prefix}latents"] = self.latents.detach().clone()
        state[f"{prefix}next_latents"] = self.next_latents.detach().clone()
        state[f"{prefix}log_probs"] = self.log_probs.detach().clone()
        state[f"{prefix}step_indices"] = torch.tensor(self.step_indices, dtype=torch.int64)
        if self.advantages is not None:
            state[f"{prefix}advantages"] = self.advantages.detach().clone()
        if self.means is not None:
            state[f"{prefix}means"] = self.means.detach().clone()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> RolloutBatch:
        """The inverse of `state_dict()` (without a prefix)."""
        return cls(
            cond={key.removeprefix("cond."): value for key, value in state.items() if key.startswith("cond.")},
            latents=state["latents"],
            next_latents=state["next_latents"],
            log_probs=state["log_probs"],
            step_indices=state["step_indices"].tolist(),
            advantages=state.get("advantages"),
            means=state.get("means"),
        )


def save_rollout_batches(batches: list[RolloutBatch], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `batches` to one safetensors file, batch `i`'s tensors under `"{i}."`."""
    from safetensors.torch import save_file

    state = {}
    for i, batch in enumerate(batches):
        state.update(batch.state_dict(prefix=f"{i}."))
    save_file(state, path, metadata=metadata)


def load_rollout_batches(path: str, device: torch.device | str = "cpu") -> tuple[list[RolloutBatch], dict[str, str]]:
    """Read what `save_rollout_batches` wrote: the batches (on `device`) and the file's metadata."""
    from safetensors import safe_open

    per_batch: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            index, _, name = key.partition(".")
            per_batch[int(index)][name] = f.get_tensor(key)
    return [RolloutBatch.from_state_dict(per_batch[i]).to(device) for i in sorted(per_batch)], metadata
