"""Speed knobs of the transformer: diffusers' attention backends and regional compilation (`torch.compile` of the
repeated blocks). The trainer applies them once, when it prepares the transformer (`attention_backend`,
`compile_transformer` in `FlowGRPOConfig`); rollouts, training and evaluation then all run through them."""

from collections.abc import Sequence

import torch

__all__ = ["attention_backends", "check_attention_backend", "compile_blocks", "set_attention_backend"]


def attention_backends() -> list[str]:
    """The names diffusers' `set_attention_backend` accepts (the values of
    `diffusers.models.attention_dispatch.AttentionBackendName`), public ones first, each group sorted."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [member.value for member in AttentionBackendName]
    return sorted(name for name in names if not name.startswith("_")) + sorted(n for n in names if n.startswith("_"))


def check_attention_backend(name: str) -> None:
    """Raise a `ValueError` listing the valid names if `name` is not one of diffusers' attention backends."""
    valid = attention_backends()
    if not isinstance(name, str) or name.lower() not in valid:
        raise ValueError(
            f"attention_backend={name!r} is not an attention backend of this diffusers version; use one of "
            f'{", ".join(map(repr, valid))} ("native" is PyTorch\'s scaled dot-product attention, on any device), '
            "or leave it unset for the model's default."
        )


def set_attention_backend(transformer: torch.nn.Module, name: str) -> None:
    """`transformer.set_attention_backend(name)` (diffusers `ModelMixin`), with a clear error for a model without it
    or whose attention processors do not go through diffusers' dispatcher (where the call would change nothing).
    A backend whose package is missing (flash-attn, sageattention, xformers) raises diffusers' own error here; a
    `*_hub` backend downloads its kernel from the Hub."""
    check_attention_backend(name)
    if not hasattr(transformer, "set_attention_backend"):
        raise ValueError(
            f"attention_backend={name!r}: {type(transformer).__name__} has no `set_attention_backend` (a diffusers "
            "ModelMixin method, diffusers >= 0.35). Leave attention_backend unset for this model."
        )
    processors = [getattr(module, "processor", None) for module in transformer.modules()]
    dispatching = [p for p in processors if p is not None and hasattr(p, "_attention_backend")]
    if not dispatching:
        kinds = sorted({type(p).__name__ for p in processors if p is not None}) or ["none"]
        raise ValueError(
            f"attention_backend={name!r} would have no effect: the attention processors of "
            f"{type(transformer).__name__} ({', '.join(kinds)}) call PyTorch's attention directly instead of "
            "diffusers' attention dispatcher in this diffusers version (SD3's do). Leave attention_backend unset "
            "(they already use scaled dot-product attention, which picks a flash / memory-efficient kernel itself)."
        )
    transformer.set_attention_backend(name.lower())


def compile_blocks(transformer: torch.nn.Module, fallback_blocks: Sequence[str] = (), **compile_kwargs) -> int:
    """Regional compilation: `torch.compile` every repeated block of `transformer` in place; returns how many.

    The blocks are those the model class lists in `_repeated_blocks`, compiled by diffusers'
    `compile_repeated_blocks(**compile_kwargs)`; for a model class that lists none (SD3's), the modules whose class
    name is in `fallback_blocks` (the pipeline adapter's `repeated_blocks`) are compiled the same way
    (`module.compile(**compile_kwargs)`). Raises a `ValueError` when there is no block to compile.
    """
    listed = list(getattr(transformer, "_repeated_blocks", None) or [])
    names = listed or list(fallback_blocks)
    blocks = [module for module in transformer.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"compile_transformer=True: {type(transformer).__name__} has no repeated block to compile (looked for "
            f"{names or 'the classes in `_repeated_blocks`, which is empty'}). Set compile_transformer=False, or name "
            "the block class in the pipeline adapter's `repeated_blocks`."
        )
    if listed:
        transformer.compile_repeated_blocks(**compile_kwargs)
    else:
        for module in blocks:
            module.compile(**compile_kwargs)
    return len(blocks)
