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

from typing import Any

import torch
from PIL import Image

from .clip_score import CLIPEmbeddingReward, clip_cosines

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


class PickScoreReward(CLIPEmbeddingReward):
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
        offload: Keep the model on the CPU between calls and move it to `device` only while scoring (frees
            accelerator memory for sampling and training, costs one copy of the weights per call).
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

    reward_name = "PickScore"

    def __init__(
        self,
        model_id: str = PICKSCORE_MODEL_ID,
        processor_id: str = PICKSCORE_PROCESSOR_ID,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        normalize: bool = False,
        offload: bool = False,
        revision: str | None = None,
        model: torch.nn.Module | None = None,
        processor: Any = None,
    ) -> None:
        super().__init__(
            model_id,
            processor_id,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            offload=offload,
            revision=revision,
            processor_revision=None,  # `revision` is the PickScore checkpoint's; the processor is LAION's CLIP-H
            model=model,
            processor=processor,
        )
        self.normalize = normalize

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """PickScore of one batch: raw (`logit_scale.exp() * cosine`), or divided by 26 when `normalize=True`."""
        cosines = clip_cosines(self.model, self.processor, prompts, images)
        scores = self.model.logit_scale.float().exp() * cosines
        return scores / PICKSCORE_NORMALIZER if self.normalize else scores

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, processor_id={self.processor_id!r}, "
            f"normalize={self.normalize}, loaded={self.is_loaded})"
        )


pickscore_reward = PickScoreReward()
"""The built-in `"pickscore"` reward: raw PickScore with the default models, loaded on first use."""
