"""Qwen-Image-Edit-Plus (`QwenImageEditPlusPipeline`: Qwen-Image-Edit-2509, -2511) and Qwen-Image-Edit
(`QwenImageEditPipeline`): instruction-based image editing with Qwen-Image."""

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image

from .base import Conditioning
from .qwen_image import NEGATIVE_PROMPT, QwenImageAdapter


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit is Qwen-Image with the source image twice in the conditioning:

    - the text conditioning is Qwen2.5-VL's reading of the instruction *and* the source: the pipeline's prompt
      template with the vision tokens (`<|vision_start|><|image_pad|><|vision_end|>`), its first
      `prompt_template_encode_start_idx` tokens dropped. The negative prompt `" "` of true CFG is encoded with the
      same source, so both conditionings depend on it: `encode_edit`, not `encode_prompts` (which refuses);
    - the source's VAE latents (the mode, normalised by `latents_mean` / `latents_std`), packed 2x2, are appended
      after the noisy latent tokens with their own `img_shapes` entry; the prediction for the source tokens is
      dropped (before true CFG, as in the pipeline). A transformer with `zero_cond_t` (Qwen-Image-Edit-2511) gives
      the source tokens timestep 0 from that entry.

    True CFG (norm-rescaled), the 2x2 packing, sizes, the decoder and the grid are Qwen-Image's
    (`QwenImageAdapter`); the grid's shift counts the output tokens only, as the pipeline's does.

    Sizes. Every source of a batch is resized to the output size (`height` x `width`) for the VAE, so the samples of
    a batch have one sequence length and the dataset's sources may have any size and aspect ratio.
    `QwenImageEditPipeline` instead resizes the source to about one megapixel at the source's aspect ratio
    (`calculate_dimensions(1024 * 1024, w / h)`, multiples of 32) for both the vision-language encoder and the VAE.
    A rollout therefore equals
    `pipe(image=source, prompt=instruction, height=height, width=width, negative_prompt=" ", true_cfg_scale=s)`
    whenever that size is `(width, height)`: square sources at 1024 x 1024, or in general training at the size the
    pipeline picks for the sources' aspect ratio. `max_sequence_length` is unused: the pipelines do not truncate the
    template either.
    """

    pipeline_class = QwenImageEditPipeline
    edits_images = True

    def _condition_image(self, image: Image.Image, height: int, width: int) -> Image.Image:
        """The source as the vision-language encoder sees it; QwenImageEditPipeline's: the VAE's image."""
        return self.pipeline.image_processor.resize(image, height, width)

    def _encode_with_images(
        self, prompts: list[str], images: list[Image.Image], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt with its image, one at a time as the pipeline encodes them (its template has one image per
        prompt), padded to the longest: (B, L, D) embeddings and a (B, L) mask."""
        encoded = [
            self.pipeline.encode_prompt(prompt=[prompt], image=[image], device=device)[0][0]
            for prompt, image in zip(prompts, images)
        ]
        length = max(embeds.shape[0] for embeds in encoded)
        mask = torch.zeros(len(encoded), length, dtype=torch.long, device=encoded[0].device)
        for index, embeds in enumerate(encoded):
            mask[index, : embeds.shape[0]] = 1
        padded = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in encoded])
        return padded, mask

    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        raise ValueError(
            f"{type(self.pipeline).__name__} encodes each instruction together with its source image, so it has no "
            "text-only conditioning: call `encode_edit(prompts, source_images, latents, ...)` (the trainer does, "
            "with the dataset's `source_image_column`)."
        )

    def encode_source_images(self, images: list[Image.Image], latents: torch.Tensor) -> Conditioning:
        raise ValueError(
            f"{type(self.pipeline).__name__} encodes each source image together with its instruction: call "
            "`encode_edit(prompts, source_images, latents, ...)` instead of `encode_source_images`."
        )

    @torch.no_grad()
    def encode_edit(
        self,
        prompts: list[str],
        images: list[Image.Image],
        latents: torch.Tensor,
        device: torch.device,
        with_negative: bool,
        max_sequence_length: int,
    ) -> Conditioning:
        pipe = self.pipeline
        if not len(prompts) == len(images) == latents.shape[0]:
            raise ValueError(
                f"Got {len(prompts)} instructions and {len(images)} source images for {latents.shape[0]} samples; "
                "pass one instruction and one source image per sample."
            )
        height, width = (size * pipe.vae_scale_factor for size in latents.shape[-2:])
        shown = [self._condition_image(image, height, width) for image in images]
        embeds, mask = self._encode_with_images(prompts, shown, device)
        cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if with_negative:  # true CFG's negative prompt sees the same source
            negative, negative_mask = self._encode_with_images([NEGATIVE_PROMPT] * len(prompts), shown, device)
            cond |= {"negative_prompt_embeds": negative, "negative_prompt_embeds_mask": negative_mask}
        # The pipeline's VAE image (`preprocess`, a one-frame video), at the output size, and `prepare_latents`'
        # encoding.
        pixels = pipe.image_processor.preprocess(list(images), height, width).unsqueeze(2)
        vae = pipe.vae
        source = pipe._encode_vae_image(pixels.to(device=latents.device, dtype=vae.dtype), generator=None)
        return cond | {"image_latents": self.pack(source[:, :, 0])}

    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        source = self.source_latents(cond)
        _, _, height, width = latents.shape
        source_shape = (1, height // 2, width // 2)  # the source has the output's size (see the class docstring)
        return self._true_cfg_velocity(transformer, latents, sigma, cond, guidance_scale, source, (source_shape,))


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-Plus (Qwen-Image-Edit-2509, -2511): Qwen-Image-Edit (`QwenImageEditAdapter`) with the source
    shown to the vision-language encoder at its own, smaller size and named in the instruction.

    `QwenImageEditPlusPipeline` prefixes the instruction with `"Picture 1: <|vision_start|><|image_pad|>
    <|vision_end|>"` (one source here: several per row are not supported yet), shows the encoder the source resized
    to about 384 x 384 pixels at its aspect ratio (`calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)`; the same
    here, for every source), and gives the VAE the source at about one megapixel (`calculate_dimensions(
    VAE_IMAGE_SIZE, w / h)`, 1024 x 1024 for a square). The adapter gives the VAE the source at the output size, so a
    rollout equals `pipe(image=source, prompt=instruction, height=height, width=width, negative_prompt=" ",
    true_cfg_scale=s)` whenever `calculate_dimensions(VAE_IMAGE_SIZE, w / h)` of each source is `(width, height)`:
    square sources at 1024 x 1024 (the pipeline's default output size for them), or the size the pipeline picks
    for the sources' aspect ratio. A smaller training size gives sources fewer tokens than the pipeline's default
    call would: sample with the trained size to compare.
    """

    pipeline_class = QwenImageEditPlusPipeline

    def _condition_image(self, image: Image.Image, height: int, width: int) -> Image.Image:
        # Read at call time, so that the module's constant is the pipeline's in force.
        area = pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE
        shown_width, shown_height = pipeline_qwenimage_edit_plus.calculate_dimensions(area, image.width / image.height)
        return self.pipeline.image_processor.resize(image, shown_height, shown_width)
