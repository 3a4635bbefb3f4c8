"""ImageReward (Xu et al., 2023): a BLIP model fine-tuned on human rankings of text-to-image outputs.

The prompt is encoded by BLIP's BERT text encoder cross-attending to the image's ViT-L/16 features; an MLP maps the
first token's hidden state to a reward, standardised with the mean and standard deviation of the training data:

    score = (MLP(text_encoder(prompt, image)[:, 0]) - 0.16717362830052426) / 1.0333394966054072

as in the reference package's `ImageReward.score`. Scores are standardised over the images of its training data:
0 is their average, and most images score between -2 and 2.

This module loads the original checkpoint, `ImageReward.pt` of the Hub repository `THUDM/ImageReward` (a plain
state dict, read with `torch.load(weights_only=True)`), into transformers' BLIP modules: `BlipVisionModel` for the
ViT-L/16 image encoder (224 px) and `BlipTextModel` (with cross-attention) for the text encoder, their weights
renamed from BLIP's names by [`convert_image_reward_state_dict`]. The tokenizer is `bert-base-uncased` with BLIP's
two extra tokens (`[DEC]`, `[ENC]`), prompts padded to 35 tokens; images are resized (bicubic, shorter side 224),
centre-cropped to 224 and normalised with CLIP's mean and standard deviation, as the reference preprocessing does.
The reference `image-reward` package is not needed (it pins old dependencies and unpickles its checkpoint).

What is tested offline: the scoring path (preprocessing, batching, the standardisation) with tiny random BLIP
modules, and the renaming against BLIP's parameter names written out by hand; the real checkpoint is not loaded in
the test suite, so a naming difference would show on its first load as a `ValueError` listing the keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ._models import BatchedRewardModel
from .aesthetic import AestheticMLP

__all__ = [
    "IMAGE_REWARD_CHECKPOINT_FILENAME",
    "IMAGE_REWARD_MEAN",
    "IMAGE_REWARD_REPO",
    "IMAGE_REWARD_STD",
    "IMAGE_REWARD_TOKENIZER_ID",
    "ImageRewardModel",
    "ImageRewardReward",
    "convert_image_reward_state_dict",
    "image_reward_configs",
    "image_reward_reward",
    "load_image_reward_model",
    "make_image_reward_processors",
]

IMAGE_REWARD_REPO = "THUDM/ImageReward"
IMAGE_REWARD_CHECKPOINT_FILENAME = "ImageReward.pt"
IMAGE_REWARD_TOKENIZER_ID = "bert-base-uncased"
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
IMAGE_SIZE = 224
TEXT_MAX_LENGTH = 35
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's ViT (vit.py) parameter names -> transformers' BlipVisionModel names, applied in order.
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
# Parts of the checkpoint the score does not use: the contrastive projections, and position-id buffers.
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


def image_reward_configs() -> tuple[Any, Any]:
    """transformers configs of ImageReward's BLIP: ViT-L/16 at 224 px and BERT-base with cross-attention to it
    (its `med_config.json`: vocabulary 30522 + `[DEC]` + `[ENC]`, encoder width 1024)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=IMAGE_SIZE,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    text = BlipTextConfig(
        vocab_size=30524,
        hidden_size=768,
        encoder_hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        is_decoder=True,  # builds the cross-attention layers; the score runs them in encoder mode
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """ImageReward's scoring network on transformers' BLIP modules.

    Args:
        vision_config: A `BlipVisionConfig` (ViT-L/16 at 224 px for the released model).
        text_config: A `BlipTextConfig` with `encoder_hidden_size` equal to the vision width.
    """

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(input_size=text_config.hidden_size)  # ImageReward's MLP has the same layers
        self.mean = IMAGE_REWARD_MEAN
        self.std = IMAGE_REWARD_STD

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """`(N, 3, 224, 224)` pixels and `(N, L)` prompt tokens -> `(N,)` standardised rewards (float32)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        rewards = self.mlp(text[:, 0].float())
        return (rewards - self.mean) / self.std


def convert_image_reward_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the original checkpoint's parameters (`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.*`) to
    [`ImageRewardModel`]'s (`vision_model.*`, `text_encoder.*`, `mlp.*`), dropping what the score does not use (the
    contrastive projections `blip.vision_proj` / `blip.text_proj` and `position_ids` buffers).

    Raises:
        ValueError: for a key that belongs to none of these parts.
    """
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if _UNUSED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in _VISION_RENAMES:
                name, count = re.subn(pattern, replacement, name)
                if count:
                    break
            else:
                unknown.append(key)
                continue
            converted[f"vision_model.{name}"] = value
        elif key.startswith("blip.text_encoder."):
            converted["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            converted[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"Unexpected parameters in the ImageReward checkpoint (not BLIP's visual_encoder / text_encoder or the "
            f"MLP): {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    return converted


def _load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} is not an ImageReward checkpoint (expected a state dict of tensors)")
    return state_dict


def load_image_reward_model(path: str | Path, vision_config: Any = None, text_config: Any = None) -> ImageRewardModel:
    """Build an [`ImageRewardModel`] (default configs: [`image_reward_configs`]) and load the original checkpoint at
    `path` into it, renamed by [`convert_image_reward_state_dict`], strictly.

    Raises:
        ValueError: if keys are missing, unexpected, or of the wrong shape.
    """
    if vision_config is None or text_config is None:
        vision_config, text_config = image_reward_configs()
    model = ImageRewardModel(vision_config, text_config)
    converted = convert_image_reward_state_dict(_load_checkpoint(path))
    expected = {key for key in model.state_dict() if not key.endswith("position_ids")}
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The ImageReward checkpoint {path} does not fit the model: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]}"
        )
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"The ImageReward checkpoint {path} does not fit the model: {error}") from None
    return model


def make_image_reward_processors(tokenizer_id: str = IMAGE_REWARD_TOKENIZER_ID) -> tuple[Any, Any]:
    """ImageReward's tokenizer (`tokenizer_id` plus BLIP's `[DEC]` and `[ENC]` tokens) and image processor (bicubic
    resize of the shorter side to 224, centre crop, CLIP normalisation)."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_id)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=Image.Resampling.BICUBIC,
        image_mean=list(_CLIP_MEAN),
        image_std=list(_CLIP_STD),
    )
    return tokenizer, image_processor


class ImageRewardReward(BatchedRewardModel):
    """ImageReward of each image for its prompt, as a reward function (`prompts`, `images` -> one float per image).

    Loaded on the first call (see the module docstring), moved to `device`, eval mode, `torch.no_grad()`, batches of
    `batch_size`; the MLP and the standardisation run in float32.

    Args:
        checkpoint_repo: Hub repository of the checkpoint.
        checkpoint_filename: The checkpoint file in `checkpoint_repo`.
        checkpoint_path: A local checkpoint file, used instead of downloading.
        tokenizer_id: Hub id or folder of the BERT tokenizer.
        device: Where to run the model. `None`: the current CUDA device if available, else the CPU; an injected
            `model` then stays where it is.
        dtype: dtype of the BLIP weights (applied to a loaded model).
        batch_size: Images per forward pass.
        offload: Keep the model on the CPU between calls and move it to `device` only while scoring.
        vision_config: The `BlipVisionConfig` to build when loading (default: [`image_reward_configs`]'s).
        text_config: The `BlipTextConfig` to build when loading (default: [`image_reward_configs`]'s).
        model: An already built [`ImageRewardModel`].
        tokenizer: An already loaded tokenizer (with BLIP's extra tokens).
        image_processor: An already built image processor.
    """

    reward_name = "ImageReward"

    def __init__(
        self,
        checkpoint_repo: str = IMAGE_REWARD_REPO,
        checkpoint_filename: str = IMAGE_REWARD_CHECKPOINT_FILENAME,
        *,
        checkpoint_path: str | Path | None = None,
        tokenizer_id: str = IMAGE_REWARD_TOKENIZER_ID,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        offload: bool = False,
        vision_config: Any = None,
        text_config: Any = None,
        model: ImageRewardModel | None = None,
        tokenizer: Any = None,
        image_processor: Any = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, offload=offload)
        self.checkpoint_repo = checkpoint_repo
        self.checkpoint_filename = checkpoint_filename
        self.checkpoint_path = checkpoint_path
        self.tokenizer_id = tokenizer_id
        self.vision_config = vision_config
        self.text_config = text_config
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @property
    def is_loaded(self) -> bool:
        """Whether the model, tokenizer and image processor are in memory (loaded or injected)."""
        return self.model is not None and self.tokenizer is not None and self.image_processor is not None

    def _models(self) -> list[torch.nn.Module]:
        return [self.model]

    def _load_models(self) -> bool:
        if self.tokenizer is None or self.image_processor is None:
            tokenizer, image_processor = make_image_reward_processors(self.tokenizer_id)
            self.tokenizer = self.tokenizer or tokenizer
            self.image_processor = self.image_processor or image_processor
        loaded_here = self.model is None
        if loaded_here:
            path = self.checkpoint_path
            if path is None:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(self.checkpoint_repo, self.checkpoint_filename)
            self.model = load_image_reward_model(path, self.vision_config, self.text_config)
            self.model.vision_model.to(self.dtype)
            self.model.text_encoder.to(self.dtype)
        self.model.mlp.float()
        return loaded_here

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """ImageReward of each image of one batch for its prompt (float32)."""
        parameter = next(self.model.vision_model.parameters())
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt"
        )
        rewards = self.model(
            pixel_values=pixels.to(device=parameter.device, dtype=parameter.dtype),
            input_ids=text["input_ids"].to(parameter.device),
            attention_mask=text["attention_mask"].to(parameter.device),
        )
        return rewards.float()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(checkpoint_repo={self.checkpoint_repo!r}, "
            f"checkpoint_filename={self.checkpoint_filename!r}, loaded={self.is_loaded})"
        )


image_reward_reward = ImageRewardReward()
"""The built-in `"image_reward"` reward: ImageReward v1.0 (`THUDM/ImageReward`), loaded on first use."""
