"""The model-FLOPs accounting of benchmarks/bench_sampling.py (MFU) and the CPU dry run of benchmarks/gpu_check.sh."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trl_flow_grpo.testing import make_tiny_sd3_pipeline

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "benchmarks" / "bench_sampling.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_sampling"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


def test_sd3_flops_of_a_tiny_config_computed_by_hand():
    # d = 4, N = 2 image tokens, M = 3 text tokens, L = 5; block 0 has SD3.5's second attention, block 1 is the last.
    config = {
        "num_attention_heads": 1,
        "attention_head_dim": 4,
        "num_layers": 2,
        "patch_size": 1,
        "in_channels": 2,
        "out_channels": 2,
        "joint_attention_dim": 3,
        "dual_attention_layers": (0,),
    }
    block0 = 24 * 2 * 16 + 24 * 3 * 16 + 4 * 25 * 4 + (8 * 2 * 16 + 4 * 4 * 4)  # 768 + 1152 + 400 + 320
    block1 = 24 * 2 * 16 + 6 * 3 * 16 + 4 * 25 * 4  # the text stream only projects q, k, v: 768 + 288 + 400
    embeddings = 2 * 2 * 2 * 4 + 2 * 3 * 3 * 4 + 2 * 2 * 4 * 2  # patches 32, text 72, output 32
    assert block0 + block1 + embeddings == 4232
    assert bench.sd3_forward_flops(config, image_tokens=2, text_tokens=3) == 4232


def test_sd3_formula_agrees_with_torch_flop_counter_on_the_tiny_transformer():
    transformer = make_tiny_sd3_pipeline(seed=0).transformer
    c = transformer.config
    latents = torch.randn(2, c.in_channels, 16, 16)
    text = torch.randn(2, 93, c.joint_attention_dim)
    # The math kernel runs attention as matmuls the counter sees (it has no formula for CPU's fused kernel).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        transformer(
            hidden_states=latents,
            timestep=torch.tensor([500.0, 500.0]),
            encoder_hidden_states=text,
            pooled_projections=torch.randn(2, c.pooled_projection_dim),
        )
    formula = bench.transformer_forward_flops(transformer, latents, text)
    # The formula leaves out the per-sample terms (timestep / pooled embeddings, AdaLN): a few % on this tiny model.
    assert formula == pytest.approx(counter.get_total_flops(), rel=0.05)
    assert formula < counter.get_total_flops()


def test_other_families_fall_back_to_two_flops_per_parameter_and_token():
    model = torch.nn.Linear(4, 3)  # 15 parameters
    assert bench.transformer_forward_flops(model, torch.zeros(2, 10, 4), torch.zeros(2, 6, 4)) == 2 * 2 * 15 * 16


def test_peak_flops_table_and_override():
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("cpu") is None
    assert bench.peak_tflops("NVIDIA L4", override=121.0) == 121.0


def test_gpu_check_dry_run_on_cpu_writes_one_json_and_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    # Kept short: both knobs on SD3, then FLUX and Qwen-Image without (one process per family and knob setting).
    for options in (["--families", "sd35m"], ["--families", "flux qwen_image", "--knobs", "none"]):
        run = subprocess.run(cmd + options + ["--methods", "fast flash"], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-4000:]
    runs = json.loads((tmp_path / "gpu_check.json").read_text())  # every run written to the folder
    assert set(runs) == {"sd35m_none", "sd35m_gradient_checkpointing", "flux_none", "qwen_image_none"}
    assert runs["sd35m_gradient_checkpointing"]["args"]["gradient_checkpointing"] is True
    assert runs["qwen_image_none"]["args"]["transformer"] == "qwen_image"
    for run in runs.values():
        assert [r["method"] for r in run["results"]] == ["fast", "flash"]
        for r in run["results"]:
            assert r["rollout_tflop"] > 0 and r["train_tflop"] > 0 and r["rollout_tflops"] > 0
            assert r["rollout_mfu"] is None and r["train_mfu"] is None  # CPU: no peak, the achieved rate only
            assert r["memory_kind"] == "CPU peak RSS increase"
            # FLOPs follow the forwards: the same FLOPs per forward in the rollout and the training (x3).
            per_forward = r["rollout_tflop"] / r["rollout_calls"]
            assert r["train_tflop"] == pytest.approx(3 * per_forward * r["train_calls"], rel=1e-6)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "rollout MFU" in table and "## sd35m_gradient_checkpointing" in table and "## flux_none" in table
