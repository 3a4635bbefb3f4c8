"""Shared plumbing of the model-based built-in rewards: the default device, CPU offload between calls, and the error
raised when an optional package is missing."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

__all__ = ["check_prompts_and_images", "default_device", "import_extra", "offloaded"]


def default_device() -> torch.device:
    """The current CUDA device if CUDA is available (the process's own GPU under `accelerate`), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def import_extra(module: str, package: str, extra: str, reward: str) -> ModuleType:
    """Import `module`, or raise an `ImportError` saying which pip package and extra of trl-flow-grpo provide it.

    Args:
        module: The module to import, e.g. `"open_clip"`.
        package: The pip package that provides it, e.g. `"open_clip_torch"`.
        extra: The trl-flow-grpo extra that installs it, e.g. `"hpsv2"`.
        reward: The reward that needs it, named in the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"The {reward} reward needs the `{package}` package (module `{module}`), which is not installed: "
            f'pip install "trl-flow-grpo[{extra}]" (or pip install {package}). Import error: {error}'
        ) from error


def check_prompts_and_images(prompts: Sequence[str], images: Sequence[Any], reward: str) -> None:
    """The inputs of a prompt-image reward model: one prompt string per image, or an error naming `reward`."""
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError(f"{reward} needs one prompt string per image")


@contextlib.contextmanager
def offloaded(modules: list[torch.nn.Module], device: torch.device, offload: bool) -> Iterator[None]:
    """Run the body with `modules` on `device`; with `offload`, move them to the CPU when the body ends.

    Offloading frees the accelerator's memory between reward calls (for the sampling and training that run in
    between) at the cost of one host-to-device copy of the weights per call.
    """
    if offload:
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        if offload:
            for module in modules:
                module.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
