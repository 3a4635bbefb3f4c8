"""Tests for trl_flow_grpo.rewards.preferences: ScalarPreference, name resolution and call_preference_funcs."""

from __future__ import annotations

import asyncio
import functools
import importlib
import itertools
import math
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from trl_flow_grpo.rewards import (
    DEFAULT_JUDGE_MODEL_ID,
    PREFERENCE_FUNCS,
    REWARD_FUNCS,
    OpenAIJudge,
    ScalarPreference,
    TransformersJudge,
    call_preference_funcs,
    preference_func_name,
    resolve_preference_func,
)


def _gray(value: int, size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def _brightness(prompts, images, **kwargs):
    """A reward: the mean pixel value of each image, in [0, 1]."""
    return [float(np.asarray(image).mean()) / 255 for image in images]


def _pairs(images: list[Image.Image]) -> tuple[list[str], list[Image.Image], list[Image.Image]]:
    """Every unordered pair of `images`, as the trainer queries one group."""
    pairs = list(itertools.combinations(images, 2))
    return ["a prompt"] * len(pairs), [a for a, _ in pairs], [b for _, b in pairs]


class _RecordingReward:
    """A reward function that records every call and returns scores looked up by image object."""

    def __init__(self, scores: dict[int, float | None]):
        self.scores = scores
        self.calls: list[dict] = []

    def __call__(self, prompts, images, **kwargs):
        self.calls.append({"prompts": list(prompts), "images": list(images), **kwargs})
        return [self.scores[id(image)] for image in images]


# --------------------------------------------------------------------------------------------- ScalarPreference


def test_hard_verdicts_follow_the_score_order():
    dark, mid, bright = _gray(20), _gray(120), _gray(220)
    preference = ScalarPreference(_brightness)
    result = preference(prompts=["p"] * 4, images_a=[bright, dark, mid, mid], images_b=[dark, bright, dark, bright])
    assert result == [1.0, 0.0, 1.0, 0.0]


def test_equal_scores_are_ties_even_without_margin():
    first, second = _gray(100), _gray(100)  # distinct objects with the same score
    assert ScalarPreference(_brightness)(prompts=["p"], images_a=[first], images_b=[second]) == [0.5]


def test_soft_verdicts_are_a_sigmoid_of_the_score_difference():
    images = [_gray(v) for v in (0, 64, 128, 255)]
    prompts, images_a, images_b = _pairs(images)
    temperature = 0.3
    soft = ScalarPreference(_brightness, temperature=temperature)
    forward = soft(prompts=prompts, images_a=images_a, images_b=images_b)
    backward = soft(prompts=prompts, images_a=images_b, images_b=images_a)
    for p, q, a, b in zip(forward, backward, images_a, images_b):
        difference = _brightness(None, [a])[0] - _brightness(None, [b])[0]
        assert p == pytest.approx(1 / (1 + math.exp(-difference / temperature)), rel=1e-6)
        assert p + q == pytest.approx(1.0)
        assert 0 < p < 1 and p != 0.5
    # A lower temperature sharpens every verdict towards the hard one.
    sharp = ScalarPreference(_brightness, temperature=0.01)(prompts=prompts, images_a=images_a, images_b=images_b)
    hard = ScalarPreference(_brightness)(prompts=prompts, images_a=images_a, images_b=images_b)
    for p_soft, p_sharp, p_hard in zip(forward, sharp, hard):
        assert abs(p_sharp - p_hard) < abs(p_soft - p_hard)


def test_tie_margin_turns_small_differences_into_ties():
    base, close, far = object(), object(), object()
    reward = _RecordingReward({id(base): 1.0, id(close): 1.05, id(far): 1.5})
    prompts = ["p"] * 3
    images_a, images_b = [close, far, base], [base, base, far]
    assert ScalarPreference(reward, tie_margin=0.1)(prompts=prompts, images_a=images_a, images_b=images_b) == [
        0.5,
        1.0,
        0.0,
    ]
    assert ScalarPreference(reward)(prompts=prompts, images_a=images_a, images_b=images_b) == [1.0, 1.0, 0.0]
    # With a temperature the margin still wins: a small difference is an exact tie, not sigmoid(0.05 / T).
    soft = ScalarPreference(reward, temperature=1.0, tie_margin=0.1)(
        prompts=prompts, images_a=images_a, images_b=images_b
    )
    assert soft[0] == 0.5 and soft[1] > 0.5 and soft[2] < 0.5


def test_a_none_score_gives_ties_for_that_image_only():
    scored, unscored, other = object(), object(), object()
    reward = _RecordingReward({id(scored): 2.0, id(unscored): None, id(other): 1.0})
    with pytest.warns(UserWarning, match="returned None"):
        result = ScalarPreference(reward)(
            prompts=["p"] * 3, images_a=[scored, unscored, scored], images_b=[unscored, other, other]
        )
    assert result == [0.5, 0.5, 1.0]


def test_each_distinct_image_is_scored_once_in_one_call():
    images = [_gray(v) for v in (10, 90, 170, 250)]
    images.append(_gray(90))  # equal pixels but a different object: scored separately
    reward = _RecordingReward({id(image): float(i) for i, image in enumerate(images)})
    prompts, images_a, images_b = _pairs(images)
    result = ScalarPreference(reward)(prompts=prompts, images_a=images_a, images_b=images_b)

    assert len(reward.calls) == 1
    scored = reward.calls[0]["images"]
    assert len(scored) == len(images)
    assert {id(image) for image in scored} == {id(image) for image in images}
    position = {id(image): i for i, image in enumerate(images)}  # PIL images compare equal by content
    assert result == [1.0 if position[id(a)] > position[id(b)] else 0.0 for a, b in zip(images_a, images_b)]


def test_prompts_and_columns_of_an_image_come_from_its_first_pair():
    x, y, z = object(), object(), object()
    reward = _RecordingReward({id(x): 0.0, id(y): 1.0, id(z): 2.0})
    ScalarPreference(reward)(
        prompts=["p0", "p1", "p2"],
        images_a=[x, y, z],
        images_b=[y, z, x],
        trainer_state="state",
        tag=["t0", "t1", "t2"],
    )
    call = reward.calls[0]
    order = [{id(x): "x", id(y): "y", id(z): "z"}[id(image)] for image in call["images"]]
    assert order == ["x", "y", "z"]  # x and y first appear in pair 0, z in pair 1
    assert call["prompts"] == ["p0", "p0", "p1"]
    assert call["tag"] == ["t0", "t0", "t1"]
    assert call["trainer_state"] == "state"


def test_async_reward_functions_can_be_compared():
    async def async_brightness(prompts, images, **kwargs):
        await asyncio.sleep(0)
        return _brightness(prompts, images)

    dark, bright = _gray(10), _gray(240)
    preference = ScalarPreference(async_brightness)
    assert preference(prompts=["p", "p"], images_a=[dark, bright], images_b=[bright, dark]) == [0.0, 1.0]


def test_builtin_reward_names_become_scalar_preferences():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    flat = _gray(128, size=32)
    preference = resolve_preference_func("jpeg_compressibility")
    assert isinstance(preference, ScalarPreference)
    assert preference(prompts=["p", "p"], images_a=[flat, noise], images_b=[noise, flat]) == [1.0, 0.0]


@pytest.mark.parametrize("argument", ["temperature", "tie_margin"])
@pytest.mark.parametrize("value", [-0.5, float("nan"), "1", True])
def test_scalar_preference_rejects_invalid_settings(argument, value):
    with pytest.raises(ValueError, match=rf"`{argument}` must be a number >= 0, got {value!r}"):
        ScalarPreference(_brightness, **{argument: value})


def test_scalar_preference_rejects_unknown_rewards_and_mismatched_inputs():
    with pytest.raises(ValueError, match="Unknown reward function 'no_such_reward'"):
        ScalarPreference("no_such_reward")
    image = _gray(1)
    with pytest.raises(ValueError, match="got 2 prompts, 1 images_a and 1 images_b"):
        ScalarPreference(_brightness)(prompts=["p", "q"], images_a=[image], images_b=[image])
    with pytest.raises(ValueError, match="column 'tag' has 2 entries for 1 pairs"):
        ScalarPreference(_brightness)(prompts=["p"], images_a=[image], images_b=[image], tag=[1, 2])


# --------------------------------------------------------------------------------------------- resolve / name


def test_resolve_preference_func():
    def prefer_a(prompts, images_a, images_b, **kwargs):
        return [1.0] * len(prompts)

    assert resolve_preference_func(prefer_a) is prefer_a
    scalar = resolve_preference_func("jpeg_compressibility", temperature=2.0, tie_margin=0.25)
    assert isinstance(scalar, ScalarPreference)
    assert scalar.reward_func is REWARD_FUNCS["jpeg_compressibility"]
    assert (scalar.temperature, scalar.tie_margin) == (2.0, 0.25)

    judge = resolve_preference_func("unifiedreward_think")
    assert isinstance(judge, TransformersJudge)
    assert judge.model_id == DEFAULT_JUDGE_MODEL_ID
    assert judge.model is None  # nothing is loaded before the first call

    assert PREFERENCE_FUNCS["openai_judge"] is OpenAIJudge
    with pytest.raises(ValueError, match=r"'openai_judge' needs settings \(base_url, model\).*OpenAIJudge\("):
        resolve_preference_func("openai_judge")


def test_resolve_preference_func_rejects_unknown_names_and_non_callables():
    with pytest.raises(ValueError) as error:
        resolve_preference_func("no_such_judge")
    message = str(error.value)
    assert "'no_such_judge'" in message
    for name in list(PREFERENCE_FUNCS) + list(REWARD_FUNCS):
        assert repr(name) in message
    assert "callable" in message
    with pytest.raises(TypeError, match="got int"):
        resolve_preference_func(3)


def test_preference_func_name():
    def my_preference(prompts, images_a, images_b):
        return []

    class NamedJudge:
        name = "my_judge"

        def __call__(self, prompts, images_a, images_b):
            return []

    assert preference_func_name(ScalarPreference("jpeg_compressibility")) == "pref_jpeg_compressibility"
    assert preference_func_name(ScalarPreference(_brightness)) == "pref__brightness"
    assert preference_func_name("jpeg_compressibility") == "pref_jpeg_compressibility"
    assert preference_func_name("unifiedreward_think") == "unifiedreward_think"
    assert preference_func_name(TransformersJudge()) == "TransformersJudge"
    assert preference_func_name(OpenAIJudge("http://localhost:1/v1", "judge")) == "OpenAIJudge"
    assert preference_func_name(NamedJudge()) == "my_judge"
    assert preference_func_name(my_preference) == "my_preference"
    assert preference_func_name(functools.partial(my_preference, prompts=[])) == "my_preference"
    with pytest.raises(ValueError, match="Unknown preference function 'nope'"):
        preference_func_name("nope")


USER_MODULE_SOURCE = """
from trl_flow_grpo.rewards import ScalarPreference


def prefer_first(prompts, images_a, images_b, **kwargs):
    return [1.0] * len(prompts)


def length(prompts, images, **kwargs):
    return [float(len(p)) for p in prompts]


class MyJudge:
    async def __call__(self, prompts, images_a, images_b, **kwargs):
        return [0.0] * len(prompts)


judge = MyJudge()
by_length = ScalarPreference(length)
"""


@pytest.fixture
def user_judges(tmp_path, monkeypatch) -> str:
    """An importable module `user_judges_pref_test` written to tmp_path; returns its name."""
    (tmp_path / "user_judges_pref_test.py").write_text(textwrap.dedent(USER_MODULE_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_judges_pref_test", raising=False)
    yield "user_judges_pref_test"
    sys.modules.pop("user_judges_pref_test", None)


def test_preference_functions_can_be_named_by_import_path(user_judges):
    module = importlib.import_module(user_judges)
    assert resolve_preference_func(f"{user_judges}.prefer_first") is module.prefer_first
    assert resolve_preference_func(f"{user_judges}:judge") is module.judge
    assert preference_func_name(f"{user_judges}.judge") == "MyJudge"
    assert preference_func_name(f"{user_judges}.by_length") == "pref_length"

    prompts, images_a, images_b = ["a", "bbb"], [_gray(0), _gray(1)], [_gray(2), _gray(3)]
    probabilities, _ = call_preference_funcs(
        [f"{user_judges}.prefer_first", f"{user_judges}.judge", f"{user_judges}:by_length"],
        prompts,
        images_a,
        images_b,
    )
    assert probabilities.tolist() == [[1.0, 0.0, 0.5], [1.0, 0.0, 0.5]]  # by_length: same prompt per pair, a tie

    with pytest.raises(TypeError, match="is a class"):
        resolve_preference_func(f"{user_judges}.MyJudge")
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        resolve_preference_func("no_such_module_xyz.judge")


# --------------------------------------------------------------------------------------------- call_preference_funcs


def _batch(n: int = 3) -> tuple[list[str], list[Image.Image], list[Image.Image]]:
    return [f"prompt {i}" for i in range(n)], [_gray(10 * i) for i in range(n)], [_gray(200) for _ in range(n)]


def test_sync_and_async_preference_functions_are_stacked_in_order():
    class AsyncJudge:
        async def __call__(self, prompts, images_a, images_b, **kwargs):
            await asyncio.sleep(0)
            return [0.25] * len(prompts)

    async def async_func(prompts, images_a, images_b, **kwargs):
        return np.array([0.0, 1.0, 0.5])

    def sync_func(prompts, images_a, images_b):
        return [1, None, 0.75]

    prompts, images_a, images_b = _batch()
    probabilities, seconds = call_preference_funcs(
        [AsyncJudge(), sync_func, async_func, ScalarPreference(_brightness)], prompts, images_a, images_b
    )
    assert probabilities.dtype == torch.float32
    expected = torch.tensor(
        [[0.25, 1.0, 0.0, 0.0], [0.25, 0.5, 1.0, 0.0], [0.25, 0.75, 0.5, 0.0]],
        dtype=torch.float32,
    )
    torch.testing.assert_close(probabilities, expected)
    assert len(seconds) == 4 and all(s >= 0 for s in seconds)


def test_columns_and_trainer_state_reach_functions_that_ask_for_them():
    received = {}

    def with_kwargs(prompts, images_a, images_b, **kwargs):
        received["kwargs"] = kwargs
        return [0.5] * len(prompts)

    def only_prompts(prompts):
        received["only_prompts"] = prompts
        return [0.5] * len(prompts)

    prompts, images_a, images_b = _batch(2)
    call_preference_funcs(
        [with_kwargs, only_prompts], prompts, images_a, images_b, columns={"tag": ["a", "b"]}, trainer_state="state"
    )
    assert received["kwargs"] == {"tag": ["a", "b"], "trainer_state": "state"}
    assert received["only_prompts"] == prompts


def test_async_functions_run_concurrently_and_are_timed_separately():
    async def slow(prompts, images_a, images_b, **kwargs):
        await asyncio.sleep(0.3)
        return [1.0] * len(prompts)

    async def fast(prompts, images_a, images_b, **kwargs):
        await asyncio.sleep(0.05)
        return [0.0] * len(prompts)

    def sync_sleepy(prompts, images_a, images_b, **kwargs):
        time.sleep(0.1)
        return [0.5] * len(prompts)

    def sync_wrapper(**kwargs):  # a sync function returning an awaitable
        return slow(**kwargs)

    prompts, images_a, images_b = _batch(2)
    start = time.perf_counter()
    probabilities, seconds = call_preference_funcs(
        [slow, fast, sync_sleepy, sync_wrapper], prompts, images_a, images_b
    )
    elapsed = time.perf_counter() - start
    assert probabilities[:, 3].tolist() == [1.0, 1.0]
    assert elapsed < 0.1 + 0.3 + 0.25  # the async functions overlapped (sequential would take >= 0.75 s)
    assert seconds[0] >= 0.3 and seconds[3] >= 0.3
    assert 0.05 <= seconds[1] < 0.25  # timed to its own completion, not to the slowest one's
    assert seconds[2] >= 0.1


def test_call_preference_funcs_from_a_running_event_loop():
    async def prefer_a(prompts, images_a, images_b, **kwargs):
        return [1.0] * len(prompts)

    async def main():
        return call_preference_funcs([prefer_a], *_batch(2))

    probabilities, _ = asyncio.run(main())
    assert probabilities[:, 0].tolist() == [1.0, 1.0]


def test_tiny_rounding_errors_are_clamped():
    def slightly_off(prompts, images_a, images_b):
        return [1 + 1e-7, -1e-7, torch.tensor(0.3)]

    probabilities, _ = call_preference_funcs([slightly_off], *_batch(3))
    assert probabilities[:, 0].tolist() == pytest.approx([1.0, 0.0, 0.3])
    assert probabilities.min() >= 0 and probabilities.max() <= 1


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        ([0.5, 0.5], ValueError, "'bad' returned 2 values for 3 pairs"),
        ([0.5, "yes", 0.5], TypeError, "'bad' returned a non-numeric value for pair 1: 'yes'"),
        ([0.5, 0.5, float("nan")], ValueError, "'bad' returned NaN for pair 2"),
        ([1.5, 0.5, 0.5], ValueError, r"'bad' returned 1.5 for pair 0; expected a probability in \[0, 1\]"),
        ([0.5, -0.01, 0.5], ValueError, r"'bad' returned -0.01 for pair 1"),
        (torch.zeros(3, 1), ValueError, r"'bad' returned a Tensor of shape \(3, 1\)"),
        ("0.5", TypeError, "'bad' returned str"),
    ],
)
def test_invalid_results_are_rejected_with_the_function_and_pair(result, error, match):
    def bad(prompts, images_a, images_b):
        return result

    with pytest.raises(error, match=match):
        call_preference_funcs([bad], *_batch(3))


def test_errors_inside_functions_name_the_function():
    def broken(prompts, images_a, images_b):
        raise RuntimeError("judge crashed")

    async def broken_async(prompts, images_a, images_b):
        raise RuntimeError("judge crashed")

    for func in (broken, broken_async):
        with pytest.raises(RuntimeError, match="judge crashed") as error:
            call_preference_funcs([func], *_batch(2))
        assert f"(raised by preference function {func.__name__!r})" in error.value.__notes__


def test_inconsistent_inputs_are_rejected():
    prompts, images_a, images_b = _batch(2)

    def prefer_a(prompts, images_a, images_b, **kwargs):
        return [1.0] * len(prompts)

    with pytest.raises(ValueError, match="got 2 prompts, 1 images_a and 2 images_b"):
        call_preference_funcs([prefer_a], prompts, images_a[:1], images_b)
    with pytest.raises(ValueError, match="column 'images_b' clashes with a reserved"):
        call_preference_funcs([prefer_a], prompts, images_a, images_b, columns={"images_b": [1, 2]})
    with pytest.raises(ValueError, match="column 'tag' has 1 entries for 2 pairs"):
        call_preference_funcs([prefer_a], prompts, images_a, images_b, columns={"tag": [1]})
    with pytest.raises(ValueError, match="Unknown preference function 'nope'"):
        call_preference_funcs(["nope"], prompts, images_a, images_b)


def test_names_resolve_and_empty_inputs_give_empty_results():
    prompts, images_a, images_b = _batch(2)
    probabilities, seconds = call_preference_funcs(["jpeg_compressibility"], prompts, images_a, images_b)
    assert probabilities.shape == (2, 1) and len(seconds) == 1
    probabilities, seconds = call_preference_funcs(["jpeg_compressibility"], [], [], [])
    assert probabilities.shape == (0, 1)
