"""Checkpoints: exact resume (LoRA, full fine-tuning, EMA), checkpoint on interrupt, EMA maths."""

import os
import signal

import numpy as np
import pytest
import torch
from test_trainer import lora_params, make_args, prompt_dataset
from transformers import TrainerCallback

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.ema import ParameterEMA
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


def make_trainer(tmp_path, lora=True, reward=brightness, **overrides):
    overrides.setdefault("save_strategy", "steps")
    overrides.setdefault("save_steps", 2)
    overrides.setdefault("max_steps", 4)
    args = make_args(tmp_path, learning_rate=1e-2, beta=0.04, **overrides)
    return FlowGRPOTrainer(
        model=make_tiny_sd3_pipeline(seed=0),
        reward_funcs=reward,
        args=args,
        train_dataset=prompt_dataset(),
        peft_config=tiny_lora_config() if lora else None,
    )


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    transformer = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_lora:
        return lora_params(transformer)
    return {name: p.detach().clone() for name, p in transformer.named_parameters()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_steps_resume_two_steps_equals_four_straight(tmp_path, lora):
    straight = make_trainer(tmp_path / "straight", lora=lora)
    straight.train()

    first = make_trainer(tmp_path / "split", lora=lora, max_steps=2)
    first.train()
    checkpoint = tmp_path / "split" / "checkpoint-2"
    expected = {"pytorch_lora_weights.safetensors"} if lora else {"transformer"}
    assert expected | {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(checkpoint))

    resumed = make_trainer(tmp_path / "split", lora=lora)
    # The new trainer starts from a fresh init; only the checkpoint can make it match.
    assert any(
        not torch.equal(p, q) for p, q in zip(trained_weights(resumed).values(), trained_weights(first).values())
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == 4
    assert_identical(trained_weights(straight), trained_weights(resumed))
    # The resumed half sampled the same images as the straight run: same rewards logged for steps 3 and 4.
    straight_rewards = [e["reward"] for e in straight.state.log_history if "reward" in e and e["step"] > 2]
    resumed_rewards = [e["reward"] for e in resumed.state.log_history if "reward" in e and e["step"] > 2]
    assert straight_rewards == resumed_rewards and len(resumed_rewards) == 2


def test_resume_between_iterations_trains_on_the_saved_rollouts(tmp_path):
    """num_iterations=2: step 3 is the first of two steps on generation 2's samples; checkpoint-3 keeps them, so the
    resumed step 4 trains on exactly what the uninterrupted run's step 4 did (new samples would give other weights)."""
    straight = make_trainer(tmp_path / "straight", num_iterations=2)
    straight.train()
    make_trainer(tmp_path / "split", num_iterations=2, max_steps=3, save_steps=1).train()
    assert not (tmp_path / "split" / "checkpoint-2" / "rollout_buffer_0.safetensors").exists()  # nothing left over
    assert (tmp_path / "split" / "checkpoint-3" / "rollout_buffer_0.safetensors").is_file()
    resumed = make_trainer(tmp_path / "split", num_iterations=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-3"))
    assert_identical(trained_weights(straight), trained_weights(resumed))


def test_resume_restores_the_ema(tmp_path):
    straight = make_trainer(tmp_path / "straight", ema_decay=0.5)
    straight.train()
    make_trainer(tmp_path / "split", ema_decay=0.5, max_steps=2).train()
    assert os.path.isfile(tmp_path / "split" / "checkpoint-2" / "ema.safetensors")
    resumed = make_trainer(tmp_path / "split", ema_decay=0.5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert resumed.ema.num_updates == straight.ema.num_updates == 4
    assert_identical(straight.ema.shadow, resumed.ema.shadow)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_refresh_moves_the_kl_reference_and_survives_a_resume(tmp_path, lora):
    # Refreshed after every step, the reference is the policy of the step being trained: the KL is exactly 0 on every
    # step (without the refresh it is > 0 from step 2 on: see test_trainer), and so is its gradient.
    straight = make_trainer(tmp_path / "straight", lora=lora, ref_model_sync_steps=1)
    straight.train()
    assert [e["kl"] for e in straight.state.log_history if "kl" in e] == [0.0] * 4
    assert straight.reference_refresh.last_refresh == 4
    make_trainer(tmp_path / "split", lora=lora, ref_model_sync_steps=1, max_steps=2).train()
    assert os.path.isfile(tmp_path / "split" / "checkpoint-2" / "reference.safetensors")
    resumed = make_trainer(tmp_path / "split", lora=lora, ref_model_sync_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    # Without the saved reference, step 3 would compare with the initial model (KL > 0) and train other weights.
    assert [e["kl"] for e in resumed.state.log_history if "kl" in e and e["step"] > 2] == [0.0, 0.0]
    assert_identical(trained_weights(straight), trained_weights(resumed))


def test_reference_refresh_every_two_steps_keeps_the_refreshed_policy(tmp_path):
    trainer = make_trainer(tmp_path, lora=False, ref_model_sync_steps=2, max_steps=3, save_strategy="no")
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = trained_weights(trainer)

    trainer.add_callback(Snapshot())
    trainer.train()
    kl = [e["kl"] for e in trainer.state.log_history if "kl" in e]
    assert kl[0] == 0.0 and kl[1] > 0.0 and kl[2] == 0.0  # step 3 trains right after the refresh at step 2
    reference = dict(trainer.ref_transformer.named_parameters())
    assert_identical(snapshots[2], {name: reference[name].detach() for name in snapshots[2]})
    assert not all(torch.equal(snapshots[3][name], reference[name]) for name in snapshots[3])


def test_resume_with_another_lora_fails_with_a_clear_error(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    full = make_trainer(tmp_path, lora=False)
    with pytest.raises(FileNotFoundError, match="transformer/"):
        full.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.fixture(scope="module")
def straight_four_steps(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The LoRA after 4 uninterrupted steps, for the interrupted runs to match."""
    trainer = make_trainer(tmp_path_factory.mktemp("straight"))
    trainer.train()
    return trained_weights(trainer)


def signal_at_generation(number: int, signum: int = signal.SIGINT):
    """A reward function that sends `signum` to this process while scoring the `number`-th generation batch."""
    sent = []

    def reward(images, trainer_state, **kwargs):  # called once per micro-batch (overlap_rewards): count generations
        if trainer_state.global_step == number - 1 and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return brightness(images)

    return reward


def test_ctrl_c_saves_the_last_completed_step_and_resumes_exactly(tmp_path, straight_four_steps):
    killed = make_trainer(tmp_path, reward=signal_at_generation(3), save_steps=100)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # step 3 was in progress: it is dropped
    assert killed.state.global_step == 2

    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_identical(straight_four_steps, trained_weights(resumed))


def test_sigterm_becomes_a_checkpoint_and_the_handlers_are_restored(tmp_path):
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    trainer = make_trainer(tmp_path, reward=signal_at_generation(2, signal.SIGTERM), save_steps=100)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        trainer.train()
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    assert {signum: signal.getsignal(signum) for signum in previous} == previous


def test_an_error_in_a_step_saves_the_last_completed_step_and_resumes_exactly(tmp_path, straight_four_steps):
    def failing_at_third_generation(images, trainer_state, **kwargs):
        if trainer_state.global_step == 2:  # the third generation batch (one per optimizer step)
            raise ConnectionError("reward server unreachable")
        return brightness(images)

    crashed = make_trainer(tmp_path, reward=failing_at_third_generation, save_steps=100)
    with pytest.raises(ConnectionError, match="reward server unreachable"):  # the error itself reaches the caller
        crashed.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert_identical(straight_four_steps, trained_weights(resumed))


class SignalDuringUpdate(TrainerCallback):
    """Sends SIGTERM between the optimizer step and the step's end (weights half-way to the next step)."""

    def __init__(self, step: int):
        self.step = step

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_an_update_is_acted_on_when_the_step_is_complete(tmp_path, straight_four_steps):
    trainer = make_trainer(tmp_path, save_steps=100)
    trainer.add_callback(SignalDuringUpdate(step=3))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    # Saving at once would have stored step 3's weights under step 2's name; the checkpoint is of step 3, whole.
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert_identical(straight_four_steps, trained_weights(resumed))


class FailDuringUpdate(TrainerCallback):
    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("CUDA out of memory (simulated)")


def test_an_error_during_an_update_saves_nothing(tmp_path):
    """The weights are half-way between two steps: saving them under either step's name would be wrong."""
    trainer = make_trainer(tmp_path, save_steps=100)
    trainer.add_callback(FailDuringUpdate())
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    assert os.listdir(tmp_path) == []


def test_a_signal_during_a_save_lets_the_save_finish(tmp_path):
    trainer = make_trainer(tmp_path, save_steps=2)
    save_rng_state = trainer._save_rng_state

    def interrupted(folder):
        os.kill(os.getpid(), signal.SIGINT)  # between the optimizer state and the trainer state
        save_rng_state(folder)

    trainer._save_rng_state = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    assert {"trainer_state.json", "optimizer.pt", "rng_state.pth"} <= set(os.listdir(tmp_path / "checkpoint-2"))


def test_resume_true_skips_a_checkpoint_whose_save_was_cut_off(tmp_path, caplog):
    make_trainer(tmp_path, max_steps=2).train()
    (tmp_path / "checkpoint-3").mkdir()  # killed while saving: no trainer_state.json
    (tmp_path / "checkpoint-3" / "optimizer.pt").write_bytes(b"")
    resumed = make_trainer(tmp_path, max_steps=3)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert "Skipping" in caplog.text and "checkpoint-3" in caplog.text


def test_resume_true_without_a_checkpoint_says_so(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint-<step> folder"):
        trainer.train(resume_from_checkpoint=True)


def test_ema_is_used_for_export_and_checkpoints_keep_raw_weights(tmp_path):
    from safetensors.torch import load_file

    trainer = make_trainer(tmp_path, ema_decay=0.5, max_steps=2)
    trainer.train()
    raw = load_file(tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    trainer.save_model(str(tmp_path / "final"))
    exported = load_file(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    assert raw.keys() == exported.keys()
    ema_by_key = {}
    for name, shadow in trainer.ema.shadow.items():
        key = "transformer." + name.replace(".default", "")
        ema_by_key[key] = shadow.cpu()
    for key in raw:
        torch.testing.assert_close(exported[key], ema_by_key[key])
    assert any(not torch.equal(raw[key], exported[key]) for key in raw)
    # Exporting did not change the weights being trained.
    live = {"transformer." + n.replace(".default", ""): p for n, p in lora_params(trainer.model).items()}
    for key in raw:
        assert torch.equal(live[key], raw[key])


def test_ema_decay_schedule_and_average():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = ParameterEMA([("w", param)], max_decay=0.9)
    assert ema.decay() == pytest.approx(1 / 10)
    expected = torch.zeros(3)
    for n in range(40):
        with torch.no_grad():
            param.fill_(float(n + 1))
        decay = min((1 + n) / (10 + n), 0.9)
        assert ema.decay() == pytest.approx(decay)
        ema.update()
        expected = decay * expected + (1 - decay) * (n + 1)
        torch.testing.assert_close(ema.shadow["w"], expected.expand(3).clone())
    with ema.applied():
        torch.testing.assert_close(param.detach(), ema.shadow["w"])
    assert torch.equal(param.detach(), torch.full((3,), 40.0))
    with pytest.raises(ValueError, match="max_decay"):
        ParameterEMA([("w", param)], max_decay=1.0)
