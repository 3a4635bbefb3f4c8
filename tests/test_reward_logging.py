"""TRL's reward keywords `log_extra` / `log_metric`: passed to the reward functions that accept them, metrics averaged
into the logged metrics, extra columns kept per sample on `Scores.extra`."""

from __future__ import annotations

import asyncio

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from PIL import Image
from transformers import TrainerState

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer, scoring
from trl_flow_grpo.rewards import call_reward_funcs
from trl_flow_grpo.scoring import RewardLogs, Scorer
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config

PROMPTS = ["a red circle", "a red circle", "two blue squares", "two blue squares"]


def _args(tmp_path, **overrides) -> FlowGRPOConfig:
    return FlowGRPOConfig(output_dir=str(tmp_path), report_to="none", num_generations=2, **overrides)


def _batch():
    rows = [{"prompt": p, "_row": i // 2, "difficulty": i} for i, p in enumerate(PROMPTS)]
    images = [Image.new("RGB", (8, 8), (60 * i, 0, 0)) for i in range(len(rows))]
    return images, rows


def _score(scorer: Scorer):
    images, rows = _batch()
    return scorer.score(images, rows, Accelerator(cpu=True), 0, TrainerState(), dataset=None)


def test_metrics_are_averaged_and_extra_columns_kept_per_sample(tmp_path):
    def named(prompts, images, difficulty, log_extra, log_metric):  # names the keywords, no **kwargs
        log_extra("length", [len(p) for p in prompts])
        log_metric("named/calls", 1.0)
        log_metric("shared", 1.0)
        return [float(d) for d in difficulty]

    async def with_kwargs(prompts, images, **kwargs):
        kwargs["log_metric"]("shared", torch.tensor(4.0))  # a 0-d tensor is a scalar too
        kwargs["log_metric"]("shared", 7.0)
        kwargs["log_extra"]("tag", [f"#{i}" for i in range(len(prompts))])
        return [0.5] * len(prompts)

    seen = {}

    def plain(prompts, images, difficulty):  # names neither: gets neither
        seen["called"] = True
        return [0.0] * len(prompts)

    scores = _score(Scorer([named, with_kwargs, plain], None, _args(tmp_path)))
    assert seen == {"called": True}
    assert scores.metrics["named/calls"] == 1.0
    assert scores.metrics["shared"] == pytest.approx((1.0 + 4.0 + 7.0) / 3)  # the mean of every call
    assert scores.extra == {"length": [len(p) for p in PROMPTS], "tag": ["#0", "#1", "#2", "#3"]}
    assert scores.metrics["rewards/named/mean"] == pytest.approx(1.5)  # the rewards themselves are unaffected


def test_without_logging_nothing_is_added(tmp_path):
    scores = _score(Scorer(["jpeg_compressibility"], None, _args(tmp_path)))
    assert scores.extra == {}
    assert set(scores.metrics) == {
        "rewards/jpeg_compressibility/mean",
        "rewards/jpeg_compressibility/std",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "advantages/abs_mean",
        "advantages/abs_max",
        "time/reward_s",
        "time/reward_wait_s",
    }


@pytest.mark.parametrize(
    "log, error, match",
    [
        (lambda kw: kw["log_extra"]("col", [1, 2]), ValueError, r"got 2 values for a batch of 4 samples"),
        (lambda kw: kw["log_extra"]("col", "abcd"), TypeError, r"values must be a list"),
        (lambda kw: [kw["log_extra"]("col", [0] * 4) for _ in range(2)], ValueError, r"'col' was already logged"),
        (lambda kw: kw["log_extra"]("", [0] * 4), ValueError, r"non-empty string"),
        (lambda kw: kw["log_metric"]("m", float("nan")), ValueError, r"log_metric\('m', ...\).*finite number"),
        (lambda kw: kw["log_metric"]("m", "1.0"), ValueError, r"finite number, got '1.0'"),
        (lambda kw: kw["log_metric"]("m", True), ValueError, r"finite number, got True"),
        (lambda kw: kw["log_metric"]("reward", 1.0), ValueError, r"'reward' with log_metric.*the trainer logs itself"),
    ],
)
def test_bad_logging_calls_are_precise_errors(tmp_path, log, error, match):
    def reward(prompts, images, **kwargs):
        log(kwargs)
        return [0.0] * len(prompts)

    with pytest.raises(error, match=match):
        _score(Scorer([reward], None, _args(tmp_path)))


def test_logs_of_several_processes_are_combined(monkeypatch):
    """What `gather` does with two processes' logs (the other process simulated by the gathering)."""
    other = (3, {"seen": ["x", "y", "z"], "only_other": [1, 2, 3]}, {"m": (10.0, 2), "n": (5.0, 1)})
    monkeypatch.setattr(scoring, "gather_object", lambda local: [*local, other])
    logs = RewardLogs(2)
    logs.log_extra("seen", ["a", "b"])
    logs.log_metric("m", 2.0)
    metrics, extra = logs.gather()
    assert metrics == {"m": pytest.approx((2.0 + 10.0) / 3), "n": 5.0}  # weighted by calls, not by process
    assert extra == {"only_other": [None, None, 1, 2, 3], "seen": ["a", "b", "x", "y", "z"]}  # process order


def test_columns_named_like_the_logging_keywords_are_refused():
    images = [Image.new("RGB", (8, 8))] * 2
    for name in ("log_extra", "log_metric"):
        with pytest.raises(ValueError, match=f"column '{name}' clashes with a reserved"):
            call_reward_funcs(["jpeg_compressibility"], ["a", "b"], images, columns={name: [1, 2]})


def test_evaluate_logs_metrics_with_the_prefix_and_keeps_the_extra(tmp_path):
    def reward(prompts, images, log_extra, log_metric, **kwargs):
        log_metric("seen", float(len(prompts)))
        log_extra("prompt_again", list(prompts))
        return [1.0] * len(prompts)

    scorer = Scorer([reward], None, _args(tmp_path))
    images, rows = _batch()
    metrics, _ = scorer.evaluate(images, rows, TrainerState(), prefix="eval")
    assert metrics["eval_seen"] == 4.0
    assert scorer.last_eval_extra == {"prompt_again": PROMPTS}


def test_a_training_run_logs_the_reward_functions_metrics(tmp_path):
    calls = []

    async def logging_reward(prompts, images, log_metric, log_extra, trainer_state, **kwargs):
        await asyncio.sleep(0)
        log_metric("custom/step_seen", float(trainer_state.global_step))
        log_extra("prompt_length", [len(p) for p in prompts])
        calls.append(len(prompts))
        return [float(len(p)) for p in prompts]

    args = FlowGRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        height=32,
        width=32,
        num_inference_steps=2,
        max_steps=2,
        max_sequence_length=16,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        logging_steps=1,
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": ["a red circle", "two blue squares", "a green triangle", "one star"]})
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(), logging_reward, args=args, train_dataset=dataset, peft_config=tiny_lora_config()
    )
    trainer.train()
    assert calls == [4, 4, 4, 4]  # overlap_rewards: one call per micro-batch of 4, while the next one samples
    logged = [entry["custom/step_seen"] for entry in trainer.state.log_history if "custom/step_seen" in entry]
    assert logged == [0.0, 1.0]  # one value per optimizer step: the global step the reward saw
