"""Tests for trl_flow_grpo.sampling.windows (pure window schedules) and the window fields of FlowGRPOConfig."""

import math
import random

import pytest
import torch
import transformers

from trl_flow_grpo import FlowGRPOConfig
from trl_flow_grpo.sampling.windows import (
    WINDOW_TYPES,
    SDEWindow,
    WindowSchedule,
    default_window_range,
    full_window,
    random_window_start,
    shift_interval_at,
    sliding_window_positions,
    sliding_window_start,
)


def make_config(tmp_path, **kwargs) -> FlowGRPOConfig:
    return FlowGRPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# full (Flow-GRPO)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, fraction, size", [(10, 0.99, 9), (25, 0.99, 24), (100, 0.29, 29), (4, 1.0, 4)])
def test_full_window_is_the_first_floor_t_fraction_steps(steps, fraction, size):
    window = full_window(steps, fraction)
    assert window == SDEWindow(0, size)
    assert window.steps == list(range(size)) and window.end == size


def test_full_schedule_matches_the_config_and_ignores_the_iteration(tmp_path):
    config = make_config(tmp_path, num_inference_steps=25)
    schedule = WindowSchedule.from_config(config)
    assert config.sde_window == "full"
    assert all(schedule.for_iteration(i) == SDEWindow(0, config.num_sde_steps) for i in (0, 1, 7, 10_000))


# ---------------------------------------------------------------------------------------------------------------------
# random (Flow-GRPO-Fast)
# ---------------------------------------------------------------------------------------------------------------------


def test_random_start_stays_in_range_covers_it_and_is_a_pure_function():
    starts = [random_window_start(i, seed=0, size=3, range_start=1, range_end=12) for i in range(400)]
    assert set(starts) == set(range(1, 10))  # [range_start, range_end - size], both ends included
    # Pure: no global RNG state is used, so every process (and a resumed run) draws the same start.
    torch.manual_seed(123)
    random.seed(456)
    assert starts == [random_window_start(i, seed=0, size=3, range_start=1, range_end=12) for i in range(400)]
    other_seed = [random_window_start(i, seed=1, size=3, range_start=1, range_end=12) for i in range(400)]
    assert other_seed != starts


def test_random_start_is_roughly_uniform():
    counts = [0] * 5
    for i in range(5000):
        counts[random_window_start(i, seed=3, size=2, range_start=0, range_end=6)] += 1
    assert all(800 < c < 1200 for c in counts), counts


def test_random_window_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="does not fit"):
        random_window_start(0, seed=0, size=4, range_start=0, range_end=3)


# ---------------------------------------------------------------------------------------------------------------------
# sliding (MixGRPO)
# ---------------------------------------------------------------------------------------------------------------------


def test_sliding_positions_keep_whole_windows():
    assert sliding_window_positions(size=2, range_start=0, range_end=6, stride=1) == [0, 1, 2, 3, 4]
    assert sliding_window_positions(size=2, range_start=1, range_end=8, stride=2) == [1, 3, 5]
    assert sliding_window_positions(size=4, range_start=0, range_end=4, stride=3) == [0]
    with pytest.raises(ValueError, match="does not fit"):
        sliding_window_positions(size=5, range_start=0, range_end=4, stride=1)


def test_sliding_constant_schedule_rolls_back():
    kwargs = dict(size=2, range_start=0, range_end=6, stride=1, shift_interval=3)
    starts = [sliding_window_start(i, **kwargs) for i in range(18)]
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 0, 0, 0]
    held = [sliding_window_start(i, roll_back=False, **kwargs) for i in (14, 15, 1000)]
    assert held == [4, 4, 4]


def test_sliding_at_the_paper_settings():
    # MixGRPO: T = 25, w = 4, shift interval 25, stride 1, over steps [0, T - 2).
    kwargs = dict(size=4, range_start=0, range_end=23, stride=1, shift_interval=25)
    for iteration in range(0, 1200, 7):
        expected = (iteration // 25) % 20  # starts 0..19: the window [s, s + 4) ends at most at 23
        assert sliding_window_start(iteration, **kwargs) == expected, iteration


def test_sliding_stride_and_range_start():
    kwargs = dict(size=2, range_start=2, range_end=9, stride=2, shift_interval=1)
    assert [sliding_window_start(i, **kwargs) for i in range(8)] == [2, 4, 6, 2, 4, 6, 2, 4]


def test_shift_interval_schedules():
    assert [shift_interval_at(o, 20, 25) for o in (0, 10, 19)] == [25, 25, 25]
    linear = [shift_interval_at(o, 20, 10, "linear_decay", min_shift_interval=1) for o in range(20)]
    assert linear[0] == 10 and all(a >= b for a, b in zip(linear, linear[1:])) and min(linear) >= 1
    assert linear[10] == math.floor(10 * 0.5 + 1 * 0.5)
    exp = [shift_interval_at(o, 23, 25, "exp_decay", decay_rate=0.1, decay_threshold=13) for o in range(23)]
    assert exp[:14] == [25] * 14
    assert exp[14:] == [max(1, math.ceil(25 * math.exp(-0.1 * (o - 13)) - 1e-9)) for o in range(14, 23)]
    assert exp[14] == 23 and exp[22] == 11
    with pytest.raises(ValueError, match="schedule"):
        shift_interval_at(0, 10, 5, "cosine")


@pytest.mark.parametrize("schedule", ["linear_decay", "exp_decay"])
def test_decaying_schedules_spend_their_intervals_in_order_and_cycle(schedule):
    kwargs = dict(size=2, range_start=0, range_end=8, stride=1, shift_interval=4, schedule=schedule)
    kwargs |= dict(min_shift_interval=1, decay_rate=0.5, decay_threshold=2)
    positions = sliding_window_positions(2, 0, 8, 1)
    intervals = [shift_interval_at(p, 8, 4, schedule, 1, 0.5, 2) for p in positions]
    expected = [p for p, n in zip(positions, intervals) for _ in range(n)]
    cycle = len(expected)
    starts = [sliding_window_start(i, **kwargs) for i in range(2 * cycle)]
    assert starts == expected + expected
    assert cycle < 4 * len(positions)  # the decay made the cycle shorter than a constant interval would
    assert sliding_window_start(10 * cycle + 5, roll_back=False, **kwargs) == positions[-1]


# ---------------------------------------------------------------------------------------------------------------------
# frozen, schedule object, invariants
# ---------------------------------------------------------------------------------------------------------------------


def test_frozen_window_stays_at_the_start_of_its_range():
    schedule = WindowSchedule("frozen", num_steps=25, size=3, range_start=2, range_end=23)
    assert {schedule.for_iteration(i) for i in range(100)} == {SDEWindow(2, 3)}


@pytest.mark.parametrize("kind", WINDOW_TYPES)
def test_every_window_fits_its_range_and_the_grid(kind):
    size = 24 if kind == "full" else 3
    schedule = WindowSchedule(kind, num_steps=25, size=size, shift_interval=2, seed=5)
    start, end = (0, 25) if kind == "full" else default_window_range(kind, 25)
    assert (schedule.range_start, schedule.range_end) == (start, end)
    for iteration in range(300):
        window = schedule.for_iteration(iteration)
        assert window.size == size
        assert start <= window.start and window.end <= end <= 25
        assert window == schedule.for_iteration(iteration)  # deterministic


def test_window_schedule_validates():
    with pytest.raises(ValueError, match="Unknown window"):
        WindowSchedule("progressive", num_steps=10, size=2)
    with pytest.raises(ValueError, match="does not fit"):
        WindowSchedule("sliding", num_steps=10, size=4, range_start=0, range_end=3)
    with pytest.raises(ValueError, match="size"):
        WindowSchedule("random", num_steps=10, size=0)


# ---------------------------------------------------------------------------------------------------------------------
# config fields
# ---------------------------------------------------------------------------------------------------------------------


def test_config_defaults_keep_flow_grpo(tmp_path):
    config = make_config(tmp_path)
    assert (config.sde_window, config.ode_solver, config.ode_compression) == ("full", "euler", 1.0)
    assert config.sde_window_size is None and config.sde_window_range is None
    assert config.num_sde_steps == 9


@pytest.mark.parametrize(
    "kind, size, window_range", [("random", 2, [0, 12]), ("sliding", 4, [0, 23]), ("frozen", 4, [0, 23])]
)
def test_config_fills_in_window_defaults(tmp_path, kind, size, window_range):
    config = make_config(tmp_path, num_inference_steps=25, sde_window=kind)
    assert config.sde_window_size == size == config.num_sde_steps
    assert config.sde_window_range == window_range
    schedule = WindowSchedule.from_config(config)
    assert (schedule.kind, schedule.size, schedule.range_start, schedule.range_end) == (kind, size, *window_range)


INVALID = [
    ({"sde_window": "progressive"}, "sde_window"),
    ({"sde_window_schedule": "cosine", "sde_window": "sliding"}, "sde_window_schedule"),
    ({"ode_solver": "heun"}, "ode_solver"),
    ({"ode_compression": 0.0}, "ode_compression"),
    ({"ode_compression": 1.5}, "ode_compression"),
    ({"sde_window_size": 3}, "sde_window_size"),  # no effect with the full window
    ({"sde_window_range": [0, 5]}, "sde_window_range"),
    ({"sde_window": "sliding", "sde_window_size": 30}, "sde_window_size"),
    ({"sde_window": "sliding", "sde_window_size": 0}, "sde_window_size"),
    ({"sde_window": "sliding", "sde_window_range": [5, 3]}, "sde_window_range"),
    ({"sde_window": "sliding", "sde_window_range": [0, 30]}, "sde_window_range"),
    ({"sde_window": "random", "sde_window_range": [0]}, "sde_window_range"),
    ({"sde_window": "random", "sde_window_size": 4, "sde_window_range": [0, 3]}, "sde_window_range"),
    ({"sde_window": "sliding", "sde_window_shift_interval": 0}, "sde_window_shift_interval"),
    ({"sde_window": "sliding", "sde_window_stride": 0}, "sde_window_stride"),
    ({"sde_window": "sliding", "sde_window_min_shift_interval": 0}, "sde_window_min_shift_interval"),
    ({"sde_window": "sliding", "sde_window_decay_rate": -1.0}, "sde_window_decay_rate"),
]


@pytest.mark.parametrize("kwargs, name", INVALID, ids=[f"{n}={list(k.values())[-1]}" for k, n in INVALID])
def test_invalid_window_fields_raise_naming_the_field(tmp_path, kwargs, name):
    with pytest.raises(ValueError) as excinfo:
        make_config(tmp_path, num_inference_steps=25, **kwargs)
    assert name in str(excinfo.value)


def test_window_larger_than_the_default_range_says_how_to_fix_it(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        make_config(tmp_path, num_inference_steps=4, sde_window="sliding")
    message = str(excinfo.value)
    assert "sde_window_size=4" in message and "sde_window_range=[0, 2)" in message and "lower" in message


def test_hf_argument_parser_parses_window_fields(tmp_path):
    parser = transformers.HfArgumentParser(FlowGRPOConfig)
    args = ["--output_dir", str(tmp_path), "--report_to", "none", "--num_inference_steps", "25"]
    args += ["--sde_window", "sliding", "--sde_window_size", "3", "--sde_window_range", "2", "20"]
    args += ["--sde_window_schedule", "exp_decay", "--ode_solver", "dpm_solver++_2m", "--ode_compression", "0.4"]
    args += ["--no_sde_window_roll_back"]
    (config,) = parser.parse_args_into_dataclasses(args)
    assert (config.sde_window, config.sde_window_size, config.sde_window_range) == ("sliding", 3, [2, 20])
    assert (config.sde_window_schedule, config.ode_solver, config.ode_compression) == (
        "exp_decay",
        "dpm_solver++_2m",
        0.4,
    )
    assert config.sde_window_roll_back is False
