"""End-to-end tests of `FlowGRPOTrainer` on the tiny offline SD3 pipeline (CPU, a few seconds in all)."""

import asyncio
import io
import os

import diffusers
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.utils.checkpoint
from datasets import Dataset
from diffusers import SD3Transformer2DModel
from PIL import Image

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo import flow_grpo_trainer as trainer_module
from trl_flow_grpo.data import GroupSampler
from trl_flow_grpo.sampling import rollout
from trl_flow_grpo.sampling import sampler as sampler_module
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "one yellow star"]
FROZEN = ("vae", "text_encoder", "text_encoder_2")


def make_args(tmp_path, **overrides) -> FlowGRPOConfig:
    """A tiny configuration: 8 images (2 prompts x 4) per optimizer step, in 2 micro-batches of 4, 32 px, 4 steps."""
    kwargs = dict(
        output_dir=str(tmp_path),
        report_to="none",
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        height=32,
        width=32,
        num_inference_steps=4,
        eval_num_inference_steps=2,
        max_steps=2,
        max_sequence_length=16,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    kwargs.update(overrides)
    return FlowGRPOConfig(**kwargs)


def prompt_dataset(**extra_columns) -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS, **extra_columns})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def lora_params(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in transformer.named_parameters() if "lora_" in name}


def assert_same_state(module: torch.nn.Module, before: dict[str, torch.Tensor], name: str = "") -> None:
    after = module.state_dict()
    assert after.keys() == before.keys(), name
    changed = [key for key in before if not torch.equal(before[key], after[key].cpu())]
    assert not changed, f"{name}: {changed[:5]} changed"


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def has_adapter(transformer: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in transformer.named_parameters())


def record_log_probs(monkeypatch, trainer) -> list[dict]:
    """Record, for every `training_step` call, the stored (rollout) log-probs and the recomputed (policy) ones.

    The policy's `step_log_prob` calls are told apart from the reference's by grad mode (the reference runs under
    `torch.no_grad`).
    """
    records: list[dict] = []
    original_step_log_prob = trainer_module.step_log_prob

    def step_log_prob(*args, **kwargs):
        out = original_step_log_prob(*args, **kwargs)
        if torch.is_grad_enabled():
            records[-1]["recomputed"].append(out[0].detach().clone())
        return out

    monkeypatch.setattr(trainer_module, "step_log_prob", step_log_prob)
    original_training_step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        records.append(
            {
                "step": trainer.state.global_step,
                "inputs": inputs,
                "stored": inputs.log_probs.detach().clone(),
                "recomputed": [],
            }
        )
        return original_training_step(model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", training_step)
    return records


def count_rollouts(monkeypatch) -> list[torch.Tensor]:
    """Record the initial noise of every `rollout` the trainer runs (one call per rollout micro-batch)."""
    calls: list[torch.Tensor] = []
    original = sampler_module.rollout

    def wrapped(adapter, transformer, cond, sigmas, noise, **kwargs):
        trajectory = original(adapter, transformer, cond, sigmas, noise, **kwargs)
        calls.append(trajectory)
        return trajectory

    monkeypatch.setattr(sampler_module, "rollout", wrapped)
    return calls


# ---------------------------------------------------------------------------------------------------- 1. LoRA e2e
def test_lora_training_updates_only_the_adapter_and_logs_metrics(tmp_path):
    pipe = make_tiny_sd3_pipeline()
    frozen_before = {name: snapshot(getattr(pipe, name)) for name in FROZEN}
    base_before = snapshot(pipe.transformer)
    args = make_args(tmp_path, beta=0.04)
    trainer = FlowGRPOTrainer(
        pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    lora_before = lora_params(pipe.transformer)
    assert lora_before, "no LoRA parameters were added"
    assert all(p.requires_grad for n, p in pipe.transformer.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in pipe.transformer.named_parameters() if "lora_" not in n)

    trainer.train()

    assert trainer.state.global_step == 2
    lora_after = lora_params(pipe.transformer)
    changed = [name for name in lora_before if not torch.equal(lora_before[name], lora_after[name])]
    assert changed, "no LoRA weight changed"
    # The LoRA B matrices start at zero; every one of them receives a gradient, except the text-stream query of the
    # last block, whose output SD3 discards (`context_pre_only`).
    last = pipe.transformer.config.num_layers - 1
    dead = f"transformer_blocks.{last}.attn.add_q_proj.lora_B"
    assert sorted(n for n in lora_before if "lora_B" in n and n not in changed) == [f"{dead}.default.weight"]
    # The base weights of the transformer are untouched (only the adapter is trained).
    after = pipe.transformer.state_dict()
    for key, value in base_before.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        current = after[key] if key in after else after[peft_key]
        assert torch.equal(value, current.cpu()), key
    for name in FROZEN:
        module = getattr(pipe, name)
        assert_same_state(module, frozen_before[name], name)
        assert not any(p.requires_grad for p in module.parameters()), name
        assert not module.training, name

    history = trainer.state.log_history
    for key in (
        "loss",
        "grad_norm",
        "reward",
        "reward_std",
        "rewards/jpeg_compressibility/mean",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio/region_mean",
    ):
        values = logged(trainer, key)
        assert len(values) == 2, (key, history)
        assert all(isinstance(v, float) and v == v for v in values), (key, values)
    # jpeg_compressibility is minus a JPEG size: negative; the adapter starts as a no-op, so the first KL is 0.
    assert all(v < 0 for v in logged(trainer, "rewards/jpeg_compressibility/mean"))
    assert logged(trainer, "kl")[0] == 0.0
    assert logged(trainer, "kl")[1] > 0.0
    assert logged(trainer, "num_images") == [8.0, 16.0]


# ------------------------------------------------------------------------------------------ 2. ratio is exactly 1
@pytest.mark.parametrize("train_cfg", [True, False], ids=["cfg", "no_cfg"])
def test_on_policy_ratio_is_exactly_one(tmp_path, monkeypatch, train_cfg):
    pipe = make_tiny_sd3_pipeline()
    args = make_args(tmp_path, train_cfg=train_cfg, guidance_scale=4.5, beta=0.04, learning_rate=1e-2)
    trainer = FlowGRPOTrainer(
        pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    assert trainer.rollout_guidance == (4.5 if train_cfg else 1.0)
    records = record_log_probs(monkeypatch, trainer)

    trainer.train()

    # 2 optimizer steps x 2 micro-batches, each with num_sde_steps recorded steps; with num_iterations=1 every
    # step trains on fresh samples of the current policy, so every ratio is exactly 1.
    assert len(records) == 4
    assert [r["step"] for r in records] == [0, 0, 1, 1]
    for record in records:
        assert len(record["recomputed"]) == args.num_sde_steps == record["stored"].shape[1]
        for k, log_prob in enumerate(record["recomputed"]):
            assert torch.equal(log_prob, record["stored"][:, k]), (record["step"], k)
    assert logged(trainer, "ratio/mean") == [1.0, 1.0]
    assert logged(trainer, "approx_kl_old") == [0.0, 0.0]


def test_num_iterations_reuses_samples_off_policy(tmp_path, monkeypatch):
    pipe = make_tiny_sd3_pipeline()
    args = make_args(tmp_path, num_iterations=2, max_steps=3, beta=0.0, learning_rate=1e-2)
    trainer = FlowGRPOTrainer(
        pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    records = record_log_probs(monkeypatch, trainer)
    rollouts = count_rollouts(monkeypatch)

    trainer.train()

    assert [r["step"] for r in records] == [0, 0, 1, 1, 2, 2]
    first, second, third = records[0:2], records[2:4], records[4:6]
    # Step 0: on-policy, exactly 1.
    for record in first:
        for k, log_prob in enumerate(record["recomputed"]):
            assert torch.equal(log_prob, record["stored"][:, k])
    # Step 1: the very same samples (same stored tensors), but the policy has moved: off-policy.
    for a, b in zip(first, second):
        assert a["inputs"] is b["inputs"]
        assert torch.equal(a["stored"], b["stored"])
    off_policy = [
        torch.equal(log_prob, record["stored"][:, k])
        for record in second
        for k, log_prob in enumerate(record["recomputed"])
    ]
    assert not all(off_policy), "the second iteration on the same samples still gives ratio 1"
    # Step 2: fresh samples again, on-policy.
    for record in third:
        assert record["inputs"] is not first[0]["inputs"] and record["inputs"] is not first[1]["inputs"]
        for k, log_prob in enumerate(record["recomputed"]):
            assert torch.equal(log_prob, record["stored"][:, k])

    # Rollouts ran for steps 0 and 2 only (2 micro-batches each); `num_images` only grows when sampling.
    assert len(rollouts) == 4
    by_step = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert by_step[1]["num_images"] == 8.0
    assert by_step[2].get("num_images", 8.0) == 8.0
    assert by_step[3]["num_images"] == 16.0
    assert by_step[2]["ratio/mean"] != 1.0 or by_step[2]["approx_kl_old"] > 0


def test_per_step_ratio_metrics_and_eval_reward_gap(tmp_path):
    args = make_args(tmp_path, max_steps=2, num_iterations=2, beta=0.0, learning_rate=1e-2)
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(),
        "jpeg_compressibility",
        args=args,
        train_dataset=prompt_dataset(),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
        peft_config=tiny_lora_config(),
    )
    trainer.train()

    steps = list(range(args.num_sde_steps))  # the full window: grid steps 0 .. 2 of 4
    first, second = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert not any(key.startswith(f"ratio/step_{len(steps)}/") for key in first)
    for k in steps:
        # Step 1 is on-policy: every ratio is exactly 1. Step 2 reuses the samples after an update.
        assert first[f"ratio/step_{k}/mean"] == 1.0 and first[f"ratio/step_{k}/std"] == 0.0
        assert second[f"ratio/step_{k}/std"] > 0.0
    # The per-step means average to the overall mean (every step has the same number of samples).
    overall = np.mean([second[f"ratio/step_{k}/mean"] for k in steps])
    assert second["ratio/mean"] == pytest.approx(overall, rel=1e-6)

    metrics = trainer.evaluate()
    # The newest training reward is that of the first (only) generation batch.
    assert metrics["eval_reward_gap"] == pytest.approx(metrics["eval_reward"] - first["reward"], rel=1e-6)
    assert logged(trainer, "eval_reward_gap") == [metrics["eval_reward_gap"]]


def test_eval_reward_gap_needs_a_training_reward(tmp_path):
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(),
        "jpeg_compressibility",
        args=make_args(tmp_path),
        train_dataset=prompt_dataset(),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
        peft_config=tiny_lora_config(),
    )
    assert "eval_reward_gap" not in trainer.evaluate()  # no training batch yet: nothing to compare with


def test_grpo_guard_trains_on_policy_with_ratio_one_and_records_the_means(tmp_path, monkeypatch):
    pipe = make_tiny_sd3_pipeline()
    args = make_args(tmp_path, loss_type="grpo_guard", beta=0.04, learning_rate=1e-2)
    trainer = FlowGRPOTrainer(
        pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    records = record_log_probs(monkeypatch, trainer)
    lora_before = lora_params(pipe.transformer)

    trainer.train()

    for record in records:
        batch = record["inputs"]
        assert batch.means is not None and batch.means.shape == batch.latents.shape
        assert batch.means.dtype == torch.float32
    assert logged(trainer, "ratio/mean") == [1.0, 1.0]
    assert all(v == 1.0 for k in range(args.num_sde_steps) for v in logged(trainer, f"ratio/step_{k}/mean"))
    lora_after = lora_params(pipe.transformer)
    assert any(not torch.equal(lora_before[name], lora_after[name]) for name in lora_before)
    # On-policy the loss of step k is -mean(A) / (-dt_k) plus the KL; the advantages of a group sum to 0, so the
    # logged policy part is ~0 (a nonzero KL after the first update only adds to it).
    assert all(abs(v) < 1.0 for v in logged(trainer, "loss"))


def test_grpo_guard_off_policy_batch_without_means_raises(tmp_path):
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(),
        "jpeg_compressibility",
        args=make_args(tmp_path, max_steps=1),
        train_dataset=prompt_dataset(),
        peft_config=tiny_lora_config(),
    )
    groups = [[{"prompt": PROMPTS[i], "_row": i}] * 4 for i in range(2)]  # two whole groups, one per micro-batch
    batch = trainer._generate_and_score(groups)[0]
    assert batch.means is None  # flow_grpo does not record them
    trainer.args.loss_type = "grpo_guard"
    with pytest.raises(ValueError, match="needs the sampling policy's step means"):
        trainer._step_loss(trainer.model, batch.to(trainer.accelerator.device), 0, batch.step_indices[0])


def test_trl_generation_batch_size_samples_once_per_optimizer_step(tmp_path, monkeypatch):
    """A TRL-style `generation_batch_size` (here one optimizer step's 8 images) trains like the default: every step
    samples its own 2 micro-batches of 4 images and trains on each of them once."""
    pipe = make_tiny_sd3_pipeline()
    args = make_args(tmp_path, generation_batch_size=8, beta=0.0)
    assert args.steps_per_generation == args.gradient_accumulation_steps == 2
    trainer = FlowGRPOTrainer(
        pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    records = record_log_probs(monkeypatch, trainer)
    rollouts = count_rollouts(monkeypatch)

    trainer.train()

    assert [r["step"] for r in records] == [0, 0, 1, 1]
    assert len({id(r["inputs"]) for r in records}) == 4  # fresh samples for every micro-batch of every step
    assert [trajectory.latents.shape[0] for trajectory in rollouts] == [4, 4, 4, 4]
    assert [entry["num_images"] for entry in trainer.state.log_history if "loss" in entry] == [8.0, 16.0]


def test_generation_batch_fields_changed_after_the_config_raise_at_construction(tmp_path):
    pipe = make_tiny_sd3_pipeline()
    args = make_args(tmp_path)
    args.gradient_accumulation_steps = 4  # generation_batch_size and steps_per_generation were filled in for 2
    with pytest.raises(ValueError, match=r"generation_batch_size=8 \(steps_per_generation=2\).*= 16 images"):
        FlowGRPOTrainer(pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset())
    assert not has_adapter(pipe.transformer)


# -------------------------------------------------------------------------------- 3. LoRA round trip via diffusers
def test_saved_lora_reproduces_trainer_samples_in_plain_diffusers(tmp_path):
    pipe = make_tiny_sd3_pipeline(seed=0)
    args = make_args(tmp_path, learning_rate=1e-2, beta=0.0, max_steps=2)
    trainer = FlowGRPOTrainer(
        pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    trainer.train()
    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    pipe.to("cpu")  # compare on the CPU (training may have run on a GPU)

    loaded = make_tiny_sd3_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    base = make_tiny_sd3_pipeline(seed=0)

    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    steps, prompt = 4, "a green triangle"
    noise = torch.randn((1, *trainer.adapter.latent_shape(32, 32)), generator=torch.Generator().manual_seed(123))
    sigmas = trainer.adapter.sigmas(steps, 32, 32, torch.device("cpu"))
    for guidance in (1.0, 4.5):
        cond = trainer.adapter.encode_prompts([prompt], torch.device("cpu"), guidance > 1, 16)
        ours = rollout(
            trainer.adapter,
            transformer,
            cond,
            sigmas,
            noise.clone(),
            sde_steps=[],
            noise_level=0.7,
            sde_type="sde",
            guidance_scale=guidance,
        ).final_latents
        call = dict(
            latents=noise.clone(),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=32,
            width=32,
            output_type="latent",
            max_sequence_length=16,
        )
        theirs = loaded(prompt, **call).images
        reference = base(prompt, **call).images
        assert theirs.shape == ours.shape
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        # The adapter really changes the samples (otherwise the comparison above proves nothing).
        assert (theirs - reference).abs().max() > 1e-2, guidance


# ------------------------------------------------------------------------------------------ 4. full fine-tuning
def test_full_fine_tuning_trains_saves_and_keeps_reference_frozen(tmp_path):
    pipe = make_tiny_sd3_pipeline()
    initial = snapshot(pipe.transformer)
    frozen_before = {name: snapshot(getattr(pipe, name)) for name in FROZEN}
    args = make_args(tmp_path, beta=0.04, max_steps=2)
    trainer = FlowGRPOTrainer(pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset())
    assert not trainer.is_lora and not has_adapter(pipe.transformer)
    assert trainer.ref_transformer is not None and trainer.ref_transformer is not pipe.transformer
    assert all(p.requires_grad for p in pipe.transformer.parameters())

    trainer.train()

    after = pipe.transformer.state_dict()
    changed = [key for key in initial if not torch.equal(initial[key], after[key].cpu())]
    assert len(changed) > len(initial) // 2, f"only {len(changed)} of {len(initial)} tensors changed"
    assert_same_state(trainer.ref_transformer, initial, "ref_transformer")
    assert not any(p.requires_grad for p in trainer.ref_transformer.parameters())
    for name in FROZEN:
        assert_same_state(getattr(pipe, name), frozen_before[name], name)
    assert logged(trainer, "kl")[-1] > 0

    trainer.save_model()
    assert os.path.isdir(tmp_path / "transformer")
    reloaded = SD3Transformer2DModel.from_pretrained(str(tmp_path), subfolder="transformer")
    assert_same_state(reloaded, snapshot(pipe.transformer), "reloaded transformer")


# ------------------------------------------------------------------------------------------------- 5. errors
@pytest.mark.parametrize(
    "case, match",
    [
        ("no_prompt_column", r"'prompt' column.*\['caption', 'label'\]"),
        ("not_flow_matching", "FlowMatchEulerDiscreteScheduler"),
        ("too_few_prompts", "1 prompts.*needs 2"),
        ("reward_weights_length", r"reward_weights has 2 values but there are 1 reward functions"),
    ],
)
def test_invalid_inputs_raise_at_construction(tmp_path, case, match):
    pipe = make_tiny_sd3_pipeline()
    args = make_args(tmp_path, reward_weights=[1.0, 2.0] if case == "reward_weights_length" else None)
    dataset = prompt_dataset()
    if case == "no_prompt_column":
        dataset = Dataset.from_dict({"caption": PROMPTS, "label": [0, 1, 2, 3]})
    elif case == "not_flow_matching":
        pipe.scheduler = diffusers.EulerDiscreteScheduler()
    elif case == "too_few_prompts":
        dataset = Dataset.from_dict({"prompt": PROMPTS[:1]})
    before = snapshot(pipe.transformer)

    with pytest.raises(ValueError, match=match):
        FlowGRPOTrainer(pipe, "jpeg_compressibility", args=args, train_dataset=dataset, peft_config=tiny_lora_config())
    # Nothing was done to the model yet.
    assert not has_adapter(pipe.transformer)
    assert_same_state(pipe.transformer, before)


def nan_reward(prompts, images, **kwargs):
    return [float("nan")] * len(prompts)


def short_reward(prompts, images, **kwargs):
    return [0.0]


@pytest.mark.parametrize(
    "reward, match",
    [(nan_reward, r"'nan_reward' returned NaN"), (short_reward, r"'short_reward' returned 1 values for 4 samples")],
    ids=["nan", "wrong_length"],
)
def test_bad_reward_fails_on_first_step(tmp_path, reward, match):
    pipe = make_tiny_sd3_pipeline()
    trainer = FlowGRPOTrainer(
        pipe, reward, args=make_args(tmp_path), train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    lora_before = lora_params(pipe.transformer)
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0
    lora_after = lora_params(pipe.transformer)
    assert all(torch.equal(lora_before[k], lora_after[k]) for k in lora_before)


# ------------------------------------------------------------------------------------- 6. several rewards, columns
def test_several_rewards_with_weights_async_none_and_columns(tmp_path):
    targets = ["red", "blue", "green", "yellow"]
    difficulty = [0, 1, 2, 3]
    row_of = {p: (t, d) for p, t, d in zip(PROMPTS, targets, difficulty)}
    received = []

    def column_reward(prompts, images, target, difficulty, trainer_state, **kwargs):
        received.append(
            {
                "prompts": list(prompts),
                "target": list(target),
                "difficulty": list(difficulty),
                "num_images": len(images),
                "trainer_state": trainer_state,
                "kwargs": sorted(kwargs),
            }
        )
        return [float(d) for d in difficulty]

    async def async_reward(prompts, images, **kwargs):
        await asyncio.sleep(0.001)
        return [0.25] * len(prompts)

    def sometimes_none(prompts, images, **kwargs):
        return [None if i % 2 else 2.0 for i in range(len(prompts))]

    funcs = ["jpeg_compressibility", column_reward, async_reward, sometimes_none]
    weights = [1.0, 0.1, 0.5, 2.0]
    args = make_args(tmp_path, reward_weights=weights, max_steps=2)
    dataset = prompt_dataset(target=targets, difficulty=difficulty)
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(), funcs, args=args, train_dataset=dataset, peft_config=tiny_lora_config()
    )
    assert trainer.reward_func_names == ["jpeg_compressibility", "column_reward", "async_reward", "sometimes_none"]

    trainer.train()

    # One call per micro-batch (overlap_rewards: scored while the next one samples), 2 per optimizer step; columns
    # line up with their prompts, and each step's two calls hold its 2 prompts x 4 images.
    assert len(received) == 4
    for call in received:
        assert call["num_images"] == 4
        assert call["kwargs"] == ["log_extra", "log_metric"]  # TRL's logging keywords; prompt / _row are not columns
        assert call["trainer_state"] is trainer.state
        assert [row_of[p] for p in call["prompts"]] == list(zip(call["target"], call["difficulty"]))
    for first, second in zip(received[::2], received[1::2]):
        prompts = first["prompts"] + second["prompts"]
        assert len(set(prompts)) == 2 and all(prompts.count(p) == 4 for p in set(prompts))

    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(entries) == 2
    for entry, first, second in zip(entries, received[::2], received[1::2]):
        difficulties = first["difficulty"] + second["difficulty"]
        mean_difficulty = sum(difficulties) / len(difficulties)
        assert entry["rewards/column_reward/mean"] == pytest.approx(mean_difficulty)
        assert entry["rewards/async_reward/mean"] == pytest.approx(0.25)
        assert entry["rewards/sometimes_none/mean"] == pytest.approx(2.0)  # None entries are ignored
        jpeg = entry["rewards/jpeg_compressibility/mean"]
        assert jpeg < 0
        # Weighted sum; None counts as 0 (half the samples get 2.0 * 2.0).
        expected = 1.0 * jpeg + 0.1 * mean_difficulty + 0.5 * 0.25 + 2.0 * 2.0 / 2
        assert entry["reward"] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------- 7. sample grids and evaluate
def test_log_completions_and_deterministic_evaluate(tmp_path):
    args = make_args(tmp_path, log_completions=True, num_images_to_log=4, max_steps=1, per_device_eval_batch_size=2)
    eval_dataset = Dataset.from_dict({"prompt": PROMPTS[:3]})
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(),
        "jpeg_compressibility",
        args=args,
        train_dataset=prompt_dataset(),
        eval_dataset=eval_dataset,
        peft_config=tiny_lora_config(),
    )
    trainer.train()

    grid_path = tmp_path / "samples" / "train_step000001.png"
    assert grid_path.is_file(), sorted(os.listdir(tmp_path / "samples"))
    table = pq.read_table(tmp_path / "completions" / "step_00001.parquet")
    assert table.num_rows == 4  # num_images_to_log of the 8 images of the step
    with Image.open(grid_path) as grid:
        assert grid.format == "PNG"
        assert grid.width >= 4 * 32 and grid.height >= 32

    first = trainer.evaluate()
    torch.randn(100)  # the global RNG must not matter
    second = trainer.evaluate()
    assert "eval_reward" in first and "eval_rewards/jpeg_compressibility/mean" in first
    assert first["eval_reward"] < 0
    assert first["eval_reward"] == second["eval_reward"]
    assert first == second
    assert (tmp_path / "samples" / "eval_step000001.png").is_file()


def brightness(prompts, images, **kwargs) -> list[float]:
    return [float(np.asarray(image.convert("L")).mean()) / 255 for image in images]


def test_log_completions_writes_a_table_per_logging_step_matching_the_logged_rewards(tmp_path):
    args = make_args(tmp_path, log_completions=True, num_images_to_log=8, max_steps=2)
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(),
        ["jpeg_compressibility", brightness],
        args=args,
        train_dataset=prompt_dataset(),
        peft_config=tiny_lora_config(),
    )
    trainer.train()

    for step in (1, 2):
        rows = pq.read_table(tmp_path / "completions" / f"step_{step:05d}.parquet").to_pylist()
        assert list(rows[0]) == ["step", "prompt", "image", "jpeg_compressibility", "brightness", "advantage"]
        assert len(rows) == 8 and {row["step"] for row in rows} == {step}
        (entry,) = [e for e in trainer.state.log_history if e.get("step") == step and "reward" in e]
        for name in ("jpeg_compressibility", "brightness"):
            assert np.mean([row[name] for row in rows]) == pytest.approx(entry[f"rewards/{name}/mean"], rel=1e-5)
        # The images are the scored ones: brightness recomputed from the stored PNG is the logged reward.
        for row in rows[:2]:
            image = Image.open(io.BytesIO(row["image"]["bytes"]))
            assert brightness([row["prompt"]], [image])[0] == pytest.approx(row["brightness"], abs=1e-6)
        # Group-relative advantages: they average to zero within each prompt's group of 4.
        by_prompt: dict[str, list[float]] = {}
        for row in rows:
            by_prompt.setdefault(row["prompt"], []).append(row["advantage"])
        assert sorted(len(group) for group in by_prompt.values()) == [4, 4]
        for group in by_prompt.values():
            assert abs(np.mean(group)) < 1e-5 and np.ptp(group) > 0


# ------------------------------------------------------------------------------------ 8. gradient checkpointing
@pytest.mark.parametrize("field", ["gradient_checkpointing", "activation_checkpointing"])
def test_gradient_checkpointing_trains_with_diffusers_checkpointing(tmp_path, monkeypatch, field):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    # diffusers' default checkpointing function looks `torch.utils.checkpoint.checkpoint` up at call time.
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)

    grad_norms = {}
    for checkpointing in (False, True):
        pipe = make_tiny_sd3_pipeline()
        args = make_args(tmp_path / str(checkpointing), max_steps=1, **{field: checkpointing})
        trainer = FlowGRPOTrainer(
            pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
        )
        assert getattr(args, field) == checkpointing  # the user's config is not modified
        assert pipe.transformer.is_gradient_checkpointing == checkpointing
        lora_before = lora_params(pipe.transformer)
        calls.clear()
        trainer.train()
        assert trainer.state.global_step == 1
        # Every checkpointed block call goes through torch's non-reentrant checkpoint (LoRA params get gradients).
        assert len(calls) > 0 if checkpointing else not calls
        assert all(use_reentrant is False for use_reentrant in calls)
        lora_after = lora_params(pipe.transformer)
        assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
        grad_norms[checkpointing] = logged(trainer, "grad_norm")[0]
    # Same samples, same gradients, with or without recomputation.
    assert grad_norms[True] > 0
    assert grad_norms[True] == pytest.approx(grad_norms[False], rel=1e-4)


# ---------------------------------------------------------------------------------------------- 9. GroupSampler
def test_group_sampler_yields_whole_groups_in_whole_batches():
    sampler = GroupSampler(num_rows=10, num_generations=3, prompts_per_batch=4, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 2 * 4 * 3  # 10 rows -> 2 whole batches of 4 prompts; 2 rows dropped
    batches = [indices[i : i + 12] for i in range(0, len(indices), 12)]
    seen = set()
    for batch in batches:
        groups = [batch[i : i + 3] for i in range(0, 12, 3)]
        assert all(len(set(group)) == 1 for group in groups)  # each prompt num_generations times in a row
        rows = [group[0] for group in groups]
        assert len(set(rows)) == 4
        assert not seen & set(rows)  # a prompt appears in one batch only per epoch
        seen |= set(rows)
    assert len(seen) == 8 and seen <= set(range(10))


def test_group_sampler_repeat_and_seeding():
    plain = list(GroupSampler(num_rows=8, num_generations=2, prompts_per_batch=2, seed=3))
    repeated_sampler = GroupSampler(num_rows=8, num_generations=2, prompts_per_batch=2, repeat=3, seed=3)
    repeated = list(repeated_sampler)
    assert len(repeated) == len(repeated_sampler) == 3 * len(plain)
    for b in range(4):  # each generation batch (4 indices) is repeated 3 times in a row
        batch = plain[4 * b : 4 * b + 4]
        assert repeated[12 * b : 12 * b + 12] == batch * 3

    def order(seed=0, epoch=0):
        sampler = GroupSampler(num_rows=16, num_generations=2, prompts_per_batch=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert sorted(order(0, 0)) == sorted(order(0, 1))
    assert order(0, 0) != order(1, 0)


def test_trainer_uses_group_sampler(tmp_path):
    args = make_args(tmp_path, num_iterations=2)
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(), "jpeg_compressibility", args=args, train_dataset=prompt_dataset()
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, GroupSampler)
    assert (sampler.num_generations, sampler.prompts_per_batch, sampler.repeat) == (4, 2, 2)


# ----------------------------------------------------------------------------------------------- 10. same_latent
@pytest.mark.parametrize("same_latent", [True, False])
def test_same_latent_shares_initial_noise_within_groups(tmp_path, monkeypatch, same_latent):
    # Groups of 4 spread over micro-batches of 2, so that a group spans two rollout calls.
    args = make_args(
        tmp_path, same_latent=same_latent, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=1
    )
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(), "jpeg_compressibility", args=args, train_dataset=prompt_dataset()
    )
    noises = []
    original = trainer._initial_noise

    def initial_noise(rows, micro_batch):
        noise = original(rows, micro_batch)
        noises.extend((row["_row"], n.clone()) for row, n in zip(rows, noise))
        return noise

    monkeypatch.setattr(trainer, "_initial_noise", initial_noise)
    rollouts = count_rollouts(monkeypatch)
    trainer.train()

    assert len(rollouts) == 4 and len(noises) == 8
    groups: dict[int, list[torch.Tensor]] = {}
    for row, noise in noises:
        groups.setdefault(row, []).append(noise)
    assert sorted(len(g) for g in groups.values()) == [4, 4]
    (a, b) = groups.values()
    if same_latent:
        assert all(torch.equal(a[0], n) for n in a) and all(torch.equal(b[0], n) for n in b)
        assert not torch.equal(a[0], b[0])
    else:
        flat = a + b
        assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))
    # Whatever the initial noise, the SDE noise makes every sample of a group different.
    finals = torch.cat([t.final_latents for t in rollouts])
    assert all(not torch.equal(finals[i], finals[j]) for i in range(8) for j in range(i + 1, 8))


def test_initial_noise_direct(tmp_path):
    args = make_args(tmp_path, same_latent=True)
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(), "jpeg_compressibility", args=args, train_dataset=prompt_dataset()
    )
    rows = [{"prompt": "a", "_row": 2}, {"prompt": "a", "_row": 2}, {"prompt": "b", "_row": 3}]
    noise = trainer._initial_noise(rows, 0)
    assert noise.shape == (3, *trainer.adapter.latent_shape(32, 32))
    assert torch.equal(noise[0], noise[1])
    assert not torch.equal(noise[0], noise[2])
    # The same group gets the same noise in another micro-batch (groups may span micro-batches and processes).
    assert torch.equal(trainer._initial_noise(rows[2:], 1)[0], noise[2])


def test_lora_initialisation_follows_args_seed(tmp_path):
    def initial_lora(seed: int) -> dict[str, torch.Tensor]:
        torch.randn(7)  # whatever state the global RNG is in must not matter
        pipe = make_tiny_sd3_pipeline()
        FlowGRPOTrainer(
            pipe,
            "jpeg_compressibility",
            args=make_args(tmp_path / str(seed), seed=seed),
            train_dataset=prompt_dataset(),
            peft_config=tiny_lora_config(),
        )
        return lora_params(pipe.transformer)

    first, again, other = initial_lora(1), initial_lora(1), initial_lora(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    ("builder", "expected"),
    [("make_tiny_sd3_pipeline", 4.5), ("make_tiny_flux_pipeline", 3.5), ("make_tiny_qwen_image_pipeline", 4.0)],
)
def test_guidance_scale_defaults_to_the_pipeline_familys(tmp_path, builder, expected):
    from trl_flow_grpo import testing

    pipe = getattr(testing, builder)(seed=0)
    trainer = FlowGRPOTrainer(pipe, "jpeg_compressibility", args=make_args(tmp_path), train_dataset=prompt_dataset())
    assert trainer.guidance_scale == trainer.rollout_guidance == expected
    explicit = make_args(tmp_path, guidance_scale=2.0, train_cfg=False)
    trainer = FlowGRPOTrainer(pipe, "jpeg_compressibility", args=explicit, train_dataset=prompt_dataset())
    assert (trainer.guidance_scale, trainer.rollout_guidance) == (2.0, 1.0)
