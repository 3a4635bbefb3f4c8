"""FLUX.1 (`FluxPipeline`): dev, schnell, and fine-tunes of them."""

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .base import Conditioning, PipelineAdapter


class FluxAdapter(PipelineAdapter):
    """FLUX takes latents packed into 2x2 patches, (B, H/16 * W/16, 4C), with position ids; the timestep sigma (not
    sigma * 1000); CLIP-L pooled + T5 text embeddings; and, for FLUX.1-dev, the guidance scale as an embedding
    (guidance distillation) instead of classifier-free guidance: one forward per step, no negative prompt.

    The trajectory keeps latents unpacked, (B, C, H/8, W/8); packing is a permutation, so Gaussian noise and the
    per-element log-probabilities are the same either way. `guidance_scale` is FLUX.1-dev's embedded guidance (3.5 in
    diffusers and in Flow-GRPO's FLUX runs); a model without a guidance embedding (schnell) ignores it.
    """

    pipeline_class = FluxPipeline

    @property
    def _factor(self) -> int:
        """Pixels per packed latent token along one side: the VAE's factor times the 2x2 packing."""
        return self.pipeline.vae_scale_factor * 2

    def check_inputs(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value % self._factor:
                raise ValueError(
                    f"{name}={value} is not divisible by {self._factor} (VAE scale factor "
                    f"{self.pipeline.vae_scale_factor} x 2x2 latent packing); use "
                    f"{name}={max(self._factor, value - value % self._factor)}."
                )

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        # No negative prompt: FLUX.1 is guidance-distilled (see the class docstring), so `with_negative` is unused.
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.transformer.config.in_channels // 4, 2 * (height // self._factor), 2 * (width // self._factor))

    def sigmas(self, num_inference_steps: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        # As FluxPipeline: sigmas linspace(1, 1/T, T), shifted by mu from the number of packed tokens.
        config = self._scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas", False):
            sigmas = None
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
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width).to(dtype)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)
        # The pipeline passes (sigma * num_train_timesteps) / 1000; the same here, to the last bit.
        timestep = (sigma * self._scheduler.config.num_train_timesteps).to(dtype) / 1000
        out = transformer(
            hidden_states=packed,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width).float()
