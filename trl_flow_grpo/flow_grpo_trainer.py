"""FlowGRPOTrainer: online RL (Flow-GRPO) for flow-matching text-to-image pipelines, on top of `transformers.Trainer`.

One optimizer step, in the order of this file:
1. `get_batch_samples` receives the step's micro-batches of prompt rows and, once per generation batch,
   `_generate_and_score` samples them with the SDE sampler of the iteration's window (`sampling.sample`), scores the
   images with every reward (and preference) function across processes and turns the scores into group-relative
   advantages (`scoring.Scorer`): one `RolloutBatch` per micro-batch.
2. `training_step` runs once per `RolloutBatch`; every recorded SDE step is one backward pass
   (`sampling.step_log_prob` -> clipped policy loss + KL to the reference, `_step_loss`), or `steps_per_backward`
   steps share one batched forward and backward (`sampling.steps_log_prob`, `_steps_loss`).
`transformers.Trainer` does the rest: optimizer, scheduler, accumulation, gradient clipping, logging, checkpoints.
Saving, resuming and every override of a private Trainer method are in `checkpointing.CheckpointingMixin`; the model
card and uploads in `hub`.
"""

import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, set_seed

from . import acceleration, hub, sample_logging
from .checkpointing import CheckpointingMixin, RolloutBuffer
from .data import SOURCE_IMAGES_KEYWORD, RowIndexed, SourceImageRows, check_prompt_dataset, check_train_dataset
from .ema import ParameterEMA
from .finite import NonFiniteGuard
from .flow_grpo_config import FlowGRPOConfig
from .interrupts import StopOnSignal
from .losses import flow_grpo_loss, grpo_guard_loss
from .pipelines import get_adapter
from .reference import ReferenceRefresh
from .rollout_batch import RolloutBatch
from .sampling import WindowSchedule, sample, step_log_prob, steps_log_prob
from .scoring import Scorer
from .seeds import stable_seed
from .utils import image_grid
from .validation import check_generation_batch

logger = logging.getLogger(__name__)


class _OnStepEnd(TrainerCallback):
    """Calls `function()` after every optimizer step."""

    def __init__(self, function: Callable[[], None]):
        self.function = function

    def on_step_end(self, args, state, control, **kwargs):
        self.function()


def _load_pipeline(model: Any, init_kwargs: dict | None) -> Any:
    """The diffusers pipeline `model` names (Hub id or folder), or `model` itself if it is one."""
    if not isinstance(model, str):
        return model
    from diffusers import DiffusionPipeline

    init_kwargs = dict(init_kwargs or {})
    for key in ("dtype", "torch_dtype"):  # diffusers >= 0.36 prefers `dtype`; accept both, as strings too
        if isinstance(init_kwargs.get(key), str) and init_kwargs[key] != "auto":
            init_kwargs[key] = getattr(torch, init_kwargs[key])
    return DiffusionPipeline.from_pretrained(model, **init_kwargs)


def _prepare_transformer(
    transformer: torch.nn.Module, peft_config: Any, args: FlowGRPOConfig, repeated_blocks: tuple[str, ...] = ()
) -> tuple[Any, Any]:
    """Make `transformer` trainable: set its attention backend, add the LoRA (trained in float32), or train it whole
    (with a frozen reference copy when `beta > 0`); turn on diffusers' gradient checkpointing; compile its repeated
    blocks (`repeated_blocks`: the adapter's names, for a model class that lists none). Returns the reference copy
    (`None` with a LoRA, whose reference is the network with its adapter disabled) and the args to give
    `transformers.Trainer`."""
    ref_transformer = None
    if args.attention_backend is not None:  # before the reference copy, which inherits it
        acceleration.set_attention_backend(transformer, args.attention_backend)
    if peft_config is not None:
        if getattr(peft_config, "lora_dropout", 0.0):
            logger.warning(
                "lora_dropout=%s: dropout makes training log-probs differ from sampling ones, so the first ratio is "
                "not exactly 1. Flow-GRPO uses lora_dropout=0.",
                peft_config.lora_dropout,
            )
        transformer.requires_grad_(False)
        transformer.add_adapter(peft_config)
        cast_training_params(transformer, dtype=torch.float32)  # train the adapter in float32 on a bf16 model
    else:
        transformer.requires_grad_(True)
        if args.beta > 0:
            ref_transformer = copy.deepcopy(transformer).requires_grad_(False).eval()
    if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
        # transformers would call `gradient_checkpointing_enable()`, which diffusers models do not have: use diffusers'
        # own, and hide the flag from transformers on a copy (the user's config stays as it was).
        transformer.enable_gradient_checkpointing()
        args = copy.copy(args)
        args.gradient_checkpointing = False
        if hasattr(args, "activation_checkpointing"):
            args.activation_checkpointing = False
    if args.compile_transformer:  # after the LoRA layers exist, so that they are compiled with their blocks
        for module in (transformer, ref_transformer):
            if module is not None:
                acceleration.compile_blocks(module, repeated_blocks)
    return ref_transformer, args


class FlowGRPOTrainer(CheckpointingMixin, Trainer):
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
        eval_reward_funcs (`callable`, `str` or a list of them, *optional*):
            The reward functions of [`~FlowGRPOTrainer.evaluate`], if they are not the training rewards (e.g. a
            held-out judge that is not optimised against): logged as `eval_rewards/<name>/mean` and `eval_reward`
            (their unweighted sum), and reaching the model card's evaluation results. Unset: the training rewards
            (and `reward_weights`); `eval_reward_gap` is only logged then.
    """

    _tag_names = ["trl", "flow-grpo", "diffusers", "lora", "text-to-image"]
    _name = "Flow-GRPO"
    _paper = hub.FLOW_GRPO

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
        eval_reward_funcs: Callable | str | list[Callable | str] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = FlowGRPOConfig(f"{name.split('/')[-1]}-Flow-GRPO")
        if not isinstance(args, FlowGRPOConfig):
            raise TypeError(f"args must be a FlowGRPOConfig, got {type(args).__name__}.")

        # --- inputs are validated before anything heavy happens ---
        check_generation_batch(args)  # again: the batch fields may have changed since the config was built
        check_train_dataset(train_dataset, args.generation_batch_size, args.num_generations)
        check_prompt_dataset(eval_dataset, "eval_dataset")
        self.scorer = Scorer(reward_funcs, preference_funcs, args)
        self.reward_funcs, self.reward_func_names = self.scorer.reward_funcs, self.scorer.reward_func_names
        self.preference_funcs = self.scorer.preference_funcs
        self.preference_func_names = self.scorer.preference_func_names
        self.eval_scorer = self.scorer  # evaluation rewards: the training rewards, or their own (weight 1 each)
        if eval_reward_funcs is not None:
            funcs = eval_reward_funcs if isinstance(eval_reward_funcs, (list, tuple)) else [eval_reward_funcs]
            self.eval_scorer = Scorer(funcs, None, args, reward_weights=[1.0] * len(funcs))

        # --- the pipeline: the transformer is trained, everything else frozen ---
        self.pipeline = model = _load_pipeline(model, args.model_init_kwargs)
        self.adapter = get_adapter(model)
        self.adapter.check_inputs(args.height, args.width)
        self._source_image_column = args.source_image_column
        train_dataset = self._with_source_images(train_dataset, "train_dataset")
        self._with_source_images(eval_dataset, "eval_dataset")  # checked now; wrapped at each `evaluate`
        self.eval_size = (args.eval_height or args.height, args.eval_width or args.width)
        self.adapter.check_inputs(*self.eval_size)
        for module in self.adapter.frozen_modules:
            module.requires_grad_(False)
            module.eval()
        set_seed(args.seed)  # the LoRA's random init follows args.seed, like everything else
        self.is_lora = peft_config is not None
        transformer = self.adapter.transformer
        if (
            args.eval_hybrid_steps is not None
            and not self.is_lora
            and (args.beta == 0 or args.ref_model_sync_steps is not None)
        ):
            raise ValueError(
                f"eval_hybrid_steps={args.eval_hybrid_steps} needs the base model for the last steps; with full "
                "fine-tuning that is the frozen copy of the base weights, which the trainer keeps only with beta > 0 "
                f"and ref_model_sync_steps=None (got beta={args.beta}, ref_model_sync_steps="
                f"{args.ref_model_sync_steps}). Train a LoRA (peft_config; its base is the adapter disabled), set "
                "beta > 0 without ref_model_sync_steps, or set eval_hybrid_steps=None."
            )
        self.ref_transformer, args = _prepare_transformer(transformer, peft_config, args, self.adapter.repeated_blocks)
        self.adapter.offload_text_encoders = args.offload_text_encoders

        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._last_samples: sample_logging.SampleTable | None = None  # this process's newest rollouts
        self._last_sample_scores: list[float] = []  # their weighted rewards (advantages if pref-only): grid captions
        self._last_eval_samples: tuple[list, list[str]] | None = None  # the newest evaluation's first images, prompts
        self._last_train_reward: float | None = None  # mean weighted reward of the newest generation batch
        self.rollout_buffer = RolloutBuffer(args.num_iterations)
        super().__init__(
            model=transformer,
            args=args,
            data_collator=lambda rows: rows,
            train_dataset=RowIndexed(train_dataset),
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        device = self.accelerator.device
        offloaded = self.adapter.text_encoders if args.offload_text_encoders else []
        for module in [*self.adapter.frozen_modules, self.ref_transformer]:
            if module is not None:
                # Offloaded text encoders wait on the CPU; `sample` moves them to the device while it encodes.
                module.to("cpu" if any(module is encoder for encoder in offloaded) else device)
        self.train_sigmas = self.adapter.sigmas(args.num_inference_steps, args.height, args.width, device)
        self.sde_window = WindowSchedule.from_config(args)  # which steps are SDE at each iteration
        self.guidance_scale = args.guidance_scale
        if self.guidance_scale is None:
            self.guidance_scale = self.adapter.default_guidance_scale
        self.rollout_guidance = self.guidance_scale if args.train_cfg else 1.0
        self.ema = None
        if args.ema_decay is not None:
            trained = ((name, p) for name, p in transformer.named_parameters() if p.requires_grad)
            self.ema = ParameterEMA(trained, max_decay=args.ema_decay)
            self.add_callback(_OnStepEnd(self.ema.update))
        self.reference_refresh = None
        if args.ref_model_sync_steps is not None:
            trained = ((name, p) for name, p in transformer.named_parameters() if p.requires_grad)
            self.reference_refresh = ReferenceRefresh(trained, args.ref_model_sync_steps, self.ref_transformer)
            self.add_callback(_OnStepEnd(lambda: self.reference_refresh.on_step_end(self.state.global_step)))
        self.add_callback(_OnStepEnd(self.rollout_buffer.mark_step_end))
        self._nonfinite = NonFiniteGuard(lambda: self.accelerator.unwrap_model(self.model).named_parameters())
        self.add_callback(self._nonfinite)  # before StopOnSignal: it raises while the weights hold the last step
        self._stop_on_signal = StopOnSignal(
            save_now=self._save_checkpoint_now,
            any_process=self._any_process,
            num_processes=self.accelerator.num_processes,
        )
        self.add_callback(self._stop_on_signal)  # after the EMA update and the buffer mark: their step ends come first

    def _with_source_images(self, dataset: Any, name: str) -> Any:
        """For an image-editing pipeline, `dataset` with each row's source image under `source_images` (checked);
        any other dataset unchanged."""
        if dataset is None or not self.adapter.edits_images:
            return dataset
        return SourceImageRows(dataset, self._source_image_column, name)

    def _source_images(self, rows: list[dict]) -> list | None:
        """The source images of `rows` for an image-editing pipeline, `None` otherwise."""
        return [row[SOURCE_IMAGES_KEYWORD] for row in rows] if self.adapter.edits_images else None

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a collective operation: every process calls it at the same point)."""
        if flag:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    # ------------------------------------------------------------------------------- 1. sample and score
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, None]:
        """Fetch the step's micro-batches of prompt rows and replace them by scored rollouts (once per generation)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        return self.rollout_buffer.next(lambda: self._generate_and_score(batches)), None

    @property
    def _generation(self) -> int:
        """Index of the current generation batch, counted in optimizer steps: the same on every process, it
        survives a resume from a checkpoint. It is also the iteration of the SDE window."""
        return self.state.global_step // self.args.num_iterations

    def _micro_batch_id(self, local_index: int) -> int:
        """The position of this process's `local_index`-th micro-batch in the step's global sequence of micro-batches
        (the dataloader hands process r the micro-batches r, r + P, r + 2P, ...). Seeding by it gives every process
        different noise, and the same images as one process running P times the gradient accumulation."""
        return local_index * self.accelerator.num_processes + self.accelerator.process_index

    def _step_bar_open(self) -> bool:
        """Whether a progress callback shows its step bar now (`ProgressCallback.training_bar`)."""
        from transformers.trainer_callback import ProgressCallback

        return any(
            isinstance(callback, ProgressCallback) and getattr(callback, "training_bar", None) is not None
            for callback in self.callback_handler.callbacks
        )

    def _initial_noise(self, rows: list[dict], micro_batch: int) -> torch.Tensor:
        shape = self.adapter.latent_shape(self.args.height, self.args.width)
        noises = []
        for i, row in enumerate(rows):
            if self.args.same_latent:  # one noise per prompt group, identical on every process
                seed = stable_seed(self.args.seed, self._generation, row["_row"])
            else:
                seed = stable_seed(self.args.seed, self._generation, self._micro_batch_id(micro_batch), i)
            noises.append(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(noises).to(self.accelerator.device)

    @torch.no_grad()
    def _generate_and_score(self, batches: list[list[dict]]) -> list[RolloutBatch]:
        """Sample every micro-batch of prompt rows with the SDE window of this generation, score all the images and
        attach the advantages: one `RolloutBatch` per micro-batch."""
        args, device = self.args, self.accelerator.device
        window = self.sde_window.for_iteration(self._generation)
        transformer = self.accelerator.unwrap_model(self.model)
        was_training = transformer.training
        transformer.eval()
        start = time.perf_counter()
        samples = []
        rewards = self.scorer.stream(self.state)  # each micro-batch is scored while the next one samples
        # No rollout bar under an open step bar (transformers' ProgressCallback or the CLI's): where the output is
        # not a terminal that moves the cursor (a log file, `| tee`, a notebook) the two bars interleave. The same
        # for the evaluation bar of an evaluation during training.
        show = self.is_local_process_zero() and not args.disable_tqdm and not self._step_bar_open()
        for index, rows in enumerate(tqdm(batches, desc="rollout", leave=False, disable=not show, delay=2)):
            seed = stable_seed(args.seed, self._generation, self._micro_batch_id(index), -1)
            samples.append(
                sample(
                    self.adapter,
                    transformer,
                    [row["prompt"] for row in rows],
                    self._initial_noise(rows, index),
                    self.train_sigmas,
                    sde_steps=window.steps,
                    noise_level=args.noise_level,
                    sde_type=args.sde_type,
                    guidance_scale=self.rollout_guidance,
                    max_sequence_length=args.max_sequence_length,
                    generator=torch.Generator(device).manual_seed(seed),
                    ode_solver=args.ode_solver,
                    ode_compression=args.ode_compression,
                    # With shared noise, the rows of one prompt share the ODE steps before the window: computed once
                    # per prompt of this micro-batch (a group split over micro-batches computes it once in each).
                    prefix_groups=[row["_row"] for row in rows] if args.same_latent else None,
                    record_means=args.loss_type == "grpo_guard",  # its RatioNorm compares them with the new means
                    autocast=self.compute_loss_context_manager,
                    source_images=self._source_images(rows),
                )
            )
            rewards.submit(samples[-1].images, rows)
        transformer.train(was_training)
        rollout_time = time.perf_counter() - start

        rows = [row for micro_batch in batches for row in micro_batch]
        images = [image for s in samples for image in s.images]
        scores = self.scorer.score(
            images, rows, self.accelerator, self._generation, self.state, self.train_dataset.dataset, rewards
        )
        local = slice(self.accelerator.process_index * len(rows), (self.accelerator.process_index + 1) * len(rows))
        advantages = scores.advantages[local]

        # The window and the cost of this generation batch on this process (transformer forwards counted per sample,
        # a CFG evaluation counting 2). Training runs one forward per recorded step and sample (plus one of the
        # reference model when beta > 0), num_iterations times.
        rollout_calls = sum(s.transformer_calls for s in samples)
        per_step = self.adapter.forwards_per_sample(self.rollout_guidance) * (2 if args.beta > 0 else 1)
        metrics = {
            **scores.metrics,
            "time/rollout_s": rollout_time,
            "sde_window/start": float(window.start),
            "sde_window/size": float(window.size),
            "rollout/transformer_calls": float(rollout_calls),
            "rollout/transformer_calls_per_image": rollout_calls / len(rows),
            "rollout/transformer_calls_saved": float(sum(s.transformer_calls_saved for s in samples)),
            "train/transformer_calls": float(len(rows) * window.size * per_step * args.num_iterations),
        }
        for key, value in metrics.items():
            self._metrics[key].append(value)
        self._metrics["num_images"] = [float((self._generation + 1) * scores.rewards.shape[0])]
        self._last_train_reward = scores.metrics.get("reward")  # for `eval_reward_gap`
        shown = scores.pointwise.rewards[local] if scores.pointwise is not None else advantages  # pref-only
        self._last_samples = sample_logging.SampleTable(
            step=self.state.global_step,
            prompts=[row["prompt"] for row in rows],
            images=images,
            rewards={name: scores.rewards[local, i].tolist() for i, name in enumerate(self.reward_func_names)},
            advantages=advantages.tolist(),
        )
        self._last_sample_scores = shown.tolist()

        for s, part in zip(samples, advantages.split([len(s.batch) for s in samples])):
            s.batch.advantages = part
        return [s.batch for s in samples]

    # ----------------------------------------------------------------------------------------------- 2. loss
    def floating_point_ops(self, inputs: RolloutBatch) -> int:
        """0: transformers' estimate counts tokens of `input_ids`, which a `RolloutBatch` does not have."""
        return 0

    def training_step(
        self, model: torch.nn.Module, inputs: RolloutBatch, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One micro-batch: its recorded SDE steps in chunks of `steps_per_backward`, each chunk one batched forward +
        backward (by default one step per backward: bounded memory)."""
        model.train()
        steps = inputs.step_indices
        scale = len(steps) * self.current_gradient_accumulation_steps
        size = self.args.steps_per_backward
        chunks = [list(range(start, min(start + size, len(steps)))) for start in range(0, len(steps), size)]
        total = torch.zeros((), device=self.accelerator.device)
        for c, ks in enumerate(chunks):
            # Synchronise gradients across processes only on the last backward of the micro-batch.
            sync = contextlib.nullcontext() if c == len(chunks) - 1 else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    if len(ks) == 1:
                        loss = self._step_loss(model, inputs, ks[0], steps[ks[0]])
                    else:
                        loss = self._steps_loss(model, inputs, ks)
                self.accelerator.backward(loss / scale)
            total += loss.detach()
        self._nonfinite.observe_loss(total)
        return total / scale

    def _step_loss(self, model: torch.nn.Module, inputs: RolloutBatch, k: int, step: int) -> torch.Tensor:
        """The clipped policy loss (plus `beta` x KL to the reference) of recorded step `k` (grid step `step`)."""
        args = self.args
        latents, next_latents = inputs.latents[:, k], inputs.next_latents[:, k]

        def transition(transformer: torch.nn.Module):  # the same call for the policy and the reference
            return step_log_prob(
                self.adapter,
                transformer,
                inputs.cond,
                self.train_sigmas,
                step,
                latents,
                next_latents,
                noise_level=args.noise_level,
                sde_type=args.sde_type,
                guidance_scale=self.rollout_guidance,
            )

        reference = None
        if args.beta > 0:  # first: a refreshed LoRA reference is swapped into the adapter, before autograd holds it
            with torch.no_grad(), self._reference_model(model) as ref_model:
                reference = transition(ref_model)
        return self._transition_loss(inputs, k, step, transition(model), reference)

    def _steps_loss(self, model: torch.nn.Module, inputs: RolloutBatch, ks: list[int]) -> torch.Tensor:
        """The sum of `_step_loss` over the recorded steps `ks`, their forwards batched into one
        (`sampling.steps_log_prob`, `steps_per_backward > 1`)."""
        args = self.args
        steps = [inputs.step_indices[k] for k in ks]

        def transitions(transformer: torch.nn.Module):
            return steps_log_prob(
                self.adapter,
                transformer,
                inputs.cond,
                self.train_sigmas,
                steps,
                inputs.latents[:, ks],
                inputs.next_latents[:, ks],
                noise_level=args.noise_level,
                sde_type=args.sde_type,
                guidance_scale=self.rollout_guidance,
            )

        references: list = [None] * len(ks)
        if args.beta > 0:
            with torch.no_grad(), self._reference_model(model) as ref_model:
                references = transitions(ref_model)
        policies = transitions(model)
        losses = [
            self._transition_loss(inputs, k, step, policy, reference)
            for k, step, policy, reference in zip(ks, steps, policies, references)
        ]
        return torch.stack(losses).sum()

    def _transition_loss(
        self, inputs: RolloutBatch, k: int, step: int, current: tuple, reference: tuple | None
    ) -> torch.Tensor:
        """The loss of recorded step `k` from the current policy's `(log_prob, mean, std, velocity)` (and the
        reference's when `beta > 0`); logs its ratio, clipping and KL metrics."""
        args = self.args
        log_prob, mean, std, velocity = current
        advantages, old_log_prob = inputs.advantages, inputs.log_probs[:, k]
        if args.loss_type == "grpo_guard":
            if inputs.means is None:
                raise ValueError(
                    "loss_type='grpo_guard' needs the sampling policy's step means, and this rollout batch has none "
                    "(it was sampled, or saved in a checkpoint, with loss_type='flow_grpo'). Resume with the "
                    "loss_type the run was started with, or start from a fresh generation batch."
                )
            policy = grpo_guard_loss(
                log_prob,
                old_log_prob,
                advantages,
                args.epsilon,
                args.epsilon_high,
                mean=mean,
                old_mean=inputs.means[:, k],
                std_dev_t=std,
                dt=self.train_sigmas[step + 1] - self.train_sigmas[step],
            )
        else:
            policy = flow_grpo_loss(log_prob, old_log_prob, advantages, args.epsilon, args.epsilon_high)
        loss, ratio = policy.loss, policy.ratio

        metrics = self._metrics
        # Per grid step: a ratio whose mean drifts below 1 or whose spread grows at some noise levels is the sign of
        # over-optimisation that GRPO-Guard describes (population std over the micro-batch, averaged in `log`).
        metrics[f"ratio/step_{step}/mean"].append(ratio.mean().item())
        metrics[f"ratio/step_{step}/std"].append(ratio.detach().std(unbiased=False).item())
        is_low = (ratio < 1 - args.epsilon) & (advantages < 0)
        is_high = (ratio > 1 + args.epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"].append(is_low.float().mean().item())
        metrics["clip_ratio/high_mean"].append(is_high.float().mean().item())
        metrics["clip_ratio/region_mean"].append((is_low | is_high).float().mean().item())
        metrics["ratio/mean"].append(ratio.mean().item())
        metrics["approx_kl_old"].append(0.5 * (log_prob - old_log_prob).pow(2).mean().item())

        if args.beta > 0:
            _, ref_mean, _, ref_velocity = reference
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
        """The reference policy: the frozen copy, or the same network with its LoRA adapters disabled (or, after a
        reference refresh, with the refreshed copy of the adapter weights swapped in)."""
        if self.ref_transformer is not None:
            yield self.ref_transformer
            return
        unwrapped = self.accelerator.unwrap_model(model)
        if self.reference_refresh is not None and self.reference_refresh.holds_lora_weights:
            with self.reference_refresh.applied():
                yield unwrapped
            return
        unwrapped.disable_adapters()
        try:
            yield unwrapped
        finally:
            unwrapped.enable_adapters()

    @contextlib.contextmanager
    def _base_model(self, transformer: torch.nn.Module):
        """The base model of hybrid inference (`eval_hybrid_steps`): `transformer` with its LoRA adapters disabled
        (whatever a reference refresh holds), or the frozen copy of the base weights of full fine-tuning."""
        if not self.is_lora:
            yield self.ref_transformer  # checked at construction: the untouched base weights
            return
        transformer.disable_adapters()
        try:
            yield transformer
        finally:
            transformer.enable_adapters()

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self,
        eval_dataset: Dataset | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Sample every eval prompt once with the ODE sampler (fixed seeds) and report the mean of every reward.

        With `eval_hybrid_steps` the images are hybrid-inference samples: the trained model for that many steps, the
        base model for the rest (MixGRPO's inference)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (pass it to the trainer or to evaluate()).")
        check_prompt_dataset(dataset, "eval_dataset")
        dataset = self._with_source_images(dataset, "eval_dataset")
        if not self.eval_scorer.reward_funcs:
            raise ValueError(
                "evaluate() reports the mean of each reward function, and this trainer has only preference functions. "
                "Pass eval_reward_funcs, or a pointwise reward too (with preference_weights doing the training, "
                "reward_weights=[0.0] keeps it out of the advantages)."
            )
        args, device = self.args, self.accelerator.device
        transformer = self.accelerator.unwrap_model(self.model)
        was_training = transformer.training
        transformer.eval()
        sigmas = self.adapter.sigmas(args.eval_num_inference_steps, *self.eval_size, device)
        shape = self.adapter.latent_shape(*self.eval_size)
        indices = list(range(self.accelerator.process_index, len(dataset), self.accelerator.num_processes))
        batch_size = args.per_device_eval_batch_size
        images, rows = [], []
        show = self.is_local_process_zero() and not args.disable_tqdm and not self._step_bar_open()
        with self._averaged_weights():  # the EMA weights when `ema_decay` is set
            for start in tqdm(
                range(0, len(indices), batch_size), desc="evaluate", leave=False, disable=not show, delay=2
            ):
                chunk = indices[start : start + batch_size]
                seeds = [stable_seed(args.seed, -1, i) for i in chunk]
                noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
                chunk_rows = [dataset[i] for i in chunk]
                samples = sample(
                    self.adapter,
                    transformer,
                    [row["prompt"] for row in chunk_rows],
                    noise.to(device),
                    sigmas,
                    sde_steps=[],
                    noise_level=0.0,
                    sde_type=args.sde_type,
                    guidance_scale=self.guidance_scale,
                    max_sequence_length=args.max_sequence_length,
                    autocast=self.compute_loss_context_manager,
                    source_images=self._source_images(chunk_rows),
                    hybrid_steps=args.eval_hybrid_steps,
                    base_transformer=lambda: self._base_model(transformer),
                )
                images.extend(samples.images)
                rows.extend(chunk_rows)
        transformer.train(was_training)

        metrics, weighted = self.eval_scorer.evaluate(images, rows, self.state, metric_key_prefix)
        if (
            self._last_train_reward is not None and self.eval_scorer is self.scorer
        ):  # same rewards: comparable  # a proxy reward that rises while this falls is being hacked
            metrics[f"{metric_key_prefix}_reward_gap"] = (
                metrics[f"{metric_key_prefix}_reward"] - self._last_train_reward
            )
        prompts = [row["prompt"] for row in rows]
        sources = self._source_images(rows)
        if sources is not None:  # edits are shown next to their source (the grid, the model card and its widget)
            images = [hub.side_by_side(source, edit) for source, edit in zip(sources, images)]
        self._last_eval_samples = (images[: hub.MAX_WIDGET_IMAGES], prompts[: hub.MAX_WIDGET_IMAGES])  # widget
        self.log(metrics)
        if self.is_world_process_zero() and images:  # after `log`: the trackers' runs are set up by then
            self._save_sample_grid(images, prompts, weighted.tolist(), metric_key_prefix)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Average the metrics collected since the last log (over steps and processes) and add them to `logs`."""
        new_rollouts = not any(key.startswith("eval_") for key in logs) and bool(self._metrics)
        if new_rollouts:
            keys = sorted(self._metrics)
            local = torch.tensor(
                [sum(self._metrics[k]) / max(len(self._metrics[k]), 1) for k in keys], device=self.accelerator.device
            )
            averaged = self.accelerator.gather(local[None]).mean(dim=0).tolist()
            logs = {**logs, **dict(zip(keys, averaged))}
            self._metrics.clear()
        super().log(logs, start_time)
        if (
            new_rollouts
            and self.args.log_completions
            and self._last_samples is not None
            and self.is_world_process_zero()
        ):
            self._log_samples(self._last_samples, self._last_sample_scores)  # after `super().log`: trackers are set up

    def _log_samples(self, samples: sample_logging.SampleTable, scores: list[float]) -> None:
        """`log_completions`: the first `num_images_to_log` rollouts as a table (`output_dir/completions/`, W&B,
        Trackio) and as a captioned grid (`output_dir/samples/`, TensorBoard)."""
        table = dataclasses.replace(samples.head(self.args.num_images_to_log), step=self.state.global_step)
        table.write_parquet(sample_logging.completions_path(self.args.output_dir, table.step))
        sample_logging.send_table(table, "train/completions", self.args.report_to)
        if len(table):
            self._save_sample_grid(table.images, table.prompts, scores, "train", trackers=("tensorboard",))

    def _save_sample_grid(
        self,
        images: list,
        prompts: list[str],
        rewards: list[float],
        split: str,
        trackers: tuple[str, ...] = ("wandb", "trackio", "tensorboard"),
    ) -> None:
        """Save the first `num_images_to_log` images with prompts and rewards as a grid, and send it to `trackers`."""
        n = min(self.args.num_images_to_log, len(images))
        if n == 0:
            return
        captions = [f"{p[:60]} | {r:.3f}" for p, r in zip(prompts[:n], rewards[:n])]
        step = self.state.global_step
        path = os.path.join(self.args.output_dir, "samples", f"{split}_step{step:06d}.png")
        grid = image_grid(images[:n], captions)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path)
        callbacks = self.callback_handler.callbacks
        sample_logging.send_image(grid, f"{split}/samples", step, self.args.report_to, callbacks, trackers)
