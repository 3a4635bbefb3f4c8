"""How much reward time `overlap_rewards` hides behind sampling, and what it does to the iteration time, in one run.

The same tiny offline SD3 pipeline (or `--model`, a local diffusers pipeline) trains a LoRA with `FlowGRPOTrainer`
twice per synthetic reward, with `overlap_rewards` on and off, on the same prompts and seeds. The synthetic reward
costs about as much per image as sampling: the benchmark first measures the sampling time of one micro-batch (an
iteration with a free reward), then calibrates, per micro-batch's worth of images,

* `sleep`: `time.sleep` for that long (an I/O-bound reward: a request to a reward server or a VLM judge), and
* `matmul`: a loop of 384 x 384 torch matmuls that takes that long on one thread (a CPU-bound reward model, which
  competes with sampling for the cores; matmuls that large release the GIL for most of their time, as a real reward
  model's layers do),

and scores every image by its mean pixel. A call on the whole batch (overlap off) costs as much as the calls on its
micro-batches. The last micro-batch's rewards have no sampling left to hide behind, so at most `(M - 1) / M` of the
reward time can be hidden with M micro-batches (`hidden_fraction_bound`).

For each (reward, overlap) it reports the iteration time (wall time of one optimizer step, the first one a warm-up
and not timed), `time/reward_s` (the time in reward calls) and `time/reward_wait_s` (the part sampling did not hide);
the hidden fraction `1 - wait / reward` with overlap on; and the ratio of the iteration times (on / off). It writes
everything, with the machine's load averages, to `--output`.

Example (CPU, a few minutes):

    OMP_NUM_THREADS=1 python benchmarks/reward_overlap.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle",
    "one yellow star",
    "a purple heart",
    "three white dots",
    "an orange ring",
    "a black cross",
]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="A local diffusers pipeline; default: the tiny offline SD3.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-inference-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="Images per micro-batch (= num_generations).")
    parser.add_argument("--micro-batches", type=int, default=8, help="Micro-batches per generation batch.")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per arm (the first is a warm-up).")
    parser.add_argument("--rewards", nargs="+", default=["sleep", "matmul"], choices=["sleep", "matmul"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (per thread of work).")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "reward_overlap.json"))
    return parser.parse_args()


def _pipeline(args):
    if args.model:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(args.model)
    from trl_flow_grpo.testing import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(seed=0, sample_size=args.resolution)


def _mean_pixel(images) -> list[float]:
    import numpy as np

    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


class _StepTimes:
    """A callback recording the wall time of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        times = self.times = []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                times.append(-time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                times[-1] += time.perf_counter()

        self.callback = Callback()


def _run(args, reward, overlap: bool, output_dir: str) -> dict:
    """Train `args.steps` optimizer steps; the step times (warm-up dropped) and the reward timings of each step."""
    from datasets import Dataset

    from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
    from trl_flow_grpo.testing import tiny_lora_config

    config = FlowGRPOConfig(
        output_dir=output_dir,
        report_to="none",
        num_generations=args.batch_size,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.micro_batches,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.num_inference_steps,
        max_steps=args.steps,
        max_sequence_length=16,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        logging_steps=1,
        seed=0,
        overlap_rewards=overlap,
    )
    steps = _StepTimes()
    trainer = FlowGRPOTrainer(
        _pipeline(args),
        reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=tiny_lora_config() if args.model is None else None,
        callbacks=[steps.callback],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "time/reward_s" in entry][1:]
    return {
        "iteration_s": steps.times[1:],
        "rollout_s": [entry["time/rollout_s"] for entry in logs],
        "reward_s": [entry["time/reward_s"] for entry in logs],
        "reward_wait_s": [entry["time/reward_wait_s"] for entry in logs],
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _matmul_reward(seconds: float):
    """A reward that multiplies 384 x 384 matrices for about `seconds` per image (calibrated here, on this thread)."""
    import torch

    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0)) / 384**0.5

    def loop(n: int) -> None:
        b = a
        for _ in range(n):
            b = torch.tanh(a @ b)

    start, probe = time.perf_counter(), 20
    loop(probe)
    per_iteration = (time.perf_counter() - start) / probe
    iterations = max(1, round(seconds / per_iteration))

    def matmul_reward(prompts, images, **kwargs):
        loop(iterations * len(images))
        return _mean_pixel(images)

    return matmul_reward, iterations


def main() -> None:
    args = _parse()
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:

        def free_reward(prompts, images, **kwargs):
            return _mean_pixel(images)

        free = _run(args, free_reward, overlap=False, output_dir=os.path.join(tmp, "calibration"))
        sampling_s = _mean(free["rollout_s"]) / args.micro_batches
        per_image_s = sampling_s / args.batch_size
        print(f"sampling one micro-batch of {args.batch_size}: {sampling_s:.3f} s")
        results = {}
        for kind in args.rewards:
            if kind == "sleep":

                def sleep_reward(prompts, images, **kwargs):
                    time.sleep(per_image_s * len(images))
                    return _mean_pixel(images)

                reward, detail = sleep_reward, {"sleep_per_image_s": per_image_s}
            else:
                reward, iterations = _matmul_reward(per_image_s)
                detail = {"matmul_iterations_per_image": iterations}
            arms = {
                mode: _run(args, reward, overlap=mode == "on", output_dir=os.path.join(tmp, f"{kind}-{mode}"))
                for mode in ("off", "on")
            }
            on, off = arms["on"], arms["off"]
            hidden = 1.0 - _mean(on["reward_wait_s"]) / _mean(on["reward_s"])
            ratio = _mean(on["iteration_s"]) / _mean(off["iteration_s"])
            results[kind] = {
                **detail,
                "arms": arms,
                "hidden_fraction": hidden,
                "hidden_fraction_bound": (args.micro_batches - 1) / args.micro_batches,
                "iteration_time_ratio_on_off": ratio,
                "reward_time_ratio_on_off": _mean(on["reward_s"]) / _mean(off["reward_s"]),
            }
            print(
                f"{kind:>6}: iteration {_mean(off['iteration_s']):.3f} s sequential -> "
                f"{_mean(on['iteration_s']):.3f} s "
                f"overlapped (x{ratio:.2f}); reward {_mean(on['reward_s']):.3f} s of which {hidden:.0%} hidden "
                f"(wait {_mean(on['reward_wait_s']):.3f} s; sequential reward {_mean(off['reward_s']):.3f} s)"
            )
    record = {
        "benchmark": "reward_overlap",
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_1_5_15_min_at_start": load,
            "loadavg_1_5_15_min_at_end": os.getloadavg(),
            "note": "CPU-only; other processes shared the cores (see the load averages).",
        },
        "sampling_per_micro_batch_s": sampling_s,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
