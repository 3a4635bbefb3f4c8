"""Tests for trl_flow_grpo.rewards: built-in registry, compressibility rewards and call_reward_funcs."""

from __future__ import annotations

import asyncio
import math
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from trl_flow_grpo.rewards import (
    REWARD_FUNCS,
    call_reward_funcs,
    jpeg_compressibility,
    jpeg_incompressibility,
    resolve_reward_func,
    reward_func_name,
)


def _flat_image(size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), (120, 60, 200))


def _noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _batch(n: int = 4) -> tuple[list[str], list[Image.Image]]:
    return [f"prompt {i}" for i in range(n)], [_flat_image(16) for _ in range(n)]


# --------------------------------------------------------------------------------------------- compressibility


def test_flat_image_is_more_compressible_than_noise():
    prompts = ["flat", "noise"]
    images = [_flat_image(), _noise_image()]
    compress = jpeg_compressibility(prompts=prompts, images=images)
    incompress = jpeg_incompressibility(prompts=prompts, images=images)
    assert all(isinstance(v, float) for v in compress + incompress)
    assert compress[0] > compress[1]
    assert incompress[0] < incompress[1]
    assert compress == [-v for v in incompress]
    assert all(v < 0 for v in compress)


def test_compressibility_accepts_numpy_and_non_rgb_images():
    array = np.asarray(_noise_image())
    from_pil = jpeg_incompressibility(prompts=["a"], images=[Image.fromarray(array)])
    from_numpy = jpeg_incompressibility(prompts=["a"], images=[array])
    assert from_pil == pytest.approx(from_numpy)
    rgba = Image.fromarray(np.dstack([array, np.full(array.shape[:2], 255, np.uint8)]))
    gray = np.asarray(_noise_image().convert("L"))
    assert len(jpeg_incompressibility(prompts=["a", "b", "c"], images=[rgba, gray, rgba.convert("P")])) == 3
    with pytest.raises(TypeError, match="uint8"):
        jpeg_compressibility(prompts=["a"], images=[array.astype(np.float32)])


def test_registry_and_resolution():
    assert REWARD_FUNCS["jpeg_compressibility"] is jpeg_compressibility
    assert REWARD_FUNCS["jpeg_incompressibility"] is jpeg_incompressibility
    assert resolve_reward_func("jpeg_compressibility") is jpeg_compressibility

    def my_reward(prompts, images, **kwargs):
        return [0.0] * len(prompts)

    assert resolve_reward_func(my_reward) is my_reward
    with pytest.raises(TypeError):
        resolve_reward_func(42)  # type: ignore[arg-type]


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as info:
        resolve_reward_func("pickscore_typo")
    message = str(info.value)
    assert "pickscore_typo" in message
    for name in REWARD_FUNCS:
        assert name in message
    assert "callable" in message


def test_reward_func_name():
    def my_reward(prompts, images, **kwargs):
        return [0.0] * len(prompts)

    class LengthReward:
        def __call__(self, prompts, images, **kwargs):
            return [float(len(p)) for p in prompts]

    assert reward_func_name(my_reward) == "my_reward"
    assert reward_func_name(LengthReward()) == "LengthReward"
    assert reward_func_name(jpeg_compressibility) == "jpeg_compressibility"
    assert reward_func_name("jpeg_incompressibility") == "jpeg_incompressibility"


# --------------------------------------------------------------------------------------------- call_reward_funcs


def test_mixed_sync_async_columns_in_order():
    prompts, images = _batch(3)

    def sync_a(prompts, images, **kwargs):
        return [1.0, 2.0, 3.0]

    async def async_b(prompts, images, **kwargs):
        await asyncio.sleep(0)
        return [10.0, 20.0, 30.0]

    class SyncC:
        def __call__(self, prompts, images, **kwargs):
            return np.array([-1.0, -2.0, -3.0])

    class AsyncD:
        async def __call__(self, prompts, images, **kwargs):
            return torch.tensor([0.5, 0.25, 0.125])

    rewards = call_reward_funcs([async_b, sync_a, AsyncD(), SyncC(), lambda **kw: (7, 8, 9)], prompts, images)
    assert rewards.dtype == torch.float32
    assert rewards.shape == (3, 5)
    expected = torch.tensor(
        [[10.0, 1.0, 0.5, -1.0, 7.0], [20.0, 2.0, 0.25, -2.0, 8.0], [30.0, 3.0, 0.125, -3.0, 9.0]],
    )
    torch.testing.assert_close(rewards, expected)


def test_builtin_names_are_resolved():
    prompts = ["flat", "noise"]
    images = [_flat_image(), _noise_image()]
    rewards = call_reward_funcs(["jpeg_compressibility", jpeg_incompressibility], prompts, images)
    assert rewards.shape == (2, 2)
    assert rewards[0, 0] > rewards[1, 0]
    torch.testing.assert_close(rewards[:, 0], -rewards[:, 1])


def test_async_reward_funcs_run_concurrently():
    prompts, images = _batch(2)

    async def slow_a(prompts, images, **kwargs):
        await asyncio.sleep(0.3)
        return [1.0, 1.0]

    async def slow_b(prompts, images, **kwargs):
        await asyncio.sleep(0.3)
        return [2.0, 2.0]

    start = time.perf_counter()
    rewards = call_reward_funcs([slow_a, slow_b], prompts, images)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"async reward functions ran sequentially ({elapsed:.2f}s)"
    torch.testing.assert_close(rewards, torch.tensor([[1.0, 2.0], [1.0, 2.0]]))


def test_call_from_inside_running_event_loop():
    prompts, images = _batch(2)

    async def slow_a(prompts, images, **kwargs):
        await asyncio.sleep(0.3)
        return [1.0, 2.0]

    async def slow_b(prompts, images, **kwargs):
        await asyncio.sleep(0.3)
        return [3.0, None]

    def sync_c(prompts, images, **kwargs):
        return [5.0, 6.0]

    async def main() -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        result = call_reward_funcs([slow_a, sync_c, slow_b], prompts, images)
        return result, time.perf_counter() - start

    rewards, elapsed = asyncio.run(main())
    assert elapsed < 0.5
    assert rewards[:, :2].tolist() == [[1.0, 5.0], [2.0, 6.0]]
    assert rewards[0, 2] == 3.0 and math.isnan(rewards[1, 2])


def test_extra_columns_and_trainer_state_passed_as_keywords():
    prompts, images = _batch(3)
    seen = {}
    state = object()

    def uses_columns(prompts, images, label, trainer_state, **kwargs):
        seen["label"] = label
        seen["kwargs"] = kwargs
        seen["trainer_state"] = trainer_state
        return [float(x) for x in label]

    async def async_uses_columns(*, prompts, images, difficulty, **kwargs):
        seen["difficulty"] = difficulty
        return [float(len(d)) for d in difficulty]

    def no_kwargs(prompts, images, label):  # only gets the keywords it names
        return [0.0] * len(prompts)

    columns = {"label": [1, 2, 3], "difficulty": ["a", "bb", "ccc"]}
    rewards = call_reward_funcs(
        [uses_columns, async_uses_columns, no_kwargs], prompts, images, columns=columns, trainer_state=state
    )
    assert seen["label"] == [1, 2, 3]
    assert seen["kwargs"] == {"difficulty": ["a", "bb", "ccc"]}
    assert seen["trainer_state"] is state
    assert seen["difficulty"] == ["a", "bb", "ccc"]
    torch.testing.assert_close(rewards, torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [3.0, 3.0, 0.0]]))


def test_column_validation():
    prompts, images = _batch(2)
    with pytest.raises(ValueError, match="'label'"):
        call_reward_funcs([jpeg_compressibility], prompts, images, columns={"label": [1]})
    with pytest.raises(ValueError, match="'prompts'"):
        call_reward_funcs([jpeg_compressibility], prompts, images, columns={"prompts": prompts})
    with pytest.raises(ValueError, match="images"):
        call_reward_funcs([jpeg_compressibility], prompts, images[:1])


def test_none_becomes_nan():
    prompts, images = _batch(3)

    def sometimes(prompts, images, **kwargs):
        return [1.0, None, 3.0]

    def always(prompts, images, **kwargs):
        return [0.0, 0.0, 0.0]

    rewards = call_reward_funcs([sometimes, always], prompts, images)
    assert math.isnan(rewards[1, 0])
    assert rewards[0, 0] == 1.0 and rewards[2, 0] == 3.0
    assert not torch.isnan(rewards[:, 1]).any()


def test_all_none_warning():
    prompts, images = _batch(3)

    def first(prompts, images, **kwargs):
        return [1.0, None, None]

    async def second(prompts, images, **kwargs):
        return [None, None, 2.0]

    with pytest.warns(UserWarning, match=r"sample 1 \(prompt 'prompt 1'\)") as record:
        rewards = call_reward_funcs([first, second], prompts, images)
    assert "sample 0" not in str(record[0].message) and "sample 2" not in str(record[0].message)
    assert torch.isnan(rewards[1]).all()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call_reward_funcs([lambda **kw: [1.0, None, 2.0], lambda **kw: [None, 1.0, 2.0]], prompts, images)


def test_wrong_length_names_function():
    prompts, images = _batch(4)

    def xyz(prompts, images, **kwargs):
        return [1.0, 2.0, 3.0]

    with pytest.raises(ValueError, match="reward function 'xyz' returned 3 values for 4 samples"):
        call_reward_funcs([xyz], prompts, images)

    async def async_xyz(prompts, images, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="reward function 'async_xyz' returned 1 values for 4 samples"):
        call_reward_funcs([async_xyz], prompts, images)


def test_nan_names_function_and_sample():
    prompts, images = _batch(3)

    def nan_reward(prompts, images, **kwargs):
        return [1.0, float("nan"), 2.0]

    with pytest.raises(ValueError) as info:
        call_reward_funcs([nan_reward], prompts, images)
    message = str(info.value)
    assert "'nan_reward'" in message and "sample 1" in message and "None" in message

    class TensorNaN:
        def __call__(self, prompts, images, **kwargs):
            return torch.tensor([0.0, 0.0, float("nan")])

    with pytest.raises(ValueError, match=r"'TensorNaN'.*sample 2"):
        call_reward_funcs([TensorNaN()], prompts, images)


def test_non_numeric_and_wrong_type_name_function():
    prompts, images = _batch(2)

    def stringy(prompts, images, **kwargs):
        return [1.0, "good"]

    with pytest.raises(TypeError, match=r"'stringy'.*sample 1"):
        call_reward_funcs([stringy], prompts, images)

    def scalar(prompts, images, **kwargs):
        return 1.0

    with pytest.raises(TypeError, match="'scalar'"):
        call_reward_funcs([scalar], prompts, images)

    def text(prompts, images, **kwargs):
        return "12"

    with pytest.raises(TypeError, match="'text'"):
        call_reward_funcs([text], prompts, images)

    def matrix(prompts, images, **kwargs):
        return np.zeros((2, 2))

    with pytest.raises(ValueError, match="'matrix'"):
        call_reward_funcs([matrix], prompts, images)


def test_results_may_be_tuple_array_tensor_or_scalars():
    prompts, images = _batch(2)
    rewards = call_reward_funcs(
        [
            lambda **kw: (1, 2),
            lambda **kw: np.array([3.0, 4.0], dtype=np.float16),
            lambda **kw: torch.tensor([5.0, 6.0], dtype=torch.bfloat16, requires_grad=True),
            lambda **kw: [np.float32(7.0), torch.tensor(8.0)],
            lambda **kw: np.array([9.0, None], dtype=object),
        ],
        prompts,
        images,
    )
    assert rewards[:, :4].tolist() == [[1.0, 3.0, 5.0, 7.0], [2.0, 4.0, 6.0, 8.0]]
    assert rewards[0, 4] == 9.0 and math.isnan(rewards[1, 4])


def test_exception_inside_reward_func_propagates():
    prompts, images = _batch(2)

    def broken(prompts, images, **kwargs):
        raise RuntimeError("boom")

    async def never_awaited(prompts, images, **kwargs):
        return [0.0, 0.0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(RuntimeError, match="boom") as info:
            call_reward_funcs([never_awaited, broken], prompts, images)
    if hasattr(info.value, "__notes__"):
        assert any("'broken'" in note for note in info.value.__notes__)


def test_empty_batch():
    rewards = call_reward_funcs([jpeg_compressibility, lambda **kw: []], [], [])
    assert rewards.shape == (0, 2)
