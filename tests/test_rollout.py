"""Tests for the rollout with SDE windows, the shared prefix and the ODE tail (DPM-Solver++(2M), compression)."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo import flow_grpo_trainer as trainer_module
from trl_flow_grpo.pipelines import get_adapter
from trl_flow_grpo.sampling import ode_step, rollout, sde_step_with_logprob
from trl_flow_grpo.sampling.dpm import compressed_schedule, dpm_solver_pp_2m_step, num_tail_steps, solve_ode
from trl_flow_grpo.testing import make_tiny_sd3_pipeline

CPU = torch.device("cpu")
STEPS = 6


@pytest.fixture(scope="module")
def tiny():
    pipe = make_tiny_sd3_pipeline(seed=0)
    adapter = get_adapter(pipe)
    return pipe, adapter, adapter.sigmas(STEPS, 32, 32, CPU)


def group_inputs(adapter, groups: list[int], with_negative: bool = False):
    """Rows of prompt groups (`groups[i]` is row i's prompt), each group with one shared initial noise."""
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    cond = adapter.encode_prompts([prompts[g] for g in groups], CPU, with_negative, 16)
    shape = adapter.latent_shape(32, 32)
    per_group = {g: torch.randn(shape, generator=torch.Generator().manual_seed(100 + g)) for g in set(groups)}
    return cond, torch.stack([per_group[g] for g in groups])


def count_forwards(transformer: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Record the batch size of every transformer forward."""
    sizes: list[int] = []

    def hook(module, args, kwargs):
        sizes.append(kwargs["hidden_states"].shape[0])

    return sizes, transformer.register_forward_pre_hook(hook, with_kwargs=True)


def run(adapter, transformer, cond, sigmas, noise, seed=0, **kwargs):
    kwargs = {"noise_level": 0.7, "sde_type": "sde", "guidance_scale": 1.0} | kwargs
    return rollout(adapter, transformer, cond, sigmas, noise.clone(), generator=torch.manual_seed(seed), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# recorded steps
# ---------------------------------------------------------------------------------------------------------------------


def test_default_rollout_is_unchanged(tiny):
    """Full window, Euler, no compression, no groups: bit for bit the loop the rollout had before windows."""
    pipe, adapter, sigmas = tiny
    cond, noise = group_inputs(adapter, [0, 1, 2])
    sde_steps = [0, 1, 2, 3, 4]
    ours = run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=sde_steps)

    generator, x, log_probs = torch.manual_seed(0), noise.clone().float(), []
    with torch.no_grad():
        for i in range(STEPS):
            v = adapter.velocity(pipe.transformer, x, sigmas[i].expand(3), cond, 1.0)
            if i in sde_steps:
                x, log_prob, _, _ = sde_step_with_logprob(
                    v, x, sigmas[i], sigmas[i + 1], 0.7, "sde", generator=generator, sigma_1=sigmas[1]
                )
                log_probs.append(log_prob)
            else:
                x = ode_step(v, x, sigmas[i], sigmas[i + 1])
    assert torch.equal(ours.final_latents, x)
    assert torch.equal(ours.log_probs, torch.stack(log_probs, dim=1))
    assert ours.step_indices == sde_steps and ours.transformer_calls == 3 * STEPS


def test_ode_only_steps_record_nothing(tiny):
    pipe, adapter, sigmas = tiny
    cond, noise = group_inputs(adapter, [0, 1])
    ode = run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[])
    assert ode.latents.shape == (2, 0, *noise.shape[1:]) and ode.next_latents.shape == ode.latents.shape
    assert ode.log_probs.shape == (2, 0) and ode.step_indices == []

    window = run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[3, 2])
    assert window.step_indices == [2, 3] and window.latents.shape[1] == window.log_probs.shape[1] == 2
    # The steps before the window are the ODE's: the first recorded input is the ODE state at step 2.
    prefix = run(adapter, pipe.transformer, cond, sigmas[:3], noise, sde_steps=[])
    assert torch.equal(window.latents[:, 0], prefix.final_latents)
    # Each recorded step links to the next; the SDE made the result differ from the ODE's.
    assert torch.equal(window.next_latents[:, 0], window.latents[:, 1])
    assert not torch.allclose(window.final_latents, ode.final_latents)


def test_invalid_sde_steps_and_solver_raise(tiny):
    pipe, adapter, sigmas = tiny
    cond, noise = group_inputs(adapter, [0])
    with pytest.raises(ValueError, match="sde_steps"):
        run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[STEPS])
    with pytest.raises(ValueError, match="ode_solver"):
        run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[0], ode_solver="heun")


# ---------------------------------------------------------------------------------------------------------------------
# shared prefix
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 4.5], ids=["no_cfg", "cfg"])
def test_shared_prefix_gives_the_same_samples_as_recomputing_it(tiny, guidance):
    pipe, adapter, sigmas = tiny
    groups = [0, 1, 0, 1, 0, 1]  # interleaved, as groups can be after a shuffle
    cond, noise = group_inputs(adapter, groups, with_negative=guidance > 1)
    kwargs = dict(sde_steps=[2, 3], guidance_scale=guidance)

    sizes, handle = count_forwards(pipe.transformer)
    try:
        shared = run(adapter, pipe.transformer, cond, sigmas, noise, prefix_groups=groups, **kwargs)
        shared_rows = sum(sizes)
        sizes.clear()
        recomputed = run(adapter, pipe.transformer, cond, sigmas, noise, **kwargs)
        recomputed_rows = sum(sizes)
    finally:
        handle.remove()

    # Same samples (up to the batch-size dependence of the kernels: the prefix ran on 2 rows instead of 6) ...
    torch.testing.assert_close(shared.latents, recomputed.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.next_latents, recomputed.next_latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.log_probs, recomputed.log_probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(shared.final_latents, recomputed.final_latents, rtol=0, atol=1e-5)
    # ... and the members of a group share their prefix but not their SDE noise.
    assert torch.equal(shared.latents[0, 0], shared.latents[2, 0])
    assert not torch.allclose(shared.final_latents[0], shared.final_latents[2])
    # Cost: the prefix (2 steps) ran for 2 prompts instead of 6 rows; CFG doubles every forward.
    cfg = 2 if guidance > 1 else 1
    assert recomputed.transformer_calls == recomputed_rows == 6 * STEPS * cfg
    assert shared.transformer_calls == shared_rows == (2 * 2 + 6 * (STEPS - 2)) * cfg
    assert shared.transformer_calls_saved == 2 * (6 - 2) * cfg == recomputed_rows - shared_rows


def test_shared_prefix_decodes_to_the_same_images(tiny):
    pipe, adapter, sigmas = tiny
    groups = [0, 0, 0, 1]
    cond, noise = group_inputs(adapter, groups)
    shared = run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[3], prefix_groups=groups)
    recomputed = run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[3])
    for a, b in zip(adapter.decode(shared.final_latents), adapter.decode(recomputed.final_latents)):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        assert diff <= 1  # 8-bit pixels: at most a rounding flip


def test_shared_prefix_needs_shared_noise(tiny):
    pipe, adapter, sigmas = tiny
    cond, noise = group_inputs(adapter, [0, 0])
    noise[1] += 1
    with pytest.raises(ValueError, match="same noise"):
        run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[2], prefix_groups=[0, 0])


def test_window_at_step_zero_has_nothing_to_share(tiny):
    pipe, adapter, sigmas = tiny
    cond, noise = group_inputs(adapter, [0, 0])
    out = run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[0, 1], prefix_groups=[0, 0])
    assert out.transformer_calls_saved == 0 and out.transformer_calls == 2 * STEPS


# ---------------------------------------------------------------------------------------------------------------------
# ODE tail
# ---------------------------------------------------------------------------------------------------------------------


def test_tail_solver_and_compression_leave_the_recorded_steps_alone(tiny):
    pipe, adapter, sigmas = tiny
    cond, noise = group_inputs(adapter, [0, 1])
    euler = run(adapter, pipe.transformer, cond, sigmas, noise, sde_steps=[0, 1])
    sizes, handle = count_forwards(pipe.transformer)
    try:
        flash = run(
            adapter,
            pipe.transformer,
            cond,
            sigmas,
            noise,
            sde_steps=[0, 1],
            ode_solver="dpm_solver++_2m",
            ode_compression=0.5,
        )
    finally:
        handle.remove()
    assert torch.equal(flash.latents, euler.latents) and torch.equal(flash.log_probs, euler.log_probs)
    assert not torch.equal(flash.final_latents, euler.final_latents)
    assert flash.transformer_calls == sum(sizes) == 2 * (2 + num_tail_steps(STEPS - 2, 0.5)) == 2 * 4


def test_num_tail_steps_and_compressed_schedule():
    assert [num_tail_steps(r, 0.4) for r in (0, 1, 2, 3, 21, 22)] == [0, 1, 1, 1, 8, 8]
    assert num_tail_steps(21, 1.0) == 21
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(25)
    grid = scheduler.sigmas.float()
    assert torch.equal(compressed_schedule(grid, 4, 1.0), grid[4:])
    for start, compression in [(0, 0.4), (4, 0.4), (10, 0.5), (20, 0.2), (24, 0.4)]:
        tail = compressed_schedule(grid, start, compression)
        assert tail.numel() == num_tail_steps(25 - start, compression) + 1
        assert tail[0] == grid[start] and tail[-1] == 0
        assert torch.all(tail[1:] < tail[:-1])
    # The points follow the grid: the middle of a 2x compression is a grid point.
    assert torch.allclose(compressed_schedule(grid, 5, 0.5)[1:-1], grid[7:25:2])
    with pytest.raises(ValueError, match="compression"):
        compressed_schedule(grid, 0, 0.0)


def gaussian_flow(mean: float, std: float):
    """Data N(mean, std^2), noise N(0, 1): the exact velocity field and the exact ODE solution."""

    def var(sigma: float) -> float:
        return (1 - sigma) ** 2 * std**2 + sigma**2

    def velocity(x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = float(sigma)
        return (sigma - (1 - sigma) * std**2) / var(sigma) * (x - (1 - sigma) * mean) - mean

    def exact(z: torch.Tensor, sigma: float) -> torch.Tensor:
        return (1 - sigma) * mean + math.sqrt(var(sigma)) * z

    return velocity, exact


@pytest.mark.parametrize("std", [0.8, 1.0])
def test_dpm_solver_is_more_accurate_than_euler_with_the_same_steps(std):
    velocity, exact = gaussian_flow(mean=0.5, std=std)
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))

    def errors(sigmas: torch.Tensor) -> tuple[float, float]:
        start, target = exact(z, float(sigmas[0])), exact(z, float(sigmas[-1]))
        return tuple((solve_ode(velocity, start, sigmas, s) - target).abs().max().item() for s in ODE)

    ODE = ("euler", "dpm_solver++_2m")
    # Uniform grids: more accurate at every step count, and second order against first order.
    errors_by_n = {n: errors(torch.linspace(1, 0, n + 1)) for n in (5, 10, 20, 40, 80)}
    for n, (euler, dpm) in errors_by_n.items():
        assert dpm < (euler if n == 5 else euler / 5), (n, euler, dpm)
    for n in (40, 80):
        (euler, dpm), (euler_half, dpm_half) = errors_by_n[n], errors_by_n[n // 2]
        assert euler / euler_half > 0.45 and dpm / dpm_half < 0.4, (n, errors_by_n)  # halving h: 1/2 and 1/4
    # MixGRPO-Flash's tail: SD3's shifted 25-step grid after a window ending at step 4, compressed to 40%.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(25)
    tail = compressed_schedule(scheduler.sigmas.float(), 4, 0.4)
    euler, dpm = errors(tail)
    assert dpm < euler / 3, (euler, dpm)


def test_dpm_solver_matches_diffusers_on_its_own_grid():
    """diffusers' DPMSolverMultistepScheduler (flow sigmas, DPM-Solver++ 2M, midpoint) is the oracle."""
    velocity, _ = gaussian_flow(mean=0.3, std=0.7)
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
    )
    scheduler.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(velocity(theirs, scheduler.sigmas[i]), t, theirs).prev_sample
    ours = solve_ode(velocity, x.clone(), scheduler.sigmas, "dpm_solver++_2m")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_first_order_dpm_step_is_euler():
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    for sigma, sigma_next in [(1.0, 0.8), (0.6, 0.3), (0.2, 0.0)]:
        dpm = dpm_solver_pp_2m_step(x, x - sigma * v, sigma, sigma_next)
        torch.testing.assert_close(dpm, ode_step(v, x, sigma, sigma_next), rtol=0, atol=1e-6)
    # With a previous point the step is corrected, except into sigma = 0 or from a previous sigma = 1.
    d, d_prev = x - 0.6 * v, x - 0.7 * v + 0.1
    assert not torch.allclose(dpm_solver_pp_2m_step(x, d, 0.6, 0.3, d_prev, 0.7), ode_step(v, x, 0.6, 0.3))
    torch.testing.assert_close(dpm_solver_pp_2m_step(x, d, 0.6, 0.0, d_prev, 0.7), d)
    torch.testing.assert_close(dpm_solver_pp_2m_step(x, d, 0.6, 0.3, d_prev, 1.0), ode_step(v, x, 0.6, 0.3))


# ---------------------------------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------------------------------


def make_args(tmp_path, **overrides) -> FlowGRPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path),
        report_to="none",
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        height=32,
        width=32,
        num_inference_steps=STEPS,
        max_steps=2,
        max_sequence_length=16,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        train_cfg=False,
        beta=0.0,
        learning_rate=1e-2,
        seed=0,
    )
    return FlowGRPOConfig(**(kwargs | overrides))


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_trainer_trains_only_the_sliding_window_with_a_shared_prefix_and_a_flash_tail(tmp_path, monkeypatch):
    args = make_args(
        tmp_path,
        sde_window="sliding",
        sde_window_size=2,
        sde_window_shift_interval=1,
        same_latent=True,
        ode_solver="dpm_solver++_2m",
        ode_compression=0.5,
    )
    assert args.sde_window_range == [0, STEPS - 2]
    dataset = Dataset.from_dict({"prompt": ["a red circle", "two blue squares", "a green triangle", "a cat"]})
    trainer = FlowGRPOTrainer(make_tiny_sd3_pipeline(), "jpeg_compressibility", args=args, train_dataset=dataset)

    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, recomputed log-prob, stored log-prob)
    original = trainer_module.step_log_prob
    original_training_step = trainer.training_step
    current: dict = {}

    def step_log_prob(adapter, model, cond, sigmas, step, *args, **kwargs):
        out = original(adapter, model, cond, sigmas, step, *args, **kwargs)
        k = current["inputs"].step_indices.index(step)
        calls.append((step, out[0].detach().clone(), current["inputs"].log_probs[:, k].clone()))
        return out

    def training_step(model, inputs, *rest, **kwargs):
        current["inputs"] = inputs
        return original_training_step(model, inputs, *rest, **kwargs)

    monkeypatch.setattr(trainer_module, "step_log_prob", step_log_prob)
    monkeypatch.setattr(trainer, "training_step", training_step)
    trainer.train()

    # Iteration 0: window [0, 2); iteration 1: window [1, 3). Only the window's steps are trained, ratio exactly 1.
    assert logged(trainer, "sde_window/start") == [0.0, 1.0]
    assert logged(trainer, "sde_window/size") == [2.0, 2.0]
    assert [step for step, _, _ in calls] == [0, 1, 0, 1, 1, 2, 1, 2]
    assert all(torch.equal(new, old) for _, new, old in calls)
    assert logged(trainer, "ratio/mean") == [1.0, 1.0]
    assert trainer.sde_window.for_iteration(1).steps == [1, 2]
    # Transformer forwards per generation batch (2 micro-batches of one group of 4 rows each):
    # it. 0: window 2 x 4 + tail (4 steps -> 2) x 4 = 16 per micro-batch;
    # it. 1: shared prefix 1 x 1 + window 2 x 4 + tail (3 steps -> 1) x 4 = 13 per micro-batch, 3 saved.
    assert logged(trainer, "rollout/transformer_calls") == [32.0, 26.0]
    assert logged(trainer, "rollout/transformer_calls_per_image") == [4.0, 3.25]
    assert logged(trainer, "rollout/transformer_calls_saved") == [0.0, 6.0]
    assert logged(trainer, "train/transformer_calls") == [16.0, 16.0]


def test_trainer_window_iteration_counts_generation_batches(tmp_path):
    args = make_args(
        tmp_path,
        sde_window="sliding",
        sde_window_size=1,
        sde_window_shift_interval=1,
        num_iterations=2,
        max_steps=3,
        num_inference_steps=4,
    )
    dataset = Dataset.from_dict({"prompt": ["a red circle", "two blue squares"]})
    trainer = FlowGRPOTrainer(make_tiny_sd3_pipeline(), "jpeg_compressibility", args=args, train_dataset=dataset)
    trainer.train()
    # Generation batches at optimizer steps 0 and 2 (num_iterations=2): iterations 0 and 1 of the schedule.
    assert logged(trainer, "sde_window/start") == [0.0, 1.0]
