"""Real multi-process training: 2 CPU processes (gloo, launched with torchrun as `accelerate launch` does on GPUs),
with DDP and with FSDP2.

A group of 4 images spans two processes (2 images per micro-batch). Two processes with gradient accumulation 2 see the
same generation batch as one process with accumulation 4; with noise seeded by the global micro-batch index they also
sample the same images, so advantages, losses and the trained LoRA must match.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_flow_grpo.testing import make_tiny_sd3_pipeline

# Several processes, minutes: `pytest -m "not distributed"` leaves them out. One xdist worker runs them all, one after
# the other (the module's fixture once), beside the rest of the suite.
pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _command(out: Path, processes: int, grad_accum: int, *extra: str) -> list[str]:
    if processes == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        cmd += [f"--master_port={_free_port()}", str(WORKER)]
    return cmd + ["--out", str(out), "--grad_accum", str(grad_accum), *extra]


def _records(out: Path, processes: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def _run(out: Path, processes: int, grad_accum: int, *extra: str) -> list[dict]:
    cmd = _command(out, processes, grad_accum, *extra)
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    records = _records(out, processes)
    assert all(record["num_processes"] == processes for record in records)
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    one = _run(root / "one", processes=1, grad_accum=4)[0]
    two = _run(root / "two", processes=2, grad_accum=2)
    return root, one, two


def _global_order(two: list[dict], step: int) -> list[dict]:
    """The micro-batches of one optimizer step in the dataloader's global order (process r got r, r + 2, ...)."""
    per_process = [record["micro_batches"][2 * step : 2 * step + 2] for record in two]
    return [per_process[rank][local] for local in range(2) for rank in range(2)]


def test_groups_are_regrouped_across_processes_and_advantages_match_one_process(runs):
    _, one, two = runs
    for step in range(2):
        single = one["micro_batches"][4 * step : 4 * step + 4]
        multi = _global_order(two, step)
        assert [mb["rows"] for mb in single] == [mb["rows"] for mb in multi]
        # Each group of 4 was split between the processes, and each process saw only half of it.
        for rank in range(2):
            local_rows = [row for mb in two[rank]["micro_batches"][2 * step : 2 * step + 2] for row in mb["rows"]]
            assert all(local_rows.count(row) == 2 for row in set(local_rows))
        assert [mb["noise"] for mb in single] == [mb["noise"] for mb in multi]
        single_adv = torch.tensor([a for mb in single for a in mb["advantages"]])
        multi_adv = torch.tensor([a for mb in multi for a in mb["advantages"]])
        # Step 1 is bit-identical; step 2 follows weights that differ by the all-reduce's rounding.
        torch.testing.assert_close(multi_adv, single_adv, atol=0.0 if step == 0 else 1e-3, rtol=0.0)
        # Advantages are normalised over whole groups: they sum to ~0 per group only if both halves were seen.
        assert abs(multi_adv.sum().item()) < 1e-4


def test_losses_and_trained_lora_match_one_process(runs):
    root, one, two = runs
    assert two[0]["losses"] == two[1]["losses"]  # the logged loss is averaged over processes
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one["losses"]), atol=1e-8, rtol=1e-4)
    single = load_file(root / "one" / "final" / "pytorch_lora_weights.safetensors")
    multi = load_file(root / "two" / "final" / "pytorch_lora_weights.safetensors")
    assert single.keys() == multi.keys()
    # Equal up to the all-reduce's rounding, which AdamW can magnify for the odd weight whose gradient is ~0: compare
    # each tensor as a whole (the LoRA B matrices start at 0, so they are made of the updates alone).
    for key in single:
        error = (multi[key] - single[key]).norm() / single[key].norm().clamp(min=1e-12)  # some B never train
        assert error < 1e-3, (key, error.item())


def test_each_process_samples_different_noise_but_shares_the_window(runs):
    _, _, two = runs
    hashes = [[h for mb in record["micro_batches"] for h in mb["first_noise"]] for record in two]
    assert not set(hashes[0]) & set(hashes[1])  # no identical images across processes
    assert len(set(hashes[0])) == len(hashes[0])  # nor within one
    assert two[0]["windows"] == two[1]["windows"]


def test_same_latent_gives_a_group_one_noise_across_processes(tmp_path):
    two = _run(tmp_path, 2, 2, "--same_latent")
    by_row: dict[int, set[str]] = {}
    for record in two:
        # The steps before the window are deterministic, so a group's samples agree up to the window's first step.
        for mb in record["micro_batches"][:2]:
            for row, noise in zip(mb["rows"], mb["first_noise"]):
                by_row.setdefault(row, set()).add(noise)
    assert by_row and all(len(noises) == 1 for noises in by_row.values())
    assert len({next(iter(n)) for n in by_row.values()}) == len(by_row)  # different prompts, different noise


def test_preferences_compare_whole_groups_across_processes_and_share_the_judging(tmp_path):
    """Pref-GRPO: groups split over processes are paired whole (the reference code pairs only within one GPU's batch),
    each process judges half of the pairs, and the advantages equal those of one process."""
    one = _run(tmp_path / "one", 1, 4, "--preference")[0]
    two = _run(tmp_path / "two", 2, 2, "--preference")
    pairs_per_step = 2 * 6  # 2 groups of 4 per step: 6 pairs each
    assert one["preference_queries"] == 2 * pairs_per_step
    assert [record["preference_queries"] for record in two] == [pairs_per_step, pairs_per_step]
    single = one["micro_batches"][:4]
    multi = _global_order(two, 0)
    torch.testing.assert_close(
        torch.tensor([a for mb in multi for a in mb["advantages"]]),
        torch.tensor([a for mb in single for a in mb["advantages"]]),
        atol=0.0,
        rtol=0.0,
    )


def _lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "pytorch_lora_weights.safetensors")


def _assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_sigterm_to_the_launcher_saves_the_last_step_at_once_then_the_step_in_progress(runs, tmp_path):
    """A preempted job: the launcher forwards SIGTERM to every process (and kills them 30 s later). The main process
    writes checkpoint-2 at once; the processes finish step 3 together, save it and stop; both resume exactly."""
    root, _, two = runs
    out, marker = tmp_path / "killed", tmp_path / "in_step_3"
    cmd = _command(out, 2, 2, "--max_steps", "4", "--save_steps", "100", "--signal_at", "3", "--marker", str(marker))
    with open(tmp_path / "log.txt", "w") as log:
        launcher = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not marker.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), (tmp_path / "log.txt").read_text()[-4000:]
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
    killed = _records(out, 2)
    assert all(r["interrupted"] == "SIGTERM: stopped after step 3" and r["global_step"] == 3 for r in killed), killed
    assert sorted(os.listdir(out / "run")) == ["checkpoint-2", "checkpoint-3"]
    # The checkpoint written at once holds step 2 exactly (the fixture's run stopped after 2 steps).
    _assert_same_lora(_lora(out / "run" / "checkpoint-2"), _lora(root / "two" / "final"))
    assert killed[0]["losses"][:2] == two[0]["losses"]

    resumed = _run(tmp_path / "resumed", 2, 2, "--max_steps", "3", "--resume", str(out / "run" / "checkpoint-2"))
    assert all(r["interrupted"] is None and r["global_step"] == 3 for r in resumed)
    _assert_same_lora(_lora(tmp_path / "resumed" / "final"), _lora(out / "run" / "checkpoint-3"))


def test_a_signal_to_one_process_stops_every_process_after_the_step(tmp_path):
    two = _run(tmp_path, 2, 2, "--max_steps", "4", "--save_steps", "100", "--signal_at", "3", "--signal_ranks", "1")
    assert [r["interrupted"] for r in two] == [
        "another process was signalled: stopped after step 3",
        "SIGTERM: stopped after step 3",
    ]
    assert [r["global_step"] for r in two] == [3, 3]
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-3"]  # only the main process saves at once
    assert (tmp_path / "run" / "checkpoint-3" / "trainer_state.json").is_file()


def test_resume_between_iterations_uses_each_process_rollouts(tmp_path):
    """num_iterations=2 on 2 processes: checkpoint-3 falls between the two steps on generation 2's samples; each
    process saved its own share of them, and resuming there ends where the uninterrupted run did."""
    common = ["--num_iterations", "2", "--max_steps", "4"]
    _run(tmp_path / "straight", 2, 2, *common, "--save_steps", "3")
    checkpoint = tmp_path / "straight" / "run" / "checkpoint-3"
    assert {"rollout_buffer_0.safetensors", "rollout_buffer_1.safetensors"} <= set(os.listdir(checkpoint))
    _run(tmp_path / "resumed", 2, 2, *common, "--resume", str(checkpoint))
    _assert_same_lora(_lora(tmp_path / "resumed" / "final"), _lora(tmp_path / "straight" / "final"))


# ------------------------------------------------------------------------------------------------------------ FSDP2
# The worker's `--fsdp2` sets what `accelerate launch --config_file accelerate_configs/fsdp2.yaml` sets and lifts
# Accelerate's CPU restriction (see `_force_fsdp2`): PyTorch's `fully_shard` shards every JointTransformerBlock over
# the 2 gloo processes, the rollout calls the sharded module, saving gathers the full state dict.


def test_fsdp2_lora_trains_like_one_process_saves_and_resumes_exactly(runs, tmp_path):
    root, one, _ = runs
    straight = _run(tmp_path / "straight", 2, 2, "--fsdp2", "--max_steps", "3", "--save_steps", "2")
    assert all(r["distributed_type"] == "FSDP" and r["sharded"].startswith("FSDP") for r in straight)
    # The first two steps are the fixture's one-process run (same images and advantages, sharded gradients).
    torch.testing.assert_close(
        torch.tensor(straight[0]["losses"][:2]), torch.tensor(one["losses"]), atol=1e-8, rtol=1e-4
    )
    assert [mb["noise"] for mb in _global_order(straight, 0)] == [mb["noise"] for mb in one["micro_batches"][:4]]
    checkpoint = tmp_path / "straight" / "run" / "checkpoint-2"
    single, sharded = _lora(root / "one" / "final"), _lora(checkpoint)  # both after 2 steps
    assert single.keys() == sharded.keys()
    for key in single:
        error = (sharded[key] - single[key]).norm() / single[key].norm().clamp(min=1e-12)
        assert error < 1e-3, (key, error.item())
    resumed = _run(tmp_path / "resumed", 2, 2, "--fsdp2", "--max_steps", "3", "--resume", str(checkpoint))
    assert all(r["global_step"] == 3 for r in resumed)
    _assert_same_lora(_lora(tmp_path / "resumed" / "final"), _lora(tmp_path / "straight" / "final"))
    assert not torch.equal(next(iter(_lora(checkpoint).values())), next(iter(single.values())))  # it trained


def _transformer(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def test_fsdp2_full_fine_tuning_matches_one_process_and_resumes_exactly(tmp_path):
    one = _run(tmp_path / "one", 1, 4, "--full")[0]
    straight = _run(tmp_path / "straight", 2, 2, "--full", "--fsdp2", "--max_steps", "3", "--save_steps", "2")
    torch.testing.assert_close(
        torch.tensor(straight[0]["losses"][:2]), torch.tensor(one["losses"]), atol=1e-8, rtol=1e-4
    )
    checkpoint = tmp_path / "straight" / "run" / "checkpoint-2"
    single, sharded = _transformer(tmp_path / "one" / "final"), _transformer(checkpoint)  # gathered from the shards
    initial = make_tiny_sd3_pipeline(seed=0).transformer.state_dict()
    assert single.keys() == sharded.keys() == initial.keys()
    changed = [key for key in single if not torch.equal(single[key], initial[key])]
    assert len(changed) > len(single) // 2  # full fine-tuning: most tensors moved
    for key in changed:
        error = (sharded[key] - single[key]).norm() / (single[key] - initial[key]).norm()  # relative to the update
        assert error < 1e-2, (key, error.item())
    _run(tmp_path / "resumed", 2, 2, "--full", "--fsdp2", "--max_steps", "3", "--resume", str(checkpoint))
    resumed, final = _transformer(tmp_path / "resumed" / "final"), _transformer(tmp_path / "straight" / "final")
    assert all(torch.equal(resumed[key], final[key]) for key in final)
