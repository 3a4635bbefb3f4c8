"""`trl-flow-grpo evaluate`: a base pipeline (+ a trained LoRA) on a prompt dataset, scored with reward functions,
reported per category with 95% confidence intervals.

Every prompt is rendered `images_per_prompt` times (seeds `seed`, `seed + 1`, ...) with the pipeline's own ODE
sampler, every image is scored by every reward function, and each reward's mean gets a cluster-bootstrap interval over
prompts (`eval_stats.cluster_bootstrap`: the images of one prompt are not independent), overall and per category when
the dataset has a category column (resampled within categories). It prints one table per reward, writes `grid.png`
(the first images) and `results.json` (settings, estimates, every image's rewards) into `output_dir`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvaluateArguments", "evaluate", "load_prompts", "reward_estimates"]

MAX_GRID_IMAGES = 16


@dataclass
class EvaluateArguments:
    """Arguments of `trl-flow-grpo evaluate`.

    Args:
        model_name_or_path (`str`, *optional*):
            Base pipeline: a Hub id or a local folder; unset or `builtin:shapes`: the shipped shapes model.
        lora (`str`, *optional*):
            A trained LoRA (an `output_dir` of `train`, a `checkpoint-<step>` folder, or a Hub repo), or the output of
            a full fine-tuning run (with a `transformer/` folder); unset: the base pipeline alone.
        dataset_name (`str`, *optional*, defaults to `"builtin:shapes"`):
            Prompts: a Hub dataset id, a local folder, a file (`.txt` one prompt per line, `.json` / `.jsonl` / `.csv`
            / `.parquet` with a prompt column), or `builtin:shapes` (the shapes world's held-out captions, with their
            category).
        dataset_config (`str`, *optional*):
            The dataset's configuration name (Hub datasets).
        dataset_split (`str`, *optional*, defaults to `"test"`):
            The split to evaluate (files have only `"train"`, which is then used).
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            The dataset column holding the prompts.
        category_column (`str`, *optional*, defaults to `"category"`):
            The column whose values group the prompts into categories (a table per category); ignored when the
            dataset has no such column.
        max_prompts (`int`, *optional*):
            Evaluate only the first `max_prompts` prompts (a quick check); unset: all of them.
        reward_funcs (`list[str]`, *optional*, defaults to `["shapes_geneval"]`):
            Reward functions (built-in names, Hub ids of reward models, reward server URLs or import paths). The
            other dataset columns are passed to them as keywords.
        images_per_prompt (`int`, *optional*, defaults to `4`):
            Images per prompt; more narrows the intervals.
        num_inference_steps (`int`, *optional*, defaults to `40`):
            ODE steps.
        guidance_scale (`float`, *optional*):
            Guidance scale; unset: the pipeline family's default.
        height (`int`, *optional*):
            Image height; defaults to the pipeline's.
        width (`int`, *optional*):
            Image width; defaults to the pipeline's.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the first image of each prompt (image `k` has seed `seed + k`, so two models compare on the same
            noise).
        dtype (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (bfloat16 on CUDA, float32 otherwise), `"float32"`, `"bfloat16"` or `"float16"`.
        output_dir (`str`, *optional*, defaults to `"evaluation"`):
            Folder for `grid.png` and `results.json`.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base pipeline; unset: shapes model."})
    lora: str | None = field(default=None, metadata={"help": "LoRA folder or Hub repo (or full fine-tuning output)."})
    dataset_name: str = field(
        default="builtin:shapes", metadata={"help": "Prompts: Hub id, folder, file, or builtin:shapes (held-out)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="test", metadata={"help": "Split to evaluate (files: train)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    category_column: str = field(default="category", metadata={"help": "Column of categories (if present)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Only the first N prompts; unset: all."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["shapes_geneval"], metadata={"help": "Rewards (names, Hub ids, URLs, import paths)."}
    )
    images_per_prompt: int = field(default=4, metadata={"help": "Images per prompt."})
    num_inference_steps: int = field(default=40, metadata={"help": "ODE steps."})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance scale; unset: the pipeline family's default."}
    )
    height: int | None = field(default=None, metadata={"help": "Image height (default: the pipeline's)."})
    width: int | None = field(default=None, metadata={"help": "Image width (default: the pipeline's)."})
    seed: int = field(default=0, metadata={"help": "Seed of each prompt's first image."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    output_dir: str = field(default="evaluation", metadata={"help": "Folder for grid.png and results.json."})


def load_prompts(args: EvaluateArguments) -> tuple[list[dict], bool]:
    """The rows to evaluate (each with `prompt` and the dataset's other columns) and whether they have a category
    (`args.category_column`, renamed `category`)."""
    from .cli import BUILTIN_SHAPES, DATA_FILE_BUILDERS

    name = args.dataset_name
    if name == BUILTIN_SHAPES:
        from .toy import all_captions
        from .toy.shapes import caption_category

        rows = [{"prompt": c, "category": caption_category(c)} for c in all_captions("test")]
    else:
        from datasets import load_dataset

        extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if extension in DATA_FILE_BUILDERS:
            dataset = load_dataset(DATA_FILE_BUILDERS[extension], data_files=name)
        else:
            dataset = load_dataset(name, args.dataset_config)
        split = args.dataset_split if args.dataset_split in dataset else None
        if split is None and list(dataset) == ["train"]:
            split = "train"  # a data file has only a train split
        if split is None:
            raise SystemExit(
                f"trl-flow-grpo evaluate: dataset {name!r} has no split {args.dataset_split!r}; it has "
                f"{list(dataset)}. Pass --dataset_split."
            )
        part = dataset[split]
        column = "text" if extension == "txt" else args.prompt_column
        if column not in part.column_names:
            raise SystemExit(
                f"trl-flow-grpo evaluate: dataset {name!r} has no column {column!r}; columns: {part.column_names}. "
                "Pass --prompt_column."
            )
        rows = []
        for row in part:
            row = {("prompt" if k == column else k): v for k, v in row.items()}
            if args.category_column in row and args.category_column != "category":
                row["category"] = row.pop(args.category_column)
            rows.append(row)
    if args.max_prompts is not None:
        if args.max_prompts < 1:
            raise SystemExit(f"trl-flow-grpo evaluate: --max_prompts must be >= 1, got {args.max_prompts}.")
        rows = rows[: args.max_prompts]
    if not rows:
        raise SystemExit(f"trl-flow-grpo evaluate: dataset {name!r} has no prompts.")
    return rows, all("category" in row for row in rows)


def reward_estimates(
    values: Any, categories: list[str] | None, num_resamples: int = 2000, seed: int = 0
) -> dict[str, dict[str, float | int]]:
    """One reward's mean with its 95% interval, overall (`"all"`) and per category.

    Args:
        values: `(num_prompts, images_per_prompt)` rewards (NaN where the reward does not apply; such images are left
            out, and a prompt without any value is dropped).
        categories: One category per prompt, or `None`.
        num_resamples: Bootstrap resamples.
        seed: The bootstrap's seed (the intervals are reproducible).
    """
    import numpy as np

    from .eval_stats import cluster_bootstrap

    values = np.asarray(values, dtype=np.float64)
    per_prompt = [row[~np.isnan(row)].tolist() for row in values]
    keep = [i for i, row in enumerate(per_prompt) if row]
    groups: dict[str, list[int]] = {"all": keep}
    if categories is not None:
        for i in keep:
            groups.setdefault(str(categories[i]), []).append(i)
    out = {}
    for group, indices in groups.items():
        if not indices:
            continue
        strata = [str(categories[i]) for i in indices] if categories is not None and group == "all" else None
        estimate = cluster_bootstrap([per_prompt[i] for i in indices], strata, num_resamples=num_resamples, seed=seed)
        out[group] = {
            "mean": estimate.value,
            "low": estimate.low,
            "high": estimate.high,
            "num_prompts": estimate.num_prompts,
            "num_images": estimate.num_images,
        }
    return out


def _table(name: str, estimates: dict[str, dict[str, float | int]]) -> str:
    width = max(len("category"), *(len(group) for group in estimates))
    lines = [f"{name}", f"  {'category':<{width}}  {'mean':>8}  {'95% interval':>19}  {'prompts':>7}  {'images':>6}"]
    for group, e in estimates.items():
        interval = f"[{e['low']:+.4f}, {e['high']:+.4f}]"
        lines.append(
            f"  {group:<{width}}  {e['mean']:>+8.4f}  {interval:>19}  {e['num_prompts']:>7}  {e['num_images']:>6}"
        )
    return "\n".join(lines)


def evaluate(argv: list[str]) -> dict:
    """`trl-flow-grpo evaluate`: render, score, print the tables; write `grid.png` and `results.json`. Returns the
    results written to `results.json`."""
    from trl import TrlParser

    from .cli import _check_flags, _check_lora, _plural, load_for_sampling

    parser = TrlParser((EvaluateArguments,), prog="trl-flow-grpo evaluate")
    _check_flags(parser, argv)
    (args,) = parser.parse_args_and_config(argv)
    if args.images_per_prompt < 1:
        raise SystemExit(f"trl-flow-grpo evaluate: --images_per_prompt must be >= 1, got {args.images_per_prompt}.")
    if not args.reward_funcs:
        raise SystemExit("trl-flow-grpo evaluate: pass at least one reward with --reward_funcs.")
    if args.lora is not None:
        _check_lora(args.lora, "evaluate")
    rows, has_category = load_prompts(args)

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .rewards.base import call_reward_funcs, resolve_reward_func, reward_func_name
    from .utils import image_grid

    reward_funcs = [resolve_reward_func(name) for name in args.reward_funcs]  # a bad name fails before sampling
    names = [reward_func_name(f) for f in reward_funcs]
    pipe, device, guidance, extra = load_for_sampling(args, "evaluate")
    images = []
    k_images = args.images_per_prompt
    for row in tqdm(rows, desc="evaluate"):
        for k in range(k_images):
            image = pipe(
                prompt=row["prompt"],  # by name: FLUX.2 pipelines take `image` first
                num_inference_steps=args.num_inference_steps,
                height=args.height,
                width=args.width,
                generator=torch.Generator(device).manual_seed(args.seed + k),
                **guidance,
                **extra,
            ).images[0]
            images.append(image)
    expanded = [row for row in rows for _ in range(k_images)]  # prompt-major, like the images
    columns = {key: [row[key] for row in expanded] for key in expanded[0] if key != "prompt"}
    rewards = call_reward_funcs(reward_funcs, [row["prompt"] for row in expanded], images, columns)
    rewards = rewards.numpy().reshape(len(rows), k_images, len(names))
    categories = [row["category"] for row in rows] if has_category else None
    estimates = {name: reward_estimates(rewards[:, :, j], categories, seed=args.seed) for j, name in enumerate(names)}
    for name in names:
        print(_table(name, estimates[name]), flush=True)

    os.makedirs(args.output_dir, exist_ok=True)
    shown = min(MAX_GRID_IMAGES, len(images))
    captions = [
        f"{expanded[i]['prompt'][:40]} | {np.nansum(rewards.reshape(-1, len(names))[i]):.3f}" for i in range(shown)
    ]
    image_grid(images[:shown], captions, ncols=k_images if 1 < k_images <= 8 else None).save(
        os.path.join(args.output_dir, "grid.png")
    )
    results = {
        "settings": {
            key: getattr(args, key)
            for key in (
                "model_name_or_path",
                "lora",
                "dataset_name",
                "dataset_config",
                "dataset_split",
                "max_prompts",
                "reward_funcs",
                "images_per_prompt",
                "num_inference_steps",
                "guidance_scale",
                "height",
                "width",
                "seed",
                "dtype",
            )
        },  # fmt: skip
        "interval": "95% percentile cluster bootstrap over prompts (within categories), 2000 resamples",
        "rewards": estimates,
        "images": [
            {
                "prompt": row["prompt"],
                **({"category": row["category"]} if has_category else {}),
                "seed": args.seed + i % k_images,
                "rewards": {
                    n: (None if math.isnan(v) else float(v))
                    for n, v in zip(names, rewards[i // k_images, i % k_images])
                },
            }
            for i, row in enumerate(expanded)
        ],
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(
        f"Evaluated {_plural(len(rows), 'prompt')} x {_plural(k_images, 'image')}; wrote grid.png and results.json "
        f"to {args.output_dir}/",
        flush=True,
    )
    return results
