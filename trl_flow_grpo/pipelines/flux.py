"""FLUX.1 (`FluxPipeline`): dev, schnell, and fine-tunes of them."""

import torch
from diffusers import FluxPipeline

from .base import Conditioning
from .packed import PackedLatentAdapter


class FluxAdapter(PackedLatentAdapter):
    """FLUX takes latents packed into 2x2 patches, (B, H/16 * W/16, 4C), with position ids; the timestep sigma (not
    sigma * 1000); CLIP-L pooled + T5 text embeddings; and, for FLUX.1-dev, the guidance scale as an embedding
    (guidance distillation) instead of classifier-free guidance: one forward per step, no negative prompt.

    Packing, sizes and the grid: `PackedLatentAdapter`. `guidance_scale` is FLUX.1-dev's embedded guidance (3.5 in
    diffusers and in Flow-GRPO's FLUX runs); a model without a guidance embedding (schnell) ignores it.
    """

    pipeline_class = FluxPipeline
    default_guidance_scale = 3.5  # FluxPipeline's default

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        # No negative prompt: FLUX.1 is guidance-distilled (see the class docstring), so `with_negative` is unused.
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def forwards_per_sample(self, guidance_scale: float) -> int:
        return 1  # embedded guidance: no [uncond; cond] batch

    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        embeds = cond["prompt_embeds"]
        dtype, device = embeds.dtype, latents.device
        batch, _, height, width = latents.shape
        packed = self.pack(latents).to(dtype)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)
        out = transformer(
            hidden_states=packed,
            timestep=self._timestep(sigma, dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return self.unpack(out, height, width).float()
