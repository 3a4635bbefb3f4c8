"""Qwen-Image (`QwenImagePipeline`)."""

import torch
from diffusers import QwenImagePipeline
from PIL import Image

from .base import Conditioning
from .packed import PackedLatentAdapter

NEGATIVE_PROMPT = " "
"""The negative prompt of Qwen-Image's true CFG (the model card's)."""


class QwenImageAdapter(PackedLatentAdapter):
    """Qwen-Image takes latents packed into 2x2 patches like FLUX, the timestep sigma, the last hidden states of
    Qwen2.5-VL (a prompt template, its first tokens dropped) with a mask for padded text, and "true" classifier-free
    guidance: separate forwards for the prompt and the negative prompt (their text lengths differ), combined as
    `uncond + s (cond - uncond)` and rescaled to the norm of the conditional prediction per token.

    Packing, sizes and the grid: `PackedLatentAdapter`. `guidance_scale` is the true-CFG scale (4.0 in
    diffusers' example); `guidance_scale <= 1` runs the prompt alone.
    """

    pipeline_class = QwenImagePipeline
    default_guidance_scale = 4.0  # diffusers' Qwen-Image example (true_cfg_scale)

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

    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        return self._true_cfg_velocity(transformer, latents, sigma, cond, guidance_scale)

    def _true_cfg_velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
        source_tokens: torch.Tensor | None = None,
        source_shapes: tuple[tuple[int, int, int], ...] = (),
    ) -> torch.Tensor:
        """`velocity`, optionally with packed source-image tokens (B, S, 4C) appended to the noisy latent tokens,
        `source_shapes` their (frames, rows, columns) entries of `img_shapes` (the editing pipelines' layout); the
        prediction for the source tokens is dropped before guidance, as the pipelines do."""
        dtype = cond["prompt_embeds"].dtype
        batch, _, height, width = latents.shape
        packed = self.pack(latents).to(dtype)
        hidden = packed if source_tokens is None else torch.cat([packed, source_tokens.to(dtype)], dim=1)
        img_shapes = [[(1, height // 2, width // 2), *source_shapes]] * batch
        timestep = self._timestep(sigma, dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=latents.device, dtype=torch.float32)

        def forward(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return transformer(
                hidden_states=hidden,
                timestep=timestep,
                guidance=guidance,
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as the pipeline passes it
                encoder_hidden_states=embeds,
                img_shapes=img_shapes,
                return_dict=False,
            )[0][:, : packed.shape[1]]

        out = forward(cond["prompt_embeds"], cond["prompt_embeds_mask"])
        if guidance_scale > 1.0:
            uncond = forward(cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])
            combined = uncond + guidance_scale * (out - uncond)
            out = combined * (out.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return self.unpack(out, height, width).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        latents = latents[:, :, None].to(vae.dtype) * std + mean  # a one-frame video latent
        images = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pil")
