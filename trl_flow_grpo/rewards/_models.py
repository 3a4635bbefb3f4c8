"""Shared plumbing of the model-based built-in rewards: the default device, CPU offload between calls, the error
raised when an optional package is missing, and the base classes `RewardModel` (where the models run and their
offloading) and `BatchedRewardModel` (the batched, input-checked scoring of prompt-image reward models)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from .compression import _to_rgb_image

__all__ = [
    "BatchedRewardModel",
    "RewardModel",
    "check_batch_size",
    "check_prompts_and_images",
    "default_device",
    "import_extra",
    "offloaded",
]


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


def check_batch_size(batch_size: int) -> None:
    """Refuse a `batch_size` below 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")


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


class RewardModel:
    """Base of the built-in rewards that hold torch models: where the models run, and their CPU offload between calls.

    A subclass loads its models in `_load_models` and names the ones that run on the compute device in `_models`;
    `load()` then does the rest, once: the compute device is `device` if given, else the default device
    ([`default_device`]) for a model loaded here, else the device of an injected model (which then stays where it
    is); the models are put in eval mode without gradients and moved there, or to the CPU with `offload`. Scoring
    runs inside `with self._on_device():`, which (with `offload`) moves them to the compute device for the body and
    back to the CPU after it ([`offloaded`]). A subclass with models loaded separately (GenEval's detector and CLIP)
    uses `_place` and `offloaded` for each group instead.

    Args:
        device: Where to run the models (see above).
        offload: Keep the models on the CPU between calls and move them to the compute device only while scoring
            (frees accelerator memory for sampling and training, costs one copy of the weights per call).
    """

    def __init__(self, *, device: str | torch.device | None = None, offload: bool = False) -> None:
        self.device = torch.device(device) if device is not None else None
        self.offload = offload
        self._compute_device: torch.device | None = None

    def _models(self) -> list[torch.nn.Module]:
        """The loaded modules that run on the compute device, the one whose device an injected model keeps first."""
        raise NotImplementedError

    def _load_models(self) -> bool:
        """Load whatever is not loaded yet; return whether the first of `_models()` was loaded here (not injected)."""
        raise NotImplementedError

    def _place(self, modules: Sequence[torch.nn.Module], loaded_here: bool) -> torch.device:
        """Put `modules` in eval mode without gradients, on their compute device (the CPU with `offload`); return it.

        The compute device is `device`, else the default device when the first module was `loaded_here`, else the
        first module's own device (the CPU when there is no module).
        """
        if self.device is not None:
            device = self.device
        elif loaded_here:
            device = default_device()
        elif modules:
            device = next(modules[0].parameters()).device
        else:
            device = torch.device("cpu")
        for module in modules:
            module.eval()
            module.requires_grad_(False)
            module.to("cpu" if self.offload else device)
        return device

    def load(self) -> None:
        """Load the models if they are not loaded yet (done automatically on the first call)."""
        if self._compute_device is None:
            loaded_here = self._load_models()
            self._compute_device = self._place(self._models(), loaded_here)

    def _on_device(self) -> contextlib.AbstractContextManager[None]:
        """A context with the models loaded and on the compute device (back on the CPU after it with `offload`)."""
        self.load()
        return offloaded(self._models(), self._compute_device, self.offload)


class BatchedRewardModel(RewardModel):
    """A [`RewardModel`] that scores images for their prompts in batches: `(prompts, images)` -> one float per image.

    `score` checks the inputs (one prompt string per image, errors naming `reward_name`), loads the models on the
    first call and runs `_score_batch` under `torch.no_grad()` on the compute device, `batch_size` RGB images at a
    time, returning a float32 CPU tensor; `__call__` is the reward-function entry point. A subclass sets
    `reward_name` and writes `_load_models`, `_models` and `_score_batch`.

    Args:
        device: Where to run the models (see [`RewardModel`]).
        dtype: dtype of the weights when loading (a subclass says how it applies).
        batch_size: Images per forward pass.
        offload: Keep the models on the CPU between calls (see [`RewardModel`]).
    """

    reward_name: ClassVar[str] = "the reward model"
    """The reward's name in the errors of the input checks, e.g. `"CLIPScore"`."""

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        offload: bool = False,
    ) -> None:
        check_batch_size(batch_size)
        super().__init__(device=device, offload=offload)
        self.dtype = dtype
        self.batch_size = batch_size

    def _score_batch(self, prompts: list[str] | None, images: list[Image.Image]) -> torch.Tensor:
        """The `(len(images),)` scores of one batch of RGB images (`prompts` is `None` for an image-only reward)."""
        raise NotImplementedError

    @torch.no_grad()
    def _scores(self, prompts: Sequence[str] | None, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """`_score_batch` over `images` (and `prompts`) in batches of `batch_size`, a float32 CPU tensor."""
        if len(images) == 0:
            return torch.empty(0, dtype=torch.float32)
        scores = []
        with self._on_device():
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                batch_prompts = None if prompts is None else list(prompts[start:stop])
                batch_images = [_to_rgb_image(image) for image in images[start:stop]]
                scores.append(self._score_batch(batch_prompts, batch_images).cpu())
        return torch.cat(scores)

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """The score of `images[i]` for `prompts[i]` (see the class docstring), a float32 CPU tensor of shape
        `(len(images),)`."""
        check_prompts_and_images(prompts, images, self.reward_name)
        return self._scores(prompts, images)

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any
    ) -> list[float]:
        """Reward-function entry point: one score per image (see the class docstring).

        Args:
            prompts: One prompt per image; image `i` is scored against `prompts[i]`.
            images: PIL images (any mode; converted to RGB) or `uint8` numpy arrays of shape `(H, W[, C])`.
            **kwargs: Other dataset columns and `trainer_state`; ignored.
        """
        return self.score(prompts, images).tolist()
