"""CLIPScore reward (Hessel et al., 2021): how well an image matches its prompt, as judged by CLIP.

The score of an image for its prompt is the cosine similarity of CLIP's projected text and image embeddings,
scaled as in the CLIPScore paper:

    score = weight * max(cosine(text_embedding, image_embedding), 0)          # weight = 2.5

With the default `weight=2.5` and OpenAI's CLIP ViT-L/14 scores are in [0, 2.5], typically 0.6-0.9 for a fitting
image. `weight=100` gives the convention of torchmetrics' `CLIPScore` (0-100, about 25-35 for a fitting image);
`weight=1, clip_at_zero=False` gives the raw cosine in [-1, 1].

The model is loaded lazily, on the first call, so that importing this module (and listing the built-in rewards) is
cheap and downloads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._models import BatchedRewardModel

__all__ = [
    "CLIP_SCORE_MODEL_ID",
    "CLIP_SCORE_WEIGHT",
    "CLIPEmbeddingReward",
    "CLIPScoreReward",
    "clip_cosines",
    "clip_score_reward",
]

CLIP_SCORE_MODEL_ID = "openai/clip-vit-large-patch14"
CLIP_SCORE_WEIGHT = 2.5
"""The CLIPScore paper's rescaling weight `w` in `w * max(cos, 0)`."""

_MAX_TEXT_LENGTH = 77  # CLIP's context length


def clip_cosines(
    model: torch.nn.Module, processor: Any, prompts: list[str], images: list[Image.Image]
) -> torch.Tensor:
    """Cosine similarity of `images[i]` and `prompts[i]` in a CLIP model's projected embedding space, for one batch.

    The processor tokenizes (padded, truncated to CLIP's 77 tokens) and preprocesses; the model runs where its
    parameters are, in their dtype, and returns `text_embeds` / `image_embeds`, compared in float32. Shared by
    CLIPScore and PickScore.
    """
    parameter = next(model.parameters())
    inputs = processor(
        text=prompts,
        images=images,
        padding=True,
        truncation=True,
        max_length=_MAX_TEXT_LENGTH,
        return_tensors="pt",
    )
    attention_mask = inputs.get("attention_mask")
    outputs = model(
        input_ids=inputs["input_ids"].to(parameter.device),
        attention_mask=None if attention_mask is None else attention_mask.to(parameter.device),
        pixel_values=inputs["pixel_values"].to(device=parameter.device, dtype=parameter.dtype),
    )
    text_embeds = torch.nn.functional.normalize(outputs.text_embeds.float(), dim=-1)
    image_embeds = torch.nn.functional.normalize(outputs.image_embeds.float(), dim=-1)
    return (text_embeds * image_embeds).sum(dim=-1)


class CLIPEmbeddingReward(BatchedRewardModel):
    """A reward read off a CLIP model's text and image embeddings (CLIPScore, PickScore): the model and its
    processor, loaded with `transformers.AutoModel` (`use_safetensors=True`) / `AutoProcessor` on the first call
    unless injected. Subclasses turn `clip_cosines` of a batch into their score (`_score_batch`)."""

    def __init__(
        self,
        model_id: str,
        processor_id: str,
        *,
        device: str | torch.device | None,
        dtype: torch.dtype,
        batch_size: int,
        offload: bool,
        revision: str | None,
        processor_revision: str | None,
        model: torch.nn.Module | None,
        processor: Any,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, offload=offload)
        self.model_id = model_id
        self.processor_id = processor_id
        self.revision = revision
        self.processor_revision = processor_revision
        self.model = model
        self.processor = processor

    @property
    def is_loaded(self) -> bool:
        """Whether the model and processor are in memory (loaded or injected)."""
        return self.model is not None and self.processor is not None

    def _models(self) -> list[torch.nn.Module]:
        return [self.model]

    def _load_models(self) -> bool:
        if self.processor is None:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(self.processor_id, revision=self.processor_revision)
        if self.model is None:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(
                self.model_id, revision=self.revision, dtype=self.dtype, use_safetensors=True
            )
            return True
        return False


class CLIPScoreReward(CLIPEmbeddingReward):
    """CLIPScore of each image for its prompt, as a reward function (`prompts`, `images` -> one float per image).

    The processor and model are loaded with `transformers.AutoProcessor` / `AutoModel` (`use_safetensors=True`) from
    `model_id` on the first call, moved to `device`, put in eval mode, and run under `torch.no_grad()` in batches of
    `batch_size`. Any CLIP checkpoint on the Hub works (`openai/clip-vit-base-patch32`,
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, ...). Embeddings are compared in float32 whatever the model dtype.

    Args:
        model_id: Hub id or local folder of a CLIP model and its processor (must hold `model.safetensors`).
        weight: The factor `w` of `w * max(cos, 0)`: 2.5 as in the CLIPScore paper (default), 100 as torchmetrics.
        clip_at_zero: Clip negative cosines to 0, as CLIPScore does. `False` keeps the sign.
        device: Where to run the model. `None`: the current CUDA device if available, else the CPU; an injected
            `model` then stays where it is.
        dtype: dtype of the model weights when loading (ignored for an injected `model`).
        batch_size: Images per forward pass.
        offload: Keep the model on the CPU between calls and move it to `device` only while scoring (frees
            accelerator memory for sampling and training, costs one copy of the weights per call).
        revision: Hub revision (branch, tag or commit) of `model_id`.
        model: An already loaded `CLIPModel` (or a compatible model returning `text_embeds` / `image_embeds`) to use
            instead of loading `model_id`.
        processor: An already loaded CLIP processor to use instead of loading it from `model_id`.

    Example:

    ```python
    from trl_flow_grpo.rewards.clip_score import CLIPScoreReward

    clip_score = CLIPScoreReward("openai/clip-vit-base-patch32", weight=100.0, dtype=torch.bfloat16)
    trainer = FlowGRPOTrainer(model, reward_funcs=[clip_score], ...)
    ```
    """

    reward_name = "CLIPScore"

    def __init__(
        self,
        model_id: str = CLIP_SCORE_MODEL_ID,
        *,
        weight: float = CLIP_SCORE_WEIGHT,
        clip_at_zero: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        offload: bool = False,
        revision: str | None = None,
        model: torch.nn.Module | None = None,
        processor: Any = None,
    ) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be > 0 (2.5 as in the CLIPScore paper, 100 as torchmetrics), got {weight}")
        super().__init__(
            model_id,
            model_id,  # the processor is the checkpoint's own, at the same revision
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            offload=offload,
            revision=revision,
            processor_revision=revision,
            model=model,
            processor=processor,
        )
        self.weight = float(weight)
        self.clip_at_zero = clip_at_zero

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """The cosines of one batch (the scaling is `score`'s)."""
        return clip_cosines(self.model, self.processor, prompts, images)

    def cosine(self, prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Cosine similarity of `images[i]` and `prompts[i]` in CLIP's embedding space (float32 CPU tensor)."""
        return super().score(prompts, images)

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """`weight * max(cos, 0)` (or `weight * cos` without `clip_at_zero`) per image, a float32 CPU tensor."""
        cosine = self.cosine(prompts, images)
        return self.weight * (cosine.clamp(min=0.0) if self.clip_at_zero else cosine)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, weight={self.weight}, "
            f"clip_at_zero={self.clip_at_zero}, loaded={self.is_loaded})"
        )


clip_score_reward = CLIPScoreReward()
"""The built-in `"clip_score"` reward: `2.5 * max(cos, 0)` with OpenAI's CLIP ViT-L/14, loaded on first use."""
