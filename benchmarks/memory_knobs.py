"""Peak memory of one Flow-GRPO training iteration with each memory knob on, against the baseline, in one run.

Every knob trains the same small random SD3 (the tiny offline pipeline of `trl_flow_grpo.testing` with a 4-layer,
4 x 64-head transformer, as `bench_sampling.py --transformer small`) on the same prompts and seeds through
`FlowGRPOTrainer`, for one optimizer step (a LoRA, `beta=0.04` so that the KL reference runs too). Knobs:

* `baseline`: one recorded SDE step per forward + backward;
* `steps_per_backward=2` and `steps_per_backward=all`: recorded steps stacked into one batched forward + backward;
* `activation_checkpointing`: diffusers' gradient checkpointing of the transformer blocks;
* `offload_text_encoders`: text encoders on the CPU except while encoding (changes nothing on a CPU-only run: the
  weights stay in the same RAM; on a GPU it frees their accelerator memory).

Peak memory, per phase (rollout: sampling + decoding + reward; training: the `training_step` calls):
on GPU `torch.cuda.max_memory_allocated` (reset before each phase) minus the memory allocated before it; on CPU the
increase of the process's resident set size (RSS, sampled every 2 ms) over its value before the phase. Each knob runs
in its own process, so the figures do not leak into each other (the CPU allocator keeps freed pages). Ratios are
against `baseline` in the same run.

    python benchmarks/memory_knobs.py --threads 1 --json benchmarks/results/memory_knobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

KNOBS = {
    "baseline": {},
    "steps_per_backward=2": {"steps_per_backward": 2},
    "steps_per_backward=all": {"steps_per_backward": 1000},
    "activation_checkpointing": {"activation_checkpointing": True},
    "offload_text_encoders": {"offload_text_encoders": True},
}
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "one yellow star"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64, help="Image height and width in pixels.")
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size (= num_generations).")
    parser.add_argument("--steps", type=int, default=8, help="num_inference_steps.")
    parser.add_argument("--sde-steps", type=int, default=4, help="Recorded SDE steps (the window size).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--device", default=None, help="cpu or cuda; defaults to cuda when available.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class _Peak:
    """Peak memory per phase: CUDA allocated bytes, or this process's RSS sampled by a thread."""

    def __init__(self, cuda: bool):
        self.cuda, self.phase, self.base, self.peaks = cuda, None, 0, {}
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        if not cuda:
            threading.Thread(target=self._run, daemon=True).start()

    def _now(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.phase is not None:
                self._record(self._now())
            time.sleep(0.002)

    def _record(self, value: int) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value - self.base)

    def wrap(self, phase: str, function):
        def wrapped(*args, **kwargs):
            if self.cuda:
                import torch

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.base, self.phase = self._now(), phase
            try:
                return function(*args, **kwargs)
            finally:
                if self.cuda:
                    import torch

                    torch.cuda.synchronize()
                    self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated() - self.base)
                else:
                    self._record(self._now())
                self.phase = None

        return wrapped


def build_pipeline(resolution: int):
    import torch
    from diffusers import SD3Transformer2DModel

    from trl_flow_grpo.testing import make_tiny_sd3_pipeline

    pipe = make_tiny_sd3_pipeline(seed=0, sample_size=resolution)
    tiny = pipe.transformer.config
    heads, head_dim = 4, 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformer = SD3Transformer2DModel(
            sample_size=tiny.sample_size,
            patch_size=tiny.patch_size,
            in_channels=tiny.in_channels,
            num_layers=4,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=tiny.joint_attention_dim,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=tiny.pooled_projection_dim,
            out_channels=tiny.out_channels,
            pos_embed_max_size=tiny.pos_embed_max_size,
        ).eval()
    pipe.register_modules(transformer=transformer)
    return pipe


def run_knob(args: argparse.Namespace, knob: str) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
    from trl_flow_grpo.pipelines.sd3 import LORA_TARGET_MODULES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = build_pipeline(args.resolution)
    with tempfile.TemporaryDirectory() as output_dir:
        config = FlowGRPOConfig(
            output_dir=output_dir,
            report_to="none",
            num_generations=args.batch_size,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.steps,
            sde_window="frozen",
            sde_window_size=args.sde_steps,
            sde_window_range=[0, args.sde_steps],
            guidance_scale=4.5,
            beta=0.04,
            max_steps=1,
            max_sequence_length=16,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            use_cpu=device == "cpu",
            bf16=device.startswith("cuda"),
            seed=0,
            **KNOBS[knob],
        )
        lora = LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES))
        trainer = FlowGRPOTrainer(
            pipe,
            "jpeg_compressibility",
            args=config,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            peft_config=lora,
        )
        peak = _Peak(device.startswith("cuda"))
        trainer._generate_and_score = peak.wrap("rollout", trainer._generate_and_score)
        trainer.training_step = peak.wrap("training", trainer.training_step)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {
        "knob": knob,
        "rollout_peak_mib": peak.peaks["rollout"] / 2**20,
        "training_peak_mib": peak.peaks["training"] / 2**20,
        "seconds": seconds,
        "loss": trainer.state.log_history[0].get("loss"),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_knob(args, args.worker)))
        return
    results = []
    for knob in KNOBS:
        command = [sys.executable, __file__, "--worker", knob, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{knob}: done", file=sys.stderr)
    base = results[0]
    for result in results:
        for phase in ("rollout", "training"):
            result[f"{phase}_ratio"] = result[f"{phase}_peak_mib"] / base[f"{phase}_peak_mib"]
    unit = "CUDA max_memory_allocated" if (args.device or "").startswith("cuda") else "RSS increase"
    print(f"| knob | rollout peak (MiB) | ratio | training peak (MiB) | ratio | s | loss |  ({unit})")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['knob']} | {r['rollout_peak_mib']:.1f} | {r['rollout_ratio']:.2f} | {r['training_peak_mib']:.1f} "
            f"| {r['training_ratio']:.2f} | {r['seconds']:.1f} | {r['loss']:.6g} |"
        )
    if args.json:
        import torch

        meta = {
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1_5_15": os.getloadavg(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "unit": unit,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
