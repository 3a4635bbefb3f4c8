"""Worker for tests/test_distributed.py: a tiny Flow-GRPO run that records what each process did.

Run on P processes (`accelerate launch --num_processes P` / `torchrun`) with `--grad_accum A`, or on one process with
`--grad_accum P*A`: both see the same generation batches. Writes `<out>/rank<r>.json` with, per micro-batch (in the
order this process ran them): the prompt rows, the advantages, the rewards and a hash of the initial noise; per step
the SDE window; and the logged losses. Rank 0 also saves the final LoRA.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "one yellow star", "a big house", "a small tree"]


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


class BrighterWins:
    """A preference function that counts the pairs it is asked about."""

    def __init__(self):
        self.queries = 0

    def __call__(self, prompts, images_a, images_b, **kwargs):
        self.queries += len(prompts)
        return [float(a > b) for a, b in zip(brightness(images_a), brightness(images_b))]


# What `accelerate launch` sets from `accelerate_configs/fsdp2.yaml` (mixed precision left out: fp32 on CPU).
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "JointTransformerBlock",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
}


def _force_fsdp2() -> None:
    """FSDP2 on CPU processes. PyTorch's `fully_shard` runs on CPU with gloo, but Accelerate (1.15) only turns
    `ACCELERATE_USE_FSDP` into FSDP for GPU-like distributed types: on CPU it keeps `MULTI_CPU` (plain DDP) without a
    word. This switches the state to FSDP once Accelerate built it, so that everything after (the Trainer's
    `is_fsdp_enabled`, `prepare`'s `fully_shard` of every `JointTransformerBlock`, the full state dict at save time)
    is Accelerate's own FSDP2 path, as on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    os.environ.update(FSDP2_ENV)
    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later states copy it from here

    AcceleratorState.__init__ = patched


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--grad_accum", type=int, required=True)
    parser.add_argument("--same_latent", action="store_true")
    parser.add_argument("--preference", action="store_true", help="add a Pref-GRPO preference function")
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--num_iterations", type=int, default=1)
    parser.add_argument("--save_steps", type=int, default=0, help="0: no checkpoints")
    parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    parser.add_argument("--signal_at", type=int, default=0, help="during the N-th generation batch (1-based) ...")
    parser.add_argument("--signal_ranks", type=int, nargs="*", default=[], help="... these ranks send SIGTERM to self")
    parser.add_argument("--marker", default=None, help="... or rank 0 writes this file and waits for a signal")
    parser.add_argument("--fsdp2", action="store_true", help="shard the transformer with FSDP2 (see _force_fsdp2)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of a LoRA")
    cli = parser.parse_args()
    if cli.fsdp2:
        _force_fsdp2()
    torch.set_num_threads(1)

    args = FlowGRPOConfig(
        output_dir=os.path.join(cli.out, "run"),
        report_to="none",
        use_cpu=True,
        num_generations=4,
        per_device_train_batch_size=2,  # a group of 4 spans two micro-batches, i.e. two processes
        gradient_accumulation_steps=cli.grad_accum,
        height=32,
        width=32,
        num_inference_steps=4,
        sde_window="random",
        sde_window_size=2,
        max_steps=cli.max_steps,
        num_iterations=cli.num_iterations,
        max_sequence_length=16,
        learning_rate=1e-2,
        beta=0.04,
        same_latent=cli.same_latent,
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    judge = BrighterWins()
    trainer = FlowGRPOTrainer(
        model=make_tiny_sd3_pipeline(seed=0),
        reward_funcs=brightness,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=None if cli.full else tiny_lora_config(),
        preference_funcs=[judge] if cli.preference else None,
    )
    record = {"micro_batches": [], "windows": []}
    generate = trainer._generate_and_score

    rank = trainer.accelerator.process_index

    def recorded(batches):
        if len(record["windows"]) + 1 == cli.signal_at:
            if rank in cli.signal_ranks:
                os.kill(os.getpid(), signal.SIGTERM)
            if cli.marker and rank == 0:
                Path(cli.marker).touch()  # the test signals the launcher, which forwards it to every process
                deadline = time.monotonic() + 60
                while trainer._stop_on_signal.received is None and time.monotonic() < deadline:
                    time.sleep(0.05)
        processed = generate(batches)
        record["windows"].append(list(processed[0].step_indices))
        for rows, mb in zip(batches, processed):
            record["micro_batches"].append(
                {
                    "rows": [row["_row"] for row in rows],
                    "advantages": mb.advantages.tolist(),
                    "noise": hashlib.sha256(mb.latents[:, 0].numpy().tobytes()).hexdigest(),
                    "first_noise": [hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in mb.latents[:, 0]],
                }
            )
        return processed

    trainer._generate_and_score = recorded
    try:
        trainer.train(resume_from_checkpoint=cli.resume)
        record["interrupted"] = None
    except KeyboardInterrupt as error:
        record["interrupted"] = str(error)
    record["global_step"] = trainer.state.global_step
    record["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record["rewards"] = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    record["num_processes"] = trainer.accelerator.num_processes
    record["distributed_type"] = trainer.accelerator.distributed_type.value
    record["sharded"] = type(trainer.model).__name__
    record["preference_queries"] = judge.queries
    with open(os.path.join(cli.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    trainer.save_model(os.path.join(cli.out, "final"))
    # Everything is on disk. Leave without the interpreter's teardown: on CPU/gloo (torch 2.13) a background thread of
    # the distributed runtime occasionally aborts the exiting process ("terminate called without an active exception",
    # about 1 run in 10, even after destroy_process_group), which would fail the test for a reason outside this code.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
