"""Reward-function plumbing: the built-in registry, name resolution and the batched call.

A reward function follows TRL's calling convention. It is any callable (a plain function, an `async def` function,
or an object with a `__call__` method) and is called with keyword arguments only:

- `prompts`: `list[str]`, one prompt per sample;
- `images`: `list[PIL.Image.Image]`, one generated image per sample;
- every other dataset column, as a keyword holding a list with one entry per sample; for an image-editing pipeline
  the source image of each sample is one of them, named `source_images` (the trainer renames `source_image_column`);
- `trainer_state`: the trainer's `TrainerState` (may be `None`);
- `log_extra(column, values)` and `log_metric(name, value)`: TRL's logging hooks (see `call_reward_funcs`), passed by
  the trainer.

It should accept `**kwargs` so that it keeps working when columns are added; a function without `**kwargs` is only
passed the keywords it names. It returns one float per sample, or `None` for a sample it does not apply to (for
example an OCR reward on a prompt without text). `None` entries become NaN in the reward matrix, and the trainer
ignores them when combining rewards.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import numbers
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .aesthetic import aesthetic_reward
from .clip_score import clip_score_reward
from .compression import jpeg_compressibility, jpeg_incompressibility
from .geneval import geneval_reward, geneval_strict_reward
from .hpsv2 import hpsv2_reward
from .image_reward import image_reward_reward
from .ocr import ocr_reward
from .pickscore import pickscore_reward
from .unifiedreward import unifiedreward_reward

__all__ = [
    "MISSING_BUILTINS",
    "REWARD_FUNCS",
    "REWARD_MODEL_IDS",
    "RewardFunc",
    "call_reward_funcs",
    "resolve_reward_func",
    "reward_func_name",
    "with_timeout",
]

RewardFunc = Callable[..., Any]
"""A reward function, sync or async (see the module docstring for the calling convention)."""


def shapes_geneval(prompts: Sequence[str], images: Sequence[Any], **kwargs: Any) -> list[float]:
    """The toy shapes world's GenEval-like reward, `trl_flow_grpo.toy.geneval.shapes_geneval`, imported when called:
    the registry names the demo's reward without depending on the demo."""
    from ..toy.geneval import shapes_geneval as reward

    return reward(prompts=prompts, images=images, **kwargs)


REWARD_FUNCS: dict[str, RewardFunc] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "shapes_geneval": shapes_geneval,
    "pickscore": pickscore_reward,
    "ocr": ocr_reward,
    "geneval": geneval_reward,
    "geneval_strict": geneval_strict_reward,
    "clip_score": clip_score_reward,
    "aesthetic": aesthetic_reward,
    "unifiedreward": unifiedreward_reward,
    "hpsv2": hpsv2_reward,
    "image_reward": image_reward_reward,
}
"""Built-in reward functions by name. This is the single place a new built-in is registered. Built-ins that need
heavy dependencies or a model download should import / load them lazily, inside the call."""

REWARD_MODEL_IDS: dict[str, str] = {
    "yuvalkirstain/PickScore_v1": "pickscore",
    "THUDM/ImageReward": "image_reward",
    "xswu/HPSv2": "hpsv2",
}
"""Hub ids of known reward models -> the built-in that runs them, so that a model's Hub id works as a reward name
(as TRL resolves a reward model's id). Matched without regard to case, as the Hub does. A value may be a built-in that
does not exist yet (listed in `MISSING_BUILTINS`): the id is then refused with an error saying what is missing."""

MISSING_BUILTINS: dict[str, str] = {}
"""Built-ins named in `REWARD_MODEL_IDS` that trl-flow-grpo does not ship yet -> the model they would run."""

_RESERVED_KWARGS = ("prompts", "images", "trainer_state", "log_extra", "log_metric")
_MAX_SAMPLES_IN_WARNING = 10
_MAX_PROMPT_CHARS_IN_WARNING = 100


def reward_func_name(func: str | RewardFunc) -> str:
    """Return a human-readable name for a reward function (used in logs and error messages).

    - a built-in (or a registry name string): its registry name;
    - an import path string (`"my_pkg.rewards.geneval"`): the name of the object it points to (by the rules below);
    - a function or method: its `__name__`;
    - a `functools.partial`: the name of the wrapped function;
    - any other callable object: its class name.
    """
    if isinstance(func, str):
        resolved = resolve_reward_func(func)  # raises on an unknown name or a failing import
        if func in REWARD_FUNCS:
            return func
        return _REWARD_MODEL_IDS_LOWER.get(func.lower()) or reward_func_name(resolved)
    for name, builtin in REWARD_FUNCS.items():
        if func is builtin:
            return name
    if isinstance(func, functools.partial):
        return reward_func_name(func.func)
    name = getattr(func, "__name__", None)
    if isinstance(name, str):
        return name
    return type(func).__name__


def resolve_reward_func(func_or_name: str | RewardFunc) -> RewardFunc:
    """Return the reward function for `func_or_name`.

    A string is resolved, in this order, as:

    1. a built-in name (`REWARD_FUNCS`), e.g. `"pickscore"`;
    2. a known reward model's Hub id (`REWARD_MODEL_IDS`, case-insensitive), e.g. `"yuvalkirstain/PickScore_v1"`,
       which gives the built-in that runs it;
    3. an `http://` or `https://` URL of a reward server (`trl-flow-grpo reward-server`), which gives a
       `trl_flow_grpo.rewards.remote.RemoteReward` for it (its bearer token, if any, read from the environment
       variable `TRL_FLOW_GRPO_REWARD_TOKEN`);
    4. an import path, any other string with a dot or a colon: `"my_pkg.rewards.geneval"` (module `my_pkg.rewards`,
       attribute `geneval`) or `"my_pkg.rewards:geneval"` (module before the colon, attribute path after it, which
       may itself be dotted). The module is imported and the attribute returned; it must be a function or a
       callable instance, not a class.

    A callable is returned unchanged.

    Raises:
        ValueError: if a string neither names a built-in nor is a well-formed import path, or the module lacks the
            attribute; or it is the Hub id of a reward model whose built-in does not exist yet (`MISSING_BUILTINS`).
        ImportError: if the module of an import path cannot be imported.
        TypeError: if the argument (or the object an import path names) is not a callable reward function.
    """
    if isinstance(func_or_name, str):
        if func_or_name in REWARD_FUNCS:
            return REWARD_FUNCS[func_or_name]
        builtin = _REWARD_MODEL_IDS_LOWER.get(func_or_name.lower())
        if builtin is not None:
            return _builtin_for_model_id(func_or_name, builtin)
        if func_or_name.startswith(("http://", "https://")):
            from .remote import RemoteReward  # the client is only imported when a URL is given

            return RemoteReward(func_or_name)
        if "." in func_or_name or ":" in func_or_name:
            return _import_func(func_or_name)
        available = ", ".join(repr(name) for name in sorted(REWARD_FUNCS))
        raise ValueError(
            f"Unknown reward function {func_or_name!r}. Available built-in reward functions: {available}. "
            f"Known reward models by Hub id: {', '.join(repr(model_id) for model_id in REWARD_MODEL_IDS)}. "
            'You can also pass an import path ("my_pkg.rewards.my_reward" or "my_pkg.rewards:my_reward"), the '
            'http(s) URL of a reward server ("http://127.0.0.1:8000", see `trl-flow-grpo reward-server`), or a '
            "callable (a function, an async function, or an object with `__call__`) that takes `prompts`, "
            "`images`, the dataset columns and `trainer_state` as keywords and returns one float (or None) per "
            "sample."
        )
    if not callable(func_or_name):
        raise TypeError(
            f"A reward function must be a built-in name (str) or a callable, got {type(func_or_name).__name__}"
        )
    return func_or_name


_REWARD_MODEL_IDS_LOWER = {model_id.lower(): builtin for model_id, builtin in REWARD_MODEL_IDS.items()}


def _builtin_for_model_id(model_id: str, builtin: str) -> RewardFunc:
    """The built-in `builtin` that runs the reward model `model_id`, or a precise error when it is not shipped."""
    if builtin in REWARD_FUNCS:
        return REWARD_FUNCS[builtin]
    model = MISSING_BUILTINS.get(builtin, "this model")
    raise ValueError(
        f"Reward {model_id!r} is the Hub id of {model}, which would run as the built-in reward {builtin!r}; "
        f"trl-flow-grpo does not ship that built-in yet (it is not in REWARD_FUNCS, and no extra installs it). "
        "Wrap the model in your own reward function (one float per image, see docs/rewards.md) and pass it as a "
        "callable or an import path, or serve it with `trl-flow-grpo reward-server --reward my_pkg.rewards:fn` and "
        "pass the server's URL."
    )


def _import_func(
    path: str, kind: str = "reward function", builtins: Iterable[str] = REWARD_FUNCS
) -> Callable[..., Any]:
    """Import the `kind` (e.g. "reward function") named by `path` (`"pkg.module.attr"` or `"pkg.module:attr.sub"`);
    `builtins` are the built-in names listed when the path is malformed."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    parts = module_name.split(".") + attr_path.split(".")
    if path.count(":") > 1 or not all(part.isidentifier() for part in parts):
        raise ValueError(
            f"Invalid {kind} import path {path!r}: expected 'package.module.function' or "
            "'package.module:function' (dotted Python identifiers), or a built-in name "
            f"({', '.join(repr(name) for name in sorted(builtins))})."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"Cannot import {kind} {path!r}: importing module {module_name!r} failed "
            f"({type(error).__name__}: {error}). Make sure the module is importable (installed, or its folder on "
            "PYTHONPATH)."
        ) from error
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(
                f"Cannot import {kind} {path!r}: {type(obj).__name__} {getattr(obj, '__name__', obj)!r} "
                f"has no attribute {attr!r}."
            ) from None
    if isinstance(obj, type):
        raise TypeError(
            f"{kind.capitalize()} {path!r} is a class; name a function or an instance instead (e.g. a module-level "
            f"`my_{kind.split()[0]} = {obj.__name__}()`)."
        )
    if not callable(obj):
        raise TypeError(f"{kind.capitalize()} {path!r} is a {type(obj).__name__}, which is not callable.")
    return obj


def _is_async(func: RewardFunc) -> bool:
    """Whether calling `func` returns a coroutine (async function, async partial, or object with async `__call__`)."""
    if inspect.iscoroutinefunction(func):
        return True
    if isinstance(func, type):
        return False
    return inspect.iscoroutinefunction(type(func).__call__)  # an instance with `async def __call__`


def _select_kwargs(func: RewardFunc, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keywords to pass to `func`: all of them if it takes `**kwargs` (or has no inspectable signature), otherwise
    only those it names."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {key: value for key, value in kwargs.items() if key in names}


def _add_note(error: BaseException, name: str, kind: str) -> None:
    """Mark an exception raised inside a function with its kind and name (Python >= 3.11)."""
    if hasattr(error, "add_note"):
        error.add_note(f"(raised by {kind} {name!r})")


def _to_float(name: str, index: int, value: Any) -> float:
    """Convert one returned entry to a float; `None` becomes NaN."""
    if value is None:
        return math.nan
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"reward function {name!r} returned a non-numeric value for sample {index}: {value!r} "
            f"(type {type(value).__name__}); expected a float, or None if the reward does not apply to the sample"
        )
    result = float(value)
    if math.isnan(result):
        raise ValueError(
            f"reward function {name!r} returned NaN for sample {index}. Return None (not NaN) to mark a sample the "
            "reward does not apply to."
        )
    if math.isinf(result):
        raise ValueError(f"reward function {name!r} returned {result} for sample {index}; rewards must be finite")
    return result


def _check_columns(
    kind: str, columns: dict[str, Sequence[Any]] | None, reserved: tuple[str, ...], count: int, unit: str
) -> dict[str, Sequence[Any]]:
    """Check that no dataset column is named like a reserved keyword and each has one entry per `unit`."""
    columns = dict(columns or {})
    for key, values in columns.items():
        if key in reserved:
            raise ValueError(
                f"dataset column {key!r} clashes with a reserved {kind.replace(' ', '-')} keyword {reserved}"
            )
        if len(values) != count:
            raise ValueError(f"dataset column {key!r} has {len(values)} entries for {count} {unit}s")
    return columns


def _as_value_list(
    kind: str, name: str, result: Any, count: int, unit: str, convert: Callable[[str, int, Any], float]
) -> list[float]:
    """Validate one function's result (a 1-D tensor / array or a sequence with one entry per `unit`) and convert
    each entry with `convert(name, index, value)`."""
    if isinstance(result, (torch.Tensor, np.ndarray)):
        if result.ndim != 1:
            raise ValueError(
                f"{kind} {name!r} returned a {type(result).__name__} of shape {tuple(result.shape)}; "
                f"expected a 1-D result with one value per {unit} ({count})"
            )
        values = result.detach().cpu().tolist() if isinstance(result, torch.Tensor) else result.tolist()
    elif isinstance(result, Sequence) and not isinstance(result, (str, bytes, bytearray)):
        values = list(result)
    else:
        raise TypeError(
            f"{kind} {name!r} returned {type(result).__name__}; expected a list (or tuple, numpy array, "
            f"or torch tensor) with one value (or None) per {unit}"
        )
    if len(values) != count:
        raise ValueError(f"{kind} {name!r} returned {len(values)} values for {count} {unit}s")
    return [convert(name, index, value) for index, value in enumerate(values)]


def _run_awaitables(factories: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Await the awaitables made by `factories` concurrently (one `asyncio.gather` in one event loop).

    Uses `asyncio.run` when no event loop is running in this thread; from inside a running loop (which cannot be
    blocked on re-entrantly), the gathering runs in a fresh thread with its own loop, and this call waits for it.
    """

    async def gather_all() -> list[Any]:
        return list(await asyncio.gather(*(factory() for factory in factories)))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather_all())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-funcs") as executor:
        return executor.submit(asyncio.run, gather_all()).result()


def _identity(value: Any) -> Any:
    return value


async def _timed(
    kind: str, name: str, make_awaitable: Callable[[], Awaitable[Any]], offset: float, seconds: list[float], j: int
) -> Any:
    """Await one function's result, noting its name on errors; `seconds[j]` gets `offset` (the time its sync part
    took, if any) plus the time from now to its completion."""
    start = time.perf_counter()
    try:
        return await make_awaitable()
    except Exception as error:
        _add_note(error, name, kind)
        raise
    finally:
        seconds[j] = offset + time.perf_counter() - start


def _call_funcs(
    kind: str,
    unit: str,
    convert: Callable[[str, int, Any], float],
    funcs: Sequence[Callable[..., Any]],
    names: Sequence[str],
    kwargs: dict[str, Any],
    count: int,
) -> tuple[torch.Tensor, list[float]]:
    """Call every function with (its selection of) `kwargs` and stack the converted results.

    Sync functions run one after the other, in order; async functions (and awaitables returned by sync ones) then
    run concurrently with each other, in a single event loop. Errors raised inside a function get a note naming it.

    Returns:
        A float32 tensor of shape `(count, len(funcs))` whose column `j` holds the converted results of `funcs[j]`,
        and the wall-clock seconds each function took: measured alone for a sync function; for an async one, from
        its start to its own completion (they overlap).
    """
    values: list[list[float] | None] = [None] * len(funcs)
    seconds = [0.0] * len(funcs)
    pending: dict[int, tuple[Callable[[], Awaitable[Any]], float]] = {}  # index -> (awaitable maker, sync seconds)
    returned: list[Awaitable[Any]] = []  # awaitables already returned by sync functions

    try:
        for j, (func, name) in enumerate(zip(funcs, names)):
            if _is_async(func):
                pending[j] = (functools.partial(func, **_select_kwargs(func, kwargs)), 0.0)
                continue
            start = time.perf_counter()
            try:
                result = func(**_select_kwargs(func, kwargs))
            except Exception as error:
                _add_note(error, name, kind)
                raise
            if inspect.isawaitable(result):  # e.g. a sync wrapper around an async function
                returned.append(result)
                pending[j] = (functools.partial(_identity, result), time.perf_counter() - start)
                continue
            seconds[j] = time.perf_counter() - start
            values[j] = _as_value_list(kind, name, result, count, unit, convert)
    except BaseException:
        for awaitable in returned:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # avoid "coroutine was never awaited"
        raise

    if pending:
        order = list(pending)
        factories = [functools.partial(_timed, kind, names[j], *pending[j], seconds, j) for j in order]
        for j, result in zip(order, _run_awaitables(factories)):
            values[j] = _as_value_list(kind, names[j], result, count, unit, convert)

    stacked = torch.zeros((count, len(funcs)), dtype=torch.float32)
    for j, column in enumerate(values):
        if count:
            stacked[:, j] = torch.tensor(column, dtype=torch.float64).to(torch.float32)
            overflow = torch.isinf(stacked[:, j]).nonzero().flatten().tolist()
            if overflow:  # finite as a Python float, inf in the float32 the trainer computes with
                raise ValueError(
                    f"{kind} {names[j]!r} returned {column[overflow[0]]} for {unit} {overflow[0]}, which overflows "
                    f"float32 (largest finite value 3.4e38) to inf ({len(overflow)} {unit}(s)). Scale the values down."
                )
    return stacked, seconds


def _timeout_error(kind: str, name: str, seconds: float, elapsed: float) -> TimeoutError:
    return TimeoutError(
        f"{kind} {name!r} did not return within reward_timeout={seconds:g} s (stopped waiting after {elapsed:.1f} s). "
        "Make it faster (smaller batches, a timeout on its own requests) or raise reward_timeout."
    )


def with_timeout(func: RewardFunc, seconds: float | None, name: str, kind: str = "reward function") -> RewardFunc:
    """`func` with a limit of `seconds` per call (unchanged when `seconds` is None); the wrapper is named `name`.

    An async function is cancelled after `seconds` (`asyncio.wait_for`); a sync one runs in a daemon thread, which
    keeps running after the timeout (Python cannot stop a thread), so the error should end the process. Either way a
    `TimeoutError` names the function and the time waited.
    """
    if seconds is None:
        return func

    async def wait(awaitable: Awaitable[Any], budget: float, start: float) -> Any:
        try:
            return await asyncio.wait_for(awaitable, max(budget, 0.0))
        except TimeoutError:
            raise _timeout_error(kind, name, seconds, time.perf_counter() - start) from None

    if _is_async(func):

        async def limited(**kwargs: Any) -> Any:
            return await wait(func(**kwargs), seconds, time.perf_counter())

    else:

        def limited(**kwargs: Any) -> Any:
            start, box = time.perf_counter(), {}

            def run() -> None:
                try:
                    box["result"] = func(**kwargs)
                except BaseException as error:  # re-raised in the caller's thread
                    box["error"] = error

            thread = threading.Thread(target=run, name=f"{kind} {name}", daemon=True)
            thread.start()
            thread.join(seconds)
            if thread.is_alive():
                raise _timeout_error(kind, name, seconds, time.perf_counter() - start)
            if "error" in box:
                raise box["error"]
            result = box["result"]
            if inspect.isawaitable(result):  # the awaitable shares the same time budget
                return wait(result, seconds - (time.perf_counter() - start), start)
            return result

    limited.__name__ = limited.__qualname__ = name
    limited.__wrapped__ = func  # inspect.signature (keyword selection) sees the function's own parameters
    return limited


def _warn_all_none(rewards: torch.Tensor, prompts: list[str]) -> None:
    """Warn about samples for which every reward function returned None."""
    indices = torch.isnan(rewards).all(dim=1).nonzero().flatten().tolist()
    if not indices:
        return
    described = []
    for index in indices[:_MAX_SAMPLES_IN_WARNING]:
        prompt = str(prompts[index])
        if len(prompt) > _MAX_PROMPT_CHARS_IN_WARNING:
            prompt = prompt[: _MAX_PROMPT_CHARS_IN_WARNING - 3] + "..."
        described.append(f"sample {index} (prompt {prompt!r})")
    if len(indices) > _MAX_SAMPLES_IN_WARNING:
        described.append(f"and {len(indices) - _MAX_SAMPLES_IN_WARNING} more")
    warnings.warn(
        f"All reward functions returned None for {len(indices)} sample(s): {', '.join(described)}. These samples get "
        "no reward signal; make sure at least one reward function applies to every sample.",
        UserWarning,
        stacklevel=3,
    )


def call_reward_funcs(
    reward_funcs: Sequence[RewardFunc],
    prompts: list[str],
    images: list,
    columns: dict[str, list] | None = None,
    trainer_state: Any = None,
    log_extra: Callable[[str, list], None] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
) -> torch.Tensor:
    """Call every reward function on a batch and stack the results.

    Each function is called as `func(prompts=prompts, images=images, **columns, trainer_state=trainer_state)`,
    plus `log_extra=log_extra` and `log_metric=log_metric` when they are given (a function without `**kwargs` only
    gets the keywords it names). Sync functions run one after the other, in
    order; async functions (and awaitables returned by sync ones) then run concurrently with each other, in a single
    event loop.

    Args:
        reward_funcs: Reward functions (or built-in names, resolved with `resolve_reward_func`).
        prompts: One prompt per sample.
        images: One image per sample (normally `PIL.Image.Image`).
        columns: Other dataset columns, name -> list with one entry per sample; passed as keywords.
        trainer_state: Passed through as the `trainer_state` keyword.
        log_extra: TRL's `log_extra(column, values)`: a reward function calls it to log a column with one value per
            sample (e.g. the text an OCR reward read). Not passed when `None`.
        log_metric: TRL's `log_metric(name, value)`: a reward function calls it to log a scalar metric for the batch.
            Not passed when `None`.

    Returns:
        A float32 tensor of shape `(num_samples, num_funcs)`; column `j` holds the rewards of `reward_funcs[j]`, and
        NaN marks a sample the function returned None for (not applicable).

    Raises:
        TypeError: a function returned something that is not a list / tuple / array / tensor, or a non-numeric entry.
        ValueError: a function returned the wrong number of values, or NaN / inf (use None for "not applicable"); or
            the inputs are inconsistent (lengths, a column named like a reserved keyword).
    """
    num_samples = len(prompts)
    if len(images) != num_samples:
        raise ValueError(f"got {len(images)} images for {num_samples} prompts")
    columns = _check_columns("reward function", columns, _RESERVED_KWARGS, num_samples, "sample")
    kwargs = {"prompts": prompts, "images": images, **columns, "trainer_state": trainer_state}
    if log_extra is not None:
        kwargs["log_extra"] = log_extra
    if log_metric is not None:
        kwargs["log_metric"] = log_metric
    funcs = [resolve_reward_func(func) for func in reward_funcs]
    names = [reward_func_name(func) for func in funcs]
    rewards, _ = _call_funcs("reward function", "sample", _to_float, funcs, names, kwargs, num_samples)
    if funcs:
        _warn_all_none(rewards, prompts)
    return rewards
