"""Checks that turn a bad input into an error naming the value and the fix, as early as it can be known.

`check_config` runs when a [`FlowGRPOConfig`] is built; `check_dataset`, `check_weights` and `unique_names` when a
[`FlowGRPOTrainer`] is built (before any model is loaded); `redact` keeps secrets out of `repr`, `str` and saved
configs. Where accepting a value is right but it is almost always a mistake, a one-line warning is logged instead.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

SECRET_KEY_PARTS = ("token", "api_key", "apikey", "password", "secret", "authorization", "credential")
"""A key of `model_init_kwargs` (or any nested dict) containing one of these (case-insensitive) holds a secret."""

REDACTED = "<REDACTED>"

# Float fields that must be finite numbers (NaN passes every `<` / `>` comparison, so it is checked apart).
_FINITE_FIELDS = (
    "noise_level",
    "beta",
    "epsilon",
    "epsilon_high",
    "adv_clip_max",
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
    "guidance_scale",
    "preference_temperature",
    "preference_tie_margin",
    "sde_window_decay_rate",
    "reward_timeout",
)
_POSITIVE_INT_FIELDS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "max_sequence_length",
)
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "auto")


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and any(part in key.lower() for part in SECRET_KEY_PARTS)


def redact(value: Any) -> Any:
    """A copy of `value` in which every dict entry whose key names a secret (`SECRET_KEY_PARTS`) is replaced by
    `REDACTED` (recursively through dicts, lists and tuples)."""
    if isinstance(value, dict):
        return {
            key: REDACTED if is_secret_key(key) and item is not None else redact(item) for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(config: Any) -> None:
    """Validate the values of a `FlowGRPOConfig` that the field-by-field checks of `__post_init__` do not cover."""
    for name in _POSITIVE_INT_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            hint = " (-1 is not 'unlimited' here)" if name == "max_sequence_length" else ""
            raise ValueError(f"{name} must be a positive integer, got {value!r}{hint}.")
    for name in _FINITE_FIELDS:
        value = getattr(config, name, None)
        if value is not None and (not _is_number(value) or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if config.max_steps == 0 or config.max_steps < -1:
        raise ValueError(
            f"max_steps={config.max_steps}: set a positive number of optimizer steps, or -1 to train for "
            f"num_train_epochs ({config.num_train_epochs}) epochs."
        )
    if config.max_steps == -1 and not config.num_train_epochs > 0:
        raise ValueError(
            f"num_train_epochs={config.num_train_epochs} with max_steps=-1 trains nothing: set num_train_epochs > 0 "
            "or a positive max_steps."
        )
    if config.learning_rate < 0:
        raise ValueError(f"learning_rate must be >= 0, got {config.learning_rate}.")
    if config.learning_rate == 0:
        logger.warning("learning_rate=0: the weights will not change (only rewards are measured).")
    if config.guidance_scale is not None and config.guidance_scale < 0:
        raise ValueError(
            f"guidance_scale must be >= 0, got {config.guidance_scale}. Use 1 (or train_cfg=False) to run without "
            "classifier-free guidance, or leave it unset for the pipeline family's default."
        )
    if config.num_images_to_log < 0:
        raise ValueError(f"num_images_to_log must be >= 0, got {config.num_images_to_log}.")
    if config.log_completions and config.num_images_to_log == 0:
        logger.warning("log_completions=True with num_images_to_log=0: the logged sample grids will be empty.")
    if config.reward_timeout is not None and config.reward_timeout <= 0:
        raise ValueError(
            f"reward_timeout must be a positive number of seconds, or unset; got {config.reward_timeout}."
        )
    for name in ("reward_weights", "preference_weights"):
        weights = getattr(config, name)
        for index, weight in enumerate(weights or []):
            if not _is_number(weight) or not math.isfinite(weight):
                raise ValueError(f"{name}[{index}] must be a finite number, got {weight!r} (in {name}={weights}).")
    check_dtypes(config.model_init_kwargs, "model_init_kwargs")
    check_launch(config.world_size)


def check_generation_batch(config: Any) -> None:
    """The generation batch of a `FlowGRPOConfig` (after `generation_batch_size` / `steps_per_generation` are filled
    in) holds whole groups and is exactly what one optimizer step trains on, the only layout the trainer supports.

    The trainer calls it again, so that a config whose batch fields were changed after it was built fails there
    instead of sampling a batch of the old size."""
    per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    processes, num_generations = config.world_size, config.num_generations
    per_step = per_device * accumulation * processes
    if config.steps_per_generation != accumulation or config.generation_batch_size != per_step:
        steps = config.generation_batch_size // (per_device * processes)
        raise ValueError(
            f"generation_batch_size={config.generation_batch_size} (steps_per_generation={steps}) is not what one "
            f"optimizer step trains on: per_device_train_batch_size ({per_device}) x gradient_accumulation_steps "
            f"({accumulation}) x processes ({processes}) = {per_step} images. FlowGRPOTrainer samples one generation "
            "batch per optimizer step; a generation batch consumed over several optimizer steps is not supported. "
            f"For {config.generation_batch_size} images per optimizer step set gradient_accumulation_steps={steps} "
            "(the same memory per micro-batch) and leave generation_batch_size and steps_per_generation unset (build "
            "the config again if its batch fields were changed after it was built); to train several optimizer steps "
            "on each generation batch, set num_iterations."
        )
    if per_step % num_generations != 0:
        suggested = num_generations // math.gcd(per_device * processes, num_generations)
        raise ValueError(
            f"One optimizer step samples per_device_train_batch_size ({per_device}) x gradient_accumulation_steps "
            f"({accumulation}) x processes ({processes}) = {per_step} images, which must be divisible by "
            f"num_generations ({num_generations}) so that every prompt gets a whole group. Change one of these "
            f"fields, e.g. gradient_accumulation_steps={suggested}."
        )


def check_dtypes(kwargs: Any, where: str) -> None:
    """A `dtype` / `torch_dtype` given as a string must name a torch floating-point dtype (or be `"auto"`)."""
    import torch

    for key in ("dtype", "torch_dtype"):
        value = kwargs.get(key) if isinstance(kwargs, dict) else None
        if not isinstance(value, str) or value == "auto":
            continue
        if not isinstance(getattr(torch, value, None), torch.dtype):
            close = difflib.get_close_matches(value, _DTYPE_NAMES, n=1)
            suggestion = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{where}[{key!r}]={value!r} is not a torch dtype.{suggestion} Use one of {', '.join(_DTYPE_NAMES)}."
            )


def check_launch(world_size: int) -> None:
    """A launch with several processes (`WORLD_SIZE` > 1, e.g. `torchrun --nproc_per_node 2`) that trains as one
    process would run independent, identical copies of the run: an error naming the fix."""
    launched = os.environ.get("WORLD_SIZE", "1")
    try:
        launched_size = int(launched)
    except ValueError:
        return
    if launched_size > 1 and world_size == 1:
        raise RuntimeError(
            f"This process was launched as one of WORLD_SIZE={launched_size} processes, but training would run as a "
            "single process (the processes did not join one distributed group), so every process would train an "
            "independent, identical copy of the run. On a machine without a GPU set use_cpu=True (--use_cpu true); "
            "otherwise launch with `accelerate launch` (or `trl-flow-grpo train --accelerate_config multi_gpu`)."
        )


def check_dataset(dataset: Any, name: str) -> None:
    """A map-style dataset of rows with a `prompt` column of strings; an error naming the row and the fix otherwise."""
    if dataset is None:
        return
    import torch
    from datasets import IterableDataset, IterableDatasetDict

    if isinstance(dataset, (IterableDataset, IterableDatasetDict, torch.utils.data.IterableDataset)):
        raise TypeError(
            f"{name} is an {type(dataset).__name__}; FlowGRPOTrainer needs a map-style datasets.Dataset (it samples "
            f"each prompt num_generations times in seeded random order). Load it without streaming=True, or convert "
            f"it, e.g. `Dataset.from_list(list({name}.take(n)))`."
        )
    if isinstance(dataset, dict) and not hasattr(dataset, "column_names"):
        splits = [key for key, value in dataset.items() if hasattr(value, "column_names")]
        if splits:  # a DatasetDict
            raise TypeError(f"{name} is a DatasetDict with splits {splits}; pass one split, e.g. {name}['train'].")
        raise TypeError(
            f"{name} is a dict of columns; wrap it in a Dataset: `Dataset.from_dict({name})` (with a 'prompt' key)."
        )
    if hasattr(dataset, "column_names") and isinstance(dataset.column_names, dict):
        raise TypeError(f"{name} is a DatasetDict with splits {list(dataset)}; pass one split, e.g. {name}['train'].")
    if isinstance(dataset, (list, tuple)):
        if dataset and all(isinstance(row, str) for row in dataset):
            fix = f"`Dataset.from_dict({{'prompt': {name}}})`"
        else:
            fix = f"`Dataset.from_list({name})` (each row a dict with a 'prompt' key)"
        raise TypeError(f"{name} is a {type(dataset).__name__}; wrap it in a Dataset: {fix}.")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"{name} must be a datasets.Dataset (or a map-style dataset of dict rows), got {type(dataset).__name__}."
        )
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        if "prompt" not in columns or len(dataset) == 0:
            return  # the trainer's own check names the columns / the empty dataset
        prompts: Iterable[Any] = dataset["prompt"]
    else:
        if len(dataset) == 0 or "prompt" not in dataset[0]:
            return
        prompts = (dataset[i]["prompt"] for i in range(len(dataset)))
    check_prompts(prompts, name)


def check_prompts(prompts: Iterable[Any], name: str) -> None:
    """Every prompt must be a string (a row of `None`, a number or a list of strings would crash in the tokenizer
    or train on garbage)."""
    bad = [(index, prompt) for index, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    if bad:
        index, prompt = bad[0]
        shown = repr(prompt) if len(repr(prompt)) <= 80 else repr(prompt)[:77] + "..."
        raise TypeError(
            f"{name} row {index} has prompt {shown} of type {type(prompt).__name__}; every prompt must be a string "
            f"({len(bad)} row(s) are not). Fix or drop them, e.g. `{name}.filter(lambda r: isinstance(r['prompt'], "
            "str))`; join a list of strings into one string."
        )


def unique_names(names: Sequence[str], kind: str) -> list[str]:
    """Distinct metric names: a repeated name gets a suffix `_2`, `_3`, ... and a warning (two functions that share a
    name would otherwise share one metric)."""
    result: list[str] = []
    for name in names:
        candidate, number = name, 2
        while candidate in result:
            candidate, number = f"{name}_{number}", number + 1
        if candidate != name:
            logger.warning(
                "Two %ss are named %r; the second one's metrics are logged as %r. Give them distinct names (the "
                "`__name__` of a function or the class name of a callable object) to choose.",
                kind,
                name,
                candidate,
            )
        result.append(candidate)
    return result


def check_weights(
    reward_weights: Sequence[float], reward_names: Sequence[str], preference_weights: Sequence[float]
) -> None:
    """All-zero weights (every reward and preference function weighted 0) would train nothing."""
    weights = [float(w) for w in [*reward_weights, *preference_weights]]
    if weights and all(w == 0 for w in weights):
        raise ValueError(
            f"Every reward weight ({list(reward_weights)} for {list(reward_names)}) and preference weight "
            f"({list(preference_weights)}) is 0, "
            "so every advantage is 0 and nothing is trained. Give at least one function a non-zero weight."
        )


def suggest_flags(unknown: Sequence[str], known: Iterable[str]) -> str:
    """For misspelt `--flags`: 'Did you mean --x?' lines (empty when nothing is close)."""
    known = sorted(set(known))
    lines = []
    for flag in unknown:
        if not flag.startswith("--"):
            continue
        name = flag[2:].split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        if close:
            lines.append(f"--{name}: did you mean --{close[0]}?")
    return "\n".join(lines)
