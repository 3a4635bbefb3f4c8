"""Pipeline adapters, one per diffusers pipeline family."""

from typing import Any

from .base import Conditioning, PipelineAdapter, select
from .flux import FluxAdapter
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .qwen_image import QwenImageAdapter
from .sd3 import SD3Adapter
from .z_image import ZImageAdapter

ADAPTERS: list[type[PipelineAdapter]] = [
    SD3Adapter,
    FluxAdapter,
    Flux2Adapter,
    Flux2KleinAdapter,
    QwenImageAdapter,
    ZImageAdapter,
]
"""Every supported family. A new family is one new module and one entry here."""


def get_adapter(pipeline: Any) -> PipelineAdapter:
    """The adapter for `pipeline`, or a `ValueError` naming the supported pipeline classes."""
    for adapter_class in ADAPTERS:
        if isinstance(pipeline, adapter_class.pipeline_class):
            return adapter_class(pipeline)
    supported = ", ".join(a.pipeline_class.__name__ for a in ADAPTERS)
    raise ValueError(f"{type(pipeline).__name__} is not supported yet. Supported pipelines: {supported}.")


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "PipelineAdapter",
    "QwenImageAdapter",
    "SD3Adapter",
    "ZImageAdapter",
    "get_adapter",
    "select",
]
