"""trl-flow-grpo: online reinforcement learning for flow-matching text-to-image models."""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

# Public name -> module that defines it. Imported lazily so that `import trl_flow_grpo` (and the CLI's
# `--help`) stays fast and does not pull in torch/diffusers until a name is used.
_LAZY = {
    "FlowGRPOConfig": "flow_grpo_config",
    "FlowGRPOTrainer": "flow_grpo_trainer",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .flow_grpo_config import FlowGRPOConfig as FlowGRPOConfig
    from .flow_grpo_trainer import FlowGRPOTrainer as FlowGRPOTrainer


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
