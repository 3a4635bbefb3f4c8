"""Exponential moving average of the trained parameters (Flow-GRPO evaluates and exports the EMA weights).

`decay_n = min((1 + n) / (10 + n), max_decay)` at the n-th update: the average follows the raw weights closely at
first and settles to `max_decay` (0.9 in Flow-GRPO) after a few dozen steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ParameterEMA:
    """A float32 shadow copy of some parameters, updated after each optimizer step.

    Args:
        named_parameters: `(name, parameter)` pairs to average (the trainable ones); names key the state dict.
        max_decay: the decay the schedule settles to.
    """

    def __init__(self, named_parameters: Iterator[tuple[str, torch.nn.Parameter]], max_decay: float = 0.9):
        if not 0.0 < max_decay < 1.0:
            raise ValueError(f"max_decay must be in (0, 1), got {max_decay}.")
        self.params = dict(named_parameters)
        if not self.params:
            raise ValueError("ParameterEMA got no parameters to average.")
        self.max_decay = max_decay
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    def decay(self) -> float:
        """The decay used by the next update."""
        n = self.num_updates
        return min((1 + n) / (10 + n), self.max_decay)

    @torch.no_grad()
    def update(self) -> None:
        """`shadow = decay * shadow + (1 - decay) * param` for every parameter."""
        decay = self.decay()
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self):
        """Temporarily load the averaged weights into the parameters (for evaluation or export)."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.shadow[name].to(param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly): the shadow weights plus the update counter."""
        state = {f"shadow.{name}": tensor.contiguous() for name, tensor in self.shadow.items()}
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = {key.removeprefix("shadow.") for key in state if key.startswith("shadow.")}
        if names != set(self.shadow):
            missing, unexpected = set(self.shadow) - names, names - set(self.shadow)
            raise ValueError(
                f"EMA state does not match the trained parameters (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}): was the checkpoint written with another LoRA / model configuration?"
            )
        for name in self.shadow:
            self.shadow[name].copy_(state[f"shadow.{name}"])
        self.num_updates = int(state["num_updates"])
