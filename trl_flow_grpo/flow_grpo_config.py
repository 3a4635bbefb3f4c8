"""FlowGRPOConfig: every knob of Flow-GRPO training, documented and validated."""

from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from .acceleration import check_attention_backend
from .losses import LOSS_TYPES
from .sampling.dpm import ODE_SOLVERS
from .sampling.steps import SDE_TYPES
from .sampling.windows import WINDOW_SCHEDULES, WINDOW_TYPES, WindowSchedule, default_window_range, full_window
from .validation import REDACTED, check_config, check_generation_batch, redact

KL_TYPES = ("mean", "velocity")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
PREFERENCE_STD_SCOPES = ("group", "batch")


@dataclass
class FlowGRPOConfig(TrainingArguments):
    r"""
    Configuration class for the [`FlowGRPOTrainer`].

    Only the parameters specific to Flow-GRPO are listed here; for the rest see [`~transformers.TrainingArguments`].
    Names follow TRL's [`~trl.GRPOConfig`] where the concept is the same. Defaults follow the Flow-GRPO paper
    (SD3.5-M, 512 px) where it has one; defaults that differ from [`~transformers.TrainingArguments`] are marked.

    **Batch semantics.** One optimizer step uses a *generation batch* of
    `generation_batch_size = per_device_train_batch_size * gradient_accumulation_steps * num_processes` images, i.e.
    `generation_batch_size / num_generations` prompts with `num_generations` images each. All of them are sampled
    first (in chunks of `per_device_train_batch_size` per process), scored, and turned into group-relative advantages;
    then each chunk is trained on one recorded SDE step at a time, one forward + backward pass per step (a micro-step
    of gradient accumulation): `gradient_accumulation_steps * num_sde_steps` backward passes per process per
    optimizer step, each over `per_device_train_batch_size` images (`steps_per_backward` stacks several steps into
    one pass). With `num_iterations > 1` the same samples are reused for that many optimizer steps (later ones are
    off-policy).

    Parameters:
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for [`~diffusers.DiffusionPipeline.from_pretrained`], used when the `model` argument of
            the [`FlowGRPOTrainer`] is a Hub id or a path, e.g. `{"dtype": "bfloat16"}`.
        max_sequence_length (`int`, *optional*, defaults to `256`):
            Maximum number of T5 tokens of a prompt (SD3's `max_sequence_length`).
        source_image_column (`str`, *optional*, defaults to `"image"`):
            For image-editing pipelines (FLUX.1-Kontext, Qwen-Image-Edit): the dataset column holding each prompt's
            source image (a PIL image, e.g. a `datasets.Image` feature). Rollouts are conditioned on it, and reward
            and preference functions receive it as the keyword `source_images`. Ignored by text-to-image pipelines.

        > Parameters that control the rollout (sampling)

        num_generations (`int`, *optional*, defaults to `24`):
            Number of images sampled per prompt (the group size G). The generation batch must be divisible by it.
        generation_batch_size (`int`, *optional*):
            Images sampled, scored and normalised together, over all processes (TRL's field). Defaults to
            `per_device_train_batch_size * num_processes * steps_per_generation`; when set, it must be divisible by
            the global micro-batch `per_device_train_batch_size * num_processes`, and `steps_per_generation` is
            derived from it. Mutually exclusive with `steps_per_generation`. The trainer samples one generation
            batch per optimizer step, so it must equal `per_device_train_batch_size * gradient_accumulation_steps *
            num_processes` (set `gradient_accumulation_steps` to change it; `num_iterations` trains several optimizer
            steps on one generation batch).
        steps_per_generation (`int`, *optional*):
            Micro-batches per process in one generation batch (TRL's field). Defaults to
            `gradient_accumulation_steps`, the only value the trainer supports (see `generation_batch_size`).
            Mutually exclusive with `generation_batch_size`.
        num_inference_steps (`int`, *optional*, defaults to `10`):
            Number of denoising steps T of a training rollout.
        eval_num_inference_steps (`int`, *optional*, defaults to `40`):
            Number of denoising steps used by [`~FlowGRPOTrainer.evaluate`] (always the deterministic ODE sampler).
        eval_hybrid_steps (`int` or `None`, *optional*, defaults to `None`):
            Hybrid inference (MixGRPO's released inference): evaluation images use the trained model for the first
            `eval_hybrid_steps` of the `eval_num_inference_steps` ODE steps and the base model for the rest (a LoRA:
            the same network with its adapter disabled; full fine-tuning: the trainer's frozen copy of the base
            weights, which it keeps with `beta > 0` and no `ref_model_sync_steps`). MixGRPO renders with 30 of 50
            steps. `eval_num_inference_steps` gives the trained model's images, `0` the base model's; `None`: off.
        guidance_scale (`float` or `None`, *optional*, defaults to `None`):
            Guidance scale, as the pipeline family understands it: classifier-free guidance for SD3 / SD3.5, the
            guidance embedding for FLUX.1-dev, true CFG with the negative prompt " " for Qwen-Image. `None` takes the
            family's default: 4.5 (SD3 / SD3.5, Flow-GRPO's value), 3.5 (FLUX.1), 4.0 (Qwen-Image). Used for
            rollouts and training when `train_cfg=True`, and always for evaluation images.
        train_cfg (`bool`, *optional*, defaults to `True`):
            Whether rollouts and the training forward use classifier-free guidance (both branches get the gradient).
            With `False`, rollouts and training run at guidance 1 (which also distils CFG into the model) and
            `guidance_scale` only applies to evaluation.
        noise_level (`float`, *optional*, defaults to `0.7`):
            Noise level `a` of the SDE sampler. `0` makes the SDE step an ODE (Euler) step.
        sde_type (`str`, *optional*, defaults to `"sde"`):
            `"sde"`: Flow-GRPO's Euler-Maruyama step of the marginal-preserving reverse SDE. `"cps"`:
            coefficients-preserving sampling (use `noise_level` around 0.8 and a smaller `epsilon`, e.g. 1e-5).
        height (`int`, *optional*, defaults to `512`):
            Image height in pixels.
        width (`int`, *optional*, defaults to `512`):
            Image width in pixels.
        eval_height (`int`, *optional*):
            Image height of [`~FlowGRPOTrainer.evaluate`]'s samples; unset: `height`.
        eval_width (`int`, *optional*):
            Image width of [`~FlowGRPOTrainer.evaluate`]'s samples; unset: `width`.
        timestep_fraction (`float`, *optional*, defaults to `0.99`):
            With `sde_window="full"`, the first `floor(num_inference_steps * timestep_fraction)` steps are SDE steps,
            recorded and trained; the rest are ODE steps (the last step's Gaussian is too narrow to train on).
        same_latent (`bool`, *optional*, defaults to `False`):
            Whether the images of one group start from the same initial noise (they still differ by the SDE noise).
            The ODE steps before the SDE window are then identical within a group and are computed once per prompt
            (shared prefix), which makes windows that start late cheaper.

        > Parameters that control which steps are SDE (the window) and the ODE steps after it

        sde_window (`str`, *optional*, defaults to `"full"`):
            Which steps are SDE (recorded and trained) at each iteration; all others are ODE steps. `"full"`
            (Flow-GRPO): the first `floor(num_inference_steps * timestep_fraction)` steps. `"random"`
            (Flow-GRPO-Fast): `sde_window_size` steps at a random start in `sde_window_range`. `"sliding"` (MixGRPO):
            `sde_window_size` steps whose start moves by `sde_window_stride` every `sde_window_shift_interval`
            iterations. `"frozen"` (MixGRPO-Flash*): `sde_window_size` steps from the start of `sde_window_range`.
            The window is the same for every image of a group and on every process; the iteration is the index of
            the generation batch (`global_step // num_iterations`). See `docs/efficient_sampling.md`.
        sde_window_size (`int`, *optional*):
            Number of SDE steps of a `"random"`, `"sliding"` or `"frozen"` window. Defaults to `2` for `"random"`
            (Flow-GRPO-Fast uses 1 to 3) and `4` otherwise (MixGRPO). Not used by `"full"`.
        sde_window_range (`list[int]`, *optional*):
            `[start, end)`: the steps the window may cover. Defaults to `[0, num_inference_steps // 2]` for
            `"random"` (the high-noise half) and `[0, num_inference_steps - 2]` for `"sliding"` and `"frozen"`
            (MixGRPO). A `"frozen"` window starts at `start`.
        sde_window_shift_interval (`int`, *optional*, defaults to `25`):
            Iterations a `"sliding"` window stays in place before it moves (MixGRPO's tau). With a decaying
            `sde_window_schedule`, the interval at the start of the range.
        sde_window_stride (`int`, *optional*, defaults to `1`):
            Steps a `"sliding"` window moves by at each shift.
        sde_window_roll_back (`bool`, *optional*, defaults to `True`):
            Whether a `"sliding"` window that reaches the end of its range goes back to the start (otherwise it stays
            at the end).
        sde_window_schedule (`str`, *optional*, defaults to `"constant"`):
            How the shift interval of a `"sliding"` window evolves as the window moves to later steps (MixGRPO):
            `"constant"`, `"linear_decay"` (linearly from `sde_window_shift_interval` down to
            `sde_window_min_shift_interval` over the range) or `"exp_decay"` (constant for the first
            `sde_window_decay_threshold` steps, then multiplied by `exp(-sde_window_decay_rate)` per step).
        sde_window_min_shift_interval (`int`, *optional*, defaults to `1`):
            Smallest shift interval of a decaying schedule.
        sde_window_decay_rate (`float`, *optional*, defaults to `0.1`):
            Rate `k` of the `"exp_decay"` schedule.
        sde_window_decay_threshold (`int`, *optional*, defaults to `13`):
            Steps from the start of the range after which the `"exp_decay"` schedule starts decaying.
        ode_solver (`str`, *optional*, defaults to `"euler"`):
            Solver of the ODE steps after the window: `"euler"`, or `"dpm_solver++_2m"` (DPM-Solver++(2M) in
            data-prediction form; with `ode_compression < 1` this is MixGRPO-Flash). The steps before the window stay
            Euler steps on the grid.
        ode_compression (`float`, *optional*, defaults to `1.0`):
            The `R` ODE steps after the window are replaced by `max(floor(ode_compression * R), 1)` steps spread
            over the same noise range. `1` keeps the grid; MixGRPO-Flash uses `0.4` with `"dpm_solver++_2m"`.

        > Parameters that control the training objective

        beta (`float`, *optional*, defaults to `0.04`):
            Weight of the KL term to the reference policy (the model with LoRA adapters disabled, or a frozen copy
            for full fine-tuning). `0` disables it and skips the reference forward. The paper uses 0.04 for GenEval
            and OCR, 0.01 for PickScore.
        kl_type (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: closed-form KL of the two Gaussian steps, `mean((mu - mu_ref)^2) / (2 s^2)` with the step's
            diffusion coefficient `s` (without the `1/(-dt)` factor, as the reference code). `"velocity"`:
            `mean((v - v_ref)^2)`.
        epsilon (`float`, *optional*, defaults to `1e-4`):
            Lower clip range of the probability ratio (`1 - epsilon`). Flow-GRPO's log-probs are per-element means,
            so ratios stay very close to 1 and the range is tiny.
        epsilon_high (`float`, *optional*):
            Upper clip range (`1 + epsilon_high`); defaults to `epsilon`.
        loss_type (`str`, *optional*, defaults to `"flow_grpo"`):
            `"flow_grpo"`: the clipped ratio `exp(log p - log p_old)`. `"grpo_guard"` (GRPO-Guard, Wang et al.
            2025): the ratio is RatioNorm-normalised per step, `exp((log p - log p_old + b) * s sqrt(-dt))` with
            `b = mean((mu - mu_old)^2) / (2 s^2 (-dt))`, and the step's loss is divided by `-dt`, so that every noise
            level gets a centred ratio of the same spread and a gradient of the same scale. It clips with the same
            `epsilon` / `epsilon_high` (the official GRPO-Guard code reuses Flow-GRPO's `clip_range`); only for
            `sde_type="sde"`. Sampling then also records each step's mean (one more latent-sized tensor per step).
        ref_model_sync_steps (`int`, *optional*):
            Reference refresh: every this many optimizer steps the KL reference becomes a copy of the current policy
            (full fine-tuning: the weights are copied into the frozen reference; LoRA: a copy of the adapter weights
            is kept and swapped in for the reference forward, the base model being the reference until the first
            refresh). Needs `beta > 0`. Unset: the reference stays the initial model.
        num_iterations (`int`, *optional*, defaults to `1`):
            Number of optimizer steps taken on each generation batch (TRL's mu). Only the first is on-policy.
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-adv_clip_max, adv_clip_max]`.
        reward_weights (`list[float]`, *optional*):
            Weight of each reward function; defaults to 1 for each.
        scale_rewards (`str` or `bool`, *optional*, defaults to `"group"`):
            Divide centred rewards by the group's standard deviation (`"group"`, or `True`), by the whole gathered
            batch's (`"batch"`, Flow-GRPO's `global_std`), or not at all (`"none"`, or `False`).
        multi_objective_aggregation (`str`, *optional*, defaults to `"sum_then_normalize"`):
            With several reward functions: weighted sum of the raw rewards then normalise (`"sum_then_normalize"`),
            or normalise each reward within its group then weighted sum (`"normalize_then_sum"`).
        reward_timeout (`float`, *optional*):
            Seconds a reward or preference function (sync or async) may take on one batch before training stops with
            an error naming the function and the time it took. Unset: no limit. A sync function that times out keeps
            running in its thread until it returns (Python cannot stop it), so the process should then exit.
        overlap_rewards (`bool`, *optional*, defaults to `True`):
            Call the reward functions on each micro-batch's images in a worker thread while the next micro-batch is
            sampled, instead of on the whole generation batch after sampling. The rewards, advantages and metrics are
            the same for reward functions that score each sample on its own; a function marked `whole_batch = True`
            (and every preference function) is still called after sampling. `log_metric` is then called once per
            micro-batch, and `reward_timeout` applies to each call. `False`: one call after sampling, as before.
        ema_decay (`float`, *optional*):
            Keep an exponential moving average of the trained weights with decay `min((1 + n) / (10 + n),
            ema_decay)` after the n-th optimizer step (Flow-GRPO uses 0.9), and use it for `evaluate()` and the
            final `save_model()` / `push_to_hub()`; checkpoints hold both the raw weights and the average. Unset:
            no average.

        > Parameters that control pairwise preferences (Pref-GRPO, used when the trainer gets `preference_funcs`)

        preference_weights (`list[float]`, *optional*):
            Weight of each preference function's win-rate advantage in the total advantage; defaults to 1 for each.
            With preference functions, advantages are mixed per function: each reward function contributes its
            weight times its own group-normalised advantage (with `"sum_then_normalize"`, the weighted reward sum is
            normalised and scaled by the sum of the reward weights).
        preference_num_opponents (`int`, *optional*):
            Compare each image with this many random opponents of its group instead of with all `G - 1` of them
            (every unordered pair: `G (G - 1) / 2` judge calls per group, 28 at G = 8, 276 at G = 24).
        preference_symmetric (`bool`, *optional*, defaults to `False`):
            Query every pair in both orders and average, `p = (p_ab + 1 - p_ba) / 2`, to cancel a judge's position
            bias (twice the judge calls).
        preference_std_scope (`str`, *optional*, defaults to `"group"`):
            Win-rate advantages `(w - mean) / (std + 1e-8)` with the mean and std of the image's group (`"group"`),
            or of the whole gathered batch (`"batch"`, the released Pref-GRPO code without `--use_group`).
        preference_std_bessel (`bool`, *optional*, defaults to `False`):
            Use the Bessel-corrected standard deviation of the win rates (divide by `n - 1`, as `torch.std` in the
            released Pref-GRPO code) instead of the population one (divide by `n`).
        preference_temperature (`float`, *optional*, defaults to `0.0`):
            For preference functions named by a built-in *reward* (e.g. `"shapes_geneval"`):
            `p = sigmoid((s_a - s_b) / preference_temperature)`; `0` gives hard verdicts 1 / 0.
        preference_tie_margin (`float`, *optional*, defaults to `0.0`):
            For preference functions named by a built-in reward: score differences of at most this much are ties
            (`p = 0.5`), so that near-identical images get no advantage.

        > Parameters that control speed and memory

        attention_backend (`str`, *optional*):
            Attention kernel of the transformer (and of the KL reference copy), set with diffusers'
            `transformer.set_attention_backend(name)`: a value of
            `diffusers.models.attention_dispatch.AttentionBackendName`, e.g. `"native"` (PyTorch's scaled
            dot-product attention, on any device), `"flash"`, `"_flash_3"`, `"sage"` or `"xformers"` (these need
            their package and a GPU; `*_hub` ones download a kernel from the Hub). Unset: the model's own
            processors. Kernels other than `"native"` may change the numerics slightly. Models whose attention
            processors do not go through diffusers' dispatcher (SD3 in diffusers 0.42, which always uses PyTorch's
            scaled dot-product attention) raise an error instead of ignoring it.
        compile_transformer (`bool`, *optional*, defaults to `False`):
            Compile the transformer's repeated blocks with `torch.compile` (regional compilation: diffusers'
            `compile_repeated_blocks`, or the blocks the pipeline adapter names when the model class lists none, e.g.
            SD3's `JointTransformerBlock`), after the LoRA is added; rollouts and training then run the compiled
            blocks. The first calls are slow (compilation; again for every new batch shape).
        steps_per_backward (`int`, *optional*, defaults to `1`):
            Recorded SDE steps of a micro-batch trained in one batched forward + backward (the steps stacked along
            the batch: `per_device_train_batch_size * steps_per_backward` samples per forward). The gradient is the
            same as one step at a time, up to rounding; fewer, larger forwards are faster on a large accelerator,
            and the activations of all the stacked steps are alive at once (memory grows with it). A value at least
            the number of recorded steps trains all of them in one pass.
        offload_text_encoders (`bool`, *optional*, defaults to `False`):
            Keep the text encoders on the CPU and move them to the accelerator only while prompts are encoded (once
            per micro-batch of rollouts and per evaluation batch; the embeddings are reused for training). Frees
            their memory for sampling and training at the cost of one copy of their weights per encoding. Results
            are identical. Reward models have their own `offload=True` option (see the rewards' documentation).

        > Parameters that control checkpoints

        resume_allow_damaged_checkpoint (`bool`, *optional*, defaults to `False`):
            Resuming verifies the checkpoint against the checksums recorded when it was saved
            (`checkpoint_manifest.json`) and requires its optimizer and scheduler state; a missing, truncated or
            changed file is an error naming it. With `True` such a checkpoint is resumed with a warning per file
            (a missing optimizer or scheduler then starts fresh).

        > Parameters that control logging

        log_completions (`bool`, *optional*, defaults to `False`):
            Whether to log the sampled images at every logging step: a table with one row per image (`step`,
            `prompt`, `image`, one column per reward function, `advantage`) written to
            `output_dir/completions/step_XXXXX.parquet` and sent to W&B and Trackio when `report_to` names them, and a
            grid with prompts and rewards saved under `output_dir/samples/` and sent to TensorBoard.
        num_images_to_log (`int`, *optional*, defaults to `8`):
            Number of images (rows) in that table and grid.

    Changed defaults of [`~transformers.TrainingArguments`]: `learning_rate=3e-4`, `weight_decay=1e-4`,
    `lr_scheduler_type="constant"`, `per_device_train_batch_size=8`, `gradient_accumulation_steps=3` (one group of
    24 per process and step), `logging_steps=1`, `remove_unused_columns=False`, `dataloader_pin_memory=False` (the
    dataloader yields prompt rows, not tensors), and `bf16` is on when a CUDA device is available unless set.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # --- model ---
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `DiffusionPipeline.from_pretrained`, used when `model` is a Hub id or a "
            'path, e.g. `{"dtype": "bfloat16"}`.'
        },
    )
    max_sequence_length: int = field(default=256, metadata={"help": "Maximum number of T5 tokens of a prompt."})
    source_image_column: str = field(
        default="image",
        metadata={
            "help": "Image-editing pipelines only: the dataset column with each prompt's source image; reward "
            "functions receive it as `source_images`."
        },
    )

    # --- rollout ---
    num_generations: int = field(
        default=24, metadata={"help": "Number of images sampled per prompt (the group size G)."}
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images sampled and scored together over all processes (TRL's field). Defaults to "
            "per_device_train_batch_size * num_processes * steps_per_generation; must equal one optimizer step's "
            "images. Mutually exclusive with steps_per_generation."
        },
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches per process in one generation batch (TRL's field). Defaults to (and must equal) "
            "gradient_accumulation_steps. Mutually exclusive with generation_batch_size."
        },
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Denoising steps T of a training rollout."})
    eval_num_inference_steps: int = field(
        default=40, metadata={"help": "Denoising steps of evaluation sampling (always ODE)."}
    )
    eval_hybrid_steps: int | None = field(
        default=None,
        metadata={
            "help": "Hybrid inference (MixGRPO): evaluation uses the trained model for the first K ODE steps and the "
            "base model (LoRA disabled) for the rest. None: off."
        },
    )
    guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "Guidance scale (CFG; FLUX.1-dev: its guidance embedding; Qwen-Image: true CFG): for rollouts and "
            "training when `train_cfg=True`, always for evaluation. None: the pipeline family's default (SD3 4.5, "
            "FLUX 3.5, Qwen-Image 4.0)."
        },
    )
    train_cfg: bool = field(
        default=True,
        metadata={
            "help": "Whether rollouts and training use CFG. With False they run at guidance 1 and `guidance_scale` "
            "applies to evaluation only."
        },
    )
    noise_level: float = field(default=0.7, metadata={"help": "Noise level `a` of the SDE sampler."})
    sde_type: str = field(
        default="sde",
        metadata={"help": "SDE step: `sde` (Flow-GRPO) or `cps` (coefficients-preserving).", "choices": SDE_TYPES},
    )
    height: int = field(default=512, metadata={"help": "Image height in pixels."})
    width: int = field(default=512, metadata={"help": "Image width in pixels."})
    eval_height: int | None = field(default=None, metadata={"help": "Height of evaluation images; unset: height."})
    eval_width: int | None = field(default=None, metadata={"help": "Width of evaluation images; unset: width."})
    timestep_fraction: float = field(
        default=0.99,
        metadata={"help": "The first floor(num_inference_steps * timestep_fraction) steps are SDE steps (trained)."},
    )
    same_latent: bool = field(
        default=False,
        metadata={
            "help": "Whether the images of a group start from the same initial noise (the ODE steps before the "
            "window are then computed once per prompt)."
        },
    )

    # --- SDE window and ODE tail ---
    sde_window: str = field(
        default="full",
        metadata={
            "help": "Which steps are SDE: `full` (Flow-GRPO), `random` (Flow-GRPO-Fast), `sliding` (MixGRPO) or "
            "`frozen` (MixGRPO-Flash*).",
            "choices": WINDOW_TYPES,
        },
    )
    sde_window_size: int | None = field(
        default=None,
        metadata={"help": "SDE steps of a random/sliding/frozen window; defaults to 2 for random, 4 otherwise."},
    )
    sde_window_range: list[int] | None = field(
        default=None,
        metadata={
            "help": "[start, end): the steps the window may cover. Defaults to [0, T // 2] for random, [0, T - 2] "
            "for sliding and frozen."
        },
    )
    sde_window_shift_interval: int = field(
        default=25, metadata={"help": "Iterations a sliding window stays in place before it moves."}
    )
    sde_window_stride: int = field(default=1, metadata={"help": "Steps a sliding window moves by at each shift."})
    sde_window_roll_back: bool = field(
        default=True, metadata={"help": "Whether a sliding window goes back to the start after the end of its range."}
    )
    sde_window_schedule: str = field(
        default="constant",
        metadata={
            "help": "Shift interval of a sliding window: `constant`, `linear_decay` or `exp_decay`.",
            "choices": WINDOW_SCHEDULES,
        },
    )
    sde_window_min_shift_interval: int = field(
        default=1, metadata={"help": "Smallest shift interval of a decaying schedule."}
    )
    sde_window_decay_rate: float = field(default=0.1, metadata={"help": "Rate k of the exp_decay schedule."})
    sde_window_decay_threshold: int = field(
        default=13, metadata={"help": "Steps into the range after which exp_decay starts decaying."}
    )
    ode_solver: str = field(
        default="euler",
        metadata={
            "help": "Solver of the ODE steps after the window: `euler` or `dpm_solver++_2m`.",
            "choices": ODE_SOLVERS,
        },
    )
    ode_compression: float = field(
        default=1.0,
        metadata={"help": "The R ODE steps after the window become max(floor(ode_compression * R), 1) steps."},
    )

    # --- objective ---
    beta: float = field(
        default=0.04, metadata={"help": "KL coefficient to the reference policy. 0 skips the reference forward."}
    )
    kl_type: str = field(
        default="mean",
        metadata={
            "help": "`mean`: Gaussian KL of the step means; `velocity`: mean squared velocity difference.",
            "choices": KL_TYPES,
        },
    )
    epsilon: float = field(default=1e-4, metadata={"help": "Lower clip range of the probability ratio."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clip range of the ratio; defaults to `epsilon`."}
    )
    loss_type: str = field(
        default="flow_grpo",
        metadata={
            "help": "`flow_grpo`: clipped ratio; `grpo_guard`: RatioNorm ratio and 1/(-dt) step weights (SDE only).",
            "choices": LOSS_TYPES,
        },
    )
    ref_model_sync_steps: int | None = field(
        default=None,
        metadata={"help": "Copy the current policy into the KL reference every N optimizer steps; unset: never."},
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer steps taken on each generation batch (TRL's mu)."}
    )
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to +-adv_clip_max."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function; defaults to 1 for each."}
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Reward std used to scale advantages: `group`, `batch` or `none`."},
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "With several rewards: `sum_then_normalize` or `normalize_then_sum`.",
            "choices": AGGREGATIONS,
        },
    )

    reward_timeout: float | None = field(
        default=None,
        metadata={"help": "Seconds a reward / preference function may take per batch before an error; unset: none."},
    )
    overlap_rewards: bool = field(
        default=True,
        metadata={
            "help": "Score each micro-batch in a worker thread while the next one samples (same rewards for "
            "per-sample reward functions); False: score the whole batch after sampling."
        },
    )

    ema_decay: float | None = field(
        default=None,
        metadata={"help": "EMA of the trained weights (used for eval and export) with this decay; unset: none."},
    )

    # --- Pref-GRPO ---
    preference_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each preference function's advantage; defaults to 1 for each."}
    )
    preference_num_opponents: int | None = field(
        default=None, metadata={"help": "Random opponents per image; unset: every pair of the group."}
    )
    preference_symmetric: bool = field(
        default=False, metadata={"help": "Query each pair in both orders and average (cancels position bias)."}
    )
    preference_std_scope: str = field(
        default="group",
        metadata={
            "help": "Win-rate mean and std of the `group` or the whole `batch`.",
            "choices": PREFERENCE_STD_SCOPES,
        },
    )
    preference_std_bessel: bool = field(
        default=False, metadata={"help": "Bessel-corrected (n - 1) win-rate std instead of the population std."}
    )
    preference_temperature: float = field(
        default=0.0, metadata={"help": "Reward-named preferences: p = sigmoid(diff / T); 0 = hard verdicts."}
    )
    preference_tie_margin: float = field(
        default=0.0, metadata={"help": "Reward-named preferences: score differences up to this are ties."}
    )

    # --- speed and memory ---
    attention_backend: str | None = field(
        default=None,
        metadata={"help": "diffusers attention backend of the transformer, e.g. `native`, `flash`; unset: default."},
    )
    compile_transformer: bool = field(
        default=False,
        metadata={"help": "torch.compile the transformer's repeated blocks (regional compilation)."},
    )
    steps_per_backward: int = field(
        default=1,
        metadata={"help": "Recorded SDE steps trained in one batched forward + backward (memory grows with it)."},
    )
    offload_text_encoders: bool = field(
        default=False,
        metadata={"help": "Keep the text encoders on the CPU except while encoding prompts."},
    )

    # --- checkpoints ---
    resume_allow_damaged_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint with missing, truncated or changed files (a warning per file) instead "
            "of failing."
        },
    )

    # --- logging ---
    log_completions: bool = field(
        default=False,
        metadata={
            "help": "Log a table of sampled images with prompts, rewards and advantages (parquet, W&B, Trackio) and "
            "a grid (TensorBoard) at every logging step."
        },
    )
    num_images_to_log: int = field(default=8, metadata={"help": "Number of images in the logged table and grid."})

    # --- changed TrainingArguments defaults ---
    learning_rate: float = field(default=3e-4, metadata={"help": "The initial learning rate for AdamW."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay for AdamW."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "The scheduler type to use."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Images per process in one rollout chunk and one training micro-batch."}
    )
    gradient_accumulation_steps: int = field(
        default=3, metadata={"help": "Micro-batches (of per_device_train_batch_size images) per optimizer step."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: they are passed to the reward functions."}
    )
    dataloader_pin_memory: bool = field(
        default=False, metadata={"help": "Pin dataloader memory; off: the dataloader yields prompt rows, not tensors."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "Use bf16 mixed precision. Defaults to True when a CUDA device is available."},
    )

    def __post_init__(self):
        if self.bf16 is None:
            import torch

            self.bf16 = not self.fp16 and torch.cuda.is_available()
        super().__post_init__()
        check_config(self)

        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if isinstance(self.scale_rewards, str):
            self.scale_rewards = {"true": "group", "false": "none"}.get(self.scale_rewards.lower(), self.scale_rewards)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon

        self._check_choice("sde_type", SDE_TYPES)
        self._check_choice("kl_type", KL_TYPES)
        self._check_choice("loss_type", LOSS_TYPES)
        self._check_choice("preference_std_scope", PREFERENCE_STD_SCOPES)
        self._check_choice("scale_rewards", SCALE_REWARDS)
        self._check_choice("multi_objective_aggregation", AGGREGATIONS)
        self._check_choice("sde_window", WINDOW_TYPES)
        self._check_choice("sde_window_schedule", WINDOW_SCHEDULES)
        self._check_choice("ode_solver", ODE_SOLVERS)

        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be at least 2 (got {self.num_generations}): group-relative advantages compare "
                "the images of one prompt with each other. The Flow-GRPO paper uses 24."
            )
        if self.num_inference_steps < 1 or self.eval_num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps ({self.num_inference_steps}) and eval_num_inference_steps "
                f"({self.eval_num_inference_steps}) must be positive."
            )
        if self.eval_hybrid_steps is not None and not 0 <= self.eval_hybrid_steps <= self.eval_num_inference_steps:
            raise ValueError(
                f"eval_hybrid_steps must be in [0, eval_num_inference_steps={self.eval_num_inference_steps}] (the "
                f"number of ODE steps made by the trained model), got {self.eval_hybrid_steps}; None turns it off."
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}.")
        self._check_window()
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}.")
        if self.noise_level == 0:
            raise ValueError(
                "noise_level=0 makes every step deterministic: there is no log-probability to train. Use e.g. 0.7."
            )
        if self.epsilon <= 0 or self.epsilon_high <= 0:
            raise ValueError(f"epsilon ({self.epsilon}) and epsilon_high ({self.epsilon_high}) must be positive.")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}.")
        if self.ref_model_sync_steps is not None:
            if isinstance(self.ref_model_sync_steps, bool) or self.ref_model_sync_steps < 1:
                raise ValueError(
                    f"ref_model_sync_steps must be a positive number of optimizer steps, or unset; got "
                    f"{self.ref_model_sync_steps!r}."
                )
            if self.beta == 0:
                raise ValueError(
                    f"ref_model_sync_steps={self.ref_model_sync_steps} refreshes the KL reference, and beta=0 has no "
                    "KL term. Set beta > 0, or unset ref_model_sync_steps."
                )
        if self.loss_type == "grpo_guard" and self.sde_type != "sde":
            raise ValueError(
                f"loss_type='grpo_guard' normalises the ratio by the Flow-GRPO SDE's step std s * sqrt(-dt); it is "
                f"not defined for sde_type={self.sde_type!r}. Use sde_type='sde' or loss_type='flow_grpo'."
            )
        if self.adv_clip_max <= 0:
            raise ValueError(f"adv_clip_max must be positive, got {self.adv_clip_max}.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(
                f"ema_decay must be in (0, 1) (Flow-GRPO uses 0.9), or unset for no EMA; got {self.ema_decay}."
            )
        if self.preference_num_opponents is not None and not 1 <= self.preference_num_opponents:
            raise ValueError(
                f"preference_num_opponents must be at least 1, or unset to compare every pair; got "
                f"{self.preference_num_opponents}."
            )
        if self.preference_num_opponents is not None and self.preference_num_opponents >= self.num_generations:
            raise ValueError(
                f"preference_num_opponents ({self.preference_num_opponents}) must be below num_generations "
                f"({self.num_generations}): an image has only {self.num_generations - 1} opponents. Unset it to "
                "compare every pair."
            )
        if self.preference_temperature < 0 or self.preference_tie_margin < 0:
            raise ValueError(
                f"preference_temperature ({self.preference_temperature}) and preference_tie_margin "
                f"({self.preference_tie_margin}) must be >= 0."
            )
        if isinstance(self.steps_per_backward, bool) or not isinstance(self.steps_per_backward, int):
            raise ValueError(f"steps_per_backward must be a positive integer, got {self.steps_per_backward!r}.")
        if self.steps_per_backward < 1:
            raise ValueError(
                f"steps_per_backward must be at least 1 (1: one recorded step per backward), got "
                f"{self.steps_per_backward}."
            )
        if self.attention_backend is not None:
            check_attention_backend(self.attention_backend)
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}.")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"height ({self.height}) and width ({self.width}) must be positive.")
        for name in ("eval_height", "eval_width"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (or unset: the training size), got {getattr(self, name)}.")
        if self.auto_find_batch_size:
            raise ValueError(
                "auto_find_batch_size is not supported: the generation batch must hold whole groups of "
                "num_generations images. Set auto_find_batch_size=False and lower per_device_train_batch_size."
            )
        self._resolve_generation_batch()
        check_generation_batch(self)

    def __str__(self) -> str:
        """Every field, with `*_token` fields and secrets in `model_init_kwargs` (keys such as `token`) redacted."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        shown = {
            name: (REDACTED if value is not None else None) if name.endswith("_token") else redact(value)
            for name, value in values.items()
        }
        lines = "".join(f"{name}={value!r},\n" for name, value in sorted(shown.items()))
        return f"{type(self).__name__}(\n{lines})"

    __repr__ = __str__

    def to_dict(self) -> dict[str, Any]:
        """`TrainingArguments.to_dict` (tokens redacted), with secrets in `model_init_kwargs` redacted too: this is
        what trackers and saved JSON configs get."""
        return {name: redact(value) for name, value in super().to_dict().items()}

    def _check_window(self) -> None:
        """Fill in the defaults of `sde_window_size` and `sde_window_range`; the window rules are checked by the
        schedule they describe (`sampling.WindowSchedule`)."""
        steps = self.num_inference_steps
        if self.sde_window == "full":
            for name in ("sde_window_size", "sde_window_range"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)} has no effect with sde_window='full', whose SDE steps are the "
                        "first floor(num_inference_steps * timestep_fraction). Set sde_window to 'random', 'sliding' "
                        f"or 'frozen', or leave {name} unset."
                    )
        else:
            if self.sde_window_size is None:
                self.sde_window_size = 2 if self.sde_window == "random" else 4
            if self.sde_window_range is None:
                self.sde_window_range = list(default_window_range(self.sde_window, steps))
            if len(self.sde_window_range) != 2:
                raise ValueError(
                    f"sde_window_range={self.sde_window_range} must be two steps [start, end), e.g. "
                    f"sde_window_range=[0, {max(steps - 2, 1)}]."
                )
            self.sde_window_range = [int(value) for value in self.sde_window_range]
        WindowSchedule.from_config(self)
        if not 0 < self.ode_compression <= 1:
            raise ValueError(
                f"ode_compression must be in (0, 1] (1 keeps every ODE step after the window), got "
                f"{self.ode_compression}. MixGRPO-Flash uses 0.4."
            )

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")

    def _resolve_generation_batch(self) -> None:
        """Fill in `generation_batch_size` and `steps_per_generation` from each other, as TRL's `GRPOConfig` does."""
        global_micro_batch = self.per_device_train_batch_size * self.world_size
        for name in ("generation_batch_size", "steps_per_generation"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, or unset; got {value!r}.")
        both = self.generation_batch_size is not None and self.steps_per_generation is not None
        if both and self.generation_batch_size == global_micro_batch * self.steps_per_generation:
            # Both set and consistent: a saved config (training_args.json holds the derived value too) reloads.
            return
        if both:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) and steps_per_generation "
                f"({self.steps_per_generation}) cannot both be set: each is derived from the other "
                "(generation_batch_size = per_device_train_batch_size x processes x steps_per_generation), and these "
                f"disagree ({global_micro_batch} x {self.steps_per_generation} != {self.generation_batch_size}). "
                "Set one."
            )
        if self.generation_batch_size is not None:
            if self.generation_batch_size % global_micro_batch != 0:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be divisible by the global batch size "
                    f"per_device_train_batch_size ({self.per_device_train_batch_size}) x processes ({self.world_size})"
                    f" = {global_micro_batch}."
                )
            self.steps_per_generation = self.generation_batch_size // global_micro_batch
        else:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_micro_batch * self.steps_per_generation

    @property
    def num_sde_steps(self) -> int:
        """Recorded (trained) SDE steps per rollout: the size of the SDE window."""
        if self.sde_window != "full":
            return self.sde_window_size
        return full_window(self.num_inference_steps, self.timestep_fraction).size
