"""Preference functions for Pref-GRPO: the built-in registry, name resolution and the batched call.

Pref-GRPO replaces each image's scalar reward by its win rate against the other images of its group. The win rates
come from a preference function, which compares pairs of images. It is any callable (a plain function, an `async def`
function, or an object with a sync or async `__call__` method) and is called with keyword arguments only:

- `prompts`: `list[str]`, one prompt per pair;
- `images_a`, `images_b`: `list[PIL.Image.Image]`, the two images of each pair;
- every other dataset column, as a keyword holding a list with one entry per pair;
- `trainer_state`: the trainer's `TrainerState` (may be `None`).

It should accept `**kwargs` so that it keeps working when columns are added; a function without `**kwargs` is only
passed the keywords it names. It returns one value per pair: the probability that `images_a[i]` is preferred over
`images_b[i]`, in [0, 1]. Hard verdicts (1, 0, and 0.5 for a tie) and soft probabilities are both fine; `None` means
"no verdict" and counts as a tie (0.5).

Built-ins can be referred to by name (`resolve_preference_func`): the judges of `PREFERENCE_FUNCS`, and every
built-in reward function of `REWARD_FUNCS`, which becomes a preference through [`ScalarPreference`]. Your own
preference function can be named by import path (`"my_judges.unified_reward"` or `"my_judges:unified_reward"`).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .base import (
    REWARD_FUNCS,
    RewardFunc,
    _call_funcs,
    _check_columns,
    _import_func,
    call_reward_funcs,
    resolve_reward_func,
    reward_func_name,
)
from .judge import OpenAIJudge, TransformersJudge, _check_pairs

__all__ = [
    "PREFERENCE_FUNCS",
    "PreferenceFunc",
    "ScalarPreference",
    "call_preference_funcs",
    "preference_func_name",
    "resolve_preference_func",
]

PreferenceFunc = Callable[..., Any]
"""A preference function, sync or async (see the module docstring for the calling convention)."""

PREFERENCE_FUNCS: dict[str, Callable[..., PreferenceFunc]] = {
    "unifiedreward_think": TransformersJudge,
    "openai_judge": OpenAIJudge,
}
"""Built-in preference functions by name, as factories: `PREFERENCE_FUNCS[name](**kwargs)` builds one. Every name of
`REWARD_FUNCS` is also accepted by `resolve_preference_func` (as a [`ScalarPreference`])."""

_RESERVED_KWARGS = ("prompts", "images_a", "images_b", "trainer_state")
_PROBABILITY_TOLERANCE = 1e-6
_SCALAR_PREFIX = "pref_"


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _check_non_negative(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value) or value < 0:
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}")
    return float(value)


class ScalarPreference:
    """Turn a scalar reward function into a preference function.

    Each call scores every distinct image once, with a single (batched) call of the reward function through
    `call_reward_funcs` (so sync / async reward functions and `None` scores work as they do for rewards), then
    compares the scores `s_a`, `s_b` of each pair:

    - a tie, p = 0.5, when `|s_a - s_b| <= tie_margin`, or when either score is `None` (not applicable);
    - otherwise p = sigmoid((s_a - s_b) / temperature) when `temperature > 0`, or the hard verdict 1 / 0 when
      `temperature == 0` (the default).

    Images are told apart by object identity: the same image object appearing in several pairs (as every image of a
    group does when all pairs are compared) is scored once. The prompt and dataset-column values an image is scored
    with are those of the first pair it appears in (as `images_a` or `images_b`); within a group they are the same
    for all pairs.

    Args:
        reward_func: A reward function, or the name of a built-in one (see `REWARD_FUNCS`).
        temperature: Softness of the comparison, in reward units; 0 gives hard verdicts.
        tie_margin: Score differences up to this value count as a tie (0.5), so that near-identical images do not
            get a winner. Defaults to 0: only exactly equal scores tie.

    Attributes:
        name: `"pref_<reward name>"`, used in logs.
    """

    def __init__(self, reward_func: str | RewardFunc, temperature: float = 0.0, tie_margin: float = 0.0) -> None:
        self.reward_func = resolve_reward_func(reward_func)
        self.temperature = _check_non_negative("temperature", temperature)
        self.tie_margin = _check_non_negative("tie_margin", tie_margin)
        self.name = _SCALAR_PREFIX + reward_func_name(self.reward_func)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({reward_func_name(self.reward_func)!r}, temperature={self.temperature}, "
            f"tie_margin={self.tie_margin})"
        )

    def _probability(self, score_a: float, score_b: float) -> float:
        difference = score_a - score_b
        if math.isnan(difference) or abs(difference) <= self.tie_margin:
            return 0.5
        if self.temperature > 0:
            return _sigmoid(difference / self.temperature)
        return 1.0 if difference > 0 else 0.0

    def __call__(
        self,
        prompts: Sequence[str],
        images_a: Sequence[Any],
        images_b: Sequence[Any],
        trainer_state: Any = None,
        **columns: Sequence[Any],
    ) -> list[float]:
        """Return P(`images_a[i]` preferred over `images_b[i]`) for every pair (see the class docstring)."""
        _check_pairs(prompts, images_a, images_b)
        num_pairs = len(prompts)
        _check_columns("preference function", columns, _RESERVED_KWARGS, num_pairs, "pair")
        if num_pairs == 0:
            return []

        slot: dict[int, int] = {}  # id(image) -> index among the distinct images
        images: list[Any] = []
        first_pair: list[int] = []  # the pair in which each distinct image first appears
        pair_slots: list[tuple[int, int]] = []
        for i, pair in enumerate(zip(images_a, images_b)):
            for image in pair:
                if id(image) not in slot:
                    slot[id(image)] = len(images)
                    images.append(image)
                    first_pair.append(i)
            pair_slots.append((slot[id(pair[0])], slot[id(pair[1])]))

        scores = call_reward_funcs(
            [self.reward_func],
            [prompts[i] for i in first_pair],
            images,
            {key: [values[i] for i in first_pair] for key, values in columns.items()},
            trainer_state=trainer_state,
        )[:, 0].tolist()
        return [self._probability(scores[a], scores[b]) for a, b in pair_slots]


def _unknown_name_error(name: str) -> ValueError:
    judges = ", ".join(repr(key) for key in sorted(PREFERENCE_FUNCS))
    rewards = ", ".join(repr(key) for key in sorted(REWARD_FUNCS))
    return ValueError(
        f"Unknown preference function {name!r}. Built-in judges: {judges}; built-in reward functions (compared "
        f"through their scores with ScalarPreference): {rewards}. You can also pass an import path "
        '("my_pkg.judges.my_judge" or "my_pkg.judges:my_judge"), or a callable (a function, an async function, or an '
        "object with `__call__`) that takes `prompts`, `images_a`, `images_b`, the dataset columns and "
        "`trainer_state` as keywords and returns, per pair, the probability (or None) that image a is preferred."
    )


def resolve_preference_func(
    func_or_name: str | PreferenceFunc, *, temperature: float = 0.0, tie_margin: float = 0.0
) -> PreferenceFunc:
    """Return the preference function for `func_or_name`.

    - a callable is returned unchanged (`temperature` and `tie_margin` do not apply to it);
    - the name of a built-in reward function (`REWARD_FUNCS`) gives
      `ScalarPreference(name, temperature=temperature, tie_margin=tie_margin)`;
    - the name of a built-in judge (`PREFERENCE_FUNCS`) gives that judge with its default settings, e.g.
      `"unifiedreward_think"` -> `TransformersJudge()` (loaded on its first call). A judge that needs settings
      (`"openai_judge"` needs `base_url` and `model`) must be built and passed as an object, or by import path;
    - any other string containing a dot or a colon is an import path to a preference function, e.g.
      `"my_judges.unified_reward"` where `my_judges.py` defines `unified_reward = OpenAIJudge(...)` (resolved like
      reward-function import paths: a function or a callable instance, not a class). It is returned as is; to compare
      the scores of your own reward function, point the path at a `ScalarPreference(my_reward)`.

    Raises:
        ValueError: an unknown name, a malformed import path, or a judge name whose factory needs arguments.
        ImportError: the module of an import path cannot be imported.
        TypeError: the argument (or the object an import path names) is not callable, or is a class.
    """
    if isinstance(func_or_name, str):
        if func_or_name in REWARD_FUNCS:
            return ScalarPreference(func_or_name, temperature=temperature, tie_margin=tie_margin)
        if func_or_name not in PREFERENCE_FUNCS:
            if "." in func_or_name or ":" in func_or_name:
                return _import_func(func_or_name, "preference function", [*PREFERENCE_FUNCS, *REWARD_FUNCS])
            raise _unknown_name_error(func_or_name)
        factory = PREFERENCE_FUNCS[func_or_name]
        required = [
            parameter.name
            for parameter in inspect.signature(factory).parameters.values()
            if parameter.default is inspect.Parameter.empty
            and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if required:
            arguments = ", ".join(f"{name}=..." for name in required)
            raise ValueError(
                f"The preference function {func_or_name!r} needs settings ({', '.join(required)}), so it cannot be "
                f"given by name alone; build it with {factory.__name__}({arguments}) (also "
                f"PREFERENCE_FUNCS[{func_or_name!r}]({arguments})) and pass the object instead."
            )
        return factory()
    if not callable(func_or_name):
        raise TypeError(
            f"A preference function must be a built-in name (str) or a callable, got {type(func_or_name).__name__}"
        )
    return func_or_name


def preference_func_name(func: str | PreferenceFunc) -> str:
    """Return a human-readable name for a preference function (used in logs and error messages).

    - a name string: the name itself (a reward-function name `r` gives `"pref_r"`, like its `ScalarPreference`);
    - an import path string: the name of the object it points to (by the rules below);
    - an object with a string `name` attribute (e.g. a [`ScalarPreference`], named `"pref_<reward name>"`): that;
    - a `functools.partial`: the name of the wrapped function;
    - a function or method: its `__name__`;
    - any other callable object (e.g. a judge): its class name.
    """
    if isinstance(func, str):
        if func in REWARD_FUNCS:
            return _SCALAR_PREFIX + func
        if func in PREFERENCE_FUNCS:
            return func
        return preference_func_name(resolve_preference_func(func))  # an import path, or raises
    name = getattr(func, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(func, functools.partial):
        return preference_func_name(func.func)
    name = getattr(func, "__name__", None)
    if isinstance(name, str):
        return name
    return type(func).__name__


def _to_probability(name: str, index: int, value: Any) -> float:
    """Convert one returned entry to a probability in [0, 1]; `None` (no verdict) becomes 0.5."""
    if value is None:
        return 0.5
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"preference function {name!r} returned a non-numeric value for pair {index}: {value!r} "
            f"(type {type(value).__name__}); expected the probability in [0, 1] that image a is preferred, or None "
            "for no verdict"
        )
    result = float(value)
    if math.isnan(result):
        raise ValueError(
            f"preference function {name!r} returned NaN for pair {index}. Return None (not NaN) when there is no "
            "verdict; it counts as a tie (0.5)."
        )
    if not -_PROBABILITY_TOLERANCE <= result <= 1 + _PROBABILITY_TOLERANCE:
        raise ValueError(
            f"preference function {name!r} returned {result} for pair {index}; expected a probability in [0, 1] "
            "(1: image a preferred, 0: image b preferred, 0.5: tie). To compare raw scores, wrap the scoring "
            "function in ScalarPreference."
        )
    return min(max(result, 0.0), 1.0)


def call_preference_funcs(
    funcs: Sequence[str | PreferenceFunc],
    prompts: list[str],
    images_a: list,
    images_b: list,
    columns: dict[str, list] | None = None,
    trainer_state: Any = None,
) -> tuple[torch.Tensor, list[float]]:
    """Call every preference function on a batch of pairs and stack the results.

    Each function is called as
    `func(prompts=prompts, images_a=images_a, images_b=images_b, **columns, trainer_state=trainer_state)` (a function
    without `**kwargs` only gets the keywords it names). Sync functions run one after the other, in order; async
    functions (and awaitables returned by sync ones) then run concurrently with each other, in a single event loop.

    Args:
        funcs: Preference functions (or built-in names, resolved with `resolve_preference_func`).
        prompts: One prompt per pair.
        images_a: The first image of each pair.
        images_b: The second image of each pair.
        columns: Other dataset columns, name -> list with one entry per pair; passed as keywords.
        trainer_state: Passed through as the `trainer_state` keyword.

    Returns:
        A float32 tensor of shape `(num_pairs, num_funcs)` whose column `j` holds P(image a preferred) from
        `funcs[j]` (`None` verdicts become 0.5), and the wall-clock seconds each function took: measured alone for
        a sync function; for an async one, from its start to its own completion (they overlap).

    Raises:
        TypeError: a function returned something that is not a list / tuple / array / tensor, or a non-numeric entry.
        ValueError: a function returned the wrong number of values, NaN, or a value outside [0, 1] (up to a 1e-6
            rounding slack, which is clamped); or the inputs are inconsistent (lengths, a column named like a
            reserved keyword).
    """
    _check_pairs(prompts, images_a, images_b)
    num_pairs = len(prompts)
    columns = _check_columns("preference function", columns, _RESERVED_KWARGS, num_pairs, "pair")
    kwargs = {
        "prompts": prompts,
        "images_a": images_a,
        "images_b": images_b,
        **columns,
        "trainer_state": trainer_state,
    }
    resolved = [resolve_preference_func(func) for func in funcs]
    names = [preference_func_name(func) for func in resolved]
    return _call_funcs("preference function", "pair", _to_probability, resolved, names, kwargs, num_pairs)
