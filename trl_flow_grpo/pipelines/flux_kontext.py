"""FLUX.1-Kontext (`FluxKontextPipeline`): instruction-based image editing with FLUX.1."""

import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from PIL import Image

from .base import Conditioning
from .flux import FluxAdapter


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1-Kontext is FLUX.1-dev with the source image in the transformer's sequence: the VAE latents of the
    source (the mode, shifted and scaled like FLUX latents), packed into 2x2 patches, are appended after the noisy
    latent tokens, with position ids whose first axis is 1 instead of 0; the prediction for the source tokens is
    dropped. Text, embedded guidance, sizes and the grid are FLUX.1's (`FluxAdapter`); the grid's shift counts the
    output tokens only, as the pipeline's does.

    The source image is resized to the output size (`height` x `width`) by the pipeline's image processor, so every
    sample of a batch has the same sequence length: a rollout equals `pipe(image=pipe.image_processor.resize(source,
    height, width), height=height, width=width, max_area=height * width, _auto_resize=False)`. The pipeline's
    defaults instead resize the output to about one megapixel (`max_area`) and the source to the nearest of
    Kontext's preferred resolutions; training at one of them (e.g. 1024 x 1024 for square sources) makes the two
    agree.
    """

    pipeline_class = FluxKontextPipeline
    edits_images = True

    @torch.no_grad()
    def encode_source_images(self, images: list[Image.Image], latents: torch.Tensor) -> Conditioning:
        pipe = self.pipeline
        if len(images) != latents.shape[0]:
            raise ValueError(f"Got {len(images)} source images for {latents.shape[0]} samples; pass one per sample.")
        height, width = (size * pipe.vae_scale_factor for size in latents.shape[-2:])
        # The pipeline's step 3 ("Preprocess image") at the output size, then `prepare_latents`' VAE encoding.
        pixels = pipe.image_processor.preprocess(
            pipe.image_processor.resize(list(images), height, width), height, width
        )
        vae = pipe.vae
        source = pipe._encode_vae_image(pixels.to(device=latents.device, dtype=vae.dtype), generator=None)
        return {"image_latents": self.pack(source)}

    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        source = self.source_latents(cond)
        embeds = cond["prompt_embeds"]
        dtype, device = embeds.dtype, latents.device
        batch, _, height, width = latents.shape
        packed = self.pack(latents).to(dtype)
        source = source.to(dtype)
        latent_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        source_ids = latent_ids.clone()
        source_ids[..., 0] = 1  # the source's tokens: the same grid, first axis 1 (the pipeline's `image_ids`)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)
        out = transformer(
            hidden_states=torch.cat([packed, source], dim=1),
            timestep=self._timestep(sigma, dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=torch.cat([latent_ids, source_ids], dim=0),
            return_dict=False,
        )[0]
        return self.unpack(out[:, : packed.shape[1]], height, width).float()
