"""FlowGRPOTrainer: online RL (Flow-GRPO) for flow-matching text-to-image pipelines, on top of `transformers.Trainer`.

One optimizer step:
1. `get_batch_samples` receives the step's micro-batches of prompt rows, samples them with the SDE sampler
   (`sampling.rollout`), scores the images with every reward function, gathers rewards across processes and turns
   them into group-relative advantages (`advantages.compute_advantages`).
2. `training_step` runs once per micro-batch; every recorded SDE step is one backward pass (`sampling.step_log_prob`
   -> clipped policy loss + KL to the reference).
`transformers.Trainer` does the rest: optimizer, scheduler, accumulation, gradient clipping, logging, checkpoints.
"""

import contextlib
import copy
import hashlib
import logging
import math
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from datasets import Dataset
from PIL import Image
from torch.utils.data import Sampler
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoint_integrity, validation
from .advantages import (
    compute_advantages,
    group_stats,
    mix_advantages,
    preference_pairs,
    symmetric_preference,
    win_rate_advantages,
    win_rates,
)
from .ema import ParameterEMA
from .finite import NonFiniteGuard, check_finite
from .flow_grpo_config import FlowGRPOConfig
from .hub import push_checkpoint_to_hub, push_model_to_hub, write_model_card
from .interrupts import StopOnSignal, newest_complete_checkpoint
from .pipelines import get_adapter
from .rewards import call_reward_funcs, resolve_reward_func, reward_func_name, with_timeout
from .rewards.preferences import call_preference_funcs, preference_func_name, resolve_preference_func
from .sampling import WindowSchedule, rollout, step_log_prob
from .utils import image_grid, save_and_report_image

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name: `load_lora_weights(dir)` finds it
EMA_WEIGHTS_NAME = "ema.safetensors"
ROLLOUT_BUFFER_NAME = "rollout_buffer_{rank}.safetensors"

PAPER_CITATION = """\
@article{liu2025flowgrpo,
    title   = {{Flow-GRPO: Training Flow Matching Models via Online RL}},
    author  = {Jie Liu and Gongye Liu and Jiajun Liang and Yangguang Li and Jiaheng Liu and Xintao Wang and Pengfei Wan
               and Di Zhang and Wanli Ouyang},
    journal = {arXiv preprint arXiv:2505.05470},
    year    = {2025}
}"""


class _RowIndexed(torch.utils.data.Dataset):
    """The user's dataset, each row extended with its index (`_row`): the id of its prompt group."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "_row": index}


class GroupSampler(Sampler[int]):
    """Yields each prompt `num_generations` times in a row, in whole generation batches.

    Every generation batch (`prompts_per_batch` prompts) is yielded `repeat` times in a row (`num_iterations`). The
    order is a permutation seeded by `seed` and the epoch, identical on every process; an incomplete last batch
    is dropped so that no optimizer step mixes epochs or holds a partial group.
    """

    def __init__(self, num_rows: int, num_generations: int, prompts_per_batch: int, repeat: int = 1, seed: int = 0):
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_batch, self.repeat, self.seed = prompts_per_batch, repeat, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        usable = len(order) - len(order) % self.prompts_per_batch
        for start in range(0, usable, self.prompts_per_batch):
            chunk = order[start : start + self.prompts_per_batch]
            for _ in range(self.repeat):
                for row in chunk:
                    yield from [row] * self.num_generations

    def __len__(self) -> int:
        return (self.num_rows - self.num_rows % self.prompts_per_batch) * self.num_generations * self.repeat


class _OnStepEnd(TrainerCallback):
    """Calls `function()` after every optimizer step."""

    def __init__(self, function: Callable[[], None]):
        self.function = function

    def on_step_end(self, args, state, control, **kwargs):
        self.function()


def _flatten_buffer(buffer: list[dict]) -> dict[str, torch.Tensor]:
    """The rollout buffer (micro-batches of tensors, a `cond` dict of tensors, a list of step indices) as flat tensors
    for safetensors (cloned: the trajectory tensors may be views of one another)."""
    flat = {}
    for i, micro_batch in enumerate(buffer):
        for key, value in micro_batch.items():
            if key == "cond":
                flat.update({f"{i}.cond.{name}": tensor.detach().clone() for name, tensor in value.items()})
            elif key == "step_indices":
                flat[f"{i}.{key}"] = torch.tensor(value, dtype=torch.int64)
            else:
                flat[f"{i}.{key}"] = value.detach().clone()
    return flat


def _unflatten_buffer(flat: dict[str, torch.Tensor], device: torch.device) -> list[dict]:
    micro_batches: dict[int, dict] = defaultdict(lambda: {"cond": {}})
    for key, tensor in flat.items():
        index, _, name = key.partition(".")
        micro_batch = micro_batches[int(index)]
        if name.startswith("cond."):
            micro_batch["cond"][name.removeprefix("cond.")] = tensor.to(device)
        elif name == "step_indices":
            micro_batch[name] = tensor.tolist()
        else:
            micro_batch[name] = tensor.to(device)
    return [micro_batches[i] for i in sorted(micro_batches)]


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from several integers (stable across processes and runs)."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_prompt_dataset(dataset: Any, name: str) -> None:
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        columns = list(dataset[0].keys()) if len(dataset) else []
    if "prompt" not in columns:
        raise ValueError(
            f"{name} needs a 'prompt' column with the text prompts, but its columns are {columns}. Rename the text "
            f"column, e.g. `{name} = {name}.rename_column('caption', 'prompt')`."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")


class FlowGRPOTrainer(Trainer):
    """Trainer for Flow-GRPO (Liu et al., 2025): GRPO on the SDE sampling steps of a flow-matching model.

    Args:
        model (`str` or `DiffusionPipeline`):
            A Hub id or local path of a diffusers pipeline (loaded with `args.model_init_kwargs`), or a pipeline
            object. Supported families: see `trl_flow_grpo.pipelines.ADAPTERS`. Its transformer is trained; the VAE
            and text encoders stay frozen.
        reward_funcs (`callable`, `str` or a list of them):
            Reward functions called as `f(prompts=..., images=..., <dataset columns>=..., trainer_state=...)`,
            returning one float (or `None`: not applicable) per image; `async def` functions run concurrently.
            A string names a built-in (`trl_flow_grpo.rewards.REWARD_FUNCS`).
        args ([`FlowGRPOConfig`], *optional*):
            Training configuration; defaults to `FlowGRPOConfig("<model>-Flow-GRPO")`.
        train_dataset ([`~datasets.Dataset`]):
            Prompts in a `prompt` column; every other column is passed to the reward functions.
        eval_dataset ([`~datasets.Dataset`], *optional*):
            Prompts for [`~FlowGRPOTrainer.evaluate`]: deterministic ODE samples, fixed seeds, every reward.
        callbacks (`list[TrainerCallback]`, *optional*):
            Extra callbacks, as for [`~transformers.Trainer`].
        optimizers (`tuple`, *optional*):
            `(optimizer, lr_scheduler)`, as for [`~transformers.Trainer`]; AdamW and `lr_scheduler_type` otherwise.
        peft_config ([`~peft.LoraConfig`], *optional*):
            Train a LoRA on the transformer (the reference policy is then the same network with the adapter
            disabled). Without it the whole transformer is trained and, if `beta > 0`, a frozen copy is kept.
        preference_funcs (`callable`, `str` or a list of them, *optional*):
            Pref-GRPO: pairwise preference functions, called as `f(prompts=..., images_a=..., images_b=...,
            <dataset columns>=..., trainer_state=...)` and returning P(a preferred over b) per pair (see
            `trl_flow_grpo.rewards.preferences`). The images of each group (gathered across processes) are compared
            in pairs (`preference_num_opponents`, `preference_symmetric`); win rates become advantages, mixed with
            the reward functions' at the advantage level (`preference_weights`). A string names a built-in judge or
            a built-in reward compared through its scores. `reward_funcs` may then be empty.
    """

    _tag_names = ["trl", "flow-grpo", "diffusers", "lora", "text-to-image"]
    _name = "Flow-GRPO"
    _paper = {
        "title": "Flow-GRPO: Training Flow Matching Models via Online RL",
        "id": "2505.05470",
        "citation": PAPER_CITATION,
    }

    def __init__(
        self,
        model: Any,
        reward_funcs: Callable | str | list[Callable | str] | None = None,
        args: FlowGRPOConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any | None = None,
        preference_funcs: Callable | str | list[Callable | str] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = FlowGRPOConfig(f"{name.split('/')[-1]}-Flow-GRPO")
        if not isinstance(args, FlowGRPOConfig):
            raise TypeError(f"args must be a FlowGRPOConfig, got {type(args).__name__}.")

        # --- inputs are validated before anything heavy happens ---
        if train_dataset is None:
            raise ValueError("FlowGRPOTrainer needs a train_dataset with a 'prompt' column.")
        validation.check_dataset(train_dataset, "train_dataset")
        validation.check_dataset(eval_dataset, "eval_dataset")
        _check_prompt_dataset(train_dataset, "train_dataset")
        _check_prompt_dataset(eval_dataset, "eval_dataset")
        prompts_per_batch = args.generation_batch_size // args.num_generations
        if len(train_dataset) < prompts_per_batch:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} prompts, but one optimizer step needs "
                f"{prompts_per_batch} (generation_batch_size {args.generation_batch_size} / num_generations "
                f"{args.num_generations}). Add prompts or lower per_device_train_batch_size / "
                "gradient_accumulation_steps."
            )
        reward_funcs = [] if reward_funcs is None else reward_funcs
        if not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]
        preference_funcs = [] if preference_funcs is None else preference_funcs
        if not isinstance(preference_funcs, (list, tuple)):
            preference_funcs = [preference_funcs]
        if not reward_funcs and not preference_funcs:
            raise ValueError(
                "Pass at least one reward function (reward_funcs) or preference function (preference_funcs)."
            )
        self.preference_funcs = [
            resolve_preference_func(f, temperature=args.preference_temperature, tie_margin=args.preference_tie_margin)
            for f in preference_funcs
        ]
        self.preference_func_names = [preference_func_name(f) for f in self.preference_funcs]
        self.preference_func_names = validation.unique_names(self.preference_func_names, "preference function")
        if args.preference_weights is not None and len(args.preference_weights) != len(self.preference_funcs):
            raise ValueError(
                f"preference_weights has {len(args.preference_weights)} values but there are "
                f"{len(self.preference_funcs)} preference functions ({', '.join(self.preference_func_names)})."
            )
        self.preference_weights = list(args.preference_weights or [1.0] * len(self.preference_funcs))
        self.reward_func_names = [reward_func_name(f) for f in reward_funcs]
        self.reward_funcs = [resolve_reward_func(f) for f in reward_funcs]
        self.reward_func_names = validation.unique_names(self.reward_func_names, "reward function")
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} values but there are {len(self.reward_funcs)} "
                f"reward functions ({', '.join(self.reward_func_names)})."
            )
        self.reward_weights = torch.tensor(args.reward_weights or [1.0] * len(self.reward_funcs))
        validation.check_weights(self.reward_weights.tolist(), self.reward_func_names, self.preference_weights)
        self.reward_funcs = [
            with_timeout(f, args.reward_timeout, n) for f, n in zip(self.reward_funcs, self.reward_func_names)
        ]
        self.preference_funcs = [
            with_timeout(f, args.reward_timeout, n, "preference function")
            for f, n in zip(self.preference_funcs, self.preference_func_names)
        ]

        # --- pipeline ---
        if isinstance(model, str):
            from diffusers import DiffusionPipeline

            init_kwargs = dict(args.model_init_kwargs or {})
            for key in ("dtype", "torch_dtype"):  # diffusers >= 0.36 prefers `dtype`; accept both, as strings too
                if isinstance(init_kwargs.get(key), str) and init_kwargs[key] != "auto":
                    init_kwargs[key] = getattr(torch, init_kwargs[key])
            model = DiffusionPipeline.from_pretrained(model, **init_kwargs)
        self.adapter = get_adapter(model)
        self.adapter.check_inputs(args.height, args.width)
        self.pipeline = model
        for module in self.adapter.frozen_modules:
            module.requires_grad_(False)
            module.eval()

        set_seed(args.seed)  # the LoRA's random init follows args.seed, like everything else
        transformer = self.adapter.transformer
        self.ref_transformer = None
        self.is_lora = peft_config is not None
        if self.is_lora:
            if getattr(peft_config, "lora_dropout", 0.0):
                logger.warning(
                    "lora_dropout=%s: dropout makes training log-probs differ from sampling ones, so the first "
                    "ratio is not exactly 1. Flow-GRPO uses lora_dropout=0.",
                    peft_config.lora_dropout,
                )
            transformer.requires_grad_(False)
            transformer.add_adapter(peft_config)
            for param in transformer.parameters():  # train the adapter in float32 even on a bf16 model
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            transformer.requires_grad_(True)
            if args.beta > 0:
                self.ref_transformer = copy.deepcopy(transformer).requires_grad_(False).eval()
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            # transformers would call `gradient_checkpointing_enable()`, which diffusers models do not have: use
            # diffusers' own, and hide the flag from transformers on a copy (the user's config stays as it was).
            transformer.enable_gradient_checkpointing()
            args = copy.copy(args)
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False

        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._buffer: list[dict] | None = None
        self._steps_on_buffer = 0
        self._last_samples: tuple[list, list[str], list[float]] | None = None

        super().__init__(
            model=transformer,
            args=args,
            data_collator=lambda rows: rows,
            train_dataset=_RowIndexed(train_dataset),
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        device = self.accelerator.device
        for module in self.adapter.frozen_modules:
            module.to(device)
        if self.ref_transformer is not None:
            self.ref_transformer.to(device)
        self.train_sigmas = self.adapter.sigmas(args.num_inference_steps, args.height, args.width, device)
        # Which steps are SDE at each iteration (`sampling.windows`); `sde_steps` holds the current window's steps.
        self.sde_window = WindowSchedule.from_config(args)
        self.sde_steps = self.sde_window.for_iteration(0).steps
        self.guidance_scale = args.guidance_scale
        if self.guidance_scale is None:
            self.guidance_scale = self.adapter.default_guidance_scale
        self.rollout_guidance = self.guidance_scale if args.train_cfg else 1.0
        self.ema = None
        if args.ema_decay is not None:
            trained = ((name, p) for name, p in transformer.named_parameters() if p.requires_grad)
            self.ema = ParameterEMA(trained, max_decay=args.ema_decay)
            self.add_callback(_OnStepEnd(self.ema.update))
        self._buffer_after_step: tuple[list[dict] | None, int] = (None, 0)  # for checkpoints written mid-step
        self.add_callback(_OnStepEnd(self._mark_buffer))
        self._nonfinite = NonFiniteGuard(lambda: self.accelerator.unwrap_model(self.model).named_parameters())
        self.add_callback(self._nonfinite)  # before StopOnSignal: it raises while the weights hold the last step
        self._stop_on_signal = StopOnSignal(
            save_now=self._save_checkpoint_now,
            any_process=lambda flag: bool(self._gather_flag(flag).any()),
            num_processes=self.accelerator.num_processes,
        )
        self.add_callback(self._stop_on_signal)  # after the EMA update and the buffer mark: their step ends come first

    # -------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs) -> Any:
        """[`~transformers.Trainer.train`], plus: on Ctrl-C or SIGTERM (e.g. a preempted job) a checkpoint of the last
        completed optimizer step is written at once, so that a killed run loses at most the step in progress; then
        `KeyboardInterrupt` is raised (see `trl_flow_grpo.interrupts.StopOnSignal`; with several processes the step in
        progress is finished and saved first). An exception that ends training (a reward function failing, out of
        memory) also saves the last completed step first, on the process that raised it, unless it came during an
        optimizer update. `resume_from_checkpoint=True` picks the newest complete checkpoint in `output_dir` (one with
        `trainer_state.json`, which is written last)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            self._verify_checkpoint(resume_from_checkpoint)
        with self._stop_on_signal.installed():
            try:
                output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
            except Exception:
                if self._stop_on_signal.between_updates:
                    try:
                        self._save_checkpoint_now()
                    except Exception as error:  # keep the original error
                        logger.error("Could not save the last completed step: %s: %s", type(error).__name__, error)
                raise
        if self._stop_on_signal.stopped_at is not None:
            received = self._stop_on_signal.received
            cause = signal.Signals(received).name if received is not None else "another process was signalled"
            raise KeyboardInterrupt(f"{cause}: stopped after step {self._stop_on_signal.stopped_at}")
        return output

    def _save_checkpoint_now(self) -> None:
        """Write `checkpoint-<global_step>` from this process without collective operations (the other processes
        may be anywhere in their step): the main process writes the weights, optimizer, scheduler, EMA, rollout buffer,
        its RNG state and `trainer_state.json` (last, marking the checkpoint complete); the others write their rollout
        buffer (`num_iterations > 1`, between the iterations of a generation batch)."""
        step = self.state.global_step
        if self.args.save_strategy == "no" or step == 0:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # their saves gather shards from every process: the step's end saves instead
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if not self.args.should_save:
            self._save_rollout_buffer(folder)  # the only per-process state that resuming needs
            return
        if os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
            return
        logger.warning("Stopped during step %d: saving the state after step %d to %s.", step + 1, step, folder)
        self._save(folder)
        self._save_optimizer_and_scheduler(folder)
        self._save_rng_state(folder)
        self.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # the last file before trainer_state.json: record the checksums now
        if self.args.should_save and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            checkpoint_integrity.write_manifest(output_dir)

    def _verify_checkpoint(self, folder: str) -> None:
        """Missing optimizer / scheduler state, or files that differ from their recorded checksums: an error."""
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.save_only_model
        allow = self.args.resume_allow_damaged_checkpoint
        checkpoint_integrity.verify_checkpoint(folder, allow_damaged=allow, require_optimizer=not sharded)

    def _gather_flag(self, flag: bool) -> torch.Tensor:
        """Every process's `flag` (a collective operation: all processes must call it at the same point)."""
        return self.accelerator.gather(torch.tensor([int(flag)], device=self.accelerator.device))

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        with self._stop_on_signal.deferred():  # a signal during the save waits for it to finish
            super()._save_checkpoint(model, trial)

    # ------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return GroupSampler(
            num_rows=len(dataset),
            num_generations=self.args.num_generations,
            prompts_per_batch=self.args.generation_batch_size // self.args.num_generations,
            repeat=self.args.num_iterations,
            seed=self.args.seed,
        )

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, None]:
        """Fetch the step's micro-batches of prompt rows and replace them by scored rollouts (once per generation)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        if self._buffer is None or self._steps_on_buffer % self.args.num_iterations == 0:
            self._buffer = self._generate_and_score(batches)
            self._steps_on_buffer = 0
        self._steps_on_buffer += 1
        return self._buffer, None

    # ------------------------------------------------------------ rollouts
    @property
    def _generation(self) -> int:
        """Index of the current generation batch: derived from the step, so it is the same on every process and
        survives a resume from a checkpoint."""
        return self.state.global_step // self.args.num_iterations

    def _micro_batch_id(self, local_index: int) -> int:
        """The position of this process's `local_index`-th micro-batch in the step's global sequence of micro-batches
        (the dataloader hands process r the micro-batches r, r + P, r + 2P, ...). Seeding by it gives every process
        different noise, and the same images as one process running P times the gradient accumulation."""
        return local_index * self.accelerator.num_processes + self.accelerator.process_index

    def _initial_noise(self, rows: list[dict], micro_batch: int) -> torch.Tensor:
        shape = self.adapter.latent_shape(self.args.height, self.args.width)
        noises = []
        for i, row in enumerate(rows):
            if self.args.same_latent:  # one noise per prompt group, identical on every process
                seed = _seed(self.args.seed, self._generation, row["_row"])
            else:
                seed = _seed(self.args.seed, self._generation, self._micro_batch_id(micro_batch), i)
            noises.append(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(noises).to(self.accelerator.device)

    @torch.no_grad()
    def _generate_and_score(self, batches: list[list[dict]]) -> list[dict]:
        args, device = self.args, self.accelerator.device
        transformer = self.accelerator.unwrap_model(self.model)
        was_training = transformer.training
        transformer.eval()
        # The iteration of the SDE window is the index of the generation batch, counted in optimizer steps so that it
        # is the same on every process and survives a resume from a checkpoint.
        window = self.sde_window.for_iteration(self.state.global_step // args.num_iterations)
        self.sde_steps = window.steps
        start = time.perf_counter()
        micro_batches, images = [], []
        rollout_calls = saved_calls = 0
        show = self.is_local_process_zero() and not args.disable_tqdm
        for index, rows in enumerate(tqdm(batches, desc="rollout", leave=False, disable=not show, delay=2)):
            prompts = [row["prompt"] for row in rows]
            cond = self.adapter.encode_prompts(prompts, device, self.rollout_guidance > 1, args.max_sequence_length)
            generator = torch.Generator(device).manual_seed(
                _seed(args.seed, self._generation, self._micro_batch_id(index), -1)
            )
            with self.compute_loss_context_manager():
                trajectory = rollout(
                    self.adapter,
                    transformer,
                    cond,
                    self.train_sigmas,
                    self._initial_noise(rows, index),
                    sde_steps=window.steps,
                    noise_level=args.noise_level,
                    sde_type=args.sde_type,
                    guidance_scale=self.rollout_guidance,
                    generator=generator,
                    ode_solver=args.ode_solver,
                    ode_compression=args.ode_compression,
                    # With shared noise, the rows of one prompt share the ODE steps before the window: computed once
                    # per prompt of this micro-batch (a group split over micro-batches computes it once in each).
                    prefix_groups=[row["_row"] for row in rows] if args.same_latent else None,
                )
            rollout_calls += trajectory.transformer_calls
            saved_calls += trajectory.transformer_calls_saved
            images.extend(self.adapter.decode(trajectory.final_latents))
            micro_batches.append({"cond": cond, "trajectory": trajectory, "rows": rows})
        transformer.train(was_training)
        rollout_time = time.perf_counter() - start

        rows = [row for mb in micro_batches for row in mb["rows"]]
        prompts = [row["prompt"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "_row")}
        start = time.perf_counter()
        rewards = call_reward_funcs(self.reward_funcs, prompts, images, columns, trainer_state=self.state)
        reward_time = time.perf_counter() - start

        # Advantages need whole groups, which may span processes: gather, compute, keep our slice.
        rewards = rewards.to(device)
        row_ids = torch.tensor([row["_row"] for row in rows], device=device)
        all_rows = self.accelerator.gather(row_ids)
        all_rewards = self.accelerator.gather(rewards) if self.reward_funcs else rewards.new_zeros((len(all_rows), 0))
        _, counts = torch.unique(all_rows, return_counts=True)
        if not torch.all(counts == args.num_generations):
            raise RuntimeError(f"Prompt groups are incomplete ({counts.tolist()}); this is a bug, please report it.")
        result = None
        if self.reward_funcs:
            result = compute_advantages(
                all_rewards,
                all_rows,
                self.reward_weights.to(device),
                scale_rewards=args.scale_rewards,
                aggregation=args.multi_objective_aggregation,
                adv_clip_max=args.adv_clip_max,
            )
            all_advantages = result.advantages
        if self.preference_funcs:
            parts = self._preference_advantages(images, all_rows)
            weights = list(self.preference_weights)
            if result is not None:
                # The pointwise advantage carries the reward functions' total weight (normalize_then_sum already
                # applied each weight), so that e.g. reward_weights=[0.4], preference_weights=[0.6] mixes 0.4 / 0.6.
                parts.insert(0, result.advantages.cpu())
                summed = args.multi_objective_aggregation == "sum_then_normalize"
                weights.insert(0, float(self.reward_weights.sum()) if summed else 1.0)
            all_advantages = mix_advantages(parts, weights, args.adv_clip_max).to(device)
        check_finite(all_advantages, "advantages", self.state.global_step, "Check the rewards' scale.")
        local = slice(self.accelerator.process_index * len(rows), (self.accelerator.process_index + 1) * len(rows))
        advantages = all_advantages[local]

        self._log_generation_metrics(all_rewards, result, all_advantages, rollout_time, reward_time)
        # The window and the cost of this generation batch on this process (transformer forwards counted per sample,
        # a CFG evaluation counting 2). Training runs one forward per recorded step and sample (plus one of the
        # reference model when beta > 0), num_iterations times.
        num_samples = len(rows)
        per_step = self.adapter.forwards_per_sample(self.rollout_guidance) * (2 if args.beta > 0 else 1)
        per_step *= args.num_iterations
        self._metrics["sde_window/start"].append(float(window.start))
        self._metrics["sde_window/size"].append(float(window.size))
        self._metrics["rollout/transformer_calls"].append(float(rollout_calls))
        self._metrics["rollout/transformer_calls_per_image"].append(rollout_calls / num_samples)
        self._metrics["rollout/transformer_calls_saved"].append(float(saved_calls))
        self._metrics["train/transformer_calls"].append(float(num_samples * len(window.steps) * per_step))
        shown = result.rewards[local] if result is not None else advantages  # pref-only: show the advantages
        self._last_samples = (images, prompts, shown.tolist())

        processed, offset = [], 0
        for mb in micro_batches:
            trajectory, size = mb["trajectory"], len(mb["rows"])
            processed.append(
                {
                    "cond": mb["cond"],
                    "latents": trajectory.latents,
                    "next_latents": trajectory.next_latents,
                    "log_probs": trajectory.log_probs,
                    "step_indices": trajectory.step_indices,
                    "advantages": advantages[offset : offset + size],
                }
            )
            offset += size
        return processed

    def _log_generation_metrics(
        self, rewards: torch.Tensor, result: Any, advantages: torch.Tensor, rollout_time: float, reward_time: float
    ):
        metrics = self._metrics
        for k, name in enumerate(self.reward_func_names):
            finite = rewards[:, k][~torch.isnan(rewards[:, k])]
            if finite.numel():  # a reward that applied to no sample of this batch has no mean to log
                metrics[f"rewards/{name}/mean"].append(finite.mean().item())
                metrics[f"rewards/{name}/std"].append(finite.std(unbiased=False).item())
        if result is not None:
            metrics["reward"].append(result.rewards.mean().item())
            metrics["reward_std"].append(result.group_std.mean().item())
            metrics["frac_reward_zero_std"].append(result.frac_zero_std)
        metrics["advantages/abs_mean"].append(advantages.abs().mean().item())
        metrics["advantages/abs_max"].append(advantages.abs().max().item())
        metrics["time/rollout_s"].append(rollout_time)
        metrics["time/reward_s"].append(reward_time)
        metrics["num_images"] = [float((self._generation + 1) * rewards.shape[0])]

    def _preference_advantages(self, images: list, all_rows: torch.Tensor) -> list[torch.Tensor]:
        """Pref-GRPO: compare the images of each group in pairs and turn win rates into advantages, one vector (over
        the whole gathered batch) per preference function.

        Every process gets every image (gathered as uint8 pixels), builds the same pairs (seeded by the generation),
        queries its share of them, and the verdicts are gathered back: groups split across processes are compared
        whole, and the judging work is spread over the processes.
        """
        args, accelerator = self.args, self.accelerator
        num_processes, rank = accelerator.num_processes, accelerator.process_index
        pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))
        all_pixels = accelerator.gather(pixels.to(accelerator.device)).cpu()
        group_ids = all_rows.cpu()
        generator = torch.Generator().manual_seed(_seed(args.seed, self._generation, -2))
        pairs = preference_pairs(group_ids, args.preference_num_opponents, generator)
        queries = torch.cat([pairs, pairs.flip(1)]) if args.preference_symmetric else pairs
        mine = queries[rank::num_processes]

        pil: dict[int, Image.Image] = {}  # one object per image, so that judges can recognise repeats

        def image(index: int) -> Image.Image:
            if index not in pil:
                pil[index] = Image.fromarray(all_pixels[index].numpy())
            return pil[index]

        source = self.train_dataset.dataset
        dataset_rows = [source[int(group_ids[a])] for a in mine[:, 0].tolist()]
        prompts = [row["prompt"] for row in dataset_rows]
        columns = {key: [row[key] for row in dataset_rows] for key in (dataset_rows[0] if dataset_rows else {})}
        columns.pop("prompt", None)
        num_funcs = len(self.preference_funcs)
        local = torch.full((math.ceil(len(queries) / num_processes), num_funcs), math.nan)
        seconds = [0.0] * num_funcs
        if len(mine):
            probs, seconds = call_preference_funcs(
                self.preference_funcs,
                prompts,
                [image(a) for a in mine[:, 0].tolist()],
                [image(b) for b in mine[:, 1].tolist()],
                columns,
                trainer_state=self.state,
            )
            local[: len(mine)] = probs
        gathered = accelerator.gather(local.to(accelerator.device)).cpu().reshape(num_processes, -1, num_funcs)
        probs = torch.empty(len(queries), num_funcs)
        for r in range(num_processes):  # process r answered queries r, r + P, r + 2P, ...
            probs[r::num_processes] = gathered[r, : len(queries[r::num_processes])]
        if args.preference_symmetric:
            probs = symmetric_preference(probs[: len(pairs)], probs[len(pairs) :])

        parts, metrics = [], self._metrics
        metrics["preferences/pairs"].append(float(len(queries)))
        for m, name in enumerate(self.preference_func_names):
            rates = win_rates(len(group_ids), pairs, probs[:, m])
            parts.append(win_rate_advantages(rates, group_ids))
            _, rate_std = group_stats(rates, group_ids)
            metrics[f"preferences/{name}/win_rate_mean"].append(rates.mean().item())
            metrics[f"preferences/{name}/win_rate_std"].append(rate_std.mean().item())
            metrics[f"preferences/{name}/tie_fraction"].append(
                (probs[:, m] - 0.5).abs().lt(1e-6).float().mean().item()
            )
            metrics[f"preferences/{name}/latency_s"].append(seconds[m])
        return parts

    # -------------------------------------------------------------- training
    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        """One micro-batch: each recorded SDE step is a forward + backward of its own (bounded memory)."""
        model.train()
        steps = inputs["step_indices"]
        scale = len(steps) * self.current_gradient_accumulation_steps
        total = torch.zeros((), device=self.accelerator.device)
        for k, step in enumerate(steps):
            # Synchronise gradients across processes only on the last backward of the micro-batch.
            sync = contextlib.nullcontext() if k == len(steps) - 1 else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    loss = self._step_loss(model, inputs, k, step)
                self.accelerator.backward(loss / scale)
            total += loss.detach()
        self._nonfinite.observe_loss(total)
        return total / scale

    def _step_loss(self, model: torch.nn.Module, inputs: dict, k: int, step: int) -> torch.Tensor:
        args = self.args
        latents, next_latents = inputs["latents"][:, k], inputs["next_latents"][:, k]

        def transition(transformer: torch.nn.Module):  # the same call for the policy and the reference
            return step_log_prob(
                self.adapter,
                transformer,
                inputs["cond"],
                self.train_sigmas,
                step,
                latents,
                next_latents,
                noise_level=args.noise_level,
                sde_type=args.sde_type,
                guidance_scale=self.rollout_guidance,
            )

        log_prob, mean, std, velocity = transition(model)
        advantages = inputs["advantages"]
        ratio = torch.exp(log_prob - inputs["log_probs"][:, k])
        clipped = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon_high)
        loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()

        metrics = self._metrics
        is_low = (ratio < 1 - args.epsilon) & (advantages < 0)
        is_high = (ratio > 1 + args.epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"].append(is_low.float().mean().item())
        metrics["clip_ratio/high_mean"].append(is_high.float().mean().item())
        metrics["clip_ratio/region_mean"].append((is_low | is_high).float().mean().item())
        metrics["ratio/mean"].append(ratio.mean().item())
        metrics["approx_kl_old"].append(0.5 * (log_prob - inputs["log_probs"][:, k]).pow(2).mean().item())

        if args.beta > 0:
            with torch.no_grad(), self._reference_model(model) as reference:
                _, ref_mean, _, ref_velocity = transition(reference)
            dims = tuple(range(1, mean.dim()))
            if args.kl_type == "mean":
                kl = ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=dims)
            else:
                kl = ((velocity - ref_velocity) ** 2).mean(dim=dims)
            loss = loss + args.beta * kl.mean()
            metrics["kl"].append(kl.mean().item())
        return loss

    @contextlib.contextmanager
    def _reference_model(self, model: torch.nn.Module):
        """The reference policy: the frozen copy, or the same network with its LoRA adapters disabled."""
        if self.ref_transformer is not None:
            yield self.ref_transformer
            return
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.disable_adapters()
        try:
            yield unwrapped
        finally:
            unwrapped.enable_adapters()

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self,
        eval_dataset: Dataset | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Sample every eval prompt once with the ODE sampler (fixed seeds) and report the mean of every reward."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (pass it to the trainer or to evaluate()).")
        _check_prompt_dataset(dataset, "eval_dataset")
        if not self.reward_funcs:
            raise ValueError(
                "evaluate() reports the mean of each reward function, and this trainer has only preference functions. "
                "Pass a pointwise reward too (with preference_weights doing the training, reward_weights=[0.0] keeps "
                "it out of the advantages)."
            )
        args, device = self.args, self.accelerator.device
        transformer = self.accelerator.unwrap_model(self.model)
        was_training = transformer.training
        transformer.eval()
        sigmas = self.adapter.sigmas(args.eval_num_inference_steps, args.height, args.width, device)
        shape = self.adapter.latent_shape(args.height, args.width)
        indices = list(range(self.accelerator.process_index, len(dataset), self.accelerator.num_processes))
        batch_size = args.per_device_eval_batch_size
        images, prompts, rows = [], [], []
        show = self.is_local_process_zero() and not args.disable_tqdm
        with self._averaged_weights():  # the EMA weights when `ema_decay` is set
            for start in tqdm(
                range(0, len(indices), batch_size), desc="evaluate", leave=False, disable=not show, delay=2
            ):
                chunk = [dataset[i] for i in indices[start : start + batch_size]]
                batch_prompts = [row["prompt"] for row in chunk]
                cond = self.adapter.encode_prompts(
                    batch_prompts, device, self.guidance_scale > 1, args.max_sequence_length
                )
                noise = torch.stack(
                    [
                        torch.randn(shape, generator=torch.Generator().manual_seed(_seed(args.seed, -1, i)))
                        for i in indices[start : start + batch_size]
                    ]
                ).to(device)
                with self.compute_loss_context_manager():
                    trajectory = rollout(
                        self.adapter,
                        transformer,
                        cond,
                        sigmas,
                        noise,
                        sde_steps=[],
                        noise_level=0.0,
                        sde_type=args.sde_type,
                        guidance_scale=self.guidance_scale,
                    )
                images.extend(self.adapter.decode(trajectory.final_latents))
                prompts.extend(batch_prompts)
                rows.extend(chunk)
        transformer.train(was_training)

        columns = {key: [row[key] for row in rows] for key in (rows[0] if rows else {}) if key != "prompt"}
        rewards = call_reward_funcs(self.reward_funcs, prompts, images, columns, trainer_state=self.state)
        all_rewards = torch.tensor(gather_object(rewards.tolist()), dtype=torch.float32).reshape(
            -1, len(self.reward_funcs)
        )
        weighted = torch.nansum(all_rewards * self.reward_weights, dim=1)
        metrics = {f"{metric_key_prefix}_reward": weighted.mean().item()}
        for k, name in enumerate(self.reward_func_names):
            metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = torch.nanmean(all_rewards[:, k]).item()
        if self.is_world_process_zero() and images:
            self._save_sample_grid(images, prompts, weighted.tolist(), metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Average the metrics collected since the last log (over steps and processes) and add them to `logs`."""
        if not any(key.startswith("eval_") for key in logs) and self._metrics:
            keys = sorted(self._metrics)
            local = torch.tensor(
                [sum(self._metrics[k]) / max(len(self._metrics[k]), 1) for k in keys], device=self.accelerator.device
            )
            averaged = self.accelerator.gather(local[None]).mean(dim=0).tolist()
            logs = {**logs, **dict(zip(keys, averaged))}
            self._metrics.clear()
            if self.args.log_completions and self._last_samples is not None and self.is_world_process_zero():
                self._save_sample_grid(*self._last_samples, split="train")
        super().log(logs, start_time)

    def _save_sample_grid(self, images: list, prompts: list[str], rewards: list[float], split: str) -> None:
        """Save the first `num_images_to_log` images with prompts and rewards, and send them to the trackers."""
        n = min(self.args.num_images_to_log, len(images))
        captions = [f"{p[:60]} | {r:.3f}" for p, r in zip(prompts[:n], rewards[:n])]
        step = self.state.global_step
        path = os.path.join(self.args.output_dir, "samples", f"{split}_step{step:06d}.png")
        grid = image_grid(images[:n], captions)
        save_and_report_image(grid, path, f"{split}/samples", step, self.callback_handler.callbacks)

    # ---------------------------------------------------------------- saving
    def _averaged_weights(self):
        """Context in which the trained parameters hold their EMA (a no-op without `ema_decay`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._stop_on_signal.deferred())  # the model holds other weights than the step's
        if self.ema is not None:
            stack.enter_context(self.ema.applied())
        return stack

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the trained weights (the EMA weights when `ema_decay` is set) in diffusers format.

        Checkpoints (`_internal_call`) keep the raw weights, and the EMA next to the optimizer state, for resuming.
        """
        context = contextlib.nullcontext() if _internal_call else self._averaged_weights()
        with context:
            super().save_model(output_dir, _internal_call=_internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.ema is not None and self.args.should_save:
            from safetensors.torch import save_file

            save_file(self.ema.state_dict(), os.path.join(output_dir, EMA_WEIGHTS_NAME))
        self._save_rollout_buffer(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._load_rollout_buffer(checkpoint)
        if self.ema is None:
            return
        path = os.path.join(checkpoint, EMA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {EMA_WEIGHTS_NAME}: it was written without ema_decay. Resume with the same "
                "ema_decay as the run that wrote it (unset if it had none)."
            )
        from safetensors.torch import load_file

        self.ema.load_state_dict(load_file(path))

    # With num_iterations > 1, a checkpoint written between the iterations of one generation batch holds the rollouts
    # still to be trained on (each process its own), so that resuming trains on the same samples as the uninterrupted
    # run instead of sampling new ones with the newer policy.
    def _mark_buffer(self) -> None:
        # Only a buffer with iterations left is kept: a used-up one must not stay in GPU memory during the next step.
        left = self._steps_on_buffer % self.args.num_iterations != 0
        self._buffer_after_step = (self._buffer if left else None, self._steps_on_buffer)

    def _save_rollout_buffer(self, folder: str) -> None:
        buffer, used = self._buffer_after_step
        if buffer is None:
            return
        from safetensors.torch import save_file

        name = ROLLOUT_BUFFER_NAME.format(rank=self.accelerator.process_index)
        os.makedirs(folder, exist_ok=True)
        save_file(_flatten_buffer(buffer), os.path.join(folder, name), metadata={"steps_on_buffer": str(used)})

    def _load_rollout_buffer(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, ROLLOUT_BUFFER_NAME.format(rank=self.accelerator.process_index))
        # All processes use their buffer, or all sample anew (in step).
        if not self._gather_flag(os.path.isfile(path)).all():
            return
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            used = int(f.metadata()["steps_on_buffer"])
            flat = {key: f.get_tensor(key) for key in f.keys()}
        self._buffer, self._steps_on_buffer = _unflatten_buffer(flat, self.accelerator.device), used
        self._buffer_after_step = (self._buffer, used)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load the weights `_save` wrote: diffusers' LoRA file, or the full transformer in `transformer/`."""
        transformer = self.accelerator.unwrap_model(model if model is not None else self.model)
        lora_file = os.path.join(resume_from_checkpoint, LORA_WEIGHTS_NAME)
        full_dir = os.path.join(resume_from_checkpoint, "transformer")
        if self.is_lora and os.path.isfile(lora_file):
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            state = {key.removeprefix("transformer."): value for key, value in load_file(lora_file).items()}
            result = set_peft_model_state_dict(transformer, state, adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                raise ValueError(
                    f"{lora_file} does not match this LoRA (unexpected keys such as {result.unexpected_keys[:3]}): "
                    "resume with the same peft_config as the run that wrote it."
                )
        elif not self.is_lora and os.path.isdir(full_dir):
            from safetensors.torch import load_file

            files = sorted(f for f in os.listdir(full_dir) if f.endswith(".safetensors"))
            state = {}
            for name in files:
                state.update(load_file(os.path.join(full_dir, name)))
            transformer.load_state_dict(state)
        else:
            expected = LORA_WEIGHTS_NAME if self.is_lora else "transformer/"
            raise FileNotFoundError(
                f"Cannot resume from {resume_from_checkpoint}: it has no {expected} ("
                f"{'LoRA' if self.is_lora else 'full fine-tuning'} run). Pass a checkpoint-<step> folder written by a "
                "FlowGRPOTrainer with the same peft_config."
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the LoRA as diffusers' `pytorch_lora_weights.safetensors` (or the full transformer)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        transformer = self.accelerator.unwrap_model(self.model)
        if self.is_lora:
            from peft.utils import get_peft_model_state_dict

            lora_state = get_peft_model_state_dict(transformer, state_dict=state_dict)
            metadata = transformer.peft_config["default"].to_dict()
            self.adapter.save_lora_weights(output_dir, lora_state, metadata)
        else:
            transformer.save_pretrained(os.path.join(output_dir, "transformer"), safe_serialization=True)

    # ------------------------------------------------------------------- hub
    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write a model card (`README.md`, plus `samples.png`, the newest sample grid) into `args.output_dir`.

        The card has metadata for the Hub (base model, `library_name: diffusers`, tags, `pipeline_tag`), each reward
        when first and last logged, the main hyperparameters, the diffusers code that loads the result, and the
        papers to cite (MixGRPO with a sliding SDE window, Pref-GRPO with preference functions). Main process only.

        Args:
            model_name (`str`, *optional*):
                Title of the card; defaults to the Hub repo name or the output folder name.
            dataset_name (`str`, *optional*):
                Hub id of the prompt dataset (metadata and link).
            tags (`str` or `list[str]`, *optional*):
                Tags added after the trainer's (`trl`, `flow-grpo`, `diffusers`, `lora` for a LoRA, `text-to-image`).
            license (`str`, *optional*):
                License id for the metadata (usually the base model's).
            finetuned_from (`str`, *optional*):
                Hub id of the base model when the pipeline was loaded from a local folder outside the Hub cache.
        """
        accepted = {"license", "finetuned_from"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"create_model_card() got unexpected keyword arguments {unknown}; it accepts model_name, "
                f"dataset_name, tags, {', '.join(sorted(accepted))}."
            )
        if not self.is_world_process_zero():
            return
        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save the model, write the model card and upload `args.output_dir` to the Hub repo `args.hub_model_id`.

        The repo then holds `pytorch_lora_weights.safetensors` (a LoRA, loadable with
        `pipe.load_lora_weights(repo_id)`) or `transformer/` (full fine-tuning), the EMA weights when `ema_decay` is
        set, with `README.md`, `samples.png` (the newest sample grid) and the evaluation grids under `samples/`;
        checkpoints (`checkpoint-*`), the training sample grids and files starting with `_` are not uploaded. The
        repo is created if needed.

        Args:
            commit_message (`str`, *optional*, defaults to `"End of training"`):
                Message of the commit.
            blocking (`bool`, *optional*, defaults to `True`):
                Wait for the upload to finish; otherwise return a `Future`.
            token (`str`, *optional*):
                Hub token with write access; defaults to `args.hub_token`, then to the cached login.
            revision (`str`, *optional*):
                Branch to commit to; defaults to `args.hub_revision`.
            private (`bool`, *optional*):
                Make a newly created repo private; defaults to `args.hub_private_repo`.
            kwargs:
                Passed to [`~FlowGRPOTrainer.create_model_card`] (`model_name`, `dataset_name`, `tags`, `license`,
                `finetuned_from`).

        Returns:
            The `CommitInfo` of the upload (a `Future` of it when `blocking=False`); `None` on other processes.
        """
        return push_model_to_hub(self, commit_message, blocking, token, revision, private, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Intermediate push (`push_to_hub=True`): the LoRA or transformer, the model card, and per `hub_strategy` the
        checkpoint (see `trl_flow_grpo.hub.push_checkpoint_to_hub`)."""
        push_checkpoint_to_hub(self, checkpoint_folder)
