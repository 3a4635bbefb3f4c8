"""Rewards overlapped with sampling (`overlap_rewards`): each micro-batch is scored in a worker thread while the next
one samples, with the same rewards, order, advantages and metrics as one call after sampling."""

from __future__ import annotations

import asyncio
import random
import time
import traceback

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from PIL import Image
from transformers import TrainerState

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.scoring import Scorer
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config

MICRO_BATCHES, MICRO_BATCH = 4, 4


def _args(tmp_path, **overrides) -> FlowGRPOConfig:
    return FlowGRPOConfig(output_dir=str(tmp_path), report_to="none", num_generations=4, **overrides)


def _micro_batches():
    """4 micro-batches of 4 samples (4 prompt groups of 4), each image a different colour."""
    batches = []
    for m in range(MICRO_BATCHES):
        rows = [{"prompt": f"prompt {m}", "_row": m, "index": m * MICRO_BATCH + i} for i in range(MICRO_BATCH)]
        images = [Image.new("RGB", (8, 8), (16 * row["index"], 3 * row["index"], 0)) for row in rows]
        batches.append((images, rows))
    return batches


def _score(scorer: Scorer, overlap: bool, between=None):
    """Submit the micro-batches as the trainer does (`between(m)` plays the sampling of the next one) and score."""
    state = TrainerState()
    stream = scorer.stream(state, overlap=overlap)
    images, rows = [], []
    for m, (batch_images, batch_rows) in enumerate(_micro_batches()):
        if between is not None:
            between(m)
        stream.submit(batch_images, batch_rows)
        images += batch_images
        rows += batch_rows
    return scorer.score(images, rows, Accelerator(cpu=True), 0, state, dataset=None, stream=stream)


def _value(image: Image.Image) -> float:
    return image.getpixel((0, 0))[0] / 255 + image.getpixel((0, 0))[1] / 7


def test_order_is_kept_with_rewards_that_sleep_random_amounts(tmp_path):
    jitter = random.Random(0)

    def sleepy(prompts, images, index, **kwargs):
        time.sleep(jitter.uniform(0.0, 0.03))
        return [_value(image) + i for image, i in zip(images, index)]

    async def sleepy_async(prompts, images, index, **kwargs):
        await asyncio.sleep(jitter.uniform(0.0, 0.03))
        return [-float(i) for i in index]

    def sampling(m):
        time.sleep(jitter.uniform(0.0, 0.03))

    scorer = Scorer([sleepy, sleepy_async], None, _args(tmp_path))
    sequential = _score(scorer, overlap=False)
    overlapped = _score(scorer, overlap=True, between=sampling)
    index = torch.arange(MICRO_BATCHES * MICRO_BATCH, dtype=torch.float32)
    assert torch.equal(overlapped.rewards[:, 1], -index)  # sample k's reward lands in row k
    assert torch.equal(overlapped.rewards, sequential.rewards)
    assert torch.equal(overlapped.advantages, sequential.advantages)
    timing = ("time/reward_s", "time/reward_wait_s")
    assert {k: v for k, v in overlapped.metrics.items() if k not in timing} == {
        k: v for k, v in sequential.metrics.items() if k not in timing
    }


def test_reward_time_is_hidden_behind_sampling(tmp_path):
    def slow(prompts, images, **kwargs):
        time.sleep(0.2)
        return [1.0] * len(prompts)

    scorer = Scorer([slow], None, _args(tmp_path))
    scores = _score(scorer, overlap=True, between=lambda m: time.sleep(0.3 if m else 0.0))
    assert scores.metrics["time/reward_s"] >= 4 * 0.2
    # Only the last micro-batch's call is left once the "sampling" is over (0.2 s); the first three were hidden.
    assert scores.metrics["time/reward_wait_s"] < 0.2 + 0.15


def test_an_exception_in_a_reward_propagates_with_its_traceback(tmp_path):
    def fails_on_the_second_micro_batch(prompts, images, index, **kwargs):
        if 5 in index:
            raise KeyError("sample 5 has no label")
        return [0.0] * len(prompts)

    scorer = Scorer([fails_on_the_second_micro_batch], None, _args(tmp_path))
    with pytest.raises(KeyError, match="sample 5 has no label") as error:
        _score(scorer, overlap=True, between=lambda m: time.sleep(0.05))
    frames = [frame.name for frame in traceback.extract_tb(error.value.__traceback__)]
    assert "fails_on_the_second_micro_batch" in frames  # the frame that raised, from the worker thread
    assert "(raised by reward function 'fails_on_the_second_micro_batch')" in error.value.__notes__


def test_timeout_and_non_finite_checks_still_apply(tmp_path):
    def stuck(prompts, images, **kwargs):
        time.sleep(3)
        return [0.0] * len(prompts)

    scorer = Scorer([stuck], None, _args(tmp_path, reward_timeout=0.2))
    with pytest.raises(TimeoutError, match=r"reward function 'stuck' did not return within reward_timeout=0.2 s"):
        _score(scorer, overlap=True)

    def nan_for_sample_9(prompts, images, index, **kwargs):
        return [float("nan") if i == 9 else 0.0 for i in index]

    with pytest.raises(ValueError, match="returned NaN for sample 1"):  # sample 1 of the third micro-batch
        _score(Scorer([nan_for_sample_9], None, _args(tmp_path)), overlap=True)


def test_whole_batch_rewards_are_called_once_after_sampling(tmp_path):
    sizes = {"per_sample": [], "ranked": []}

    def per_sample(prompts, images, index, log_extra, **kwargs):
        sizes["per_sample"].append(len(prompts))
        log_extra("index", list(index))
        return [float(i) for i in index]

    def ranked(prompts, images, index, **kwargs):  # the rank of each sample in the whole batch: needs all of it
        sizes["ranked"].append(len(prompts))
        order = sorted(range(len(index)), key=lambda k: -_value(images[k]))
        return [float(order.index(k)) for k in range(len(index))]

    ranked.whole_batch = True
    scorer = Scorer([per_sample, ranked], None, _args(tmp_path))
    sequential = _score(scorer, overlap=False)
    overlapped = _score(scorer, overlap=True)
    assert sizes == {"per_sample": [16, 4, 4, 4, 4], "ranked": [16, 16]}
    assert torch.equal(overlapped.rewards, sequential.rewards)
    assert overlapped.extra == sequential.extra == {"index": list(range(16))}  # one column over the micro-batches


def _train(tmp_path, overlap: bool):
    recorded = []

    def per_prompt(prompts, images, **kwargs):
        return [float(np.asarray(image.convert("L")).mean()) + len(p) for p, image in zip(prompts, images)]

    args = FlowGRPOConfig(
        output_dir=str(tmp_path / str(overlap)),
        report_to="none",
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        height=32,
        width=32,
        num_inference_steps=3,
        max_steps=2,
        max_sequence_length=16,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        logging_steps=1,
        seed=0,
        overlap_rewards=overlap,
    )
    dataset = Dataset.from_dict({"prompt": ["a red circle", "two blue squares", "a green triangle", "a star"]})
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(),
        ["jpeg_compressibility", per_prompt],
        args=args,
        train_dataset=dataset,
        peft_config=tiny_lora_config(),
    )
    score = trainer.scorer.score

    def recording(*args, **kwargs):
        scores = score(*args, **kwargs)
        recorded.append((scores.rewards.clone(), scores.advantages.clone()))
        return scores

    trainer.scorer.score = recording
    trainer.train()
    metrics = [
        {k: v for k, v in entry.items() if not k.startswith("time/") and "runtime" not in k and "per_second" not in k}
        for entry in trainer.state.log_history
    ]
    return recorded, metrics


def test_trainer_rewards_advantages_and_metrics_match_with_overlap_on_and_off(tmp_path):
    on, metrics_on = _train(tmp_path, overlap=True)
    off, metrics_off = _train(tmp_path, overlap=False)
    assert len(on) == len(off) == 2
    for (rewards_on, advantages_on), (rewards_off, advantages_off) in zip(on, off):
        assert torch.equal(rewards_on, rewards_off)
        assert torch.equal(advantages_on, advantages_off)
        assert rewards_on.shape == (8, 2)
    assert metrics_on == metrics_off
    assert "rewards/per_prompt/mean" in metrics_on[0]
