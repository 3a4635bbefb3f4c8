"""FLUX.2: klein (`Flux2KleinPipeline`, distilled and base) and dev (`Flux2Pipeline`)."""

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image

from .base import Conditioning
from .packed import PackedLatentAdapter

LORA_TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "to_qkv_mlp_proj",
)
"""The attention projections of FLUX.2's double-stream blocks (SD3's names) and the fused query/key/value + MLP input
projection of its single-stream blocks (`to_qkv_mlp_proj`). The single-stream output projection is left out: it is
named `attn.to_out` like the double-stream blocks' `ModuleList`, which PEFT cannot wrap. SD3's list alone (the CLI's
default `lora_target_modules`) reaches only the double-stream blocks: 8 of FLUX.2-dev's 56."""


class Flux2AdapterBase(PackedLatentAdapter):
    """What FLUX.2 dev and klein share. The VAE's latents are patchified 2x2 and normalised by the VAE's batch-norm
    statistics; the trajectory keeps that space unpacked, (B, 4C, H/2f, W/2f), which is the `latents` argument the
    pipelines take. The transformer sees it flattened to (B, H/2f * W/2f, 4C) tokens with 4-axis position ids, text
    position ids, and the timestep sigma. Sizes are multiples of 2f; the grid is `linspace(1, 1/T, T)` shifted by
    FLUX.2's `compute_empirical_mu` (of the token count and T, not the scheduler's base/max shift).
    """

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, height // self._factor, width // self._factor)

    def sigmas(self, num_inference_steps: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if self._scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        tokens = (height // self._factor) * (width // self._factor)
        mu = compute_empirical_mu(image_seq_len=tokens, num_steps=num_inference_steps)
        self._scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        return self._scheduler.sigmas.to(device=device, dtype=torch.float32)

    def _encode(self, prompts: list[str], device: torch.device, max_sequence_length: int) -> torch.Tensor:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=device, max_sequence_length=max_sequence_length
        )
        return embeds  # the text position ids are recomputed from the shape in `_forward`

    def _forward(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        embeds: torch.Tensor,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor:
        """One transformer call as the pipelines make it; (B, 4C, h, w) in and out."""
        batch, channels, height, width = latents.shape
        device = latents.device
        packed = self.pipeline._pack_latents(latents).to(self.transformer.dtype)
        out = transformer(
            hidden_states=packed,
            timestep=self._timestep(sigma, embeds.dtype),
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=self.pipeline._prepare_text_ids(embeds).to(device),
            img_ids=self.pipeline._prepare_latent_ids(latents).to(device),
            return_dict=False,
        )[0][:, : height * width]
        # The inverse of `_pack_latents` (the pipelines scatter by the row-major position ids: the same permutation).
        return out.permute(0, 2, 1).reshape(batch, channels, height, width).float()

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Trajectory latents -> the VAE's (B, C, H/f, W/f): undo the batch norm and the 2x2 patchify."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        return self.pipeline._unpatchify_latents(latents * std + mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        images = vae.decode(self._to_vae_latents(latents).to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pil")


class Flux2KleinAdapter(Flux2AdapterBase):
    """FLUX.2 klein: Qwen3 text embeddings (three intermediate layers stacked) padded to `max_sequence_length`, no
    guidance embedding, and classifier-free guidance with the empty negative prompt as a second forward,
    `uncond + s (cond - uncond)`, unless the checkpoint is step-distilled (`is_distilled` in the pipeline's config,
    the 4-step klein models): then `guidance_scale` is ignored, one forward per step, as in `Flux2KleinPipeline`.
    """

    pipeline_class = Flux2KleinPipeline
    default_guidance_scale = 4.0  # Flux2KleinPipeline's default

    def _cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and not self.pipeline.config.is_distilled

    def forwards_per_sample(self, guidance_scale: float) -> int:
        return 2 if self._cfg(guidance_scale) else 1

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        cond = {"prompt_embeds": self._encode(prompts, device, max_sequence_length)}
        if with_negative and not self.pipeline.config.is_distilled:
            cond["negative_prompt_embeds"] = self._encode([""] * len(prompts), device, max_sequence_length)
        return cond

    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        out = self._forward(transformer, latents, sigma, cond["prompt_embeds"], None)
        if self._cfg(guidance_scale):
            uncond = self._forward(transformer, latents, sigma, cond["negative_prompt_embeds"], None)
            out = uncond + guidance_scale * (out - uncond)
        return out


class Flux2Adapter(Flux2AdapterBase):
    """FLUX.2 dev: Mistral Small 3.1 text embeddings (three intermediate layers stacked, FLUX.2's system prompt)
    padded to `max_sequence_length`, and the guidance scale as an embedding (guidance distillation): one forward per
    step, no negative prompt, as in `Flux2Pipeline`.
    """

    pipeline_class = Flux2Pipeline
    default_guidance_scale = 4.0  # Flux2Pipeline's default

    def forwards_per_sample(self, guidance_scale: float) -> int:
        return 1  # embedded guidance: no [uncond; cond] batch

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        # No negative prompt: FLUX.2-dev's guidance is embedded (class docstring), so `with_negative` is unused.
        return {"prompt_embeds": self._encode(prompts, device, max_sequence_length)}

    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        guidance = torch.full((latents.shape[0],), guidance_scale, device=latents.device, dtype=torch.float32)
        return self._forward(transformer, latents, sigma, cond["prompt_embeds"], guidance)
