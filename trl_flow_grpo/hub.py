"""Model cards and Hub uploads of a Flow-GRPO run: no trainer here, only what a run hands over.

[`RunSummary`] is what a run knows (base model, rewards before/after training, hyperparameters, a sample grid, the
papers to cite); [`generate_model_card`] renders it through the Jinja template `templates/model_card.md` with
[`~huggingface_hub.ModelCard.from_template`] (no I/O) and [`write_model_card`] writes `README.md`. The rest are the
pieces of an upload: [`copy_model_files`] (the LoRA or `transformer/` from a checkpoint), [`save_training_args`]
(without any Hub token) and [`upload_output_dir`] (`output_dir` without checkpoints and training grids).
`FlowGRPOTrainer` builds the summary and drives the uploads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from PIL import Image

from .file_names import (
    COMPLETIONS_FOLDER,
    LORA_WEIGHTS_NAME,
    PICKLED_TRAINING_ARGS_NAME,
    SAMPLE_IMAGES_FOLDER,
    SAMPLES_NAME,
    TRAINING_ARGS_NAME,
    TRANSFORMER_FOLDER,
)
from .validation import redact

MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
"""The Jinja template of the model card, shipped in the package."""
UPLOAD_IGNORE_PATTERNS = [
    "_*",
    "checkpoint-*",
    "samples/train_*",
    f"{COMPLETIONS_FOLDER}/*",
    PICKLED_TRAINING_ARGS_NAME,
]
"""Not uploaded from `output_dir`: private files, checkpoints (uploaded separately per `hub_strategy`), the training
sample grids and sample tables (one per logging step: gigabytes over a long run; `samples.png`, the widget images and
the evaluation grids are uploaded) and any pickled `training_args.bin` (the redacted `training_args.json` is)."""


@dataclass(frozen=True)
class Paper:
    """A paper the model card cites."""

    name: str
    title: str
    arxiv_id: str
    citation: str
    used_for: str = ""  # what the run uses from the paper, for the summary


FLOW_GRPO = Paper(
    name="Flow-GRPO",
    title="Flow-GRPO: Training Flow Matching Models via Online RL",
    arxiv_id="2505.05470",
    citation="""\
@article{liu2025flowgrpo,
    title   = {{Flow-GRPO: Training Flow Matching Models via Online RL}},
    author  = {Jie Liu and Gongye Liu and Jiajun Liang and Yangguang Li and Jiaheng Liu and Xintao Wang and Pengfei Wan
               and Di Zhang and Wanli Ouyang},
    journal = {arXiv preprint arXiv:2505.05470},
    year    = {2025}
}""",
)

MIXGRPO = Paper(
    name="MixGRPO",
    title="MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE",
    arxiv_id="2507.21802",
    citation="""\
@article{li2025mixgrpo,
    title   = {{MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE}},
    author  = {Junzhe Li and Yutao Cui and Tao Huang and Yinping Ma and Chun Fan and Miles Yang and Zhao Zhong},
    journal = {arXiv preprint arXiv:2507.21802},
    year    = {2025}
}""",
    used_for="mixed ODE-SDE sampling (an SDE window)",
)

PREF_GRPO = Paper(
    name="Pref-GRPO",
    title="Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable Text-to-Image Reinforcement Learning",
    arxiv_id="2508.20751",
    citation="""\
@article{wang2025prefgrpo,
    title   = {{Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable Text-to-Image Reinforcement Learning}},
    author  = {Yibin Wang and Zhimin Li and Yuhang Zang and Yujie Zhou and Jiazi Bu and Chunyu Wang and Qinglin Lu
               and Cheng Jin and Jiaqi Wang},
    journal = {arXiv preprint arXiv:2508.20751},
    year    = {2025}
}""",
    used_for="pairwise-preference (win-rate) advantages",
)


@dataclass(frozen=True)
class EvalScore:
    """One mean reward of the last evaluation, for the card's structured evaluation results."""

    metric: str  # the metric type: the reward function's name, or `reward` for the weighted total
    label: str  # a readable name
    value: float
    step: int


def last_eval_scores(log_history: list[dict[str, Any]], reward_names: list[str]) -> list[EvalScore]:
    """The mean rewards of the last logged evaluation (`eval_rewards/<name>/mean` in `reward_names` order, then any
    other logged one, then the weighted total `eval_reward`); empty if no evaluation was logged."""
    entry = next((e for e in reversed(log_history) if isinstance(e.get("eval_reward"), (int, float))), None)
    if entry is None:
        return []
    step = int(entry.get("step", 0))
    logged = [
        k[len("eval_rewards/") : -len("/mean")] for k in entry if k.startswith("eval_rewards/") and k.endswith("/mean")
    ]
    scores = [
        EvalScore(name, f"Mean {name} (ODE samples, step {step})", float(entry[f"eval_rewards/{name}/mean"]), step)
        for name in dict.fromkeys([*reward_names, *logged])
        if isinstance(entry.get(f"eval_rewards/{name}/mean"), (int, float))
    ]
    label = f"Mean weighted reward (ODE samples, step {step})"
    return [*scores, EvalScore("reward", label, float(entry["eval_reward"]), step)]


@dataclass(frozen=True)
class MetricChange:
    """First and last logged value of one metric of `trainer.state.log_history`."""

    label: str  # markdown
    key: str
    first: float
    last: float
    first_step: int
    last_step: int

    @property
    def change(self) -> float:
        return self.last - self.first


def format_number(value: float) -> str:
    """How the card prints a number: 4 decimals, or 4 significant digits in scientific notation if very small/big."""
    if value != value:  # NaN
        return "nan"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def metric_changes(log_history: list[dict[str, Any]], reward_names: list[str]) -> list[MetricChange]:
    """First and last logged values of the reward metrics, in the order the card shows them.

    Rows: `rewards/<name>/mean` of each reward function (in `reward_names` order, then any other reward that was
    logged, e.g. of preference functions), the weighted total `reward`, then the same for evaluation
    (`eval_rewards/<name>/mean`, `eval_reward`). Metrics that were never logged are left out.
    """
    logged_names = [
        key[len("rewards/") : -len("/mean")]
        for entry in log_history
        for key in entry
        if key.startswith("rewards/") and key.endswith("/mean")
    ]
    names = list(dict.fromkeys([*reward_names, *logged_names]))
    rows = [(f"`{name}`", f"rewards/{name}/mean") for name in names] + [("reward (weighted total)", "reward")]
    rows += [(f"eval: `{name}`", f"eval_rewards/{name}/mean") for name in names]
    rows += [("eval: reward (weighted total)", "eval_reward")]
    changes = []
    for label, key in rows:
        points = [
            (int(entry.get("step", 0)), float(entry[key]))
            for entry in log_history
            if isinstance(entry.get(key), (int, float))
        ]
        if points:
            changes.append(MetricChange(label, key, points[0][1], points[-1][1], points[0][0], points[-1][0]))
    return changes


def hub_id_from_name_or_path(name_or_path: str | None) -> str | None:
    """The Hub id of a base model given by `from_pretrained`'s argument, or `None` if it is not one.

    A Hub id (`org/name`) is returned as is; a local folder of the Hugging Face cache
    (`.../models--org--name/snapshots/<sha>`) gives `org/name`; any other local path gives `None`.
    """
    if not name_or_path:
        return None
    name_or_path = str(name_or_path)
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]", name_or_path)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if os.path.isdir(name_or_path) or os.path.isabs(name_or_path) or name_or_path.startswith("."):
        return None
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path):
        return name_or_path
    return None


def _versions() -> list[tuple[str, str]]:
    rows = []
    for label, package in (
        ("trl-flow-grpo", "trl-flow-grpo"),
        ("Diffusers", "diffusers"),
        ("Transformers", "transformers"),
        ("PEFT", "peft"),
        ("PyTorch", "torch"),
    ):
        try:
            rows.append((label, version(package)))
        except PackageNotFoundError:
            continue
    return rows


def _cell(value: Any) -> str:
    """A markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _usage_code(
    base_model: str | None,
    repo_id: str,
    is_lora: bool,
    transformer_class: str,
    prompt: str,
    inference: dict[str, Any],
    hybrid_steps: int | None = None,
) -> str:
    """The card's loading example. With `hybrid_steps` (a LoRA only), hybrid inference as the evaluation made its
    images: a `callback_on_step_end` turns the LoRA off after that many steps, so the base model makes the rest."""
    base = json.dumps(base_model or "path/to/base-model")
    repo = json.dumps(repo_id)
    call_args = ", ".join(f"{key}={value!r}" for key, value in inference.items())
    hybrid = is_lora and hybrid_steps is not None
    if hybrid:
        call_args += ", callback_on_step_end=base_model_after"
    call = f"image = pipe(prompt={json.dumps(prompt, ensure_ascii=False)}, {call_args}).images[0]"
    if is_lora:
        lines = [
            "import torch",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained({base}, torch_dtype=torch.bfloat16).to("cuda")',
            f"pipe.load_lora_weights({repo})",
        ]
    else:
        lines = [
            "import torch",
            f"from diffusers import DiffusionPipeline, {transformer_class}",
            "",
            f"transformer = {transformer_class}.from_pretrained({repo}, subfolder={json.dumps(TRANSFORMER_FOLDER)}, "
            "torch_dtype=torch.bfloat16)",
            f"pipe = DiffusionPipeline.from_pretrained({base}, transformer=transformer, torch_dtype=torch.bfloat16)",
            'pipe = pipe.to("cuda")',
        ]
    if hybrid:
        lines += [
            "",
            f"# Hybrid inference (MixGRPO), as in the evaluation: the LoRA makes the first {hybrid_steps} steps, "
            "the base model the rest.",
            "def base_model_after(pipe, step, timestep, callback_kwargs):",
            f"    if step == {hybrid_steps - 1}:",
            "        pipe.disable_lora()",
            "    return callback_kwargs",
            "",
        ]
        if hybrid_steps == 0:
            lines.append("pipe.disable_lora()")
        return "\n".join([*lines, call, "pipe.enable_lora()", 'image.save("sample.png")'])
    return "\n".join([*lines, call, 'image.save("sample.png")'])


@dataclass
class RunSummary:
    """What the model card says about a run. `FlowGRPOTrainer.create_model_card` fills it in."""

    model_name: str
    """Title of the card."""
    base_model: str | None
    """Hub id of the base pipeline, or `None` if unknown or local (then left out of the metadata)."""
    hub_model_id: str | None
    """Repo the card is pushed to (used in the loading code); `model_name` if `None`."""
    is_lora: bool
    """Whether the repo holds a LoRA (`pytorch_lora_weights.safetensors`) or a full `transformer/`."""
    tags: list[str]
    """Metadata tags, in order (duplicates dropped)."""
    papers: list[Paper]
    """Papers to cite, in order; the first one is the training method."""
    trainer_name: str = "Flow-GRPO"
    pipeline_class: str = "DiffusionPipeline"
    transformer_class: str = "SD3Transformer2DModel"
    license: str | None = None
    dataset_name: str | None = None
    """Hub id of the prompt dataset, if known."""
    num_prompts: int | None = None
    num_eval_prompts: int | None = None
    reward_names: list[str] = field(default_factory=list)
    preference_names: list[str] = field(default_factory=list)
    """Pref-GRPO's preference functions."""
    metric_rows: list[MetricChange] = field(default_factory=list)
    """Reward metrics before/after training (see [`metric_changes`])."""
    hyperparameters: list[tuple[str, Any]] = field(default_factory=list)
    """`(name, value)` rows of the hyperparameter table (see [`hyperparameters`])."""
    sample_image: str | None = None
    """Path, relative to the card, of a sample grid to embed."""
    sample_caption: str | None = None
    example_prompt: str = "a photo of a cat"
    """Prompt of the loading example."""
    inference: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the pipeline call in the loading example."""
    hybrid_steps: int | None = None
    """`eval_hybrid_steps`: the loading example of a LoRA then makes hybrid-inference images, as the evaluation."""
    wandb_url: str | None = None
    """The W&B run of the training, if one was active."""
    trackio_url: str | None = None
    """The Trackio Space of the training, if it had one."""
    widget: list[dict[str, Any]] = field(default_factory=list)
    """The Hub widget's examples: `{"text": prompt, "output": {"url": "images/sample_<i>.png"}}` (see
    [`save_widget_images`])."""
    eval_dataset_name: str | None = None
    """Hub id of the evaluation prompts, if known (the `dataset.type` of the evaluation results)."""
    eval_results: list[EvalScore] = field(default_factory=list)
    """The last evaluation's mean rewards (see [`last_eval_scores`]): the card's structured evaluation results."""


def card_tags(tags: list[str], is_lora: bool) -> list[str]:
    """The metadata tags: `tags`, then what the Hub and diffusers' training scripts put on a diffusers model
    (`diffusers-training`; for a LoRA `lora` and `template:sd-lora`, the Hub's image-LoRA card template that shows the
    widget images as a gallery), duplicates dropped."""
    extra = ["diffusers", "diffusers-training", *(["lora", "template:sd-lora"] if is_lora else [])]
    return list(dict.fromkeys([*tags, *extra]))


def card_eval_results(summary: RunSummary) -> list[EvalResult] | None:
    """`summary.eval_results` as huggingface_hub `EvalResult`s (the card's `model-index`), or `None` without any."""
    if not summary.eval_results:
        return None
    dataset_type = summary.eval_dataset_name or summary.dataset_name or "custom"
    count = f" ({summary.num_eval_prompts} prompts)" if summary.num_eval_prompts is not None else ""
    return [
        EvalResult(
            task_type="text-to-image",
            task_name="Text-to-image",
            dataset_type=dataset_type,
            dataset_name=f"Evaluation prompts{count}",
            metric_type=score.metric,
            metric_name=score.label,
            metric_value=score.value,
        )
        for score in summary.eval_results
    ]


def generate_model_card(summary: RunSummary) -> ModelCard:
    """Render the model card of a run from `templates/model_card.md` (no I/O)."""
    if not summary.papers:
        raise ValueError("generate_model_card needs at least one paper: the training method's, to cite first.")
    base_model, is_lora = summary.base_model, summary.is_lora
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=("adapter" if is_lora else "finetune") if base_model else None,
        datasets=[summary.dataset_name] if summary.dataset_name else None,
        library_name="diffusers",
        license=summary.license,
        pipeline_tag="text-to-image",
        tags=card_tags(summary.tags, is_lora),
        widget=summary.widget or None,
        model_name=summary.model_name if summary.eval_results else None,
        eval_results=card_eval_results(summary),
    )
    rewards = ", ".join(f"`{name}`" for name in summary.reward_names)
    preferences = ", ".join(f"`{name}`" for name in summary.preference_names)
    objective = f"the reward{'s' if len(summary.reward_names) > 1 else ''} {rewards}" if rewards else "its rewards"
    objective += f" and the pairwise preferences {preferences}" if preferences else ""
    trained = dict(summary.hyperparameters)
    usage = _usage_code(
        base_model,
        summary.hub_model_id or summary.model_name,
        is_lora,
        summary.transformer_class,
        summary.example_prompt,
        summary.inference,
        summary.hybrid_steps,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        **{f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)},
        base_link=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local base model",
        objective=objective,
        optimizer_steps=trained.get("Optimizer steps"),
        images_sampled=trained.get("Images sampled"),
        usage_code=usage,
        lora_weights_name=LORA_WEIGHTS_NAME,
        transformer_folder=TRANSFORMER_FOLDER,
        reward_list=rewards,
        preference_list=preferences,
        reward_rows=[
            (
                _cell(row.label),
                f"{format_number(row.first)} (step {row.first_step})",
                f"{format_number(row.last)} (step {row.last_step})",
                ("+" if row.change >= 0 else "") + format_number(row.change),
            )
            for row in summary.metric_rows
        ],
        hyperparameter_rows=[(_cell(name), _cell(value)) for name, value in summary.hyperparameters],
        versions=_versions(),
    )


def write_model_card(summary: RunSummary, output_dir: str) -> ModelCard:
    """Write the card of `summary` as `output_dir/README.md` and return it."""
    card = generate_model_card(summary)
    os.makedirs(output_dir, exist_ok=True)
    card.save(os.path.join(output_dir, "README.md"))
    return card


def papers_for(method: Paper, args: Any, uses_preferences: bool) -> list[Paper]:
    """The papers a run cites: its method, MixGRPO with a window or a higher-order ODE solver, Pref-GRPO with
    preference functions."""
    papers = [method]
    # MixGRPO: the sliding window, its frozen variant (MixGRPO-Flash*) and higher-order ODE solvers (MixGRPO-Flash).
    if args.sde_window in ("sliding", "frozen") or args.ode_solver != "euler":
        papers.append(MIXGRPO)
    if uses_preferences:
        papers.append(PREF_GRPO)
    return papers


def images_sampled(log_history: list[dict[str, Any]]) -> int | None:
    """The number of images sampled in training, as last logged (`num_images`)."""
    best = max((entry["num_images"] for entry in log_history if "num_images" in entry), default=0)
    return int(best) if best else None


def hyperparameters(
    args: Any,
    *,
    global_step: int,
    guidance_scale: float,
    num_reward_funcs: int,
    uses_preferences: bool,
    images_sampled: int | None = None,
    lora_config: Any = None,
) -> list[tuple[str, Any]]:
    """The rows of the card's hyperparameter table (fields that do not apply to the run are left out)."""
    rows: list[tuple[str, Any]] = [("Optimizer steps", global_step)]
    if images_sampled is not None:
        rows.append(("Images sampled", images_sampled))
    rows += [
        ("num_generations (group size G)", args.num_generations),
        ("Images per optimizer step", args.generation_batch_size),
        ("num_inference_steps (training rollouts)", args.num_inference_steps),
        ("guidance_scale", guidance_scale),
        ("train_cfg", args.train_cfg),
        ("Resolution", f"{args.height}x{args.width}"),
        ("noise_level", args.noise_level),
        ("sde_type", args.sde_type),
        ("sde_window", args.sde_window),
    ]
    if args.sde_window == "full":
        rows.append(("timestep_fraction", args.timestep_fraction))
    else:
        rows += [("sde_window_size", args.sde_window_size), ("sde_window_range", args.sde_window_range)]
        if args.sde_window == "sliding":
            rows += [
                ("sde_window_shift_interval", args.sde_window_shift_interval),
                ("sde_window_stride", args.sde_window_stride),
                ("sde_window_schedule", args.sde_window_schedule),
                ("sde_window_roll_back", args.sde_window_roll_back),
            ]
        rows += [("ode_solver", args.ode_solver), ("ode_compression", args.ode_compression)]
    rows += [("Trained SDE steps per rollout", args.num_sde_steps), ("same_latent", args.same_latent)]
    rows.append(("beta (KL)", args.beta))
    if args.beta > 0:
        rows.append(("kl_type", args.kl_type))
    rows += [
        ("epsilon", args.epsilon),
        ("epsilon_high", args.epsilon_high),
        ("num_iterations", args.num_iterations),
        ("scale_rewards", args.scale_rewards),
        ("adv_clip_max", args.adv_clip_max),
    ]
    if num_reward_funcs > 1:
        rows.append(("multi_objective_aggregation", args.multi_objective_aggregation))
    if args.reward_weights is not None:
        rows.append(("reward_weights", args.reward_weights))
    if uses_preferences:
        for name in ("preference_weights", "preference_num_opponents", "preference_symmetric"):
            rows.append((name, getattr(args, name)))
    rows += [
        ("learning_rate", args.learning_rate),
        ("lr_scheduler_type", getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        ("weight_decay", args.weight_decay),
        ("max_grad_norm", args.max_grad_norm),
        ("Mixed precision", "bf16" if args.bf16 else "fp16" if args.fp16 else "no"),
    ]
    if args.ema_decay is not None:
        rows.append(("ema_decay", args.ema_decay))
    if lora_config is not None:
        targets = lora_config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
        rows += [
            ("LoRA rank", lora_config.r),
            ("LoRA alpha", lora_config.lora_alpha),
            ("LoRA target modules", ", ".join(targets) if isinstance(targets, (list, tuple)) else targets),
        ]
    else:
        rows.append(("Fine-tuning", "full transformer"))
    rows.append(("seed", args.seed))
    return [(name, value) for name, value in rows if value is not None]


# ----------------------------------------------------------------------------------------------- sample grid
_SAMPLE_FILE = re.compile(r"(?P<split>[^/\\]+)_step(?P<step>\d+)\.png$")


def newest_sample_grid(output_dir: str) -> Path | None:
    """The newest sample grid under `output_dir/samples/` (highest step; at equal steps eval before train)."""
    folder = Path(output_dir, "samples")
    if not folder.is_dir():
        return None

    def key(path: Path) -> tuple:
        match = _SAMPLE_FILE.search(path.name)
        step = int(match.group("step")) if match else -1
        return step, bool(match and match.group("split") == "eval"), path.stat().st_mtime, path.name

    grids = sorted(folder.glob("*.png"), key=key)
    return grids[-1] if grids else None


def copy_newest_sample_grid(output_dir: str) -> tuple[str | None, str | None]:
    """Copy the newest sample grid to `output_dir/samples.png`: its path relative to the card and its caption
    (`(None, None)` without a grid)."""
    grid = newest_sample_grid(output_dir)
    if grid is None:
        return None, None
    shutil.copyfile(grid, os.path.join(output_dir, SAMPLES_NAME))
    match = _SAMPLE_FILE.search(grid.name)
    if not match:
        return SAMPLES_NAME, None
    what = "Evaluation samples (ODE sampler)" if match.group("split") == "eval" else "Training rollouts (SDE)"
    return SAMPLES_NAME, f"{what} at step {int(match.group('step'))}, with their prompts and rewards."


def wandb_url() -> str | None:
    """The URL of the Weights & Biases run of this process, if one is active (`wandb.run.url`)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    return getattr(run, "url", None) if run is not None else None


def trackio_url() -> str | None:
    """The URL of the Trackio Space this process logs to, if any (`trackio.context_vars.current_space_id`, what
    transformers' `TrackioCallback` reads); `None` for a local Trackio run or without trackio."""
    context_vars = getattr(sys.modules.get("trackio"), "context_vars", None)
    space = getattr(context_vars, "current_space_id", None)
    space_id = space.get() if space is not None else None
    return f"https://huggingface.co/spaces/{space_id}" if space_id else None


MAX_WIDGET_IMAGES = 4
"""How many sample images the model card's widget shows."""


def side_by_side(source: Image.Image, edit: Image.Image) -> Image.Image:
    """An edit next to its source image (source left, edit right, the source resized to the edit's size): the
    samples of an image-editing run in evaluation grids, the model card's `samples.png` and its widget."""
    width, height = edit.size
    pair = Image.new("RGB", (2 * width, height), "white")
    pair.paste(source.convert("RGB").resize((width, height)), (0, 0))
    pair.paste(edit.convert("RGB"), (width, 0))
    return pair


def save_widget_images(
    output_dir: str, images: list[Image.Image], prompts: list[str], max_images: int = MAX_WIDGET_IMAGES
) -> list[dict[str, Any]]:
    """Save the first `max_images` images as `output_dir/images/sample_<i>.png` (removing older `sample_*.png`) and
    return the widget entries of the card metadata, `{"text": prompt, "output": {"url": "images/sample_<i>.png"}}`."""
    if len(images) != len(prompts):
        raise ValueError(f"save_widget_images got {len(images)} images but {len(prompts)} prompts.")
    folder = Path(output_dir, SAMPLE_IMAGES_FOLDER)
    for old in folder.glob("sample_*.png"):
        old.unlink()
    widget = []
    for i, (image, prompt) in enumerate(zip(images[:max_images], prompts)):
        folder.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(folder / f"sample_{i}.png")
        widget.append({"text": str(prompt), "output": {"url": f"{SAMPLE_IMAGES_FOLDER}/sample_{i}.png"}})
    return widget


# -------------------------------------------------------------------------------------------------- uploads
def hf_api() -> Any:
    """transformers' shared `HfApi` (tagged with its library info), or a plain one on versions without it."""
    try:
        from transformers.utils.hub import hf_api as transformers_hf_api
    except ImportError:
        from huggingface_hub import HfApi

        return HfApi()
    return transformers_hf_api()


def redacted_args(args: Any) -> Any:
    """A shallow copy of `args` with every `*_token` field set to `None` and secrets in `model_init_kwargs` redacted
    (safe to write into a public repo)."""
    safe = copy.copy(args)
    for field_ in dataclasses.fields(args):
        if field_.name.endswith("_token") and getattr(safe, field_.name, None) is not None:
            setattr(safe, field_.name, None)
    if isinstance(getattr(safe, "model_init_kwargs", None), dict):  # e.g. {"token": ...} for a gated model
        safe.model_init_kwargs = redact(safe.model_init_kwargs)
    return safe


def save_training_args(args: Any, folder: str) -> str:
    """Write `args` as JSON (`TrainingArguments.to_json_string`), without any Hub token or other secret, to
    `folder/training_args.json`, and return its path. No pickle: the file is safe to load from an untrusted repo
    (`FlowGRPOConfig(**{k: v for k, v in json.load(f).items() if not k.endswith("_token")})` rebuilds the config)."""
    path = os.path.join(folder, TRAINING_ARGS_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(redacted_args(args).to_json_string())
    return path


def copy_model_files(checkpoint_folder: str, output_dir: str) -> None:
    """Copy the trained weights of a checkpoint (the LoRA file or the `transformer/` folder) into `output_dir`."""
    source = os.path.join(checkpoint_folder, LORA_WEIGHTS_NAME)
    if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(output_dir, LORA_WEIGHTS_NAME))
    source = os.path.join(checkpoint_folder, TRANSFORMER_FOLDER)
    if os.path.isdir(source):
        shutil.copytree(source, os.path.join(output_dir, TRANSFORMER_FOLDER), dirs_exist_ok=True)


def upload_output_dir(**upload_folder_kwargs: Any) -> Any:
    """`HfApi.upload_folder` of an output folder, without `UPLOAD_IGNORE_PATTERNS`."""
    return hf_api().upload_folder(ignore_patterns=UPLOAD_IGNORE_PATTERNS, **upload_folder_kwargs)
