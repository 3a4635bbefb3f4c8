"""Qwen-Image 2.1 (`QwenImage21Pipeline`): its own family, not a variant of Qwen-Image."""

import numpy as np
import torch
from diffusers import QwenImage21Pipeline
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift
from PIL import Image

from .base import Conditioning
from .packed import PackedLatentAdapter

NEGATIVE_PROMPT = " "
"""The negative prompt of true CFG (Qwen-Image's; QwenImage21Pipeline turns an empty prompt into it anyway)."""


class QwenImage21Adapter(PackedLatentAdapter):
    """Qwen-Image 2.1 takes unpatched latents (a 16x VAE, 64 channels), flattened to (B, h * w, C) tokens; the text
    of a Qwen3-VL encoder (its last layer before the final norm, the system turn dropped) with a mask, joined with the
    image tokens in one block-causal sequence laid out by `img_mask` (one slot per 2x2 latent tokens); the timestep
    sigma; and true classifier-free guidance with a second forward for the negative prompt, `uncond + s (cond -
    uncond)`, without Qwen-Image's norm rescaling.

    Sizes are multiples of 2 x 16 (`PackedLatentAdapter.check_inputs`). The grid is the author's `sample_sigmas`
    from the pipeline's config when it sets one (it fixes the number of steps), else `linspace(1, 1/T, T)`, shifted
    by `mu` of the number of latent tokens. The pipeline reuses the text's keys and values across steps (a cache);
    the adapter recomputes them, which gives the same velocities.

    `guidance_scale` is `true_cfg_scale` (the pipeline's default 1.0: no CFG). The pipeline tokenizes without a
    maximum length, so `max_sequence_length` is unused.
    """

    pipeline_class = QwenImage21Pipeline
    default_guidance_scale = 1.0  # QwenImage21Pipeline's default true_cfg_scale

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, 2 * (height // self._factor), 2 * (width // self._factor))

    def sigmas(self, num_inference_steps: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        sigmas = self.pipeline.config.get("sample_sigmas")
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        elif len(sigmas) != num_inference_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps}, but this Qwen-Image 2.1 checkpoint sets its own grid of "
                f"{len(sigmas)} steps (`sample_sigmas` in the pipeline's config). Set num_inference_steps (and "
                f"eval_num_inference_steps) to {len(sigmas)}, or drop the grid with "
                "`pipe.register_to_config(sample_sigmas=None)`."
            )
        tokens = (2 * (height // self._factor)) * (2 * (width // self._factor))
        mu = calculate_shift(
            tokens,
            self._scheduler.config.get("base_image_seq_len", 256),
            self._scheduler.config.get("max_image_seq_len", 4096),
            self._scheduler.config.get("base_shift", 0.5),
            self._scheduler.config.get("max_shift", 1.15),
        )
        self._scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        return self._scheduler.sigmas.to(device=device, dtype=torch.float32)

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, mask, image_pad_mask = self.pipeline.encode_prompt(prompt=list(prompts), device=device)
        if mask is None:  # the pipeline drops an all-ones mask; keep a tensor so that the batch can be sliced
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"embeds": embeds, "embeds_mask": mask.long(), "image_pad_mask": image_pad_mask.long()}

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        cond = {f"prompt_{key}": value for key, value in self._encode(prompts, device).items()}
        if with_negative:
            negative = self._encode([NEGATIVE_PROMPT] * len(prompts), device)
            cond |= {f"negative_prompt_{key}": value for key, value in negative.items()}
        return cond

    def pipeline_call_kwargs(self, guidance_scale: float) -> dict:
        return {"true_cfg_scale": guidance_scale, "negative_prompt": NEGATIVE_PROMPT} if guidance_scale > 1 else {}

    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        dtype = cond["prompt_embeds"].dtype
        batch, channels, height, width = latents.shape
        tokens = height * width
        packed = latents.flatten(2).transpose(1, 2).to(dtype)  # the pipeline's `_pack_latents`
        timestep = self._timestep(sigma, dtype)
        target_slots = torch.ones(batch, tokens // 4, dtype=torch.bool, device=latents.device)

        def forward(prefix: str) -> torch.Tensor:
            mask = cond[f"{prefix}_embeds_mask"]
            return transformer(
                hidden_states=packed,
                timestep=timestep,
                encoder_hidden_states=cond[f"{prefix}_embeds"],
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as the pipeline passes it
                img_shapes=[[(1, height, width)]] * batch,
                img_mask=torch.cat([cond[f"{prefix}_image_pad_mask"].bool(), target_slots], dim=1),
                return_dict=False,
            )[0][:, -tokens:]

        out = forward("prompt")
        if guidance_scale > 1.0:
            uncond = forward("negative_prompt")
            out = uncond + guidance_scale * (out - uncond)
        return out.transpose(1, 2).reshape(batch, channels, height, width).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        latents = latents[:, :, None].to(vae.dtype) * std + mean  # a one-frame video latent
        images = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pil")
