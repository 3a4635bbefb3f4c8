"""The adapter protocol: everything the trainer needs from a pipeline family, and nothing else.

An adapter wraps one diffusers pipeline and reuses its own methods (``encode_prompt``, the VAE, the scheduler); it
never copies the pipeline's ``__call__``. Adding a family (FLUX, Qwen-Image, ...) means one new file with one
subclass, registered in ``trl_flow_grpo.pipelines.ADAPTERS``; the trainer has no ``if`` per family.
"""

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import offload_models
from PIL import Image

Conditioning = dict[str, torch.Tensor]
"""Text conditioning of a batch: named tensors, batch dimension first, so that they can be sliced per sample."""


def select(cond: Conditioning, index: torch.Tensor | slice | list[int]) -> Conditioning:
    """The conditioning of a subset of the samples."""
    return {key: value[index] for key, value in cond.items()}


class PipelineAdapter(ABC):
    """What Flow-GRPO needs from a flow-matching text-to-image pipeline."""

    pipeline_class: ClassVar[type]
    """The diffusers pipeline class this adapter serves (subclasses included)."""
    default_guidance_scale: ClassVar[float]
    """The guidance scale used when the configuration leaves `guidance_scale` unset."""
    edits_images: ClassVar[bool] = False
    """Whether the pipeline edits a source image (FLUX.1-Kontext, Qwen-Image-Edit): each dataset row then carries its
    source image (`source_image_column`) and `encode_edit` conditions on it."""
    repeated_blocks: ClassVar[tuple[str, ...]] = ()
    """Class names of the transformer's repeated blocks, for regional compilation (`compile_transformer`) when the
    diffusers model class lists none in its `_repeated_blocks`."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.offload_text_encoders = False
        """Keep the text encoders on the CPU except inside `text_encoders_on` (set by the trainer)."""
        scheduler = pipeline.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"The pipeline's scheduler is {type(scheduler).__name__}, but Flow-GRPO needs a flow-matching "
                "scheduler (FlowMatchEulerDiscreteScheduler). If the model was trained with flow matching, set "
                "`pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)`; "
                "otherwise this model cannot be trained with Flow-GRPO."
            )
        # A private copy: computing a grid must not change the state of the user's pipeline.
        self._scheduler = copy.deepcopy(scheduler)

    def _shift_mu(self, image_tokens: int, default_max_shift: float) -> float:
        """`mu` of the scheduler's resolution-dependent shift for `image_tokens` transformer tokens, from the
        scheduler's config (with the pipeline's defaults), as the diffusers pipelines compute it."""
        config = self._scheduler.config
        return calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", default_max_shift),
        )

    @property
    def transformer(self) -> torch.nn.Module:
        """The denoiser that is trained."""
        return self.pipeline.transformer

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that are never trained (VAE, text encoders): kept in eval mode, without gradients."""
        names = [name for name, module in self.pipeline.components.items() if isinstance(module, torch.nn.Module)]
        return [self.pipeline.components[name] for name in names if name != "transformer"]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (components named `text_encoder*`), which only `encode_prompts` uses."""
        components = self.pipeline.components
        return [
            module
            for name, module in components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        ]

    @contextlib.contextmanager
    def text_encoders_on(self, device: torch.device) -> Iterator[None]:
        """Around `encode_prompts`: with `offload_text_encoders`, move the text encoders to `device` and back to
        where they were (the CPU) afterwards (diffusers' `offload_models`); otherwise nothing."""
        encoders = self.text_encoders if self.offload_text_encoders else []
        with offload_models(*encoders, device=device, offload=bool(encoders)):
            yield
        if encoders and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()

    @abstractmethod
    def check_inputs(self, height: int, width: int) -> None:
        """Raise a `ValueError` naming `height`/`width` if the model cannot produce that size."""

    @abstractmethod
    def encode_prompts(
        self, prompts: list[str], device: torch.device, with_negative: bool, max_sequence_length: int
    ) -> Conditioning:
        """Text conditioning of `prompts` (and of the empty negative prompt when `with_negative`)."""

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latent (without the batch dimension)."""

    @abstractmethod
    def sigmas(self, num_inference_steps: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The noise-level grid sigma_0 = 1 > ... > sigma_T = 0, float32, shape (T + 1,)."""

    @abstractmethod
    def velocity(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Velocity v(x, sigma) after classifier-free guidance (none when `guidance_scale <= 1`), float32.

        Args:
            transformer: the (possibly wrapped) denoiser to call.
            latents: shape (B, *latent_shape), float32.
            sigma: shape (B,), float32.
            cond: from `encode_prompts`, batch B.
        """

    def encode_source_images(self, images: list[Image.Image], latents: torch.Tensor) -> Conditioning:
        """The conditioning on one source image per sample, for samples shaped like `latents` (B, *latent_shape),
        merged into the text conditioning by the default `encode_edit`. Only editing adapters (`edits_images`) whose
        text encoder does not see the source (FLUX.1-Kontext) implement it."""
        raise ValueError(
            f"{type(self.pipeline).__name__} generates from text only, so it cannot be conditioned on source images; "
            "use an image-editing pipeline (FluxKontextPipeline, QwenImageEditPlusPipeline, QwenImageEditPipeline) "
            "to train on edits."
        )

    def source_latents(self, cond: Conditioning) -> torch.Tensor:
        """The packed source-image latents an editing adapter's `encode_edit` put in `cond` (for `velocity`).

        Raises:
            ValueError: `cond` has none (the dataset lacks the source image column).
        """
        if "image_latents" not in cond:
            raise ValueError(
                f"{type(self.pipeline).__name__} edits a source image, but the conditioning has none: the dataset "
                "needs a column of source images (`source_image_column`, 'image' by default)."
            )
        return cond["image_latents"]

    def encode_edit(
        self,
        prompts: list[str],
        images: list[Image.Image],
        latents: torch.Tensor,
        device: torch.device,
        with_negative: bool,
        max_sequence_length: int,
    ) -> Conditioning:
        """The whole conditioning of an editing batch: the instructions `prompts` with one source image each, for
        samples shaped like `latents` (B, *latent_shape); `sample` calls it instead of `encode_prompts` when the batch
        has source images (inside `text_encoders_on`).

        The default is `encode_prompts(...) | encode_source_images(images, latents)`, for a pipeline whose text
        encoder sees the instruction only (FLUX.1-Kontext). An adapter whose text encoder also sees the source
        (Qwen-Image-Edit's vision-language encoder) overrides this method instead of `encode_source_images`.
        """
        cond = self.encode_prompts(prompts, device, with_negative, max_sequence_length)
        return cond | self.encode_source_images(images, latents)

    def pipeline_call_kwargs(self, guidance_scale: float) -> dict:
        """The arguments of the pipeline's own `__call__` that sample with this guidance (model cards, `sample`)."""
        return {"guidance_scale": guidance_scale}

    def forwards_per_sample(self, guidance_scale: float) -> int:
        """Transformer forwards per sample in one `velocity` call: 2 with classifier-free guidance ([uncond; cond])."""
        return 2 if guidance_scale > 1.0 else 1

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, *latent_shape) -> B PIL images (a VAE with `scaling_factor` and `shift_factor`)."""
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pil")

    def save_lora_weights(self, output_dir: str, lora_state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write `pytorch_lora_weights.safetensors` that `pipeline_class.load_lora_weights(output_dir)` loads."""
        self.pipeline_class.save_lora_weights(
            output_dir, transformer_lora_layers=lora_state_dict, transformer_lora_adapter_metadata=metadata
        )
