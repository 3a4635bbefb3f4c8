"""Saving, resuming and sharing a Flow-GRPO run, and every override of a private `transformers.Trainer` method.

- The trained weights in diffusers' format: the LoRA as `pytorch_lora_weights.safetensors` (loadable with
  `pipe.load_lora_weights(folder)`), or the full transformer in `transformer/` (`save_weights` / `load_weights`).
- The EMA of the trained parameters next to the optimizer state (`ema_decay`).
- The rollout buffer (`RolloutBuffer`): with `num_iterations > 1`, a checkpoint written between the iterations of one
  generation batch holds the rollouts still to be trained on (each process its own), so that resuming trains on the
  same samples as the uninterrupted run instead of sampling new ones with the newer policy.
- The signal-time save (`CheckpointingMixin.train`, `_save_checkpoint_now`): on Ctrl-C or SIGTERM, the last
  completed step is written at once.
- The model card (`create_model_card`, from a `hub.RunSummary`) and the uploads (`push_to_hub`,
  `_push_from_checkpoint`).

`CheckpointingMixin` is the one place where `FlowGRPOTrainer` overrides private `transformers.Trainer` methods
(`PRIVATE_TRAINER_OVERRIDES`; `tests/test_trainer_overrides.py` checks that transformers still has them, with the
signatures used here) and calls private ones (`_save_rng_state`, `_finish_current_push`).
"""

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from torch.utils.data import Sampler
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoint_integrity, hub
from .data import GroupSampler
from .file_names import (
    EMA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    REFERENCE_WEIGHTS_NAME,
    ROLLOUT_BUFFER_NAME,
    TRANSFORMER_FOLDER,
)
from .interrupts import newest_complete_checkpoint
from .rewards.preferences import preference_func_name
from .rollout_batch import RolloutBatch, load_rollout_batches, save_rollout_batches

logger = logging.getLogger(__name__)

PRIVATE_TRAINER_OVERRIDES: dict[str, tuple[str, ...]] = {
    "_get_train_sampler": ("self", "train_dataset"),
    "_save": ("self", "output_dir", "state_dict"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "_save_optimizer_and_scheduler": ("self", "output_dir"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_push_from_checkpoint": ("self", "checkpoint_folder"),
    "_save_rng_state": ("self", "output_dir"),
}
"""The private `transformers.Trainer` methods `CheckpointingMixin` overrides, with the parameters it expects."""

PRIVATE_TRAINER_CALLS: dict[str, tuple[str, ...]] = {
    "_finish_current_push": ("self",),
}
"""The private `transformers.Trainer` methods it calls, with the parameters it passes."""


# ------------------------------------------------------------------------------------------------------ weights
def save_weights(
    transformer: torch.nn.Module, adapter: Any, output_dir: str, is_lora: bool, state_dict: dict | None = None
) -> None:
    """Write the trained weights of `transformer` in diffusers' format: the LoRA through the pipeline family's
    `save_lora_weights`, or the whole transformer in `transformer/`. `state_dict`, when given, holds the full weights
    (the Trainer gathers them under FSDP / DeepSpeed) and is written instead of the module's own."""
    os.makedirs(output_dir, exist_ok=True)
    if is_lora:
        from peft.utils import get_peft_model_state_dict

        lora_state = get_peft_model_state_dict(transformer, state_dict=state_dict)
        metadata = transformer.peft_config["default"].to_dict()
        adapter.save_lora_weights(output_dir, lora_state, metadata)
    elif state_dict is None:
        transformer.save_pretrained(os.path.join(output_dir, TRANSFORMER_FOLDER), safe_serialization=True)
    else:  # gathered by the Trainer (FSDP's full state dict): the module itself holds only this process's shards
        folder = os.path.join(output_dir, TRANSFORMER_FOLDER)
        os.makedirs(folder, exist_ok=True)
        transformer.save_config(folder)
        weights = {key: value.detach().contiguous() for key, value in state_dict.items()}
        save_file(weights, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def load_weights(transformer: torch.nn.Module, checkpoint: str, is_lora: bool) -> None:
    """Load what `save_weights` wrote into `transformer` (safetensors only)."""
    lora_file = os.path.join(checkpoint, LORA_WEIGHTS_NAME)
    full_dir = os.path.join(checkpoint, TRANSFORMER_FOLDER)
    if is_lora and os.path.isfile(lora_file):
        from peft.utils import set_peft_model_state_dict

        state = {key.removeprefix("transformer."): value for key, value in load_file(lora_file).items()}
        result = set_peft_model_state_dict(transformer, state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(
                f"{lora_file} does not match this LoRA (unexpected keys such as {result.unexpected_keys[:3]}): "
                "resume with the same peft_config as the run that wrote it."
            )
    elif not is_lora and os.path.isdir(full_dir):
        state = {}
        for name in sorted(f for f in os.listdir(full_dir) if f.endswith(".safetensors")):
            state.update(load_file(os.path.join(full_dir, name)))
        if any(isinstance(p, DTensor) for p in transformer.parameters()):  # FSDP2: each process keeps its shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(transformer, state, options=StateDictOptions(full_state_dict=True))
        else:
            transformer.load_state_dict(state)
    else:
        expected = LORA_WEIGHTS_NAME if is_lora else f"{TRANSFORMER_FOLDER}/"
        raise FileNotFoundError(
            f"Cannot resume from {checkpoint}: it has no {expected} ({'LoRA' if is_lora else 'full fine-tuning'} "
            "run). Pass a checkpoint-<step> folder written by a FlowGRPOTrainer with the same peft_config."
        )


# ------------------------------------------------------------------------------------------------ rollout buffer
class RolloutBuffer:
    """The scored rollouts of the current generation batch, trained on `num_iterations` times in a row."""

    def __init__(self, num_iterations: int):
        self.num_iterations = num_iterations
        self.batches: list[RolloutBatch] | None = None
        self.steps_used = 0
        # What a checkpoint written after the last optimizer step holds (the buffer may be refilled since).
        self._after_step: tuple[list[RolloutBatch] | None, int] = (None, 0)

    def next(self, refill: Callable[[], list[RolloutBatch]]) -> list[RolloutBatch]:
        """The batches of this optimizer step: `refill()` at the start of every generation batch."""
        if self.batches is None or self.steps_used % self.num_iterations == 0:
            self.batches = refill()
            self.steps_used = 0
        self.steps_used += 1
        return self.batches

    def mark_step_end(self) -> None:
        """Called after every optimizer step. Only a buffer with iterations left is kept for checkpoints: a used-up
        one must not stay in GPU memory during the next step."""
        left = self.steps_used % self.num_iterations != 0
        self._after_step = (self.batches if left else None, self.steps_used)

    def save(self, folder: str, rank: int) -> None:
        """Write this process's buffer into `folder`, if a checkpoint now needs it."""
        batches, used = self._after_step
        if batches is None:
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ROLLOUT_BUFFER_NAME.format(rank=rank))
        save_rollout_batches(batches, path, metadata={"steps_on_buffer": str(used)})

    def load(self, path: str, device: torch.device) -> None:
        """Read a buffer `save` wrote: the next steps train on it until its iterations are used up."""
        batches, metadata = load_rollout_batches(path, device)
        self.batches, self.steps_used = batches, int(metadata["steps_on_buffer"])
        self._after_step = (self.batches, self.steps_used)


# ------------------------------------------------------------------------------------------------- the mixin
class CheckpointingMixin:
    """Save, resume, signal-time saves and Hub pushes of `FlowGRPOTrainer`: every private Trainer override.

    Expects of the trainer: `adapter`, `is_lora`, `ema`, `reference_refresh`, `rollout_buffer`, `_stop_on_signal` and
    `_any_process`; for
    the model card `pipeline`, `guidance_scale`, `reward_funcs`, `reward_func_names`, `preference_funcs`,
    `_last_eval_samples` (images and prompts of the newest evaluation, or `None`), `_last_samples` (the newest
    rollouts, a `sample_logging.SampleTable`, or `None`) and the class attributes `_name`, `_paper` (a `hub.Paper`)
    and `_tag_names`.
    """

    # ------------------------------------------------------------------------------------------- training
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

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # the last file before trainer_state.json: record the checksums now
        if self.args.should_save and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            checkpoint_integrity.write_manifest(output_dir)

    def _verify_checkpoint(self, folder: str) -> None:
        """Missing optimizer / scheduler state, or files that differ from their recorded checksums: an error."""
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.save_only_model
        allow = self.args.resume_allow_damaged_checkpoint
        checkpoint_integrity.verify_checkpoint(folder, allow_damaged=allow, require_optimizer=not sharded)

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return GroupSampler(
            num_rows=len(dataset),
            num_generations=self.args.num_generations,
            prompts_per_batch=self.args.generation_batch_size // self.args.num_generations,
            repeat=self.args.num_iterations,
            seed=self.args.seed,
        )

    # --------------------------------------------------------------------------------------------- saving
    def _averaged_weights(self) -> contextlib.ExitStack:
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

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the LoRA as diffusers' `pytorch_lora_weights.safetensors` (or the full transformer)."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_weights(self.accelerator.unwrap_model(self.model), self.adapter, output_dir, self.is_lora, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load the weights `_save` wrote: diffusers' LoRA file, or the full transformer in `transformer/`."""
        transformer = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_weights(transformer, resume_from_checkpoint, self.is_lora)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.ema is not None and self.args.should_save:
            save_file(self.ema.state_dict(), os.path.join(output_dir, EMA_WEIGHTS_NAME))
        if self.reference_refresh is not None and self.args.should_save:
            save_file(self.reference_refresh.state_dict(), os.path.join(output_dir, REFERENCE_WEIGHTS_NAME))
        self.rollout_buffer.save(output_dir, self.accelerator.process_index)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ROLLOUT_BUFFER_NAME.format(rank=self.accelerator.process_index))
        if not self._any_process(not os.path.isfile(path)):  # all processes use their buffer, or all sample anew
            self.rollout_buffer.load(path, self.accelerator.device)
        if self.reference_refresh is not None:
            path = os.path.join(checkpoint, REFERENCE_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {REFERENCE_WEIGHTS_NAME}: it was written without ref_model_sync_steps. "
                    "Resume with the same ref_model_sync_steps as the run that wrote it (unset if it had none)."
                )
            self.reference_refresh.load_state_dict(load_file(path, device=str(self.accelerator.device)))
        if self.ema is None:
            return
        path = os.path.join(checkpoint, EMA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {EMA_WEIGHTS_NAME}: it was written without ema_decay. Resume with the same "
                "ema_decay as the run that wrote it (unset if it had none)."
            )
        self.ema.load_state_dict(load_file(path))

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        with self._stop_on_signal.deferred():  # a signal during the save waits for it to finish
            super()._save_checkpoint(model, trial)

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
            self.rollout_buffer.save(
                folder, self.accelerator.process_index
            )  # all the per-process state resuming needs
            return
        if os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
            return
        logger.warning("Stopped during step %d: saving the state after step %d to %s.", step + 1, step, folder)
        self._save(folder)
        self._save_optimizer_and_scheduler(folder)
        self._save_rng_state(folder)
        self.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))

    # ------------------------------------------------------------------------------------------------ hub
    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write a model card (`README.md`, plus `samples.png`, the newest sample grid, and the widget's images
        `images/sample_<i>.png`) into `args.output_dir`.

        The card has metadata for the Hub (base model, `library_name: diffusers`, tags with `diffusers-training` and,
        for a LoRA, `lora` and `template:sd-lora`, `pipeline_tag`, a `widget` of up to 4 sample images with their
        prompts: from the newest evaluation, else the newest training rollouts, and the last evaluation's mean rewards
        as structured evaluation results, `model-index`), links to the W&B run and Trackio Space when known, each
        reward when first and last logged, the main hyperparameters, the diffusers code that loads the result, and
        the papers to cite (MixGRPO with a sliding SDE window, Pref-GRPO with preference functions). Main process
        only.

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
            eval_dataset_name (`str`, *optional*):
                Hub id of the evaluation prompts (the dataset of the evaluation results); defaults to `dataset_name`.
        """
        accepted = {"license", "finetuned_from", "eval_dataset_name"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"create_model_card() got unexpected keyword arguments {unknown}; it accepts model_name, "
                f"dataset_name, tags, {', '.join(sorted(accepted))}."
            )
        if not self.is_world_process_zero():
            return
        hub.write_model_card(self._run_summary(model_name, dataset_name, tags, **kwargs), self.args.output_dir)

    def _run_summary(
        self,
        model_name: str | None,
        dataset_name: str | None,
        tags: str | list[str] | None,
        license: str | None = None,
        finetuned_from: str | None = None,
        eval_dataset_name: str | None = None,
    ) -> hub.RunSummary:
        """What the model card says about this run."""
        args, state = self.args, self.state
        hub_model_id = getattr(self, "hub_model_id", None) or args.hub_model_id  # set by `init_hf_repo`
        if model_name is None:
            model_name = (
                hub_model_id.split("/")[-1] if hub_model_id else os.path.basename(os.path.abspath(args.output_dir))
            )
        pipeline = self.pipeline
        name_or_path = getattr(pipeline, "name_or_path", None) or getattr(pipeline.config, "_name_or_path", None)
        trainer_tags = [tag for tag in self._tag_names if self.is_lora or tag != "lora"]
        trainer_tags += ["hf_jobs"] if "JOB_ID" in os.environ else []
        preference_names = [preference_func_name(f) for f in self.preference_funcs]
        transformer = self.accelerator.unwrap_model(self.model)
        os.makedirs(args.output_dir, exist_ok=True)
        sample_image, sample_caption = hub.copy_newest_sample_grid(args.output_dir)
        if self._last_eval_samples is not None:  # ODE samples with the evaluation guidance: what users will get
            widget_images, widget_prompts = self._last_eval_samples
        elif self._last_samples is not None:
            widget_images, widget_prompts = self._last_samples.images, self._last_samples.prompts
        else:
            widget_images, widget_prompts = [], []
        widget = hub.save_widget_images(args.output_dir, widget_images, widget_prompts)
        prompts = self.train_dataset.dataset["prompt"]
        return hub.RunSummary(
            model_name=model_name,
            base_model=finetuned_from or hub.hub_id_from_name_or_path(name_or_path),
            hub_model_id=hub_model_id,
            is_lora=self.is_lora,
            tags=[*trainer_tags, *([tags] if isinstance(tags, str) else list(tags or []))],
            papers=hub.papers_for(self._paper, args, uses_preferences=bool(preference_names)),
            trainer_name=self._name,
            pipeline_class=type(pipeline).__name__,
            transformer_class=type(transformer).__name__,
            license=license,
            dataset_name=dataset_name,
            num_prompts=len(self.train_dataset),
            num_eval_prompts=len(self.eval_dataset) if self.eval_dataset is not None else None,
            reward_names=list(self.reward_func_names),
            preference_names=preference_names,
            metric_rows=hub.metric_changes(state.log_history, self.reward_func_names),
            hyperparameters=hub.hyperparameters(
                args,
                global_step=state.global_step,
                guidance_scale=self.guidance_scale,
                num_reward_funcs=len(self.reward_funcs),
                uses_preferences=bool(preference_names),
                images_sampled=hub.images_sampled(state.log_history),
                lora_config=transformer.peft_config["default"] if self.is_lora else None,
            ),
            sample_image=sample_image,
            sample_caption=sample_caption,
            example_prompt=str(prompts[0]),
            inference={
                "num_inference_steps": args.eval_num_inference_steps,
                **self.adapter.pipeline_call_kwargs(self.guidance_scale),
                "height": args.height,
                "width": args.width,
            },
            hybrid_steps=args.eval_hybrid_steps,
            wandb_url=hub.wandb_url(),
            trackio_url=hub.trackio_url(),
            widget=widget,
            eval_dataset_name=eval_dataset_name,
            eval_results=hub.last_eval_scores(state.log_history, self.reward_func_names),
        )

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

        As [`~transformers.Trainer.push_to_hub`] (save on every process, card and upload from the main process, after
        any intermediate upload finishes). The repo then holds `pytorch_lora_weights.safetensors` (a LoRA, loadable
        with `pipe.load_lora_weights(repo_id)`) or `transformer/` (full fine-tuning), the EMA weights when `ema_decay`
        is set, with `README.md`, `samples.png` (the newest sample grid), the widget images `images/sample_<i>.png`,
        the evaluation grids under `samples/` and `training_args.json` (secrets redacted; no pickle); checkpoints
        (`checkpoint-*`), the training sample grids and tables (`completions/`), any `training_args.bin` and files
        starting with `_` are not uploaded. The repo is created if needed.

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
                `finetuned_from`, `eval_dataset_name`).

        Returns:
            The `CommitInfo` of the upload (a `Future` of it when `blocking=False`); `None` on other processes.
        """
        args = self.args
        self.callback_handler.on_push_begin(args, self.state, self.control)
        token = token if token is not None else args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        with self._averaged_weights():
            self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        hub.save_training_args(args, args.output_dir)
        self._finish_current_push()
        return hub.upload_output_dir(
            repo_id=self.hub_model_id,
            folder_path=args.output_dir,
            commit_message=commit_message,
            token=token,
            run_as_future=not blocking,
            revision=revision if revision is not None else args.hub_revision,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Intermediate push (`push_to_hub=True`): `transformers.Trainer._push_from_checkpoint` (main process only;
        nothing with `hub_strategy="end"`; skips a push while the previous one runs unless `hub_always_push`;
        `"checkpoint"` also uploads the checkpoint to `last-checkpoint/`, `"all_checkpoints"` to `checkpoint-<step>/`)
        with three differences: the model files are this trainer's (the LoRA or `transformer/`; with `ema_decay` the
        EMA weights, the checkpoint keeping the raw ones), `README.md` is refreshed with the model card, and the
        training arguments go up as `training_args.json` without any secret instead of a pickled
        `training_args.bin`."""
        from transformers.trainer_utils import HubStrategy, SaveStrategy
        from transformers.utils.hub import PushInProgress

        args = self.args
        if not self.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
            return
        in_progress = getattr(self, "push_in_progress", None)  # set by `init_hf_repo`
        if not args.hub_always_push and in_progress is not None and not in_progress.is_done():
            return  # an upload still reads output_dir: do not overwrite its files

        self.callback_handler.on_push_begin(args, self.state, self.control)
        os.makedirs(args.output_dir, exist_ok=True)
        if self.ema is not None:
            # The checkpoint holds the raw weights (to resume); people download the average, as from the final push.
            with self._averaged_weights():
                self._save(args.output_dir)
        else:  # the weights were just saved in the checkpoint: copy them rather than saving the model again
            hub.copy_model_files(checkpoint_folder, args.output_dir)
        hub.save_training_args(args, args.output_dir)
        self.create_model_card()

        if args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        upload = dict(repo_id=self.hub_model_id, token=args.hub_token, revision=args.hub_revision, run_as_future=True)
        jobs = [hub.upload_output_dir(folder_path=args.output_dir, commit_message=commit_message, **upload)]
        if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            last = args.hub_strategy == HubStrategy.CHECKPOINT
            path_in_repo = "last-checkpoint" if last else os.path.basename(os.path.normpath(checkpoint_folder))
            jobs.append(
                hub.hf_api().upload_folder(
                    folder_path=checkpoint_folder,
                    path_in_repo=path_in_repo,
                    commit_message=commit_message + ", checkpoint",
                    **upload,
                )
            )
        if in_progress is None or in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            in_progress.jobs.extend(jobs)
