"""Pref-GRPO in the trainer: pairs per group, symmetric queries, win-rate advantages mixed with rewards, metrics."""

import numpy as np
import pytest
import torch
from test_trainer import make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.advantages import compute_advantages
from trl_flow_grpo.rewards.preferences import ScalarPreference
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


class RecordingJudge:
    """Prefers the brighter image; records every query."""

    def __init__(self, first_always_wins: bool = False):
        self.queries: list[tuple[str, float, float]] = []
        self.first_always_wins = first_always_wins

    def __call__(self, prompts, images_a, images_b, **kwargs):
        a, b = brightness(images_a), brightness(images_b)
        self.queries.extend(zip(prompts, a, b))
        if self.first_always_wins:
            return [1.0] * len(prompts)
        return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(a, b)]


def make_trainer(tmp_path, reward_funcs=None, preference_funcs=None, **overrides):
    overrides.setdefault("max_steps", 1)
    return FlowGRPOTrainer(
        model=make_tiny_sd3_pipeline(seed=0),
        reward_funcs=reward_funcs,
        args=make_args(tmp_path, **overrides),
        train_dataset=prompt_dataset(),
        peft_config=tiny_lora_config(),
        preference_funcs=preference_funcs,
    )


def capture_advantages(trainer) -> list[torch.Tensor]:
    captured = []
    generate = trainer._generate_and_score

    def wrapped(batches):
        processed = generate(batches)
        captured.append(torch.cat([mb.advantages for mb in processed]).cpu())
        return processed

    trainer._generate_and_score = wrapped
    return captured


@pytest.mark.parametrize(
    "overrides, expected_queries",
    [({}, 2 * 6), ({"preference_symmetric": True}, 2 * 6 * 2), ({"preference_num_opponents": 1}, None)],
    ids=["all-pairs", "symmetric", "one-opponent"],
)
def test_each_group_is_compared_within_itself(tmp_path, overrides, expected_queries):
    judge = RecordingJudge()
    trainer = make_trainer(tmp_path, preference_funcs=judge, **overrides)
    trainer.train()
    # 2 prompts x 4 images per step: 6 unordered pairs per group.
    if expected_queries is not None:
        assert len(judge.queries) == expected_queries
    else:
        assert 2 * 2 <= len(judge.queries) <= 2 * 4
    assert {prompt for prompt, _, _ in judge.queries} <= set(prompt_dataset()["prompt"])
    log = next(entry for entry in trainer.state.log_history if "preferences/pairs" in entry)
    assert log["preferences/pairs"] == len(judge.queries)
    for key in ("win_rate_mean", "win_rate_std", "tie_fraction", "latency_s"):
        assert f"preferences/RecordingJudge/{key}" in log
    if "preference_num_opponents" not in overrides:
        assert log["preferences/RecordingJudge/win_rate_mean"] == pytest.approx(0.5)


def test_symmetric_queries_neutralise_a_position_biased_judge(tmp_path):
    judge = RecordingJudge(first_always_wins=True)
    trainer = make_trainer(tmp_path, preference_funcs=judge, preference_symmetric=True)
    captured = capture_advantages(trainer)
    trainer.train()
    assert torch.equal(captured[0], torch.zeros(8))
    log = next(entry for entry in trainer.state.log_history if "preferences/pairs" in entry)
    assert log["preferences/RecordingJudge/tie_fraction"] == 1.0


@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("bessel", [False, True])
def test_win_rate_std_scope_and_bessel_correction_reach_the_advantages(tmp_path, scope, bessel):
    # A strict brightness ranking within each group of 4 gives win rates 0, 1/3, 2/3, 1 in both groups (all pairs).
    trainer = make_trainer(
        tmp_path, preference_funcs=RecordingJudge(), preference_std_scope=scope, preference_std_bessel=bessel
    )
    captured = capture_advantages(trainer)
    trainer.train()
    rates = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    pool = rates if scope == "group" else torch.cat([rates, rates])  # the batch holds both groups' rates
    expected = (rates - 0.5) / (pool.std(unbiased=bessel) + 1e-8)
    torch.testing.assert_close(captured[0].sort().values, torch.cat([expected, expected]).sort().values)


def test_win_rate_and_reward_advantages_are_mixed_with_their_weights(tmp_path):
    scores: list[float] = []

    def recorded_brightness(images, **kwargs):
        values = brightness(images)
        scores.extend(values)
        return values

    trainer = make_trainer(
        tmp_path,
        reward_funcs=recorded_brightness,
        preference_funcs=ScalarPreference(brightness),
        reward_weights=[0.4],
        preference_weights=[0.6],
    )
    captured = capture_advantages(trainer)
    trainer.train()
    rewards = torch.tensor(scores)
    group_ids = torch.arange(2).repeat_interleave(4)  # the sampler yields each prompt 4 times in a row
    # sum_then_normalize: the weighted reward sum is normalised, then carries the reward weights' total (0.4).
    grpo = compute_advantages(rewards[:, None], group_ids, torch.tensor([0.4])).advantages
    # Hard verdicts of the same scores: the win rate is the rank within the group, standardised.
    expected_pref = torch.zeros(8)
    for g in range(2):
        ranks = rewards[4 * g : 4 * g + 4].argsort().argsort().float()
        expected_pref[4 * g : 4 * g + 4] = (ranks - ranks.mean()) / ranks.std(unbiased=False)
    torch.testing.assert_close(captured[0], 0.4 * grpo + 0.6 * expected_pref, atol=1e-5, rtol=0)


def test_reward_named_preference_uses_the_config_temperature_and_margin(tmp_path):
    trainer = make_trainer(
        tmp_path,
        preference_funcs="jpeg_compressibility",
        preference_temperature=0.5,
        preference_tie_margin=0.01,
    )
    (func,) = trainer.preference_funcs
    assert isinstance(func, ScalarPreference)
    assert (func.temperature, func.tie_margin) == (0.5, 0.01)
    assert trainer.preference_func_names == ["pref_jpeg_compressibility"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="at least one reward function"):
        make_trainer(tmp_path)
    with pytest.raises(ValueError, match="preference_weights has 2 values but there are 1"):
        make_trainer(tmp_path, preference_funcs=RecordingJudge(), preference_weights=[1.0, 2.0])
    trainer = make_trainer(tmp_path, preference_funcs=RecordingJudge())
    with pytest.raises(ValueError, match="only preference functions"):
        trainer.evaluate(prompt_dataset())
