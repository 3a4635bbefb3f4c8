"""Qwen-Image (`QwenImagePipeline`)."""

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from PIL import Image

from .base import Conditioning, PipelineAdapter

NEGATIVE_PROMPT = " "
"""The negative prompt of Qwen-Image's true CFG (the model card's)."""


class QwenImageAdapter(PipelineAdapter):
    """Qwen-Image takes latents packed into 2x2 patches like FLUX, the timestep sigma, the last hidden states of
    Qwen2.5-VL (a prompt template, its first tokens dropped) with a mask for padded text, and "true" classifier-free
    guidance: separate forwards for the prompt and the negative prompt (their text lengths differ), combined as
    `uncond + s (cond - uncond)` and rescaled to the norm of the conditional prediction per token.

    The trajectory keeps latents unpacked, (B, C, H/8, W/8). `guidance_scale` is the true-CFG scale (4.0 in
    diffusers' example); `guidance_scale <= 1` runs the prompt alone.
    """

    pipeline_class = QwenImagePipeline

    @property
    def _factor(self) -> int:
        return self.pipeline.vae_scale_factor * 2

    def check_inputs(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value % self._factor:
                raise ValueError(
                    f"{name}={value} is not divisible by {self._factor} (VAE scale factor "
                    f"{self.pipeline.vae_scale_factor} x 2x2 latent packing); use "
                    f"{name}={max(self._factor, value - value % self._factor)}."
                )

    def _encode(self, prompts: list[str], device: torch.device, max_sequence_length: int):
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts, device=device, max_sequence_length=max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-ones mask; keep a tensor so that the batch can be sliced
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        embeds, mask = self._encode(prompts, device, max_sequence_length)
        cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if with_negative:
            neg, neg_mask = self._encode([NEGATIVE_PROMPT] * len(prompts), device, max_sequence_length)
            cond |= {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
        return cond

    def pipeline_call_kwargs(self, guidance_scale: float) -> dict:
        # QwenImagePipeline's `guidance_scale` is for guidance-distilled variants; true CFG needs a negative prompt.
        return {"true_cfg_scale": guidance_scale, "negative_prompt": NEGATIVE_PROMPT} if guidance_scale > 1 else {}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.transformer.config.in_channels // 4, 2 * (height // self._factor), 2 * (width // self._factor))

    def sigmas(self, num_inference_steps: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        # As QwenImagePipeline: sigmas linspace(1, 1/T, T), shifted by mu from the number of packed tokens.
        config = self._scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        tokens = (height // self._factor) * (width // self._factor)
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        self._scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        return self._scheduler.sigmas.to(device=device, dtype=torch.float32)

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
        packed = QwenImagePipeline._pack_latents(latents, batch, channels, height, width).to(dtype)
        timestep = (sigma * self._scheduler.config.num_train_timesteps).to(dtype) / 1000
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=latents.device, dtype=torch.float32)

        def forward(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return transformer(
                hidden_states=packed,
                timestep=timestep,
                guidance=guidance,
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as the pipeline passes it
                encoder_hidden_states=embeds,
                img_shapes=[[(1, height // 2, width // 2)]] * batch,
                return_dict=False,
            )[0]

        out = forward(cond["prompt_embeds"], cond["prompt_embeds_mask"])
        if guidance_scale > 1.0:
            uncond = forward(cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])
            combined = uncond + guidance_scale * (out - uncond)
            out = combined * (out.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        latents = latents[:, :, None].to(vae.dtype) * std + mean  # a one-frame video latent
        images = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pil")
