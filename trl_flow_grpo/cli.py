"""The `trl-flow-grpo` command.

    trl-flow-grpo train [--config recipe.yaml] [--accelerate_config NAME_OR_PATH [--num_processes N ...]]
                        [--<field> VALUE ...]
    trl-flow-grpo sample [--model_name_or_path ID] [--lora DIR_OR_REPO] --prompts "a cat" "a dog"
                         [--reward_funcs NAME ...] [--output_dir samples]

Arguments are the fields of `TrainScriptArguments` and `FlowGRPOConfig` (`train`) or `SampleArguments` (`sample`),
in TRL's conventions (`TrlParser`: YAML defaults with `--config`, command-line overrides, an `env:` block). Without
`--model_name_or_path`, `train` trains the built-in offline demo: the shipped pretrained shapes model
(`trl_flow_grpo.toy`), its prompts and the rule-based GenEval-like `shapes_geneval` reward, reporting held-out
accuracy per category before and after. `--accelerate_config` relaunches `train` under `accelerate launch` with a
shipped config (TRL's names: `single_gpu`, `multi_gpu`, `zero1`, `zero2`, `zero3`, `fsdp1`, `fsdp2`) or your own
file; `accelerate launch`'s own flags (`--num_processes`, `--main_process_port`, `--mixed_precision`, ...) go to it,
as with `trl <command> --accelerate_config`. `model_name_or_path: builtin:shapes` and `dataset_name: builtin:shapes`
name the shipped shapes model and its prompts in a recipe (examples/shapes_grpo.yaml).
"""

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .file_names import TRANSFORMER_FOLDER

# The demo: the shipped pretrained shapes model (trl_flow_grpo.toy), its training-split prompts and the rule-based
# GenEval-like reward, with the shapes recipe (trl_flow_grpo.toy.recipe.SHAPES_RECIPE), sized to finish in about
# 2.5 minutes on 2 CPU cores, evaluations included.
DEMO_NUM_PROMPTS = 1024
DEMO_OVERRIDES = {
    "output_dir": "flow-grpo-shapes",
    "reward_funcs": ["shapes_geneval"],
    "use_peft": False,  # 2.3M parameters: full fine-tuning (the recipe's learning rate is for it)
    "max_steps": 50,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "per_device_eval_batch_size": 128,
    "log_completions": True,
}


def demo_defaults() -> dict:
    """The demo's settings: the shapes recipe plus the demo's own (output folder, reward, length, logging)."""
    from .toy.recipe import SHAPES_RECIPE

    return {**SHAPES_RECIPE, **DEMO_OVERRIDES}


BUILTIN_SHAPES = "builtin:shapes"
"""`model_name_or_path` / `dataset_name` value naming the shipped shapes model / its training and held-out prompts."""

# Messages of other libraries that every command would print although nothing is wrong; each filter drops exactly
# its message and nothing else the logger says.
_TORCHVISION_FALLBACK = re.compile(
    r"^`(CLIPImageProcessor|SiglipImageProcessor)` requires torchvision \(not installed\); falling back to "
)
"""transformers, when diffusers' pipeline modules import the CLIP / SigLIP image processors (unused here)."""
_NO_TEXT_ENCODER_LORA = re.compile(r"^No LoRA keys associated to \w+ found with the prefix='text_encoder")
"""diffusers' `load_lora_weights`, once per text encoder, for a LoRA of the transformer only (as the trainer saves)."""


class _DropMessage(logging.Filter):
    """A logging filter that drops the records whose message matches `pattern`."""

    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _silence_torchvision_fallback() -> None:
    """Drop transformers' two "requires torchvision (not installed)" warnings (installed once per process)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropMessage) and f.pattern is _TORCHVISION_FALLBACK for f in logger.filters):
        logger.addFilter(_DropMessage(_TORCHVISION_FALLBACK))


@contextlib.contextmanager
def _without_text_encoder_lora_warnings() -> Iterator[None]:
    """During `pipe.load_lora_weights(...)` of a transformer-only LoRA: no "No LoRA keys associated to
    CLIPTextModelWithProjection" warning per text encoder (a LoRA with no transformer keys still warns)."""
    logger, drop = logging.getLogger("diffusers.loaders.lora_base"), _DropMessage(_NO_TEXT_ENCODER_LORA)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _sd3_lora_targets() -> tuple[str, ...]:
    from .pipelines.sd3 import LORA_TARGET_MODULES  # imported lazily: `trl-flow-grpo --help` stays light

    return LORA_TARGET_MODULES


def _plural(count: int, noun: str) -> str:
    """`1 prompt`, `2 prompts`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclass
class TrainScriptArguments:
    """Arguments of `trl-flow-grpo train` that are not training hyperparameters.

    Parameters:
        model_name_or_path (`str`, *optional*):
            Hub id or local path of a diffusers pipeline, or `builtin:shapes` (the shipped shapes model). Unset: the
            built-in offline demo.
        model_revision (`str`, *optional*):
            Branch, tag or commit of `model_name_or_path` on the Hub (`from_pretrained(revision=...)`); unset: the
            default branch.
        dataset_name (`str`, *optional*):
            Hub dataset id, local dataset folder, a data file (`.json`, `.jsonl`, `.csv`, `.txt`, `.parquet`), or
            `builtin:shapes` (the shapes world's training prompts, evaluated on its held-out captions). Unset: the
            built-in demo prompts. A Hub id is recorded in the model card's metadata.
        dataset_config (`str`, *optional*):
            Dataset configuration name.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to train on.
        dataset_test_split (`str`, *optional*):
            Split to evaluate on before and after training.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompts (renamed to `prompt`).
        reward_funcs (`list[str]`, *optional*, defaults to `["jpeg_compressibility"]`):
            Built-in reward names (see `trl_flow_grpo.rewards.REWARD_FUNCS`) or import paths of your own reward
            functions (`my_pkg.rewards.my_reward`). May be empty when `preference_funcs` is set.
        eval_reward_funcs (`list[str]`, *optional*, defaults to `[]`):
            Rewards of the evaluations (names or import paths, as `reward_funcs`), if they are not the training
            rewards; empty: the training rewards.
        preference_funcs (`list[str]`, *optional*, defaults to `[]`):
            Pref-GRPO preference functions: built-in judges (`trl_flow_grpo.rewards.preferences.PREFERENCE_FUNCS`),
            built-in reward names (compared through their scores, see `preference_temperature` and
            `preference_tie_margin`), or import paths.
        use_peft (`bool`, *optional*, defaults to `True`):
            Train a LoRA (diffusers format) instead of the whole transformer.
        lora_r (`int`, *optional*, defaults to `32`):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to `64`):
            LoRA alpha.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the LoRA's input (TRL's `ModelConfig` defaults to 0.05; Flow-GRPO trains without).
        lora_target_modules (`list[str]`, *optional*):
            Modules that get a LoRA; defaults to the attention projections (Flow-GRPO's choice).
        use_rslora (`bool`, *optional*, defaults to `False`):
            Rank-stabilized LoRA: scale the update by `lora_alpha / sqrt(lora_r)` instead of `lora_alpha / lora_r`.
        use_dora (`bool`, *optional*, defaults to `False`):
            DoRA (weight-decomposed LoRA): a learned magnitude per output feature on top of the LoRA direction.
        heldout_images_per_prompt (`int`, *optional*, defaults to `4`):
            Demo only: images per held-out caption in the before/after evaluation (more: a narrower interval).
        num_threads (`int`, *optional*):
            torch's CPU threads for a run without a GPU. Unset: `OMP_NUM_THREADS` if it is set, else the cores not
            busy (core count minus the 1-minute load average, at least 1), since torch's one thread per core is
            fastest only on an idle machine (see `trl_flow_grpo.cpu_threads`).
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pipeline id or path, or builtin:shapes; unset: the offline demo."}
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of model_name_or_path on the Hub."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset id, folder, data file, or builtin:shapes; unset: the demo prompts."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["jpeg_compressibility"],
        metadata={"help": "Built-in reward names or import paths (my_pkg.rewards.my_reward)."},
    )
    eval_reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "Rewards of the evaluations; empty: the training rewards."}
    )
    preference_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Pref-GRPO preference functions: built-in judges, reward names or import paths."},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA instead of the whole transformer."})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA's input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that get a LoRA; unset: the attention projections (to_q, to_k, ...)."},
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilized LoRA: scale by lora_alpha / sqrt(lora_r)."}
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})
    heldout_images_per_prompt: int = field(
        default=4, metadata={"help": "Demo only: images per held-out caption in the before/after evaluation."}
    )
    num_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads without a GPU; unset: OMP_NUM_THREADS, else the cores that are not busy."},
    )


_TRAIN_USAGE = (
    "trl-flow-grpo train [--config recipe.yaml] [--accelerate_config NAME_OR_PATH [accelerate launch flags]] "
    "[--<option> VALUE ...]"
)
_TRAIN_DESCRIPTION = (
    "Train a diffusers flow-matching pipeline with Flow-GRPO. Options in a recipe (--config) are overridden by the "
    "command line. Without --model_name_or_path this trains the built-in offline demo (the shipped shapes model, its "
    "prompts, the shapes_geneval reward), which changes some defaults: those options say '[demo: VALUE]' (the demo "
    "settings are trl_flow_grpo.toy.recipe.SHAPES_RECIPE plus trl_flow_grpo.cli.DEMO_OVERRIDES)."
)
_NO_FLAG_HELP = {"use_peft": "Train the whole transformer (full fine-tuning) instead of a LoRA."}
"""Help of the `--no_<field>` flags HfArgumentParser adds for a boolean field that defaults to True (it would repeat
the field's own help, which says the opposite)."""


def _group_options(parser, demo: dict) -> None:
    """Group the options of `train --help`: the script's, FlowGRPOConfig's own, then the ones inherited from
    transformers' TrainingArguments; mark the values the demo uses instead of the defaults."""
    from dataclasses import fields

    from transformers import TrainingArguments

    from .flow_grpo_config import FlowGRPOConfig

    script = {f.name for f in fields(TrainScriptArguments)}
    inherited = {f.name for f in fields(TrainingArguments)} - set(vars(FlowGRPOConfig).get("__annotations__", {}))
    groups = [
        (parser.add_argument_group("trl-flow-grpo train: model, data, rewards, LoRA"), lambda d: d in script),
        (parser.add_argument_group("Flow-GRPO (FlowGRPOConfig)"), lambda d: d not in script and d not in inherited),
        (parser.add_argument_group("Training arguments inherited from transformers (TrainingArguments)"), None),
    ]
    for action in list(parser._optionals._group_actions):
        if action.dest in ("help", "config"):
            continue
        dest = action.dest
        negated = [o for o in action.option_strings if o.startswith("--no_")]
        if negated:
            action.help = _NO_FLAG_HELP.get(dest, f"Set {dest} to False.")
        elif dest in demo and demo[dest] != action.default:
            value = demo[dest]
            value = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            action.help = f"{action.help or ''} [demo: {value.replace('%', '%%')}]".strip()
        group = next(g for g, belongs in groups if belongs is None or belongs(dest))
        parser._optionals._group_actions.remove(action)
        group._group_actions.append(action)


def _help_cache_path() -> str:
    """Where `train --help` keeps its text: keyed by every source file of the package, the versions of the libraries
    whose fields it lists and the terminal width, so any change to them writes a fresh one."""
    import hashlib
    import shutil
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    for name in ("transformers", "trl", "peft", "accelerate"):
        try:
            digest.update(f"{name}=={version(name)}".encode())
        except PackageNotFoundError:
            digest.update(name.encode())
    digest.update(str(shutil.get_terminal_size().columns).encode())
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "trl-flow-grpo", f"train-help-{digest.hexdigest()[:16]}.txt")


def _print_train_help() -> None:
    """`train --help`. Building the parser imports transformers' TrainingArguments (torch, peft: seconds), so the text
    is kept in the user's cache and printed from there until the package or those libraries change."""
    path = _help_cache_path()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            print(f.read(), end="")
        return
    text = _parser(demo=False, for_help=True).format_help()
    print(text, end="")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.{os.getpid()}.tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    except OSError:  # a read-only home: the help is rebuilt each time
        pass


def _parser(demo: bool, for_help: bool = False):
    """The parser of `train`: `TrainScriptArguments` and `FlowGRPOConfig`; with `demo`, the demo's defaults."""
    from trl import TrlParser

    from .flow_grpo_config import FlowGRPOConfig

    parser = TrlParser(
        (TrainScriptArguments, FlowGRPOConfig),
        prog="trl-flow-grpo train",
        usage=_TRAIN_USAGE,
        description=_TRAIN_DESCRIPTION,
    )
    if demo:
        parser.set_defaults(**demo_defaults())
    if for_help:
        _group_options(parser, demo_defaults())
    return parser


def _option_names(parser) -> list[str]:
    """The `--flags` of a TrlParser, `--config` (which it reads itself) included."""
    return ["config"] + [option[2:] for option in parser._option_string_actions if option.startswith("--")]


def _check_flags(parser, argv: list[str], extra: list[str] = ()) -> None:
    """A misspelt `--flag` is an error that suggests the nearest right one (argparse only lists it)."""
    from .validation import suggest_flags

    known = _option_names(parser) + list(extra)
    unknown = [arg for arg in argv if arg.startswith("--") and arg.split("=", 1)[0][2:] not in known]
    hints = suggest_flags(unknown, known)
    if hints:
        raise SystemExit(f"{parser.prog}: unrecognized arguments: {' '.join(unknown)}\n{hints}")


def _check_config_keys(parser, argv: list[str]) -> None:
    """A key of the `--config` YAML that no option has is an error naming the file and the key, with the nearest
    option; a key of `accelerate launch` (`accelerate_config`, `num_processes`, ...) says to give it on the command
    line, where `train` takes it (TRL's parser would fail later, with a traceback)."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if path is None or not os.path.isfile(path):
        return  # no recipe, or TRL's parser reports the missing file
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise SystemExit(f"{parser.prog}: {path} is not a YAML mapping of option: value (got {type(raw).__name__}).")
    known = _option_names(parser)
    unknown = [key for key in raw if key != "env" and key not in known]  # `env:` sets environment variables (TRL)
    if not unknown:
        return
    from accelerate.commands.launch import launch_command_parser

    from .validation import suggest_flags

    launch_keys = {flag.lstrip("-") for flag in launch_command_parser()._option_string_actions}
    launch = [key for key in unknown if key == "accelerate_config" or key in launch_keys]
    lines = [f"{parser.prog}: {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}."]
    hints = suggest_flags([f"--{key}" for key in unknown if key not in launch], known)
    lines += [hints] if hints else []
    if launch:
        example = " ".join(f"--{key} {raw[key]}" for key in launch)
        what = (
            "options of the launch, not of the recipe; give them"
            if len(launch) > 1
            else "an option of the launch, not of the recipe; give it"
        )
        lines.append(
            f"{', '.join(launch)}: {what} on the command line: `trl-flow-grpo train --config {path} {example}`."
        )
    raise SystemExit("\n".join(lines))


def _check_lora(lora: str, command: str = "sample") -> None:
    """`sample --lora` (or `command`'s): a local path must exist and hold a LoRA file or a `transformer/` folder."""
    if os.path.isdir(lora):
        if not os.path.isdir(os.path.join(lora, "transformer")) and not any(
            name.endswith(".safetensors") for name in os.listdir(lora)
        ):
            raise SystemExit(
                f"trl-flow-grpo {command}: --lora {lora} has no pytorch_lora_weights.safetensors and no transformer/ "
                "folder; pass the output_dir (or a checkpoint-<step> folder) of a FlowGRPOTrainer run."
            )
        return
    looks_local = os.path.isabs(lora) or lora.startswith((".", "~")) or lora.count("/") != 1 or os.path.exists(lora)
    if looks_local:
        raise SystemExit(
            f"trl-flow-grpo {command}: --lora {lora}: no such folder (a Hub repo id has the form 'user/repo'). Pass "
            "the output_dir of a FlowGRPOTrainer run, a checkpoint-<step> folder in it, or the Hub repo it was pushed "
            "to."
        )


DATA_FILE_BUILDERS = {"json": "json", "jsonl": "json", "csv": "csv", "txt": "text", "parquet": "parquet"}
"""Extension of a `dataset_name` that is a data file -> the `datasets` builder that reads it."""


def _shapes_prompts():
    """The shapes world's prompts: `train` (the demo's training prompts), `test` (the held-out captions)."""
    from datasets import Dataset, DatasetDict

    from .toy import all_captions, make_prompt_dataset

    return DatasetDict(
        train=make_prompt_dataset(DEMO_NUM_PROMPTS, seed=0, split="train"),
        test=Dataset.from_dict({"prompt": all_captions("test")}),
    )


def hub_dataset_id(dataset_name: str | None) -> str | None:
    """The Hub id a `dataset_name` names (recorded in the model card), or `None` for a file, folder or built-in."""
    if not dataset_name or dataset_name == BUILTIN_SHAPES or os.path.exists(dataset_name):
        return None
    if "." in dataset_name and dataset_name.rsplit(".", 1)[-1].lower() in DATA_FILE_BUILDERS:
        return None
    return dataset_name


def _load_datasets(script_args: TrainScriptArguments):
    from datasets import load_dataset

    if script_args.dataset_name is None:
        if script_args.model_name_or_path is not None:
            raise ValueError(
                "--dataset_name is required with --model_name_or_path: a Hub dataset id, a dataset folder or a file "
                "of prompts (.txt with one prompt per line, .json/.jsonl/.csv/.parquet with a 'prompt' column)."
            )
        shapes = _shapes_prompts()
        return shapes["train"], shapes["test"]
    name = script_args.dataset_name
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if name == BUILTIN_SHAPES:
        dataset = _shapes_prompts()
    elif extension in DATA_FILE_BUILDERS:
        dataset = load_dataset(DATA_FILE_BUILDERS[extension], data_files=name)
    else:
        dataset = load_dataset(name, script_args.dataset_config)

    def prepare(split):
        if split not in dataset:
            raise ValueError(f"Dataset {name!r} has no split {split!r}; it has {list(dataset)}.")
        part = dataset[split]
        column = "text" if extension == "txt" else script_args.prompt_column
        if column != "prompt":
            if column not in part.column_names:
                raise ValueError(f"Dataset {name!r} has no column {column!r}; columns: {part.column_names}.")
            part = part.rename_column(column, "prompt")
        return part

    test = prepare(script_args.dataset_test_split) if script_args.dataset_test_split else None
    return prepare(script_args.dataset_train_split), test


def _each_reward(logs: dict, prefix: str = "") -> str:
    """` (a +0.1000, b -0.2000)`: each reward's mean when there are several (the total is their weighted sum)."""
    head = f"{prefix}rewards/"
    values = [
        (key[len(head) : -len("/mean")], logs[key]) for key in logs if key.startswith(head) and key.endswith("/mean")
    ]
    if len(values) < 2:
        return ""
    return " (" + ", ".join(f"{name} {value:+.4f}" for name, value in values) + ")"


def _log_line(state, logs: dict) -> str | None:
    """One short line for a log entry: the reward (and each reward when there are several), KL and loss, or the
    held-out reward."""
    step = f"step {state.global_step:>4}/{state.max_steps}" if state.max_steps else "before training"
    if "reward" in logs:
        return (
            f"{step} | reward {logs['reward']:+.4f}{_each_reward(logs)} | kl {logs.get('kl', 0.0):.2e} | "
            f"loss {logs.get('loss', float('nan')):+.2e}"
        )
    if "eval_reward" in logs:
        return f"{step} | held-out reward {logs['eval_reward']:+.4f}{_each_reward(logs, 'eval_')}"
    return None


def _concise_logging(show_bar: bool):
    """Replaces transformers' progress/printer callback: the bar (if shown) plus one short line per log."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class ConciseProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            line = _log_line(state, logs or {}) if state.is_world_process_zero else None
            if line and self.training_bar is not None:
                self.training_bar.write(line)
            elif line:
                print(line, flush=True)

    class ConcisePrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            line = _log_line(state, logs or {}) if state.is_world_process_zero else None
            if line:
                print(line, flush=True)

    return ConciseProgress() if show_bar else ConcisePrinter()


def _demo_evaluation(trainer, images_per_prompt: int):
    """Held-out GenEval-like evaluation of the shapes demo (the trainer's own policy, ODE sampling, fixed seeds).

    The seeds are `evaluate_heldout`'s own, not `--seed`'s: demo runs with different training seeds are measured on
    the same images' noise (and on the same as `benchmarks/shapes_learning.py`), so their numbers compare."""
    from .toy.evaluation import evaluate_heldout

    def evaluate():
        args = trainer.args
        print(f"Held-out evaluation: {_plural(images_per_prompt, 'image')} per held-out caption...", flush=True)
        result = evaluate_heldout(
            trainer.pipeline,
            images_per_prompt=images_per_prompt,
            num_inference_steps=args.eval_num_inference_steps,
            guidance_scale=trainer.guidance_scale,
            batch_size=args.per_device_eval_batch_size,
            keep_images=False,
            progress=not args.disable_tqdm,
        )
        return result

    return evaluate


def lora_config(script_args: TrainScriptArguments):
    """The `peft.LoraConfig` of `train`'s LoRA options, or `None` without `use_peft`."""
    if not script_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=script_args.lora_r,
        lora_alpha=script_args.lora_alpha,
        lora_dropout=script_args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(script_args.lora_target_modules or _sd3_lora_targets()),
        use_rslora=script_args.use_rslora,
        use_dora=script_args.use_dora,
    )


def _with_revision(training_args, revision: str | None) -> None:
    """Pass `--model_revision` to `DiffusionPipeline.from_pretrained` (through `model_init_kwargs`)."""
    if revision is None:
        return
    kwargs = dict(training_args.model_init_kwargs or {})
    if kwargs.get("revision", revision) != revision:
        raise ValueError(
            f"--model_revision {revision!r} and model_init_kwargs revision {kwargs['revision']!r} disagree; set one."
        )
    training_args.model_init_kwargs = {**kwargs, "revision": revision}


def _hub_unavailable(error: BaseException) -> bool:
    """Whether `error` (from `from_pretrained` or `load_dataset`) says the Hub could not be reached (offline mode or no
    network) for something that is not in the local cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    markers = ("not fully cached locally", "OfflineModeIsEnabled", "outgoing traffic has been disabled")
    markers += ("Couldn't reach", "Failed to resolve", "Connection refused", "Max retries exceeded")
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LocalEntryNotFoundError | OfflineModeIsEnabled | ConnectionError):
            return True
        if any(marker in str(current) for marker in markers):
            return True
        current = current.__cause__ or current.__context__
    return False


def _hub_unavailable_message(command: str, kind: str, name: str) -> str:
    """One line: what is missing and what to do."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
    repo_type = " --repo-type dataset" if kind == "dataset" else ""
    local = "a local folder or data file" if kind == "dataset" else "a local pipeline folder"
    return (
        f"trl-flow-grpo {command}: the {kind} {name!r} is not in the local Hugging Face cache and {why}. Download it "
        f"on a machine with network (`hf download {name}{repo_type}`; set HF_HOME to share the cache), "
        f"{'unset HF_HUB_OFFLINE, ' if offline else ''}or pass {local} (--{kind}_name"
        f"{'_or_path' if kind == 'model' else ''} PATH); the offline recipe is examples/shapes_grpo.yaml."
    )


@contextlib.contextmanager
def _hub_errors_as_one_line(command: str, kind: str, name: str | None) -> Iterator[None]:
    """A Hub download that fails offline becomes a one-line error that says what to do, not a traceback."""
    try:
        yield
    except (OSError, ValueError) as error:
        if name is None or os.path.exists(name) or not _hub_unavailable(error):
            raise
        raise SystemExit(_hub_unavailable_message(command, kind, name)) from None


def _set_cpu_threads(requested: int | None) -> None:
    """On a machine without a GPU, use the cores that are free (or the user's choice) and say so in one line."""
    import torch

    from .cpu_threads import choose_cpu_threads, load_average

    if torch.cuda.is_available():
        return
    threads, reason = choose_cpu_threads(requested, os.cpu_count() or 1, load_average(), torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)
    count = torch.get_num_threads()
    print(f"CPU threads: {count} ({reason}; --num_threads N to choose).", flush=True)


def train(argv: list[str]) -> None:
    """`trl-flow-grpo train`: parse, load, train, evaluate before and after, save."""
    if "-h" in argv or "--help" in argv:
        _print_train_help()
        return
    parser = _parser(demo=False)
    _check_flags(parser, argv)
    _check_config_keys(parser, argv)
    script_args, training_args = parser.parse_args_and_config(argv)
    demo = script_args.model_name_or_path is None
    if demo:
        script_args, training_args = _parser(demo=True).parse_args_and_config(argv)

    from .flow_grpo_trainer import FlowGRPOTrainer

    _set_cpu_threads(script_args.num_threads)
    if demo:
        from .toy.model import load_shapes_pipeline

        model = load_shapes_pipeline()
        print(
            "No --model_name_or_path: training the built-in offline demo, the pretrained shapes model "
            f"(trl_flow_grpo.toy) on {DEMO_NUM_PROMPTS} training prompts, reward "
            f"{', '.join(script_args.reward_funcs)}; held-out = compositions never seen in training.\n"
            f"Recipe (trl_flow_grpo.toy.recipe.SHAPES_RECIPE, not the library defaults): "
            f"{'LoRA' if script_args.use_peft else 'full fine-tuning'}, "
            f"learning_rate {training_args.learning_rate:g}, "
            f"beta {training_args.beta:g}, {training_args.num_inference_steps} steps (the first "
            f"{training_args.num_sde_steps} stochastic: {training_args.sde_type}, noise_level "
            f"{training_args.noise_level:g}), train_cfg {training_args.train_cfg}, {training_args.max_steps} "
            "optimizer steps.",
            flush=True,
        )
    elif script_args.model_name_or_path == BUILTIN_SHAPES:
        from .toy.model import SHAPES_MODEL_PATH

        model = str(SHAPES_MODEL_PATH)
    else:
        model = script_args.model_name_or_path
        _with_revision(training_args, script_args.model_revision)
    with _hub_errors_as_one_line("train", "dataset", script_args.dataset_name):
        train_dataset, eval_dataset = _load_datasets(script_args)
    with _hub_errors_as_one_line("train", "model", model if isinstance(model, str) else None):
        trainer = FlowGRPOTrainer(
            model=model,
            reward_funcs=script_args.reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=lora_config(script_args),
            preference_funcs=script_args.preference_funcs,
            eval_reward_funcs=script_args.eval_reward_funcs or None,
        )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_concise_logging(show_bar=not training_args.disable_tqdm))
    prompts_per_step = training_args.generation_batch_size // training_args.num_generations
    print(
        f"One optimizer step: {_plural(training_args.generation_batch_size, 'image')} "
        f"({_plural(prompts_per_step, 'prompt')} x {training_args.num_generations}), "
        f"{_plural(training_args.num_sde_steps, 'SDE step')} each.",
        flush=True,
    )
    evaluate = _demo_evaluation(trainer, script_args.heldout_images_per_prompt) if demo else trainer.evaluate
    if not demo and not trainer.reward_funcs:
        eval_dataset = None  # evaluate() reports pointwise rewards; a preference-only run has none
    before = evaluate() if eval_dataset is not None else None
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the newest checkpoint-<step> in output_dir
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt as interrupt:
        message = _after_interrupt(trainer, interrupt)
        if trainer.is_world_process_zero():
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    after = evaluate() if eval_dataset is not None else None
    dataset_id = hub_dataset_id(script_args.dataset_name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_id)  # saves the model and writes the card first
    else:
        trainer.save_model()
        trainer.create_model_card(dataset_name=dataset_id)
    if before is not None and after is not None and trainer.is_world_process_zero():
        if demo:
            from .toy.evaluation import format_comparison

            print("\n" + format_comparison(before, after, title="held-out (ODE, fixed seeds)"))
        else:
            print(f"\n{'held-out (ODE sampling, fixed seeds)':<40}{'before':>8}{'after':>8}{'change':>8}")
            for key in before:
                print(f"{key:<40}{before[key]:>8.3f}{after[key]:>8.3f}{after[key] - before[key]:>+8.3f}")
    if trainer.is_world_process_zero():
        print(f"Saved to {training_args.output_dir}/ (samples in {training_args.output_dir}/samples/)")


INTERRUPTED_FOLDER = "interrupted-step-{step}"
"""Folder in `output_dir` where an interrupted run without checkpoints (`save_strategy="no"`) leaves its weights."""


def _after_interrupt(trainer, interrupt: KeyboardInterrupt) -> str:
    """After Ctrl-C or SIGTERM: the checkpoint to resume from; without checkpoints (`save_strategy="no"`, as in the
    demo) the weights of the last completed step, saved now; or exactly why nothing was saved. Every process calls
    it (a save may gather shards); the main process prints what it returns."""
    from .interrupts import newest_complete_checkpoint

    args, step = trainer.args, trainer.state.global_step
    reason = str(interrupt) or "Ctrl-C"
    head = f"\nInterrupted ({reason}) after {_plural(step, 'optimizer step')} of {trainer.state.max_steps}."
    if step == 0:
        return f"{head} Nothing was saved: no optimizer step had completed, the weights are the base model's."
    if args.save_strategy == "no":
        if trainer._stop_on_signal.busy:
            return (
                f"{head} Nothing was saved: save_strategy is 'no' (no checkpoints), and a second signal stopped the "
                f"update after step {step} halfway, so the weights are neither step {step}'s nor the next one's."
            )
        folder = os.path.join(args.output_dir, INTERRUPTED_FOLDER.format(step=step))
        trainer.save_model(folder, _internal_call=True)
        return (
            f"{head} save_strategy is 'no', so there is no checkpoint to resume from; the weights after step {step} "
            f"are saved in {folder} (render them with `trl-flow-grpo sample --lora {folder}`). To be able to resume, "
            "train with --save_strategy steps --save_steps N."
        )
    try:
        checkpoint = newest_complete_checkpoint(args.output_dir)
    except ValueError:
        return (
            f"{head} No complete checkpoint in {args.output_dir}: with DeepSpeed or FSDP a signal does not save at "
            "once (their saves need every process), and no save step had been reached."
        )
    return f"{head} Newest checkpoint: {checkpoint}. To go on, run the same command with --resume_from_checkpoint true"


# ----------------------------------------------------------------------------------------- accelerate launch
def accelerate_config_path(name_or_path: str) -> str:
    """A shipped accelerate config by name (TRL's names, or the aliases `deepspeed_zero2`, `fsdp`), or a file path."""
    from .accelerate_configs import config_path

    try:
        return config_path(name_or_path)
    except ValueError as error:
        raise SystemExit(f"trl-flow-grpo: {error}") from None


def _pop_option(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """Remove `--name VALUE` / `--name=VALUE` from argv; return the rest and the value."""
    rest, value, i = [], None, 0
    while i < len(argv):
        if argv[i] == name:
            if i + 1 >= len(argv):
                raise SystemExit(f"trl-flow-grpo: {name} needs a value (a shipped config name or a file path).")
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(name + "="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return rest, value


def launch_with_accelerate(config: str, command: str, argv: list[str]) -> int:
    """Run `trl-flow-grpo <command> argv` under `accelerate launch --config_file <config>` (plus the accelerate
    launch flags found in argv); return its exit code."""
    from .accelerate_configs import split_launch_args

    config_path = accelerate_config_path(config)
    parser = _parser(demo=False)
    try:
        launch, rest = split_launch_args(argv, _option_names(parser))
    except ValueError as error:
        raise SystemExit(f"trl-flow-grpo: {error}") from None
    _check_flags(parser, rest)  # a misspelt flag or recipe key fails here, not in every launched process
    _check_config_keys(parser, rest)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_path, *launch]
    cmd += ["-m", "trl_flow_grpo.cli", command, *rest]
    print("Launching:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode


# ----------------------------------------------------------------------------------------------------- sample
@dataclass
class SampleArguments:
    """Arguments of `trl-flow-grpo sample`: render prompts with a base pipeline (plus a trained LoRA) into a grid.

    Parameters:
        model_name_or_path (`str`, *optional*):
            Hub id or local path of the base diffusers pipeline. Unset: the built-in shapes model.
        lora (`str`, *optional*):
            Folder or Hub repo with `pytorch_lora_weights.safetensors` (what `FlowGRPOTrainer` saves and pushes), or a
            full fine-tuning output folder with a `transformer/` subfolder.
        prompts (`list[str]`, *optional*):
            Prompts to render.
        prompts_file (`str`, *optional*):
            A text file with one prompt per line (added after `prompts`).
        images_per_prompt (`int`, *optional*, defaults to `1`):
            Images per prompt (seeds `seed`, `seed + 1`, ...).
        output_dir (`str`, *optional*, defaults to `"samples"`):
            Folder to write into: `grid.png` (the prompts as captions), one `<index>.png` per image and, with
            `reward_funcs`, `rewards.jsonl` (one line per image: prompt, seed, file, each reward).
        reward_funcs (`list[str]`, *optional*, defaults to `[]`):
            Rewards to score every image with (built-in names or import paths, as in `train`); printed per image.
        num_inference_steps (`int`, *optional*, defaults to `40`):
            ODE steps (the Flow-GRPO paper evaluates with 40).
        guidance_scale (`float`, *optional*):
            Guidance scale, passed as the pipeline family takes it (Qwen-Image: `true_cfg_scale` with the negative
            prompt " "); unset: the family's default (SD3 / SD3.5 4.5, FLUX.1 3.5, Qwen-Image 4.0).
        height (`int`, *optional*):
            Image height; defaults to the pipeline's.
        width (`int`, *optional*):
            Image width; defaults to the pipeline's.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the first image of each prompt.
        dtype (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (bfloat16 on CUDA, float32 otherwise), `"float32"`, `"bfloat16"` or `"float16"`.
        hybrid_steps (`int`, *optional*):
            Hybrid inference (MixGRPO's): the trained model (`lora`) makes the first `hybrid_steps` of the
            `num_inference_steps` steps, the base model the rest (the LoRA disabled, or the base pipeline's own
            transformer for a full fine-tuning output). Unset: the trained model makes every step.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base pipeline; unset: shapes model."})
    lora: str | None = field(default=None, metadata={"help": "LoRA folder or Hub repo (or full fine-tuning output)."})
    prompts: list[str] = field(default_factory=list, metadata={"help": "Prompts to render."})
    prompts_file: str | None = field(default=None, metadata={"help": "File with one prompt per line."})
    images_per_prompt: int = field(default=1, metadata={"help": "Images per prompt."})
    output_dir: str = field(
        default="samples", metadata={"help": "Folder for grid.png, one PNG per image and rewards.jsonl."}
    )
    reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "Rewards to score each image with (names or import paths)."}
    )
    num_inference_steps: int = field(default=40, metadata={"help": "ODE steps."})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance scale; unset: the pipeline family's default (SD3 4.5, FLUX 3.5)."}
    )
    height: int | None = field(default=None, metadata={"help": "Image height (default: the pipeline's)."})
    width: int | None = field(default=None, metadata={"help": "Image width (default: the pipeline's)."})
    seed: int = field(default=0, metadata={"help": "Seed of the first image of each prompt."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    hybrid_steps: int | None = field(
        default=None,
        metadata={
            "help": "Hybrid inference (MixGRPO): the trained model for the first K steps, the base model after."
        },
    )


class _HybridInference:
    """`sample --hybrid_steps K`: the trained model for the first K steps, then the base model. A diffusers
    `callback_on_step_end` switches after step K - 1: it disables the LoRA, or puts the base pipeline's transformer
    back in place of a fully fine-tuned one (`base_transformer`); `switched()` runs one call and switches back."""

    def __init__(self, pipe: Any, steps: int, base_transformer: Any | None = None):
        self.pipe, self.steps, self.base_transformer, self.trained = pipe, steps, base_transformer, None

    def _use_base(self) -> None:
        if self.base_transformer is None:
            self.pipe.disable_lora()
        else:
            self.trained, self.pipe.transformer = self.pipe.transformer, self.base_transformer

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if step == self.steps - 1:
            self._use_base()
        return callback_kwargs

    @contextlib.contextmanager
    def switched(self) -> Iterator[None]:
        if self.steps == 0:
            self._use_base()
        try:
            yield
        finally:
            if self.base_transformer is None:
                self.pipe.enable_lora()
            elif self.trained is not None:
                self.pipe.transformer, self.trained = self.trained, None


def _reward_table(names: list[str], prompts: list[str], seeds: list[int], rewards) -> str:
    """The rewards of each image, one row per image (NaN: the reward does not apply to it)."""
    width = min(max(len(p) for p in prompts), 48)
    head = f"{'#':>3}  {'seed':>5}  {'prompt':<{width}}" + "".join(f"  {name:>12}" for name in names)
    rows = [head]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        shown = prompt if len(prompt) <= width else prompt[: width - 3] + "..."
        rows.append(f"{i:>3}  {seed:>5}  {shown:<{width}}" + "".join(f"  {v:>12.4f}" for v in rewards[i].tolist()))
    return "\n".join(rows)


def load_for_sampling(args, command: str):
    """The pipeline of `sample` / `evaluate` (`args.model_name_or_path`, unset or `builtin:shapes`: the shapes model;
    `args.lora` loaded on top), on CUDA if available, in `args.dtype`; `args.height` / `args.width` filled in for the
    shapes model. Returns the pipeline, its device, its guidance keywords and any other call keywords (with
    `args.hybrid_steps`, a `_HybridInference` callback whose `switched()` must wrap each call)."""
    import torch
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if args.dtype != "auto" and args.dtype not in dtypes:
        raise SystemExit(f"trl-flow-grpo {command}: --dtype must be auto, {', '.join(dtypes)}; got {args.dtype!r}.")
    dtype = dtypes.get(args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    # diffusers >= 0.36 takes `dtype` and warns about `torch_dtype`; 0.35 only knows `torch_dtype`.
    from diffusers import __version__ as diffusers_version
    from packaging.version import Version

    load_dtype = {"dtype" if Version(diffusers_version) >= Version("0.36") else "torch_dtype": dtype}
    if args.model_name_or_path in (None, BUILTIN_SHAPES):
        from .toy.model import SHAPES_SAMPLING, load_shapes_pipeline

        pipe = load_shapes_pipeline(dtype)
        extra = {"max_sequence_length": SHAPES_SAMPLING["max_sequence_length"]}
        args.height, args.width = args.height or SHAPES_SAMPLING["height"], args.width or SHAPES_SAMPLING["width"]
    else:
        with _hub_errors_as_one_line(command, "model", args.model_name_or_path):
            pipe = DiffusionPipeline.from_pretrained(args.model_name_or_path, **load_dtype)
        extra = {}
    hybrid_steps = getattr(args, "hybrid_steps", None)  # `sample --hybrid_steps`
    base_transformer = None  # a full fine-tuning output's base transformer, for --hybrid_steps
    if args.lora is not None:
        transformer_dir = os.path.join(args.lora, TRANSFORMER_FOLDER)
        if os.path.isdir(transformer_dir):  # a full fine-tuning output
            if hybrid_steps is not None:
                base_transformer = pipe.transformer.to(device)
            pipe.transformer = type(pipe.transformer).from_pretrained(transformer_dir, **load_dtype)
        else:
            with _without_text_encoder_lora_warnings():  # the trainer's LoRAs have no text encoder keys
                pipe.load_lora_weights(args.lora)
    pipe = pipe.to(device)
    if hybrid_steps is not None:  # `extra["callback_on_step_end"].switched()` wraps each call
        extra["callback_on_step_end"] = _HybridInference(pipe, hybrid_steps, base_transformer)
    pipe.set_progress_bar_config(disable=True)
    from .pipelines import get_adapter

    try:  # each family names its guidance its own way (Qwen-Image: true_cfg_scale with a negative prompt)
        adapter = get_adapter(pipe)
        scale = args.guidance_scale if args.guidance_scale is not None else adapter.default_guidance_scale
        guidance = adapter.pipeline_call_kwargs(scale)
    except ValueError:  # a pipeline the trainer does not support: its own guidance argument and default
        guidance = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    return pipe, device, guidance, extra


def sample(argv: list[str]) -> None:
    """`trl-flow-grpo sample`: base pipeline (+ LoRA) -> images and a grid in `output_dir`, each image's rewards."""
    from trl import TrlParser

    parser = TrlParser((SampleArguments,), prog="trl-flow-grpo sample")
    _check_flags(parser, argv)
    (args,) = parser.parse_args_and_config(argv)
    if args.lora is not None:
        _check_lora(args.lora)
    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit('trl-flow-grpo sample: no prompts; pass --prompts "a cat" "a dog" or --prompts_file FILE.')
    if args.images_per_prompt < 1:
        raise SystemExit(f"trl-flow-grpo sample: --images_per_prompt must be >= 1, got {args.images_per_prompt}.")
    if args.hybrid_steps is not None:
        if args.lora is None:
            raise SystemExit(
                "trl-flow-grpo sample: --hybrid_steps switches from the trained model to the base model; pass the "
                "trained model with --lora (a LoRA or a full fine-tuning output)."
            )
        if not 0 <= args.hybrid_steps <= args.num_inference_steps:
            raise SystemExit(
                f"trl-flow-grpo sample: --hybrid_steps must be in [0, --num_inference_steps="
                f"{args.num_inference_steps}] (the steps made by the trained model), got {args.hybrid_steps}."
            )

    import torch
    from tqdm.auto import tqdm

    from .rewards.base import call_reward_funcs, resolve_reward_func, reward_func_name
    from .utils import image_grid

    reward_funcs = [resolve_reward_func(name) for name in args.reward_funcs]  # a bad name fails before sampling
    pipe, device, guidance, extra = load_for_sampling(args, "sample")
    hybrid = extra.get("callback_on_step_end")
    switched = hybrid.switched if isinstance(hybrid, _HybridInference) else contextlib.nullcontext
    images, captions, seeds = [], [], []
    jobs = [(p, k) for p in prompts for k in range(args.images_per_prompt)]
    for prompt, k in tqdm(jobs, desc="sample"):
        generator = torch.Generator(device).manual_seed(args.seed + k)
        with switched():
            image = pipe(
                prompt=prompt,  # by name: FLUX.2 and editing pipelines take `image` first
                num_inference_steps=args.num_inference_steps,
                height=args.height,
                width=args.width,
                generator=generator,
                **guidance,
                **extra,
            ).images[0]
        images.append(image)
        captions.append(prompt)
        seeds.append(args.seed + k)
    os.makedirs(args.output_dir, exist_ok=True)
    files = [f"{i:04d}.png" for i in range(len(images))]
    for image, name in zip(images, files):
        image.save(os.path.join(args.output_dir, name))
    grid = os.path.join(args.output_dir, "grid.png")
    image_grid(images, captions, ncols=args.images_per_prompt if args.images_per_prompt > 1 else None).save(grid)
    print(
        f"Wrote {_plural(len(images), 'image')} of {_plural(len(prompts), 'prompt')} to {args.output_dir}/ "
        f"({', '.join(files[:2])}{', ...' if len(files) > 2 else ''} and grid.png)",
        flush=True,
    )
    if reward_funcs:
        import json

        names = [reward_func_name(f) for f in reward_funcs]
        rewards = call_reward_funcs(reward_funcs, captions, images)
        print(_reward_table(names, captions, seeds, rewards), flush=True)
        means = ", ".join(f"{n} {torch.nanmean(rewards[:, j]).item():+.4f}" for j, n in enumerate(names))
        print(f"mean over {_plural(len(images), 'image')}: {means}", flush=True)
        with open(os.path.join(args.output_dir, "rewards.jsonl"), "w", encoding="utf-8") as f:
            for i, (prompt, seed, name) in enumerate(zip(captions, seeds, files)):
                values = {n: (None if v != v else v) for n, v in zip(names, rewards[i].tolist())}
                f.write(json.dumps({"file": name, "prompt": prompt, "seed": seed, "rewards": values}) + "\n")


def evaluate(argv: list[str]) -> None:
    """`trl-flow-grpo evaluate`: see `trl_flow_grpo.evaluate` (imported when called)."""
    from .evaluate import evaluate as run

    run(argv)


def reward_server(argv: list[str]) -> None:
    """`trl-flow-grpo reward-server --reward NAME_OR_PATH [--host] [--port] [--token-env VAR]`: serve a reward over
    HTTP for `RemoteReward` (see `trl_flow_grpo.rewards.server`)."""
    from .rewards.server import main as serve

    serve(argv)


COMMANDS = {
    "train": (train, "Train a flow-matching pipeline with Flow-GRPO (built-in offline demo by default)."),
    "sample": (sample, "Render prompts with a base pipeline plus a trained LoRA; score them with rewards."),
    "reward-server": (reward_server, "Serve a reward function over HTTP (POST /score) for a reward URL."),
    "evaluate": (evaluate, "Score a pipeline (+ LoRA) on a prompt dataset: means with 95% CIs."),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: trl-flow-grpo <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<14} {help_text}")
        print("\nRun `trl-flow-grpo <command> --help` for the options of a command.")
        return
    command, rest = argv[0], argv[1:]
    _silence_torchvision_fallback()
    if command not in COMMANDS:
        raise SystemExit(f"trl-flow-grpo: unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    if command == "train":
        rest, config = _pop_option(rest, "--accelerate_config")
        if config is not None:
            raise SystemExit(launch_with_accelerate(config, command, rest))
    COMMANDS[command][0](rest)


if __name__ == "__main__":
    main()
