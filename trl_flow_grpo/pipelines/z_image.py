"""Z-Image (`ZImagePipeline`): Z-Image and Z-Image-Turbo."""

import torch
from diffusers import ZImagePipeline

from .base import Conditioning
from .packed import PackedLatentAdapter


class ZImageAdapter(PackedLatentAdapter):
    """Z-Image's transformer takes a list of per-sample latents (C, 1, h, w) that it patchifies itself (2x2), a list of
    per-sample text embeddings of their own lengths (Qwen3's second-to-last hidden states of the chat-templated
    prompt, padding dropped), and the timestep `1 - sigma`; it predicts `-v`. Classifier-free guidance runs the
    prompt and the empty negative prompt in one forward and combines them as `cond + s (cond - uncond)`.

    Sizes and the grid are FLUX's (`PackedLatentAdapter`): multiples of 2f, `linspace(1, 1/T, T)` through the
    scheduler with `mu` from the token count (Z-Image-Turbo's scheduler has a fixed `shift` and ignores `mu`).

    `guidance_scale` follows the trainer's convention (no guidance at `<= 1`, `uncond + w (cond - uncond)`), which is
    ZImagePipeline's `guidance_scale + 1`: the pipeline's default 5.0 is 6.0 here, and Z-Image-Turbo (guidance
    distilled, sampled with the pipeline's 0.0) is 1.0 here. `pipeline_call_kwargs` converts back. The pipeline's
    `cfg_normalization` and `cfg_truncation` are left at their defaults (off), the same in rollouts and in
    `pipe(...)` calls.

    The conditioning keeps the padded embeddings with their mask, so that a batch can be sliced; `velocity` drops the
    padding again exactly as `ZImagePipeline._encode_prompt` does.
    """

    pipeline_class = ZImagePipeline
    default_guidance_scale = 6.0  # ZImagePipeline's default guidance_scale=5.0 in its `cond + s (cond - uncond)`

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        # The transformer packs 2x2 patches itself, so `in_channels` are the VAE's latent channels.
        return (self.transformer.config.in_channels, 2 * (height // self._factor), 2 * (width // self._factor))

    def _encode(self, prompts: list[str], device: torch.device, max_sequence_length: int):
        # `_encode_prompt` returns one tensor per prompt with the padding removed; pad them again, with a mask.
        embeds = self.pipeline._encode_prompt(
            prompt=list(prompts), device=device, max_sequence_length=max_sequence_length
        )
        length = max(e.shape[0] for e in embeds)
        padded = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), length, dtype=torch.long, device=padded.device)
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
        return padded, mask

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        embeds, mask = self._encode(prompts, device, max_sequence_length)
        cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if with_negative:  # ZImagePipeline's negative prompt defaults to ""
            neg, neg_mask = self._encode([""] * len(prompts), device, max_sequence_length)
            cond |= {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
        return cond

    def pipeline_call_kwargs(self, guidance_scale: float) -> dict:
        return {"guidance_scale": max(guidance_scale - 1.0, 0.0)}  # see the class docstring

    @staticmethod
    def _unpad(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return [e[m.bool()] for e, m in zip(embeds, mask)]

    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        batch = latents.shape[0]
        dtype = self.transformer.dtype
        # The pipeline's timestep: t = sigma * num_train_timesteps, then (1000 - t) / 1000, in float32.
        timestep = (1000 - sigma.float() * self._scheduler.config.num_train_timesteps) / 1000
        x = latents.to(dtype)
        embeds = self._unpad(cond["prompt_embeds"], cond["prompt_embeds_mask"])
        cfg = guidance_scale > 1.0
        if cfg:  # one forward on [cond; uncond], as the pipeline
            x = x.repeat(2, 1, 1, 1)
            embeds = embeds + self._unpad(cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])
            timestep = timestep.repeat(2)
        out = transformer(list(x.unsqueeze(2).unbind(dim=0)), timestep, embeds, return_dict=False)[0]
        out = torch.stack([o.float() for o in out], dim=0).squeeze(2)
        if cfg:
            pos, neg = out[:batch], out[batch:]
            out = pos + (guidance_scale - 1.0) * (pos - neg)
        return -out
