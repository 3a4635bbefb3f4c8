"""Model cards and Hub uploads for [`FlowGRPOTrainer`].

[`generate_model_card`] turns what a run knows (base model, rewards before/after training, hyperparameters, a sample
grid, the papers to cite) into a [`~huggingface_hub.ModelCard`]; it does no I/O. [`write_model_card`] collects that
information from a trainer and writes `README.md` (plus `samples.png`) into `args.output_dir`.
[`push_checkpoint_to_hub`] is the trainer's intermediate push (`push_to_hub=True` with a `hub_strategy`): it follows
`transformers.Trainer._push_from_checkpoint`, but copies the files this trainer saves
(`pytorch_lora_weights.safetensors` or the `transformer/` folder) instead of transformers' fixed list, refreshes the
model card, and never writes the Hub token into the uploaded `training_args.bin`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .validation import redact

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""The file diffusers' `load_lora_weights` looks for in a folder or Hub repo."""
TRANSFORMER_FOLDER = "transformer"
"""Subfolder holding the fully fine-tuned transformer (`save_pretrained`)."""
SAMPLES_NAME = "samples.png"
"""Name of the sample grid next to `README.md`."""
TRAINING_ARGS_NAME = "training_args.bin"
UPLOAD_IGNORE_PATTERNS = ["_*", "checkpoint-*", "samples/train_*"]
"""Not uploaded from `output_dir`: private files, checkpoints (uploaded separately per `hub_strategy`) and the training
sample grids (one per logging step: gigabytes over a long run; `samples.png` and the evaluation grids are uploaded)."""


@dataclass(frozen=True)
class Paper:
    """A paper the model card cites."""

    name: str
    title: str
    arxiv_id: str
    citation: str
    used_for: str = ""  # what the run uses from the paper, for the summary


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


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _usage_code(
    base_model: str | None,
    repo_id: str,
    is_lora: bool,
    transformer_class: str,
    prompt: str,
    inference: dict[str, Any],
) -> str:
    base = json.dumps(base_model or "path/to/base-model")
    repo = json.dumps(repo_id)
    call_args = ", ".join(f"{key}={value!r}" for key, value in inference.items())
    call = f"image = pipe({json.dumps(prompt, ensure_ascii=False)}, {call_args}).images[0]"
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
            f'transformer = {transformer_class}.from_pretrained({repo}, subfolder="transformer", '
            "torch_dtype=torch.bfloat16)",
            f"pipe = DiffusionPipeline.from_pretrained({base}, transformer=transformer, torch_dtype=torch.bfloat16)",
            'pipe = pipe.to("cuda")',
        ]
    return "\n".join([*lines, call, 'image.save("sample.png")'])


def generate_model_card(
    *,
    model_name: str,
    base_model: str | None,
    hub_model_id: str | None,
    is_lora: bool,
    tags: list[str],
    papers: list[Paper],
    trainer_name: str = "Flow-GRPO",
    pipeline_class: str = "DiffusionPipeline",
    transformer_class: str = "SD3Transformer2DModel",
    license: str | None = None,
    dataset_name: str | None = None,
    num_prompts: int | None = None,
    num_eval_prompts: int | None = None,
    reward_names: list[str] | None = None,
    preference_names: list[str] | None = None,
    metric_rows: list[MetricChange] | None = None,
    hyperparameters: list[tuple[str, Any]] | None = None,
    sample_image: str | None = None,
    sample_caption: str | None = None,
    example_prompt: str = "a photo of a cat",
    inference: dict[str, Any] | None = None,
    wandb_url: str | None = None,
) -> ModelCard:
    """Build the model card of a Flow-GRPO run (no I/O).

    Args:
        model_name: Title of the card.
        base_model: Hub id of the base pipeline, or `None` if unknown or local (then left out of the metadata).
        hub_model_id: Repo the card is pushed to (used in the loading code); `model_name` if `None`.
        is_lora: Whether the repo holds a LoRA (`pytorch_lora_weights.safetensors`) or a full `transformer/`.
        tags: Metadata tags, in order (duplicates dropped).
        papers: Papers to cite, in order; the first one is the training method.
        trainer_name: Name of the method in the summary.
        pipeline_class, transformer_class: diffusers class names of the base pipeline and its transformer.
        license: SPDX-like license id for the metadata, if known.
        dataset_name: Hub id of the prompt dataset, if known.
        num_prompts, num_eval_prompts: Number of training / evaluation prompts.
        reward_names, preference_names: Reward functions and (Pref-GRPO) preference functions used.
        metric_rows: Reward metrics before/after training (see [`metric_changes`]).
        hyperparameters: `(name, value)` rows of the hyperparameter table.
        sample_image: Path, relative to the card, of a sample grid to embed.
        sample_caption: Caption under the sample grid.
        example_prompt: Prompt of the loading example.
        inference: Keyword arguments of the pipeline call in the loading example.
        wandb_url: Weights & Biases run to link.
    """
    if not papers:
        raise ValueError("generate_model_card needs at least one paper: the training method's, to cite first.")
    tags = list(dict.fromkeys(tags))
    repo_id = hub_model_id or model_name
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=("adapter" if is_lora else "finetune") if base_model else None,
        datasets=[dataset_name] if dataset_name else None,
        library_name="diffusers",
        license=license,
        pipeline_tag="text-to-image",
        tags=tags,
    )
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local base model"
    kind = "A LoRA adapter" if is_lora else "A fine-tuned transformer"
    method, *others = papers
    method_link = f"[{trainer_name}](https://huggingface.co/papers/{method.arxiv_id})"
    extras = "".join(
        f", with {p.used_for or 'ideas'} from [{p.name}](https://huggingface.co/papers/{p.arxiv_id})" for p in others
    )
    rewards = ", ".join(f"`{name}`" for name in reward_names or [])
    rewards = f"the reward{'s' if len(reward_names or []) > 1 else ''} {rewards}" if rewards else "its rewards"
    preferences = ", ".join(f"`{name}`" for name in preference_names or [])
    objective = rewards + (f" and the pairwise preferences {preferences}" if preferences else "")
    trained = dict(hyperparameters or [])
    sections = [
        f"# {model_name}",
        f"{kind} for {base_link}, trained with online reinforcement learning: {method_link}{extras}, using "
        f"`trl_flow_grpo.FlowGRPOTrainer`. It was trained to maximise {objective}"
        + (f" for {trained['Optimizer steps']} optimizer steps" if trained.get("Optimizer steps") else "")
        + (f" on {trained['Images sampled']} sampled images" if "Images sampled" in trained else "")
        + (f" from {num_prompts} prompts" if num_prompts else "")
        + (f" of [{dataset_name}](https://huggingface.co/datasets/{dataset_name})" if dataset_name else "")
        + ".",
    ]
    if wandb_url:
        sections.append(f"Training logs: [Weights & Biases]({wandb_url}).")
    if sample_image:
        sections.append(f"![Samples]({sample_image})" + (f"\n\n*{sample_caption}*" if sample_caption else ""))

    sections += [
        "## How to use",
        (
            "Load the base pipeline, then the LoRA:"
            if is_lora
            else "Load the fine-tuned transformer into the base pipeline:"
        )
        + ("" if base_model else " (the base model was loaded from a local folder: put its path or Hub id below)"),
        "```python\n"
        + _usage_code(base_model, repo_id, is_lora, transformer_class, example_prompt, inference or {})
        + "\n```",
        "## Base model",
        f"- Base model: {base_link} (`{pipeline_class}`)\n"
        + (
            f"- This repo holds `{LORA_WEIGHTS_NAME}`, a LoRA of the transformer in diffusers' format; the VAE and "
            "text encoders are unchanged."
            if is_lora
            else f"- This repo holds the whole fine-tuned transformer (`{TRANSFORMER_FOLDER}/`); the VAE and text "
            "encoders are unchanged."
        ),
        "## Training data",
        "- Prompt dataset: "
        + (f"[{dataset_name}](https://huggingface.co/datasets/{dataset_name})" if dataset_name else "not specified")
        + (f"\n- Training prompts: {num_prompts}" if num_prompts is not None else "")
        + (f"\n- Evaluation prompts: {num_eval_prompts}" if num_eval_prompts is not None else ""),
        "## Rewards",
        "Reward functions: "
        + (", ".join(f"`{name}`" for name in reward_names or []) or "none")
        + (f"; preference functions (Pref-GRPO win rates): {preferences}" if preferences else "")
        + ".",
    ]
    if metric_rows:
        sections.append(
            "Mean rewards when first and last logged. Training values are over the SDE rollouts of the logged steps "
            "(the first rollouts are sampled before any update, i.e. by the base model); `eval` values are "
            "deterministic ODE samples of the evaluation prompts.\n\n"
            + _table(
                ("Reward", "First logged", "Last logged", "Change"),
                [
                    (
                        row.label,
                        f"{format_number(row.first)} (step {row.first_step})",
                        f"{format_number(row.last)} (step {row.last_step})",
                        ("+" if row.change >= 0 else "") + format_number(row.change),
                    )
                    for row in metric_rows
                ],
            )
        )
    else:
        sections.append("No reward was logged yet.")
    if hyperparameters:
        sections += ["## Training hyperparameters", _table(("Hyperparameter", "Value"), hyperparameters)]
    versions = _versions()
    if versions:
        sections += ["### Framework versions", "\n".join(f"- {label}: {value}" for label, value in versions)]
    sections.append("## Citations")
    for paper in papers:
        sections.append(f"{paper.name} ([arXiv:{paper.arxiv_id}](https://arxiv.org/abs/{paper.arxiv_id})):")
        sections.append(f"```bibtex\n{paper.citation}\n```")
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


# ----------------------------------------------------------------------------------------------- from a trainer
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


def _base_model_name_or_path(trainer: Any) -> str | None:
    pipeline = trainer.pipeline
    name = getattr(pipeline, "name_or_path", None) or getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _preference_names(trainer: Any) -> list[str]:
    funcs = getattr(trainer, "preference_funcs", None)
    if not funcs:
        return []
    names = getattr(trainer, "preference_func_names", None)
    if names:
        return list(names)
    from .rewards import reward_func_name

    names = []
    for func in funcs:
        try:
            names.append(reward_func_name(func))
        except Exception:  # an object reward_func_name does not know: fall back to its class name
            names.append(func if isinstance(func, str) else type(func).__name__)
    return names


def _hyperparameters(trainer: Any, images_sampled: int | None) -> list[tuple[str, Any]]:
    args = trainer.args

    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    rows: list[tuple[str, Any]] = [
        ("Optimizer steps", trainer.state.global_step),
    ]
    if images_sampled is not None:
        rows.append(("Images sampled", images_sampled))
    rows += [
        ("num_generations (group size G)", args.num_generations),
        ("Images per optimizer step", args.generation_batch_size),
        ("num_inference_steps (training rollouts)", args.num_inference_steps),
        ("guidance_scale", trainer.guidance_scale),
        ("train_cfg", get("train_cfg")),
        ("Resolution", f"{args.height}x{args.width}"),
        ("noise_level", args.noise_level),
        ("sde_type", args.sde_type),
        ("sde_window", args.sde_window),
    ]
    if args.sde_window == "full":
        rows.append(("timestep_fraction", get("timestep_fraction")))
    else:
        rows += [("sde_window_size", get("sde_window_size")), ("sde_window_range", get("sde_window_range"))]
        if args.sde_window == "sliding":
            rows += [
                ("sde_window_shift_interval", get("sde_window_shift_interval")),
                ("sde_window_stride", get("sde_window_stride")),
                ("sde_window_schedule", get("sde_window_schedule")),
                ("sde_window_roll_back", get("sde_window_roll_back")),
            ]
        rows += [("ode_solver", get("ode_solver")), ("ode_compression", get("ode_compression"))]
    rows += [("Trained SDE steps per rollout", get("num_sde_steps")), ("same_latent", get("same_latent"))]
    rows.append(("beta (KL)", args.beta))
    if args.beta > 0:
        rows.append(("kl_type", get("kl_type")))
    rows += [
        ("epsilon", args.epsilon),
        ("epsilon_high", get("epsilon_high")),
        ("num_iterations", get("num_iterations")),
        ("scale_rewards", get("scale_rewards")),
        ("adv_clip_max", get("adv_clip_max")),
    ]
    if len(getattr(trainer, "reward_funcs", [])) > 1:
        rows.append(("multi_objective_aggregation", get("multi_objective_aggregation")))
    if get("reward_weights") is not None:
        rows.append(("reward_weights", get("reward_weights")))
    if getattr(trainer, "preference_funcs", None):
        for name in ("preference_weights", "preference_num_opponents", "preference_symmetric"):
            if hasattr(args, name):
                rows.append((name, get(name)))
    rows += [
        ("learning_rate", args.learning_rate),
        ("lr_scheduler_type", getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        ("weight_decay", args.weight_decay),
        ("max_grad_norm", args.max_grad_norm),
        ("Mixed precision", "bf16" if args.bf16 else "fp16" if args.fp16 else "no"),
    ]
    if get("ema_decay") is not None:
        rows.append(("ema_decay", get("ema_decay")))
    if getattr(trainer, "is_lora", False):
        transformer = trainer.accelerator.unwrap_model(trainer.model)
        config = getattr(transformer, "peft_config", {}).get("default")
        if config is not None:
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
            rows += [
                ("LoRA rank", config.r),
                ("LoRA alpha", config.lora_alpha),
                ("LoRA target modules", ", ".join(targets) if isinstance(targets, (list, tuple)) else targets),
            ]
    else:
        rows.append(("Fine-tuning", "full transformer"))
    rows.append(("seed", args.seed))
    return [(name, value) for name, value in rows if value is not None]


def _images_sampled(trainer: Any) -> int | None:
    logged = [entry["num_images"] for entry in trainer.state.log_history if "num_images" in entry]
    counted = getattr(trainer, "_num_images", 0) or 0
    best = max([*logged, counted], default=0)
    return int(best) if best else None


def _wandb_url() -> str | None:
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    return getattr(run, "url", None) if run is not None else None


def write_model_card(
    trainer: Any,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
    license: str | None = None,
    finetuned_from: str | None = None,
) -> ModelCard:
    """Write `README.md` (and `samples.png`, the newest sample grid) into `trainer.args.output_dir`.

    Args:
        trainer: A [`FlowGRPOTrainer`].
        model_name: Title of the card; defaults to the Hub repo name or the output folder name.
        dataset_name: Hub id of the prompt dataset.
        tags: Extra metadata tags, after the trainer's.
        license: License id for the metadata.
        finetuned_from: Hub id of the base model, if the pipeline does not know it (e.g. loaded from a local copy).

    Returns:
        The card that was written.
    """
    args = trainer.args
    output_dir = args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    hub_model_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    if model_name is None:
        model_name = hub_model_id.split("/")[-1] if hub_model_id else Path(output_dir).absolute().name
    base_model = finetuned_from or hub_id_from_name_or_path(_base_model_name_or_path(trainer))
    is_lora = bool(getattr(trainer, "is_lora", False))

    user_tags = [tags] if isinstance(tags, str) else list(tags or [])
    trainer_tags = [tag for tag in trainer._tag_names if is_lora or tag != "lora"]
    if "JOB_ID" in os.environ:
        trainer_tags.append("hf_jobs")

    paper = trainer._paper
    papers = [Paper(trainer._name, paper["title"], paper["id"], paper["citation"])]
    # MixGRPO: the sliding window, its frozen variant (MixGRPO-Flash*) and higher-order ODE solvers (MixGRPO-Flash).
    if getattr(args, "sde_window", "full") in ("sliding", "frozen") or getattr(args, "ode_solver", "euler") != "euler":
        papers.append(MIXGRPO)
    preference_names = _preference_names(trainer)
    if preference_names:
        papers.append(PREF_GRPO)

    sample_image = sample_caption = None
    grid = newest_sample_grid(output_dir)
    if grid is not None:
        shutil.copyfile(grid, os.path.join(output_dir, SAMPLES_NAME))
        sample_image = SAMPLES_NAME
        match = _SAMPLE_FILE.search(grid.name)
        if match:
            what = "Evaluation samples (ODE sampler)" if match.group("split") == "eval" else "Training rollouts (SDE)"
            sample_caption = f"{what} at step {int(match.group('step'))}, with their prompts and rewards."

    train_dataset = getattr(trainer.train_dataset, "dataset", trainer.train_dataset)
    prompts = train_dataset["prompt"] if train_dataset is not None and len(train_dataset) else []
    eval_dataset = trainer.eval_dataset
    reward_names = list(getattr(trainer, "reward_func_names", []))
    pipeline = trainer.pipeline
    transformer = trainer.accelerator.unwrap_model(trainer.model)
    card = generate_model_card(
        model_name=model_name,
        base_model=base_model,
        hub_model_id=hub_model_id,
        is_lora=is_lora,
        tags=[*trainer_tags, *user_tags],
        papers=papers,
        trainer_name=trainer._name,
        pipeline_class=type(pipeline).__name__,
        transformer_class=type(transformer).__name__,
        license=license,
        dataset_name=dataset_name,
        num_prompts=len(train_dataset) if train_dataset is not None else None,
        num_eval_prompts=len(eval_dataset) if eval_dataset is not None else None,
        reward_names=reward_names,
        preference_names=preference_names,
        metric_rows=metric_changes(trainer.state.log_history, reward_names),
        hyperparameters=_hyperparameters(trainer, _images_sampled(trainer)),
        sample_image=sample_image,
        sample_caption=sample_caption,
        example_prompt=str(prompts[0]) if len(prompts) else "a photo of a cat",
        inference={
            "num_inference_steps": args.eval_num_inference_steps,
            **trainer.adapter.pipeline_call_kwargs(trainer.guidance_scale),
            "height": args.height,
            "width": args.width,
        },
        wandb_url=_wandb_url(),
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card


# --------------------------------------------------------------------------------------------- intermediate push
def _hf_api() -> Any:
    """transformers' shared `HfApi` (tagged with its library info), or a plain one on versions without it."""
    try:
        from transformers.utils.hub import hf_api
    except ImportError:
        from huggingface_hub import HfApi

        return HfApi()
    return hf_api()


def redacted_args(args: Any) -> Any:
    """A shallow copy of `args` with every `*_token` field set to `None` and secrets in `model_init_kwargs` redacted
    (safe to pickle into a public repo)."""
    safe = copy.copy(args)
    for field in dataclasses.fields(args):
        if field.name.endswith("_token") and getattr(safe, field.name, None) is not None:
            setattr(safe, field.name, None)
    if isinstance(getattr(safe, "model_init_kwargs", None), dict):  # e.g. {"token": ...} for a gated model
        safe.model_init_kwargs = redact(safe.model_init_kwargs)
    return safe


def push_model_to_hub(
    trainer: Any,
    commit_message: str | None,
    blocking: bool,
    token: str | None,
    revision: str | None,
    private: bool | None,
    **card_kwargs: Any,
) -> Any:
    """The trainer's `push_to_hub`: `transformers.Trainer.push_to_hub` (save on every process, card and upload from the
    main process, after any intermediate upload finishes) with the EMA weights applied while saving and
    `UPLOAD_IGNORE_PATTERNS`."""
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    token = token if token is not None else args.hub_token
    if trainer.hub_model_id is None:
        trainer.init_hf_repo(token=token, private=private)
    with trainer._averaged_weights():
        trainer.save_model(_internal_call=True)
    if not trainer.is_world_process_zero():
        return None
    trainer.create_model_card(**card_kwargs)
    trainer._finish_current_push()
    return _hf_api().upload_folder(
        repo_id=trainer.hub_model_id,
        folder_path=args.output_dir,
        commit_message=commit_message,
        token=token,
        run_as_future=not blocking,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        revision=revision if revision is not None else args.hub_revision,
    )


def push_checkpoint_to_hub(trainer: Any, checkpoint_folder: str) -> None:
    """Push the model files of `checkpoint_folder` (and the checkpoint itself, per `hub_strategy`) to the Hub.

    Follows `transformers.Trainer._push_from_checkpoint` (main process only; nothing with `hub_strategy="end"`; skips
    a push while the previous one runs unless `hub_always_push`; asynchronous uploads tracked in
    `trainer.push_in_progress`; `"checkpoint"` also uploads the checkpoint to `last-checkpoint/`, `"all_checkpoints"`
    to `checkpoint-<step>/`), with three differences: it copies `pytorch_lora_weights.safetensors` or the
    `transformer/` folder into `output_dir` (transformers copies a fixed list of `transformers` file names; with
    `ema_decay` the EMA weights are saved there instead, the checkpoint keeping the raw ones), it refreshes
    `README.md` with the trainer's model card, and the `training_args.bin` it writes has no Hub token.
    """
    from transformers.trainer_utils import HubStrategy, SaveStrategy
    from transformers.utils.hub import PushInProgress

    args = trainer.args
    if not trainer.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
        return
    in_progress = getattr(trainer, "push_in_progress", None)
    if not args.hub_always_push and in_progress is not None and not in_progress.is_done():
        return  # an upload still reads output_dir: do not overwrite its files

    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    output_dir = args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    if getattr(trainer, "ema", None) is not None:
        # The checkpoint holds the raw weights (to resume); people download the average, as from the final push.
        with trainer._averaged_weights():
            trainer._save(output_dir)
    else:
        # The weights were just saved in the checkpoint: copy them rather than saving the model again.
        source = os.path.join(checkpoint_folder, LORA_WEIGHTS_NAME)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(output_dir, LORA_WEIGHTS_NAME))
        source = os.path.join(checkpoint_folder, TRANSFORMER_FOLDER)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(output_dir, TRANSFORMER_FOLDER), dirs_exist_ok=True)
    import torch

    torch.save(redacted_args(args), os.path.join(output_dir, TRAINING_ARGS_NAME))
    trainer.create_model_card()

    if args.save_strategy == SaveStrategy.STEPS:
        commit_message = f"Training in progress, step {trainer.state.global_step}"
    else:
        commit_message = f"Training in progress, epoch {int(trainer.state.epoch or 0)}"
    api = _hf_api()
    jobs = [
        api.upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=output_dir,
            commit_message=commit_message,
            token=args.hub_token,
            run_as_future=True,
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
            revision=args.hub_revision,
        )
    ]
    if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        last = args.hub_strategy == HubStrategy.CHECKPOINT
        path_in_repo = "last-checkpoint" if last else Path(checkpoint_folder).name
        jobs.append(
            api.upload_folder(
                repo_id=trainer.hub_model_id,
                folder_path=checkpoint_folder,
                path_in_repo=path_in_repo,
                commit_message=commit_message + ", checkpoint",
                token=args.hub_token,
                run_as_future=True,
                revision=args.hub_revision,
            )
        )
    if in_progress is None or in_progress.is_done():
        trainer.push_in_progress = PushInProgress(jobs)
    else:
        in_progress.jobs.extend(jobs)
