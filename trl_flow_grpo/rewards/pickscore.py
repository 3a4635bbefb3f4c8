"""PickScore reward (Kirstain et al., 2023), the human-preference reward of Flow-GRPO.

PickScore is a CLIP-H/14 model fine-tuned on Pick-a-Pic human preferences. The score of an image for its prompt is

    score = logit_scale.exp() * cosine(text_embedding, image_embedding)

i.e. the diagonal of CLIP's `logits_per_text`. `logit_scale.exp()` is 100 for the released model, so raw scores of
SD3.5-M images are around 21-23 (the Flow-GRPO paper reports 21.7 before and 23.3 after training). Raw scores are
returned by default; `normalize=True` divides them by 26 as Flow-GRPO's training code does (about [0, 1]).

The model is loaded lazily, on the first call, so that importing this module (and listing the built-in rewards) is
cheap and downloads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._models import check_prompts_and_images
from .compression import _to_rgb_image

__all__ = [
    "PICKSCORE_MODEL_ID",
    "PICKSCORE_NORMALIZER",
    "PICKSCORE_PROCESSOR_ID",
    "PickScoreReward",
    "pickscore_reward",
]

PICKSCORE_MODEL_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_NORMALIZER = 26.0
"""Flow-GRPO divides PickScore by this constant to get rewards of about [0, 1] (`normalize=True`)."""

_MAX_TEXT_LENGTH = 77  # CLIP's context length


def _default_device() -> torch.device:
    """The current CUDA device if CUDA is available (the process's own GPU under `accelerate`), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PickScoreReward:
    """PickScore of each image for its prompt, as a reward function (`prompts`, `images` -> one float per image).

    Models are loaded with `transformers.AutoProcessor` / `AutoModel` (`use_safetensors=True`) on the first call,
    moved to `device`, put in eval mode, and run under `torch.no_grad()` in batches of `batch_size`. Embeddings are
    compared in float32 whatever the model dtype, so that bfloat16 rounding does not swamp the small differences
    between images of one prompt.

    Args:
        model_id: Hub id or local folder of the PickScore `CLIPModel` (must hold `model.safetensors`).
        processor_id: Hub id or local folder of the CLIP processor (image preprocessing and tokenizer).
        device: Where to run the model. `None`: the current CUDA device if available, else the CPU; an injected
            `model` then stays where it is.
        dtype: dtype of the model weights when loading (ignored for an injected `model`).
        batch_size: Images per forward pass.
        normalize: Divide scores by 26 ([`PICKSCORE_NORMALIZER`], Flow-GRPO's training convention). Off by default:
            raw PickScore is what papers report.
        revision: Hub revision (branch, tag or commit) of `model_id`, e.g. a `refs/pr/N` branch holding safetensors
            weights.
        model: An already loaded `CLIPModel` (or compatible model returning `text_embeds` / `image_embeds` and
            having a `logit_scale`) to use instead of loading `model_id`.
        processor: An already loaded CLIP processor to use instead of loading `processor_id`.

    Example:

    ```python
    from trl_flow_grpo.rewards.pickscore import PickScoreReward

    reward = PickScoreReward(dtype=torch.bfloat16, batch_size=32)
    trainer = FlowGRPOTrainer(model, reward_funcs=[reward], ...)
    ```
    """

    def __init__(
        self,
        model_id: str = PICKSCORE_MODEL_ID,
        processor_id: str = PICKSCORE_PROCESSOR_ID,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        normalize: bool = False,
        revision: str | None = None,
        model: torch.nn.Module | None = None,
        processor: Any = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.model_id = model_id
        self.processor_id = processor_id
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.batch_size = batch_size
        self.normalize = normalize
        self.revision = revision
        self.model = model
        self.processor = processor
        self._prepared = False

    @property
    def is_loaded(self) -> bool:
        """Whether the model and processor are in memory (loaded or injected)."""
        return self.model is not None and self.processor is not None

    def load(self) -> None:
        """Load the processor and the model if they are not loaded yet (done automatically on the first call)."""
        if self._prepared:
            return
        if self.processor is None:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(self.processor_id)
        if self.model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(
                self.model_id, revision=self.revision, dtype=self.dtype, use_safetensors=True
            )
            self.model = model.to(self.device if self.device is not None else _default_device())
        elif self.device is not None:
            self.model = self.model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self._prepared = True

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """PickScore of `images[i]` for `prompts[i]`, as a float32 CPU tensor of shape `(len(images),)`.

        Scores are raw (`logit_scale.exp() * cosine`), or divided by 26 when `normalize=True`.
        """
        check_prompts_and_images(prompts, images, "PickScore")
        if len(images) == 0:
            return torch.empty(0, dtype=torch.float32)
        self.load()
        parameter = next(self.model.parameters())
        scores = []
        for start in range(0, len(images), self.batch_size):
            batch_prompts = list(prompts[start : start + self.batch_size])
            batch_images = [_to_rgb_image(image) for image in images[start : start + self.batch_size]]
            inputs = self.processor(
                text=batch_prompts,
                images=batch_images,
                padding=True,
                truncation=True,
                max_length=_MAX_TEXT_LENGTH,
                return_tensors="pt",
            )
            attention_mask = inputs.get("attention_mask")
            outputs = self.model(
                input_ids=inputs["input_ids"].to(parameter.device),
                attention_mask=None if attention_mask is None else attention_mask.to(parameter.device),
                pixel_values=inputs["pixel_values"].to(device=parameter.device, dtype=parameter.dtype),
            )
            text_embeds = torch.nn.functional.normalize(outputs.text_embeds.float(), dim=-1)
            image_embeds = torch.nn.functional.normalize(outputs.image_embeds.float(), dim=-1)
            logit_scale = self.model.logit_scale.float().exp()
            scores.append((logit_scale * (text_embeds * image_embeds).sum(dim=-1)).cpu())
        result = torch.cat(scores)
        return result / PICKSCORE_NORMALIZER if self.normalize else result

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any
    ) -> list[float]:
        """Reward-function entry point: one PickScore per image (see the class docstring).

        Args:
            prompts: One prompt per image; image `i` is scored against `prompts[i]`.
            images: PIL images (any mode; converted to RGB) or `uint8` numpy arrays of shape `(H, W[, C])`.
            **kwargs: Other dataset columns and `trainer_state`; ignored.
        """
        return self.score(prompts, images).tolist()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, processor_id={self.processor_id!r}, "
            f"normalize={self.normalize}, loaded={self.is_loaded})"
        )


pickscore_reward = PickScoreReward()
"""The built-in `"pickscore"` reward: raw PickScore with the default models, loaded on first use."""
