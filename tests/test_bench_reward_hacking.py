"""benchmarks/reward_hacking.py's tables: the task-only control, the excess drift over it and the target verdicts,
on synthetic runs (no training)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reward_hacking", ROOT / "benchmarks" / "reward_hacking.py")
rh = importlib.util.module_from_spec(_spec)
sys.modules["reward_hacking"] = rh
_spec.loader.exec_module(rh)


def _settings(hack_weight: float, seeds: list[int]) -> dict:
    return {
        "feature": "saturation",
        "hack_weight": hack_weight,
        "max_steps": 60,
        "images_per_prompt": 4,
        "num_captions": None,
        "seeds": seeds,
        "beta": 0.04,
        "hybrid_steps": [6],
    }


def _run(arm: str, seed: int, acc: float, drift: float) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "train_seconds": 60.0,
        "accuracy_change": {"value": acc, "low": acc - 0.05, "high": acc + 0.05},
        "accuracy_after": 0.2 + acc,
        "feature_after": 0.7 + drift,
        "feature_drift": drift,
    }


def _part(hack_weight: float, runs: list[dict]) -> dict:
    seeds = sorted({r["seed"] for r in runs})
    return {"settings": _settings(hack_weight, seeds), "num_captions": 141, "runs": runs}


def _row(text: str, arm: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_a_weight_zero_run_merges_as_the_control_and_gives_the_excess_drift():
    hacked = _part(
        0.1,
        [
            _run("flow_grpo", 0, 0.15, 0.10),
            _run("flow_grpo", 1, 0.15, 0.12),
            _run("hybrid, k 3", 0, 0.14, 0.075),
            _run("hybrid, k 3", 1, 0.14, 0.085),
        ],
    )
    control = _part(0.0, [_run("flow_grpo", 0, 0.15, 0.07), _run("flow_grpo", 1, 0.15, 0.09)])
    merged = rh.merge([control, hacked])  # the control first: the hack weight still comes from the hacked run
    assert merged["settings"]["hack_weight"] == 0.1
    assert [r["arm"] for r in merged["runs"]].count("task_only") == 2
    text = rh.table(merged)
    plain, hybrid = _row(text, "flow_grpo"), _row(text, "hybrid, k 3")
    assert plain[4].startswith("+0.0300")  # excess over the control, per seed 0.03 and 0.03
    assert hybrid[4].startswith("+0.0000") and hybrid[5] == "0.00"
    assert hybrid[3] == "0.73"  # total drift 0.08 / 0.11: the target is missed...
    assert "not met by any arm" in text.splitlines()[-2]
    assert "met by hybrid, k 3 (0.00x, -0.010 on seeds [0, 1])" in text.splitlines()[-1]  # ...the excess is removed


def test_columns_against_plain_pair_the_seeds():
    merged = rh.merge(
        [
            _part(0.1, [_run("flow_grpo", s, acc, 0.1) for s, acc in enumerate([0.10, 0.20, 0.30, 0.40])]),
            _part(0.1, [_run("hybrid, k 6", 0, 0.10, 0.04), _run("hybrid, k 6", 1, 0.19, 0.04)]),
        ]
    )
    row = _row(rh.table(merged), "hybrid, k 6")
    assert row[6] == "-0.005"  # against plain's seeds 0 and 1 (0.15), not its 4-seed mean (0.25)
    assert row[3] == "0.40"
    assert row[4] == "-"  # no control: no excess
    assert "met by hybrid, k 6." in rh.table(merged)


def test_a_weight_zero_run_of_another_arm_does_not_merge_as_a_control():
    hacked = _part(0.1, [_run("flow_grpo", 0, 0.15, 0.10)])
    leash = _part(0.0, [_run("kl_velocity", 0, 0.10, 0.05)])
    with pytest.raises(SystemExit, match="only as the task_only control"):
        rh.merge([hacked, leash])
    with pytest.raises(SystemExit, match="different hack_weight"):
        rh.merge([hacked, _part(0.2, [_run("flow_grpo", 1, 0.15, 0.10)])])
