"""Reference refresh: move the KL reference to the current policy every `ref_model_sync_steps` optimizer steps.

The KL term keeps the policy near a reference. With a fixed reference (the initial model) the penalty grows as
training goes on; refreshing it to the current policy from time to time bounds the drift per period instead.

- **Full fine-tuning**: the reference is a frozen copy of the transformer; a refresh copies the trained weights into
  it.
- **LoRA**: the reference is the same network with its adapter disabled (the base model) until the first refresh.
  A refresh keeps a copy of the adapter's weights (a few MB, no second network); from then on the reference forward
  runs with that copy swapped into the adapter, and the trained weights are put back right after it. The swap is
  an exact copy in both directions, and it happens before the policy's forward of the step, so it never touches
  tensors autograd holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ReferenceRefresh:
    """The KL reference's weights, refreshed from the trained parameters every `sync_steps` optimizer steps.

    Args:
        named_parameters: `(name, parameter)` pairs of the trained parameters; names key the state dict.
        sync_steps: refresh after every optimizer step whose number is a multiple of this.
        reference: the frozen reference copy (full fine-tuning), whose parameters with the same names are
            overwritten; `None` for a LoRA, whose reference weights are kept here.
    """

    def __init__(
        self,
        named_parameters: Iterator[tuple[str, torch.nn.Parameter]],
        sync_steps: int,
        reference: torch.nn.Module | None = None,
    ):
        if sync_steps < 1:
            raise ValueError(f"sync_steps must be a positive number of optimizer steps, got {sync_steps}.")
        self.params = dict(named_parameters)
        if not self.params:
            raise ValueError("ReferenceRefresh got no trained parameters.")
        self.sync_steps = sync_steps
        self.targets: dict[str, torch.Tensor] | None = None
        """The reference weights by name: the reference copy's parameters, or (LoRA) the kept copy once refreshed."""
        self.is_lora = reference is None
        if reference is not None:
            reference_params = dict(reference.named_parameters())
            missing = sorted(set(self.params) - set(reference_params))
            if missing:
                raise ValueError(f"The reference model has no parameters named {missing[:3]} like the trained ones.")
            self.targets = {name: reference_params[name] for name in self.params}
        self.last_refresh: int | None = None
        """The optimizer step of the newest refresh; `None` while the reference is still the initial model."""

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        """Copy the trained weights into the reference (full fine-tuning) or into the kept copy (LoRA)."""
        if self.targets is None:  # a LoRA's first refresh
            self.targets = {name: param.detach().clone() for name, param in self.params.items()}
        else:
            for name, param in self.params.items():
                self.targets[name].copy_(param)
        self.last_refresh = step

    def on_step_end(self, global_step: int) -> None:
        """Refresh if `global_step` (the number of optimizer steps taken) is a multiple of `sync_steps`."""
        if global_step % self.sync_steps == 0:
            self.refresh(global_step)

    @property
    def holds_lora_weights(self) -> bool:
        """Whether a LoRA reference copy exists, to be swapped in with `applied()`."""
        return self.is_lora and self.targets is not None

    @contextlib.contextmanager
    def applied(self):
        """Temporarily load the kept reference weights into the trained parameters (LoRA; no gradient)."""
        if not self.holds_lora_weights:
            raise RuntimeError("applied() swaps in a LoRA reference copy, and there is none (yet).")
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.targets[name])
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly): the reference weights (after a refresh) and the step of the refresh."""
        state = {"last_refresh": torch.tensor(-1 if self.last_refresh is None else self.last_refresh)}
        if self.last_refresh is not None:
            state.update({f"reference.{name}": t.detach().contiguous() for name, t in self.targets.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        last = int(state["last_refresh"])
        if last < 0:
            return
        names = {key.removeprefix("reference.") for key in state if key.startswith("reference.")}
        if names != set(self.params):
            missing, unexpected = set(self.params) - names, names - set(self.params)
            raise ValueError(
                f"Reference state does not match the trained parameters (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}): was the checkpoint written with another LoRA / model configuration?"
            )
        if self.targets is None:
            self.targets = {name: param.detach().clone() for name, param in self.params.items()}
        for name in self.params:
            self.targets[name].copy_(state[f"reference.{name}"])
        self.last_refresh = last
