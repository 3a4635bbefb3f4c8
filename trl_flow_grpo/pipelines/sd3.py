"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`)."""

import torch
from diffusers import StableDiffusion3Pipeline

from .base import Conditioning, PipelineAdapter

LORA_TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
"""The attention projections of SD3's joint blocks (image and text streams): Flow-GRPO's LoRA targets."""


class SD3Adapter(PipelineAdapter):
    """SD3 takes latents (B, C, H/8, W/8), the timestep sigma * 1000, CLIP-L + CLIP-G + T5 text embeddings."""

    pipeline_class = StableDiffusion3Pipeline
    default_guidance_scale = 4.5  # Flow-GRPO's SD3.5 setting
    repeated_blocks = ("JointTransformerBlock",)  # diffusers' SD3Transformer2DModel lists no `_repeated_blocks`

    def check_inputs(self, height: int, width: int) -> None:
        factor, patch = self.pipeline.vae_scale_factor, self.pipeline.patch_size
        multiple = factor * patch
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise ValueError(
                    f"{name}={value} is not divisible by {multiple} (VAE scale factor "
                    f"{factor} x patch size {patch}); use {name}={max(multiple, value - value % multiple)}."
                )
        max_patches = self.transformer.config.pos_embed_max_size
        if max_patches is None:  # no positional-embedding table to crop from: any size the grid allows
            return
        largest = max_patches * multiple
        too_large = [f"{name}={value}" for name, value in (("height", height), ("width", width)) if value > largest]
        if too_large:
            default = self.transformer.config.sample_size * factor
            verb = "are" if len(too_large) > 1 else "is"
            raise ValueError(
                f"{' and '.join(too_large)} {verb} larger than this SD3 transformer can sample: at most {largest} "
                f"pixels per side (pos_embed_max_size {max_patches} x patch size {patch} x VAE scale factor {factor})."
                f" Pass height and width of at most {largest} (multiples of {multiple}), e.g. the pipeline's default "
                f"size height={default}, width={default}. FlowGRPOConfig's 512 x 512 default is SD3.5's size; for the "
                "shipped shapes model (trl_flow_grpo.toy.model.load_shapes_pipeline) pass height=32, width=32 or use "
                "trl_flow_grpo.toy.recipe.SHAPES_RECIPE."
            )

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        embeds, neg_embeds, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=with_negative,
            negative_prompt=[""] * len(prompts) if with_negative else None,
            max_sequence_length=max_sequence_length,
        )
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if with_negative:
            cond |= {"negative_prompt_embeds": neg_embeds, "negative_pooled_prompt_embeds": neg_pooled}
        return cond

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        factor = self.pipeline.vae_scale_factor
        return (self.transformer.config.in_channels, height // factor, width // factor)

    def sigmas(self, num_inference_steps: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        kwargs = {}
        config = self._scheduler.config
        if config.get("use_dynamic_shifting", False):
            patch = self.transformer.config.patch_size
            _, h, w = self.latent_shape(height, width)
            kwargs["mu"] = self._shift_mu((h // patch) * (w // patch), default_max_shift=1.16)
        self._scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
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
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        use_cfg = guidance_scale > 1.0
        if use_cfg:  # one forward on [uncond; cond], as the pipeline does
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], pooled])
            latents, sigma = torch.cat([latents, latents]), torch.cat([sigma, sigma])
        timestep = sigma * self._scheduler.config.num_train_timesteps
        out = transformer(
            hidden_states=latents.to(dtype),
            timestep=timestep.to(dtype),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0].float()
        if use_cfg:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        return out
