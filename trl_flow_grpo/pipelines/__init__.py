"""Pipeline adapters, one per diffusers pipeline family."""

from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from .base import Conditioning, PipelineAdapter, select
from .flux import FluxAdapter
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .flux_kontext import FluxKontextAdapter
from .qwen_image import QwenImageAdapter
from .qwen_image_21 import QwenImage21Adapter
from .qwen_image_edit import QwenImageEditAdapter, QwenImageEditPlusAdapter
from .sd3 import SD3Adapter
from .z_image import ZImageAdapter

ADAPTERS: list[type[PipelineAdapter]] = [
    SD3Adapter,
    FluxAdapter,
    FluxKontextAdapter,
    Flux2Adapter,
    Flux2KleinAdapter,
    QwenImageAdapter,
    QwenImageEditPlusAdapter,
    QwenImageEditAdapter,
    QwenImage21Adapter,
    ZImageAdapter,
]
"""Every supported family. A new family is one new module and one entry here."""


def get_adapter(pipeline: Any) -> PipelineAdapter:
    """The adapter of the first class in `ADAPTERS` whose `pipeline_class` `pipeline` is an instance of.

    Raises:
        ValueError: for any other pipeline, naming the supported pipeline classes; for a flow-matching pipeline
            (its scheduler is a `FlowMatchEulerDiscreteScheduler`), also what an adapter for it must implement.
    """
    for adapter_class in ADAPTERS:
        if isinstance(pipeline, adapter_class.pipeline_class):
            return adapter_class(pipeline)
    raise ValueError(unsupported_pipeline_message(pipeline))


def unsupported_pipeline_message(pipeline: Any) -> str:
    """Why `pipeline` has no adapter, which pipelines have one, and (for a flow-matching pipeline) how to add one."""
    name = type(pipeline).__name__
    supported = ", ".join(a.pipeline_class.__name__ for a in ADAPTERS)
    scheduler = getattr(pipeline, "scheduler", None)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return (
            f"{name} is not supported: Flow-GRPO trains flow-matching pipelines (a FlowMatchEulerDiscreteScheduler), "
            f"and this pipeline's scheduler is {type(scheduler).__name__}. Supported pipelines: {supported}."
        )
    required = ", ".join(f"`{method}`" for method in sorted(PipelineAdapter.__abstractmethods__))
    return (
        f"{name} is a flow-matching pipeline, but no adapter supports it yet. Supported pipelines: {supported}. "
        f"To add it, subclass trl_flow_grpo.pipelines.PipelineAdapter with `pipeline_class = {name}`, "
        f"`default_guidance_scale` and the methods {required} (override `decode`, `forwards_per_sample`, "
        "`pipeline_call_kwargs` and `save_lora_weights` if the defaults do not fit; an image-editing pipeline also "
        "sets `edits_images = True` and implements `encode_source_images`, or `encode_edit` when its text encoder "
        "sees the source too), and append it to trl_flow_grpo.pipelines.ADAPTERS; see docs/adding_a_family.md."
    )


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "PipelineAdapter",
    "QwenImage21Adapter",
    "QwenImageAdapter",
    "QwenImageEditAdapter",
    "QwenImageEditPlusAdapter",
    "SD3Adapter",
    "ZImageAdapter",
    "get_adapter",
    "unsupported_pipeline_message",
    "select",
]
