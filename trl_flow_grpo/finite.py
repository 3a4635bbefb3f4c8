"""Non-finite values stop training with an error naming the step and the value, before they reach the weights.

Rewards are checked after their cast to float32 (in `rewards.base`), advantages after they are computed
(`check_finite`), and the loss and the gradients before the optimizer update (`NonFiniteGuard`): a NaN or inf there
raises `NonFiniteError` before `optimizer.step()`, while the model still holds the weights of the last completed
step, which `FlowGRPOTrainer.train` then saves as a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback


class NonFiniteError(FloatingPointError):
    """A NaN or inf in the rewards, advantages, loss or gradients of a training step."""


def check_finite(values: torch.Tensor, what: str, step: int, hint: str = "") -> None:
    """Raise `NonFiniteError` if `values` (in the dtype used) holds a NaN or inf."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    first = tuple(bad[0].tolist())
    raise NonFiniteError(
        f"Step {step + 1}: {int(bad.shape[0])} of the {what} are not finite (e.g. {values[first].item()} at index "
        f"{first if len(first) > 1 else first[0]}, in {values.dtype}). {hint}".rstrip()
    )


class NonFiniteGuard(TrainerCallback):
    """Checks the step's loss and gradients before every optimizer update.

    `observe_loss` is called with each micro-batch's loss (no synchronisation: the sum stays on the device); at
    `on_pre_optimizer_step` (after gradient clipping, before `optimizer.step()`) one check covers the loss and
    every gradient. It must be registered before `StopOnSignal`, so that the error comes while the model still holds
    the last completed step (which `train()` then saves).

    Args:
        named_parameters (`Callable[[], Iterable[tuple[str, torch.nn.Parameter]]]`):
            The trained parameters, with names.
    """

    def __init__(self, named_parameters: Callable[[], Iterable[tuple[str, torch.nn.Parameter]]]):
        self.named_parameters = named_parameters
        self._loss: torch.Tensor | None = None  # the sum of the step's micro-batch losses

    def observe_loss(self, loss: torch.Tensor) -> None:
        total = loss.detach().float().sum()
        self._loss = total if self._loss is None else self._loss + total

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        loss, self._loss = self._loss, None
        # Under FSDP2 a gradient is a DTensor holding this process's shard: check the shard, then agree across the
        # processes (one tiny all-reduce), so that every process stops, or none.
        grads = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        sharded = any(isinstance(grad, DTensor) for _, grad in grads)
        grads = [(name, grad.to_local() if isinstance(grad, DTensor) else grad) for name, grad in grads]
        flags = [torch.isfinite(grad).all() for _, grad in grads]
        if loss is not None:
            flags.append(torch.isfinite(loss))
        finite = bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True
        if sharded:
            agreed = torch.tensor(int(finite), device=flags[0].device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            finite = bool(agreed)
        if finite:
            return
        bad = [name for (name, grad) in grads if not bool(torch.isfinite(grad).all())]
        parts = []
        if loss is not None and not bool(torch.isfinite(loss)):
            parts.append(f"the loss ({loss.item()})")
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            parts.append(f"the gradient of {len(bad)} parameter(s) ({shown})")
        raise NonFiniteError(
            f"Step {state.global_step + 1}: {' and '.join(parts)} is not finite; stopped before the optimizer update, "
            f"so the weights still hold step {state.global_step} (saved as a checkpoint unless save_strategy='no'). "
            "Lower learning_rate, set max_grad_norm, or check the rewards and the model's dtype (fp16 overflows "
            "where bf16 does not)."
        )
