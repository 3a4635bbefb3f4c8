"""The `trl-flow-grpo` command.

    trl-flow-grpo train [--config recipe.yaml] [--accelerate_config NAME_OR_PATH] [--<field> VALUE ...]
    trl-flow-grpo sample [--model_name_or_path ID] [--lora DIR_OR_REPO] --prompts "a cat" "a dog" [--output grid.png]

Arguments are the fields of `TrainScriptArguments` and `FlowGRPOConfig` (`train`) or `SampleArguments` (`sample`),
in TRL's conventions (`TrlParser`: YAML defaults with `--config`, command-line overrides, an `env:` block). Without
`--model_name_or_path`, `train` trains the built-in offline demo: the shipped pretrained shapes model
(`trl_flow_grpo.toy`), its prompts and the rule-based GenEval-like `shapes_geneval` reward, reporting held-out
accuracy per category before and after. `--accelerate_config` relaunches `train` under `accelerate launch` with a
shipped config (`single_gpu`, `multi_gpu`, `deepspeed_zero2`, `fsdp`) or your own file.
"""

import os
import subprocess
import sys
from dataclasses import dataclass, field

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


def _sd3_lora_targets() -> tuple[str, ...]:
    from .pipelines.sd3 import LORA_TARGET_MODULES  # imported lazily: `trl-flow-grpo --help` stays light

    return LORA_TARGET_MODULES


@dataclass
class TrainScriptArguments:
    """Arguments of `trl-flow-grpo train` that are not training hyperparameters.

    Parameters:
        model_name_or_path (`str`, *optional*):
            Hub id or local path of a diffusers pipeline. Unset: the built-in offline demo pipeline.
        dataset_name (`str`, *optional*):
            Hub dataset id, local dataset folder, or a data file (`.json`, `.jsonl`, `.csv`, `.txt`, `.parquet`).
            Unset: the built-in demo prompts.
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
        lora_target_modules (`list[str]`, *optional*):
            Modules that get a LoRA; defaults to the attention projections (Flow-GRPO's choice).
        heldout_images_per_prompt (`int`, *optional*, defaults to `4`):
            Demo only: images per held-out caption in the before/after evaluation (more: a narrower interval).
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Pipeline id or path; unset: demo."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset id, folder or data file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["jpeg_compressibility"],
        metadata={"help": "Built-in reward names or import paths (my_pkg.rewards.my_reward)."},
    )
    preference_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Pref-GRPO preference functions: built-in judges, reward names or import paths."},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA instead of the whole transformer."})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(_sd3_lora_targets()),
        metadata={"help": "Modules that get a LoRA."},
    )
    heldout_images_per_prompt: int = field(
        default=4, metadata={"help": "Demo only: images per held-out caption in the before/after evaluation."}
    )


def _parser(demo: bool):
    from trl import TrlParser

    from .flow_grpo_config import FlowGRPOConfig

    parser = TrlParser((TrainScriptArguments, FlowGRPOConfig), prog="trl-flow-grpo train")
    if demo:
        parser.set_defaults(**demo_defaults())
    return parser


def _check_flags(parser, argv: list[str]) -> None:
    """A misspelt `--flag` is an error that suggests the nearest right one (argparse only lists it)."""
    from .validation import suggest_flags

    known = [option[2:] for option in parser._option_string_actions if option.startswith("--")]
    unknown = [arg for arg in argv if arg.startswith("--") and arg.split("=", 1)[0][2:] not in known]
    hints = suggest_flags(unknown, known)
    if hints:
        raise SystemExit(f"{parser.prog}: unrecognized arguments: {' '.join(unknown)}\n{hints}")


def _check_lora(lora: str) -> None:
    """`sample --lora`: a local path must exist and hold a LoRA file or a `transformer/` folder."""
    if os.path.isdir(lora):
        if not os.path.isdir(os.path.join(lora, "transformer")) and not any(
            name.endswith(".safetensors") for name in os.listdir(lora)
        ):
            raise SystemExit(
                f"trl-flow-grpo sample: --lora {lora} has no pytorch_lora_weights.safetensors and no transformer/ "
                "folder; pass the output_dir (or a checkpoint-<step> folder) of a FlowGRPOTrainer run."
            )
        return
    looks_local = os.path.isabs(lora) or lora.startswith((".", "~")) or lora.count("/") != 1 or os.path.exists(lora)
    if looks_local:
        raise SystemExit(
            f"trl-flow-grpo sample: --lora {lora}: no such folder (a Hub repo id has the form 'user/repo'). Pass the "
            "output_dir of a FlowGRPOTrainer run, a checkpoint-<step> folder in it, or the Hub repo it was pushed to."
        )


def _load_datasets(script_args: TrainScriptArguments):
    from datasets import Dataset, load_dataset

    if script_args.dataset_name is None:
        if script_args.model_name_or_path is not None:
            raise ValueError(
                "--dataset_name is required with --model_name_or_path: a Hub dataset id, a dataset folder or a file "
                "of prompts (.txt with one prompt per line, .json/.jsonl/.csv/.parquet with a 'prompt' column)."
            )
        from .toy import all_captions, make_prompt_dataset

        train = make_prompt_dataset(DEMO_NUM_PROMPTS, seed=0, split="train")
        return train, Dataset.from_dict({"prompt": all_captions("test")})
    name = script_args.dataset_name
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    builders = {"json": "json", "jsonl": "json", "csv": "csv", "txt": "text", "parquet": "parquet"}
    if extension in builders:
        dataset = load_dataset(builders[extension], data_files=name)
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


def _log_line(state, logs: dict) -> str | None:
    """One short line for a log entry: the reward and its change since the first log, or the held-out reward."""
    step = f"step {state.global_step:>4}/{state.max_steps}" if state.max_steps else "before training"
    if "reward" in logs:
        return (
            f"{step} | reward {logs['reward']:+.4f} | kl {logs.get('kl', 0.0):.2e} | "
            f"loss {logs.get('loss', float('nan')):+.2e}"
        )
    if "eval_reward" in logs:
        return f"{step} | held-out reward {logs['eval_reward']:+.4f}"
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
    """Held-out GenEval-like evaluation of the shapes demo (the trainer's own policy, ODE sampling, fixed seeds)."""
    from .toy.evaluation import evaluate_heldout

    def evaluate():
        args = trainer.args
        print(f"Held-out evaluation: {images_per_prompt} images per held-out caption...", flush=True)
        result = evaluate_heldout(
            trainer.pipeline,
            images_per_prompt=images_per_prompt,
            num_inference_steps=args.eval_num_inference_steps,
            guidance_scale=trainer.guidance_scale,
            seed=args.seed,
            batch_size=args.per_device_eval_batch_size,
            keep_images=False,
            progress=not args.disable_tqdm,
        )
        return result

    return evaluate


def train(argv: list[str]) -> None:
    """`trl-flow-grpo train`: parse, load, train, evaluate before and after, save."""
    _check_flags(_parser(demo=False), argv)
    script_args, _ = _parser(demo=False).parse_args_and_config(argv)
    demo = script_args.model_name_or_path is None
    if demo:
        script_args, training_args = _parser(demo=True).parse_args_and_config(argv)
    else:
        script_args, training_args = _parser(demo=False).parse_args_and_config(argv)

    from peft import LoraConfig

    from .flow_grpo_trainer import FlowGRPOTrainer

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
            f"{training_args.num_sde_steps} SDE), train_cfg {training_args.train_cfg}, {training_args.max_steps} "
            "optimizer steps.",
            flush=True,
        )
    else:
        model = script_args.model_name_or_path
    train_dataset, eval_dataset = _load_datasets(script_args)
    peft_config = None
    if script_args.use_peft:
        peft_config = LoraConfig(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=script_args.lora_target_modules,
        )
    trainer = FlowGRPOTrainer(
        model=model,
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        preference_funcs=script_args.preference_funcs,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_concise_logging(show_bar=not training_args.disable_tqdm))
    print(
        f"One optimizer step: {training_args.generation_batch_size} images "
        f"({training_args.generation_batch_size // training_args.num_generations} prompts x "
        f"{training_args.num_generations}), {training_args.num_sde_steps} SDE steps each.",
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
        if trainer.is_world_process_zero():
            print(_interrupted(training_args.output_dir, interrupt), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    after = evaluate() if eval_dataset is not None else None
    trainer.save_model()
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


def _interrupted(output_dir: str, interrupt: KeyboardInterrupt) -> str:
    """What to do after Ctrl-C or SIGTERM: the checkpoint to resume from, or why there is none."""
    from .interrupts import newest_complete_checkpoint

    reason = str(interrupt) or "Ctrl-C"
    try:
        checkpoint = newest_complete_checkpoint(output_dir)
    except ValueError:
        return f"\nInterrupted ({reason}). No checkpoint was written: no step had completed, or save_strategy is 'no'."
    return (
        f"\nInterrupted ({reason}). Newest checkpoint: {checkpoint}. To go on, run the same command with "
        "--resume_from_checkpoint true"
    )


# ----------------------------------------------------------------------------------------- accelerate launch
def accelerate_config_path(name_or_path: str) -> str:
    """A shipped accelerate config by name (`multi_gpu`, `deepspeed_zero2`, `fsdp`, `single_gpu`), or a file path."""
    if os.path.isfile(name_or_path):
        return name_or_path
    from importlib.resources import files

    shipped = files("trl_flow_grpo") / "accelerate_configs"
    names = sorted(p.name.removesuffix(".yaml") for p in shipped.iterdir() if p.name.endswith(".yaml"))
    if name_or_path.removesuffix(".yaml") not in names:
        raise SystemExit(
            f"trl-flow-grpo: --accelerate_config {name_or_path!r} is neither a file nor a shipped config; shipped "
            f"configs: {', '.join(names)}."
        )
    return str(shipped / f"{name_or_path.removesuffix('.yaml')}.yaml")


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
    """Run `trl-flow-grpo <command> argv` under `accelerate launch --config_file <config>`; return its exit code."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config_path(config)]
    cmd += ["-m", "trl_flow_grpo.cli", command, *argv]
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
        output (`str`, *optional*, defaults to `"samples.png"`):
            Where to write the grid.
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
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base pipeline; unset: shapes model."})
    lora: str | None = field(default=None, metadata={"help": "LoRA folder or Hub repo (or full fine-tuning output)."})
    prompts: list[str] = field(default_factory=list, metadata={"help": "Prompts to render."})
    prompts_file: str | None = field(default=None, metadata={"help": "File with one prompt per line."})
    images_per_prompt: int = field(default=1, metadata={"help": "Images per prompt."})
    output: str = field(default="samples.png", metadata={"help": "Output grid path."})
    num_inference_steps: int = field(default=40, metadata={"help": "ODE steps."})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance scale; unset: the pipeline family's default (SD3 4.5, FLUX 3.5)."}
    )
    height: int | None = field(default=None, metadata={"help": "Image height (default: the pipeline's)."})
    width: int | None = field(default=None, metadata={"help": "Image width (default: the pipeline's)."})
    seed: int = field(default=0, metadata={"help": "Seed of the first image of each prompt."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})


def sample(argv: list[str]) -> None:
    """`trl-flow-grpo sample`: base pipeline (+ LoRA) -> one image grid with the prompts as captions."""
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

    import torch
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    from .utils import image_grid

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if args.dtype != "auto" and args.dtype not in dtypes:
        raise SystemExit(f"trl-flow-grpo sample: --dtype must be auto, {', '.join(dtypes)}; got {args.dtype!r}.")
    dtype = dtypes.get(args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    if args.model_name_or_path is None:
        from .toy.model import SHAPES_SAMPLING, load_shapes_pipeline

        pipe = load_shapes_pipeline(dtype)
        extra = {"max_sequence_length": SHAPES_SAMPLING["max_sequence_length"]}
        args.height, args.width = args.height or SHAPES_SAMPLING["height"], args.width or SHAPES_SAMPLING["width"]
    else:
        pipe = DiffusionPipeline.from_pretrained(args.model_name_or_path, torch_dtype=dtype)
        extra = {}
    if args.lora is not None:
        transformer_dir = os.path.join(args.lora, TRANSFORMER_FOLDER)
        if os.path.isdir(transformer_dir):  # a full fine-tuning output
            pipe.transformer = type(pipe.transformer).from_pretrained(transformer_dir, torch_dtype=dtype)
        else:
            pipe.load_lora_weights(args.lora)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    from .pipelines import get_adapter

    try:  # each family names its guidance its own way (Qwen-Image: true_cfg_scale with a negative prompt)
        adapter = get_adapter(pipe)
        scale = args.guidance_scale if args.guidance_scale is not None else adapter.default_guidance_scale
        guidance = adapter.pipeline_call_kwargs(scale)
    except ValueError:  # a pipeline the trainer does not support: its own guidance argument and default
        guidance = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    images, captions = [], []
    jobs = [(p, k) for p in prompts for k in range(args.images_per_prompt)]
    for prompt, k in tqdm(jobs, desc="sample"):
        generator = torch.Generator(device).manual_seed(args.seed + k)
        image = pipe(
            prompt,
            num_inference_steps=args.num_inference_steps,
            height=args.height,
            width=args.width,
            generator=generator,
            **guidance,
            **extra,
        ).images[0]
        images.append(image)
        captions.append(prompt)
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    image_grid(images, captions, ncols=args.images_per_prompt if args.images_per_prompt > 1 else None).save(
        args.output
    )
    print(f"Wrote {len(images)} images to {args.output}", flush=True)


def reward_server(argv: list[str]) -> None:
    """`trl-flow-grpo reward-server --reward NAME_OR_PATH [--host] [--port] [--token-env VAR]`: serve a reward over
    HTTP for `RemoteReward` (see `trl_flow_grpo.rewards.server`)."""
    from .rewards.server import main as serve

    serve(argv)


COMMANDS = {
    "train": (train, "Train a flow-matching pipeline with Flow-GRPO (built-in offline demo by default)."),
    "sample": (sample, "Render prompts with a base pipeline plus a trained LoRA into an image grid."),
    "reward-server": (reward_server, "Serve a reward function over HTTP (POST /score) for a reward URL."),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: trl-flow-grpo <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<8} {help_text}")
        print("\nRun `trl-flow-grpo <command> --help` for the options of a command.")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"trl-flow-grpo: unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    if command == "train":
        rest, config = _pop_option(rest, "--accelerate_config")
        if config is not None:
            raise SystemExit(launch_with_accelerate(config, command, rest))
    COMMANDS[command][0](rest)


if __name__ == "__main__":
    main()
