"""Tiny, fully offline diffusers pipelines for tests.

This module is public: use it in your own tests to exercise code that drives a
[`~diffusers.StableDiffusion3Pipeline`] (sampling, log-prob computation, LoRA training, saving/loading) without
downloading anything from the Hugging Face Hub. Every component is built in code with random weights:

- a 2-layer [`~diffusers.SD3Transformer2DModel`] (2 heads x 8 dims, patch size 2, 16 latent channels),
- a 2-block [`~diffusers.AutoencoderKL`] (VAE scale factor 2, SD3's `scaling_factor`/`shift_factor`),
- SD3's [`~diffusers.FlowMatchEulerDiscreteScheduler`] (`shift=3.0`),
- two 2-layer [`~transformers.CLIPTextModelWithProjection`] text encoders (hidden size 32, projection 32) with
  byte-level BPE [`~transformers.CLIPTokenizer`]s whose vocabulary (every byte plus merges for common words) is
  generated in code, so any prompt tokenizes without unknown tokens and different prompts tokenize differently,
- optionally a 2-layer [`~transformers.T5EncoderModel`] (`d_model=64`) with a Unigram [`~transformers.T5Tokenizer`]
  built in code.

[`make_tiny_flux_pipeline`] builds a [`~diffusers.FluxPipeline`] the same way (a 1 + 1-layer
[`~diffusers.FluxTransformer2DModel`], optionally with FLUX.1-dev's guidance embedding; a CLIP text encoder and a T5
encoder; FLUX's dynamic-shift scheduler), [`make_tiny_qwen_image_pipeline`] a [`~diffusers.QwenImagePipeline`] and
[`make_tiny_z_image_pipeline`] a [`~diffusers.ZImagePipeline`] (a tiny Qwen3 text encoder with a chat template),
[`make_tiny_flux2_klein_pipeline`] a [`~diffusers.Flux2KleinPipeline`] and [`make_tiny_flux2_pipeline`] a
[`~diffusers.Flux2Pipeline`] (FLUX.2-dev's layout with a tiny Mistral 3 text encoder), and
[`make_tiny_qwen_image_21_pipeline`] a [`~diffusers.QwenImage21Pipeline`]. The editing pipelines:
[`make_tiny_flux_kontext_pipeline`] a [`~diffusers.FluxKontextPipeline`], [`make_tiny_qwen_image_edit_plus_pipeline`]
a [`~diffusers.QwenImageEditPlusPipeline`] and [`make_tiny_qwen_image_edit_pipeline`] a
[`~diffusers.QwenImageEditPipeline`] (with a Qwen2-VL processor built in code).

The images are noise, of course; the point is that shapes, dtypes, configs and code paths match the real model.

Example:

```python
import torch
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config

pipe = make_tiny_sd3_pipeline(seed=0)
image = pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=torch.manual_seed(0)).images[0]
pipe.transformer.add_adapter(tiny_lora_config())
```
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from peft import LoraConfig
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.processing_utils import ProcessorMixin

from .pipelines.sd3 import LORA_TARGET_MODULES
from .tiny_tokenizers import (
    CLIP_MAX_LENGTH,
    TINY_WORDS,
    make_tiny_clip_tokenizer,
    make_tiny_qwen2_tokenizer,
    make_tiny_t5_tokenizer,
)

__all__ = [
    "TINY_SD3_LORA_TARGET_MODULES",
    "TINY_WORDS",
    "make_tiny_clip_tokenizer",
    "make_tiny_flux2_klein_pipeline",
    "make_tiny_flux2_pipeline",
    "make_tiny_flux_kontext_pipeline",
    "make_tiny_flux_pipeline",
    "TinyQwen2VLProcessor",
    "TinyQwen3VLTextProcessor",
    "make_tiny_qwen2_tokenizer",
    "make_tiny_qwen_image_21_pipeline",
    "make_tiny_qwen_image_edit_pipeline",
    "make_tiny_qwen_image_edit_plus_pipeline",
    "make_tiny_qwen_image_pipeline",
    "make_tiny_sd3_pipeline",
    "make_tiny_t5_tokenizer",
    "make_tiny_z_image_pipeline",
    "record_device_moves",
    "tiny_lora_config",
]

TINY_SD3_LORA_TARGET_MODULES = LORA_TARGET_MODULES  # kept public under its testing name

_CLIP_HIDDEN_SIZE = 32
_CLIP_PROJECTION_DIM = 32
_T5_D_MODEL = 64
# SD3 concatenates the two CLIP hidden states along the feature axis and zero-pads them to the T5 width.
_JOINT_ATTENTION_DIM = 2 * _CLIP_HIDDEN_SIZE
_POOLED_PROJECTION_DIM = 2 * _CLIP_PROJECTION_DIM
_LATENT_CHANNELS = 16
_VAE_BLOCK_OUT_CHANNELS = (8, 16)
_VAE_SCALE_FACTOR = 2 ** (len(_VAE_BLOCK_OUT_CHANNELS) - 1)
_PATCH_SIZE = 2
_NUM_HEADS = 2
_HEAD_DIM = 8


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_HIDDEN_SIZE,
        intermediate_size=37,
        projection_dim=_CLIP_PROJECTION_DIM,
        num_hidden_layers=2,  # SD3 uses hidden_states[-2], so at least two layers are needed
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is read at the first eos token
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(_clip_config(tokenizer))


def _t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_D_MODEL,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as used by SD3 and FLUX
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _tiny_vae(sample_size: int, latent_channels: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def make_tiny_sd3_pipeline(
    seed: int = 0,
    *,
    sample_size: int = 32,
    with_t5: bool = False,
    torch_dtype: torch.dtype = torch.float32,
) -> StableDiffusion3Pipeline:
    """Build a tiny, randomly initialised [`~diffusers.StableDiffusion3Pipeline`] without touching the network.

    Weights are drawn from the CPU random generator seeded with `seed` inside `torch.random.fork_rng`, so the same
    seed gives identical weights and the caller's global RNG state is left untouched. Models are returned on CPU,
    in eval mode, with `requires_grad` left at its default (`True`): freezing is the caller's decision.

    Configuration (with the default `sample_size=32`):

    - VAE: 2 blocks `(8, 16)`, 16 latent channels, scale factor 2, `scaling_factor=1.5305`,
      `shift_factor=0.0609`, no quant convs (as in SD3).
    - Transformer: `sample_size = sample_size // 2` latent pixels, patch size 2, 2 layers, 2 heads x 8 dims,
      `joint_attention_dim=64`, `caption_projection_dim=16`, `pooled_projection_dim=64`, `pos_embed_max_size`
      at least 32 (so images up to 128 px can be sampled).
    - Text: two CLIP encoders (hidden 32, projection 32, 77 positions); with `with_t5=True` a T5 encoder with
      `d_model=64` (= `joint_attention_dim`), otherwise SD3 fills the T5 part of the prompt embeddings with zeros.

    `pipe.save_pretrained(path)` round-trips exactly. Without T5, reload with
    `StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)`: diffusers treats the T5
    slots as required components and otherwise refuses to load a pipeline saved without them.

    Args:
        seed: Seed for the weight initialisation.
        sample_size: Default image height and width in pixels; must be a multiple of 4 (VAE factor x patch size).
        with_t5: Whether to include the third (T5) text encoder and tokenizer.
        torch_dtype: dtype of all model weights.

    Returns:
        The pipeline, on CPU.
    """
    _check_sample_size(sample_size, _VAE_SCALE_FACTOR * _PATCH_SIZE)
    latent_size = sample_size // _VAE_SCALE_FACTOR

    tokenizer = make_tiny_clip_tokenizer()
    tokenizer_2 = make_tiny_clip_tokenizer()
    tokenizer_3 = make_tiny_t5_tokenizer() if with_t5 else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=_PATCH_SIZE,
            in_channels=_LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_NUM_HEADS,
            joint_attention_dim=_JOINT_ATTENTION_DIM,
            caption_projection_dim=_NUM_HEADS * _HEAD_DIM,
            pooled_projection_dim=_POOLED_PROJECTION_DIM,
            out_channels=_LATENT_CHANNELS,
            pos_embed_max_size=max(32, latent_size // _PATCH_SIZE),
        )
        vae = _tiny_vae(sample_size, _LATENT_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609)
        text_encoder = _clip_text_encoder(tokenizer)
        text_encoder_2 = _clip_text_encoder(tokenizer_2)
        text_encoder_3 = _t5_encoder(tokenizer_3) if with_t5 else None

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    _finish([transformer, vae, text_encoder, text_encoder_2, text_encoder_3], torch_dtype)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _check_sample_size(sample_size: int, multiple: int) -> None:
    if sample_size <= 0 or sample_size % multiple != 0:
        raise ValueError(f"sample_size must be a positive multiple of {multiple}, got {sample_size}.")


def _finish(models: list[torch.nn.Module | None], torch_dtype: torch.dtype) -> None:
    for model in models:
        if model is None:
            continue
        if torch_dtype != torch.float32:
            # `torch.nn.Module.to` rather than `ModelMixin.to`, which warns about `_keep_in_fp32_modules` on every
            # dtype cast even when (as here) that list is empty.
            torch.nn.Module.to(model, dtype=torch_dtype)
        model.eval()


def make_tiny_flux_pipeline(
    seed: int = 0,
    *,
    sample_size: int = 32,
    guidance_embeds: bool = True,
    torch_dtype: torch.dtype = torch.float32,
) -> FluxPipeline:
    """Build a tiny, randomly initialised [`~diffusers.FluxPipeline`] without touching the network.

    Seeded and returned like [`make_tiny_sd3_pipeline`]. Configuration:

    - Transformer: 1 double-stream and 1 single-stream block, 2 heads x 16 dims (rotary axes 4 + 6 + 6), 4 latent
      channels packed into 2x2 patches (`in_channels=16`), `joint_attention_dim=64` (= T5's `d_model`),
      `pooled_projection_dim=32` (= CLIP's hidden size); `guidance_embeds=True` is FLUX.1-dev's guidance embedding,
      `False` FLUX.1-schnell's layout.
    - VAE: 2 blocks `(8, 16)`, 4 latent channels, scale factor 2, FLUX's `scaling_factor=0.3611` and
      `shift_factor=0.1159`, no quant convs. Images must be multiples of 4 pixels (VAE factor x packing).
    - Text: a 2-layer [`~transformers.CLIPTextModel`] (pooled output) and a 2-layer T5 encoder, tokenizers built in
      code.
    - Scheduler: FLUX's `FlowMatchEulerDiscreteScheduler` (dynamic shifting, `shift=3.0`, base/max shift 0.5/1.15,
      base/max sequence length 256/4096).

    Args:
        seed: Seed for the weight initialisation.
        sample_size: Default image height and width in pixels; a multiple of 4.
        guidance_embeds: Whether the transformer takes a guidance embedding (FLUX.1-dev) or not (schnell).
        torch_dtype: dtype of all model weights.

    Returns:
        The pipeline, on CPU.
    """
    _check_sample_size(sample_size, _VAE_SCALE_FACTOR * 2)
    latent_channels = 4
    tokenizer, tokenizer_2 = make_tiny_clip_tokenizer(), make_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_T5_D_MODEL,
            pooled_projection_dim=_CLIP_HIDDEN_SIZE,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
        vae = _tiny_vae(sample_size, latent_channels, scaling_factor=0.3611, shift_factor=0.1159)
        text_encoder = CLIPTextModel(_clip_config(tokenizer))
        text_encoder_2 = _t5_encoder(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    _finish([transformer, vae, text_encoder, text_encoder_2], torch_dtype)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def make_tiny_flux_kontext_pipeline(
    seed: int = 0,
    *,
    sample_size: int = 32,
    torch_dtype: torch.dtype = torch.float32,
) -> FluxKontextPipeline:
    """Build a tiny, randomly initialised [`~diffusers.FluxKontextPipeline`] without touching the network.

    The models of [`make_tiny_flux_pipeline`] with FLUX.1-dev's guidance embedding (Kontext is a FLUX.1-dev
    fine-tune with the same transformer; the source image only adds tokens), seeded and returned the same way.

    Args:
        seed: Seed for the weight initialisation.
        sample_size: Default image height and width in pixels; a multiple of 4.
        torch_dtype: dtype of all model weights.

    Returns:
        The pipeline, on CPU.
    """
    flux = make_tiny_flux_pipeline(seed, sample_size=sample_size, guidance_embeds=True, torch_dtype=torch_dtype)
    return FluxKontextPipeline(**flux.components)


def make_tiny_qwen2_5_vl(tokenizer: Qwen2Tokenizer, hidden_size: int = 32) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL with one text layer and one vision layer (seed it yourself)."""
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 8192,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
            "bos_token_id": None,
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _tiny_qwen_image_components(seed: int, torch_dtype: torch.dtype, zero_cond_t: bool = False) -> dict:
    """The models, tokenizer and scheduler of [`make_tiny_qwen_image_pipeline`] (shared by the editing builders)."""
    latent_channels, text_width = 4, 32
    tokenizer = make_tiny_qwen2_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * latent_channels,
            out_channels=latent_channels,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_width,
            axes_dims_rope=(4, 6, 6),
            zero_cond_t=zero_cond_t,
        )
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=latent_channels,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=[0.1, -0.2, 0.3, -0.4],
            latents_std=[1.5, 2.0, 0.8, 1.2],
        )
        text_encoder = make_tiny_qwen2_5_vl(tokenizer, hidden_size=text_width)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    _finish([transformer, vae, text_encoder], torch_dtype)
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def make_tiny_qwen_image_pipeline(
    seed: int = 0, *, sample_size: int = 32, torch_dtype: torch.dtype = torch.float32
) -> QwenImagePipeline:
    """Build a tiny, randomly initialised [`~diffusers.QwenImagePipeline`] without touching the network.

    Seeded and returned like [`make_tiny_sd3_pipeline`]. Configuration: a 1-layer
    [`~diffusers.QwenImageTransformer2DModel`] (2 heads x 16 dims, rotary axes 4 + 6 + 6, 4 latent channels packed
    2x2, `joint_attention_dim=32`); a 2-stage [`~diffusers.AutoencoderKLQwenImage`] (scale factor 2, 4 latent
    channels with their own `latents_mean` / `latents_std`); a 1-layer Qwen2.5-VL text encoder (hidden size 32) with
    the byte-level tokenizer of [`make_tiny_qwen2_tokenizer`]; Qwen-Image's scheduler settings (dynamic exponential
    shift, `shift_terminal=0.02`). Images must be multiples of 4 pixels.
    """
    _check_sample_size(sample_size, _VAE_SCALE_FACTOR * 2)  # the 2-stage VAE's factor x 2x2 packing
    return QwenImagePipeline(**_tiny_qwen_image_components(seed, torch_dtype))


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """[`~transformers.Qwen2VLProcessor`] without its video processor, for the tiny Qwen-Image-Edit pipelines.

    The real processor's video processor cannot be built without torchvision, and editing pipelines pass images
    only. This one is the real processor otherwise: the tokenizer, the PIL image processor
    [`~transformers.Qwen2VLImageProcessorPil`] (Qwen2-VL's smart resize to multiples of 28 pixels, 14-pixel patches
    merged 2x2, CLIP's mean and std) and the expansion of each `<|image_pad|>` into one token per merged patch.
    """

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: Qwen2Tokenizer):
        # Qwen2VLProcessor.__init__ without the video processor: the same token attributes, then ProcessorMixin's.
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer)


def _tiny_qwen_image_edit_components(seed: int, sample_size: int, torch_dtype: torch.dtype, zero_cond_t: bool):
    _check_sample_size(sample_size, _VAE_SCALE_FACTOR * 2)
    components = _tiny_qwen_image_components(seed, torch_dtype, zero_cond_t=zero_cond_t)
    processor = TinyQwen2VLProcessor(Qwen2VLImageProcessorPil(), components["tokenizer"])
    return components | {"processor": processor}


def make_tiny_qwen_image_edit_plus_pipeline(
    seed: int = 0, *, sample_size: int = 32, zero_cond_t: bool = False, torch_dtype: torch.dtype = torch.float32
) -> QwenImageEditPlusPipeline:
    """Build a tiny, randomly initialised [`~diffusers.QwenImageEditPlusPipeline`] without touching the network.

    The models of [`make_tiny_qwen_image_pipeline`] (Qwen-Image-Edit-2509 is a Qwen-Image fine-tune with the same
    transformer; the source image adds tokens, and the 1-layer Qwen2.5-VL's 1-block vision tower now reads it) and a
    [`TinyQwen2VLProcessor`], seeded and returned the same way.

    Args:
        seed: Seed for the weight initialisation.
        sample_size: Default image height and width in pixels; a multiple of 4.
        zero_cond_t: The transformer's `zero_cond_t` (Qwen-Image-Edit-2511: the source tokens get timestep 0).
        torch_dtype: dtype of all model weights.
    """
    return QwenImageEditPlusPipeline(**_tiny_qwen_image_edit_components(seed, sample_size, torch_dtype, zero_cond_t))


def make_tiny_qwen_image_edit_pipeline(
    seed: int = 0, *, sample_size: int = 32, torch_dtype: torch.dtype = torch.float32
) -> QwenImageEditPipeline:
    """Build a tiny, randomly initialised [`~diffusers.QwenImageEditPipeline`] (the first Qwen-Image-Edit) without
    touching the network: the models and processor of [`make_tiny_qwen_image_edit_plus_pipeline`]."""
    return QwenImageEditPipeline(**_tiny_qwen_image_edit_components(seed, sample_size, torch_dtype, False))


QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""Qwen3's chat layout (user turn, assistant header, the empty think block when thinking is off), for the tiny
tokenizer of [`make_tiny_z_image_pipeline`]: ZImagePipeline formats every prompt with `apply_chat_template`."""


def make_tiny_z_image_pipeline(
    seed: int = 0, *, sample_size: int = 32, torch_dtype: torch.dtype = torch.float32
) -> ZImagePipeline:
    """Build a tiny, randomly initialised [`~diffusers.ZImagePipeline`] without touching the network.

    Seeded and returned like [`make_tiny_sd3_pipeline`]. Configuration:

    - Transformer: a [`~diffusers.ZImageTransformer2DModel`] with 1 main layer and 1 noise / context refiner layer
      each, `dim=32`, 2 heads x 16 dims (rotary axes 4 + 6 + 6), patch size 2, 4 latent channels,
      `cap_feat_dim=32` (= the text encoder's hidden size).
    - VAE: 2 blocks `(8, 16)`, 4 latent channels, scale factor 2, the FLUX VAE's `scaling_factor=0.3611` and
      `shift_factor=0.1159` (Z-Image's). Images must be multiples of 4 pixels (VAE factor x 2x2 patches).
    - Text: a 2-layer [`~transformers.Qwen3Model`] (hidden size 32; Z-Image reads the second-to-last hidden states)
      with the byte-level tokenizer of [`make_tiny_qwen2_tokenizer`] and [`QWEN3_CHAT_TEMPLATE`].
    - Scheduler: Z-Image-Turbo's `FlowMatchEulerDiscreteScheduler` (`shift=3.0`, no dynamic shifting).

    Args:
        seed: Seed for the weight initialisation.
        sample_size: Default image height and width in pixels; a multiple of 4.
        torch_dtype: dtype of all model weights.

    Returns:
        The pipeline, on CPU.
    """
    _check_sample_size(sample_size, _VAE_SCALE_FACTOR * 2)
    latent_channels, text_width = 4, 32
    tokenizer = make_tiny_qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=latent_channels,
            dim=32,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=text_width,
            axes_dims=[4, 6, 6],
            axes_lens=[1024, 64, 64],
        )
        vae = _tiny_vae(sample_size, latent_channels, scaling_factor=0.3611, shift_factor=0.1159)
        text_encoder = Qwen3Model(_tiny_qwen3_config(tokenizer, text_width, num_hidden_layers=2))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    _finish([transformer, vae, text_encoder], torch_dtype)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _tiny_qwen3_config(tokenizer: Qwen2Tokenizer, hidden_size: int, num_hidden_layers: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_flux2_models(sample_size: int, text_width: int, guidance_embeds: bool):
    """FLUX.2's transformer (1 + 1 blocks) and batch-normed VAE, tiny; call inside a seeded RNG."""
    latent_channels = 4
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_width,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=_VAE_BLOCK_OUT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCK_OUT_CHANNELS),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=sample_size,
    )
    vae.bn.running_mean.copy_(0.1 * torch.randn(4 * latent_channels))
    vae.bn.running_var.copy_(0.5 + torch.rand(4 * latent_channels))
    return transformer, vae


def make_tiny_flux2_klein_pipeline(
    seed: int = 0, *, sample_size: int = 32, is_distilled: bool = False, torch_dtype: torch.dtype = torch.float32
) -> Flux2KleinPipeline:
    """Build a tiny, randomly initialised [`~diffusers.Flux2KleinPipeline`] without touching the network.

    Seeded and returned like [`make_tiny_sd3_pipeline`]. Configuration:

    - Transformer: a [`~diffusers.Flux2Transformer2DModel`] with 1 double-stream and 1 single-stream block, 2 heads x
      16 dims (rotary axes 4 x 4), 4 VAE channels patchified 2x2 (`in_channels=16`), `joint_attention_dim=96` (three
      stacked text layers of width 32), no guidance embedding (klein's layout).
    - VAE: an [`~diffusers.AutoencoderKLFlux2`] with 2 blocks `(8, 16)`, 4 latent channels, scale factor 2, and
      batch-norm statistics drawn at random (not the identity), so that decoding checks them. Images must be
      multiples of 4 pixels.
    - Text: a 28-layer [`~transformers.Qwen3ForCausalLM`] (hidden size 32; the pipeline reads hidden states 9, 18
      and 27) with the byte-level tokenizer of [`make_tiny_qwen2_tokenizer`] and [`QWEN3_CHAT_TEMPLATE`].
    - Scheduler: FLUX.2's `FlowMatchEulerDiscreteScheduler` (dynamic shifting, `shift=3.0`); the pipeline computes
      `mu` itself.

    Args:
        seed: Seed for the weight initialisation.
        sample_size: Default image height and width in pixels; a multiple of 4.
        is_distilled: The pipeline's `is_distilled` flag: the step-distilled klein models ignore `guidance_scale`.
        torch_dtype: dtype of all model weights.

    Returns:
        The pipeline, on CPU.
    """
    _check_sample_size(sample_size, _VAE_SCALE_FACTOR * 2)
    text_width = 32
    tokenizer = make_tiny_qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, vae = _tiny_flux2_models(sample_size, text_width, guidance_embeds=False)
        text_encoder = Qwen3ForCausalLM(_tiny_qwen3_config(tokenizer, text_width, num_hidden_layers=28))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    _finish([transformer, vae, text_encoder], torch_dtype)
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )


MISTRAL3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[INST]{% endif %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{% if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[/INST]{% endif %}"
    "{% endfor %}"
)
"""Mistral Small 3.1's layout of a system + user conversation whose contents are lists of text parts, for the tiny
tokenizer of [`make_tiny_flux2_pipeline`] (Flux2Pipeline formats every prompt with FLUX.2's system message)."""


def make_tiny_flux2_pipeline(
    seed: int = 0, *, sample_size: int = 32, torch_dtype: torch.dtype = torch.float32
) -> Flux2Pipeline:
    """Build a tiny, randomly initialised [`~diffusers.Flux2Pipeline`] (FLUX.2-dev's layout) without the network.

    Seeded and returned like [`make_tiny_sd3_pipeline`]. The transformer and VAE are those of
    [`make_tiny_flux2_klein_pipeline`], with FLUX.2-dev's guidance embedding. Text: a
    [`~transformers.Mistral3ForConditionalGeneration`] with a 31-layer Mistral text model (hidden size 32; the pipeline
    reads hidden states 10, 20 and 30) and a 1-layer Pixtral vision tower, and the byte-level tokenizer of
    [`make_tiny_qwen2_tokenizer`] with [`MISTRAL3_CHAT_TEMPLATE`] in place of the Pixtral processor (the pipeline
    only tokenizes text). The byte-level tokenizer spends about 200 tokens on FLUX.2's system message: use
    `max_sequence_length` of 256 or more so that prompts differ.

    Args:
        seed: Seed for the weight initialisation.
        sample_size: Default image height and width in pixels; a multiple of 4.
        torch_dtype: dtype of all model weights.

    Returns:
        The pipeline, on CPU.
    """
    _check_sample_size(sample_size, _VAE_SCALE_FACTOR * 2)
    text_width = 32
    tokenizer = make_tiny_qwen2_tokenizer()
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": text_width,
            "intermediate_size": 2 * text_width,
            "num_hidden_layers": 31,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 32,
            "patch_size": 8,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, vae = _tiny_flux2_models(sample_size, text_width, guidance_embeds=True)
        text_encoder = Mistral3ForConditionalGeneration(config)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    _finish([transformer, vae, text_encoder], torch_dtype)
    return Flux2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


class TinyQwen3VLTextProcessor:
    """A text-only stand-in for [`~transformers.Qwen3VLProcessor`], for [`make_tiny_qwen_image_21_pipeline`].

    The real processor cannot be built without torchvision (its video processor needs it), and a text-to-image
    pipeline only tokenizes text. This one does what `QwenImage21Pipeline` asks of the processor: `tokenizer`,
    `apply_chat_template` of text-only turns (Qwen's `<|im_start|>role\n...<|im_end|>\n` layout) and a call on text
    with padding, returning `mm_token_type_ids` (all text) as the real processor does.
    """

    def __init__(self, tokenizer: Qwen2Tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, messages: list[dict], tokenize: bool = True, return_dict: bool = False):
        text = "".join(
            f"<|im_start|>{m['role']}\n" + "".join(part["text"] for part in m["content"]) + "<|im_end|>\n"
            for m in messages
        )
        return [self.tokenizer.encode(text)] if tokenize else text

    def __call__(self, text: list[str], **kwargs):
        inputs = self.tokenizer(text, **kwargs)
        inputs["mm_token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        return inputs


def make_tiny_qwen_image_21_pipeline(
    seed: int = 0, *, torch_dtype: torch.dtype = torch.float32
) -> QwenImage21Pipeline:
    """Build a tiny, randomly initialised [`~diffusers.QwenImage21Pipeline`] without touching the network.

    Seeded and returned like [`make_tiny_sd3_pipeline`]. Configuration: a 1-layer
    [`~diffusers.QwenImage21Transformer2DModel`] (2 heads x 16 dims, rotary axes 4 + 6 + 6, 4 unpatched latent
    channels, `context_in_dim=32`, block-causal conditioning); a 5-stage [`~diffusers.AutoencoderKLQwenImage21`]
    (16x, as the pipeline assumes; 4 latent channels with their own `latents_mean` / `latents_std`); a 2-layer
    Qwen3-VL text encoder (hidden size 32, a 1-layer vision tower) with the byte-level tokenizer of
    [`make_tiny_qwen2_tokenizer`] behind [`TinyQwen3VLTextProcessor`]; a dynamic-shift scheduler. Images must be
    multiples of 32 pixels (64 gives 4 x 4 latents).
    """
    latent_channels, text_width = 4, 32
    tokenizer = make_tiny_qwen2_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_width,
            "intermediate_size": 2 * text_width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 2, 4], "mrope_interleaved": True},
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": text_width,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
            "patch_size": 4,
            "spatial_merge_size": 2,
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImage21Transformer2DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            context_in_dim=text_width,
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKLQwenImage21(
            base_dim=4,
            decoder_base_dim=4,
            z_dim=latent_channels,
            dim_mult=[1, 1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, False, False, False],
            latents_mean=[0.1, -0.2, 0.3, -0.4],
            latents_std=[1.5, 2.0, 0.8, 1.2],
        )
        text_encoder = Qwen3VLForConditionalGeneration(config)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True)
    _finish([transformer, vae, text_encoder], torch_dtype)
    return QwenImage21Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        processor=TinyQwen3VLTextProcessor(tokenizer),
        transformer=transformer,
    )


def tiny_lora_config(r: int = 4, lora_alpha: int = 8) -> LoraConfig:
    """A [`~peft.LoraConfig`] targeting the attention projections of an SD3 transformer.

    Targets `to_q`, `to_k`, `to_v`, `to_out.0` (image stream) and `add_q_proj`, `add_k_proj`, `add_v_proj`,
    `to_add_out` (text stream; the last block of SD3 has no `to_add_out`). LoRA weights are initialised with
    `init_lora_weights="gaussian"` (so B is zero and the adapter starts as a no-op). Use it with
    `pipe.transformer.add_adapter(tiny_lora_config())`.

    Args:
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
    """
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(TINY_SD3_LORA_TARGET_MODULES),
    )


def record_device_moves(module: torch.nn.Module, *methods: str) -> tuple[list[str], list[str]]:
    """Record where `module` is sent and where it was sent last whenever one of its `methods` runs.

    `module.to(device, ...)` appends `str(device)` to the first list and really moves the module only to the CPU, so
    that offloading to `"cuda:N"` can be checked on a machine without a GPU (the module computes on the CPU
    throughout). Each call of one of `methods` (e.g. `"forward"`) appends the last recorded move (`"none"` before the
    first) to the second list. Both patch the instance, not its class.

    Returns:
        `(moves, runs)`: the devices passed to `.to`, and the placement seen by each call of `methods`.
    """
    moves: list[str] = []
    runs: list[str] = []
    original_to = module.to

    def recording_to(device: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        moves.append(str(device))
        return original_to(device, *args, **kwargs) if str(device) == "cpu" else module

    module.to = recording_to  # type: ignore[method-assign]
    for name in methods:
        original = getattr(module, name)

        def recording(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            runs.append(moves[-1] if moves else "none")
            return _original(*args, **kwargs)

        setattr(module, name, recording)
    return moves, runs
