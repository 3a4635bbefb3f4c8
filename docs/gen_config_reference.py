"""Generate `docs/configuration.md` from `FlowGRPOConfig` and `TrainScriptArguments`.

    python docs/gen_config_reference.py            # (re)write docs/configuration.md
    python docs/gen_config_reference.py --check    # exit 1 if docs/configuration.md is stale

The mkdocs build runs it too (`docs/hooks.py`), so the published reference always matches the code. The text comes
from the code only: the class docstrings (their `Parameters:` sections, grouped by their `> Parameters that control
...` headers) and each field's `metadata["help"]`, which is also what `trl-flow-grpo train --help` prints.
"""

import argparse
import dataclasses
import enum
import re
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "configuration.md"
TRAINING_ARGUMENTS_URL = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"

_ENTRY = re.compile(r"^(?P<name>[A-Za-z_]\w*) \((?P<spec>.*)\):$")
_DOC_LINK = re.compile(r"\[`~?([\w.]+)`\]")  # doc-builder links: [`~transformers.TrainingArguments`]


def plain_links(text: str) -> str:
    """Replace Hugging Face doc-builder links (``[`~a.b.C`]``) by code spans of their last component."""
    return _DOC_LINK.sub(lambda m: f"`{m[1].rsplit('.', 1)[-1]}`", text)


@dataclasses.dataclass
class DocEntry:
    """One parameter of a class docstring's `Parameters:` section."""

    name: str
    type: str | None
    default: str | None
    description: str
    group: str | None


def parse_docstring_parameters(doc: str | None) -> dict[str, DocEntry]:
    """Parse the `Parameters:` section of a Hugging Face style docstring.

    Entries look like ``name (`type`, *optional*, defaults to `value`):`` followed by an indented description;
    ``> Parameters that control ...`` lines start a group. Returns the entries by name, in docstring order.
    """
    lines = (doc or "").expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Parameters:")
    except StopIteration:
        return {}
    base = len(lines[start]) - len(lines[start].lstrip())
    entries: dict[str, DocEntry] = {}
    group = None
    current: DocEntry | None = None
    description: list[str] = []
    entry_indent = None

    def finish():
        if current is not None:
            current.description = plain_links(" ".join(description).strip())
            entries[current.name] = current

    for line in lines[start + 1 :]:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped and indent <= base:
            break  # the end of the section
        if not stripped:
            continue
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent and stripped.startswith(">"):
            finish()
            current, description = None, []
            group = stripped.lstrip("> ").strip()
            continue
        match = _ENTRY.match(stripped) if indent == entry_indent else None
        if match:
            finish()
            spec = match["spec"]
            default = None
            if "defaults to " in spec:
                spec, default = spec.split("defaults to ", 1)
                default = default.strip()
            parts = [part.strip() for part in spec.split(",")]
            spec = ", ".join(part for part in parts if part and part != "*optional*")
            current = DocEntry(match["name"], spec or None, default, "", group)
            description = []
        elif current is not None and indent > entry_indent:
            description.append(stripped)
    finish()
    return entries


def field_default(f: dataclasses.Field):
    """The default value of a dataclass field (calling its `default_factory`), or `dataclasses.MISSING`."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_value(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def format_type(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def config_fields():
    """(added, changed): the fields `FlowGRPOConfig` adds to `TrainingArguments`, and those whose default it changes.

    Fields starting with `_` are skipped.
    """
    from transformers import TrainingArguments

    from trl_flow_grpo import FlowGRPOConfig

    base = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    added, changed = [], []
    for f in dataclasses.fields(FlowGRPOConfig):
        if f.name.startswith("_"):
            continue
        if f.name not in base:
            added.append(f)
        elif _differs(field_default(f), field_default(base[f.name])):
            changed.append((f, base[f.name]))
    return added, changed


def _differs(a, b) -> bool:
    a = a.value if isinstance(a, enum.Enum) else a
    b = b.value if isinstance(b, enum.Enum) else b
    return type(a) is not type(b) or a != b


def _field_section(f: dataclasses.Field, entry: DocEntry | None, heading: str = "###") -> list[str]:
    kind = entry.type if entry and entry.type else f"`{format_type(f.type)}`"
    help_text = f.metadata.get("help", "").strip()
    choices = f.metadata.get("choices")
    out = [f"{heading} `{f.name}`", "", f"{kind}, default {format_value(field_default(f))}.", ""]
    if entry and entry.description:
        out += [entry.description, ""]
    flag = f"`--{f.name}`"
    if choices:
        flag += " (one of " + ", ".join(format_value(c) for c in choices) + ")"
    out += [f"Command line: {flag}: {help_text}" if help_text else f"Command line: {flag}.", ""]
    return out


def _grouped(fields, entries: dict[str, DocEntry]):
    """Fields grouped by their docstring header, in docstring order; undocumented fields last."""
    order = {name: i for i, name in enumerate(entries)}
    groups: dict[str, list] = {}
    for f in sorted(fields, key=lambda f: order.get(f.name, len(order))):
        entry = entries.get(f.name)
        groups.setdefault(entry.group if entry and entry.group else "Other parameters", []).append(f)
    return groups


def generate() -> str:
    """The Markdown text of the configuration reference."""
    from trl_flow_grpo import FlowGRPOConfig
    from trl_flow_grpo.cli import TrainScriptArguments

    entries = parse_docstring_parameters(FlowGRPOConfig.__doc__)
    added, changed = config_fields()
    out = [
        "<!-- Generated by docs/gen_config_reference.py from FlowGRPOConfig and TrainScriptArguments: do not edit",
        "by hand. The mkdocs build regenerates it; `python docs/gen_config_reference.py` does too. -->",
        "",
        "# Configuration reference",
        "",
        "`FlowGRPOConfig` is a `transformers.TrainingArguments`: every field below is a keyword of",
        "`FlowGRPOConfig(...)`, a key of a `trl-flow-grpo train --config` YAML file and a `--flag` of the command",
        "line. This page lists the fields that `FlowGRPOConfig` adds to `TrainingArguments` and the",
        "`TrainingArguments` defaults it changes; for everything else (`output_dir`, `max_steps`, `save_strategy`,",
        f"`report_to`, `seed`, ...) see [`TrainingArguments`]({TRAINING_ARGUMENTS_URL}).",
        "The arguments of the `trl-flow-grpo train` command that are not training hyperparameters",
        "(`TrainScriptArguments`) come [last](#command-line-script-arguments).",
        "",
        "It is generated from the class docstrings and the fields' `help` metadata, which `trl-flow-grpo train",
        "--help` also prints. Batch semantics are explained in [concepts.md](concepts.md#groups-and-batch-semantics).",
        "",
    ]
    for group, fields in _grouped(added, entries).items():
        title = group[0].upper() + group[1:] if group else group
        out += [f"## {title}", ""]
        for f in fields:
            out += _field_section(f, entries.get(f.name))

    out += [
        "## Changed defaults of TrainingArguments",
        "",
        "| Field | `FlowGRPOConfig` default | `TrainingArguments` default | Help |",
        "| --- | --- | --- | --- |",
    ]
    for f, base in changed:
        help_text = f.metadata.get("help", "").replace("|", "\\|").strip()
        out.append(
            f"| `{f.name}` | {format_value(field_default(f))} | {format_value(field_default(base))} | {help_text} |"
        )
    out += [
        "",
        "`bf16=None` means: on when a CUDA device is available (and `fp16` is off), off otherwise.",
        "",
        "## Other TrainingArguments",
        "",
        f"Every other [`TrainingArguments`]({TRAINING_ARGUMENTS_URL}) field works as in `transformers.Trainer`.",
        "The ones most often set for Flow-GRPO: `output_dir`, `max_steps` / `num_train_epochs`, `save_strategy` /",
        "`save_steps`, `eval_strategy` / `eval_steps` with `per_device_eval_batch_size`, `report_to`, `run_name`,",
        "`seed`, `max_grad_norm` (default 1.0), `activation_checkpointing`, `fp16`, and the optimizer settings",
        "(`optim`, `adam_beta1`, `adam_beta2`, `adam_epsilon`). `auto_find_batch_size=True` is rejected: every",
        "optimizer step must hold whole groups of `num_generations` images.",
        "",
    ]

    script_entries = parse_docstring_parameters(TrainScriptArguments.__doc__)
    out += [
        "## Command-line script arguments",
        "",
        "`TrainScriptArguments` (in `trl_flow_grpo/cli.py`): what to train and on what. They exist only for",
        "`trl-flow-grpo train` (flags and YAML keys, like the fields above); in Python, pass the pipeline, the",
        "datasets, the reward functions and the `peft_config` to `FlowGRPOTrainer` directly.",
        "",
    ]
    for f in dataclasses.fields(TrainScriptArguments):
        if not f.name.startswith("_"):
            out += _field_section(f, script_entries.get(f.name))
    return "\n".join(out).rstrip() + "\n"


def write(path: Path = OUTPUT) -> bool:
    """Write the reference to `path` if it changed; return whether it was written."""
    text = generate()
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if the file is stale instead of writing it.")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.check:
        stale = not args.output.exists() or args.output.read_text(encoding="utf-8") != generate()
        print(f"{args.output} is {'stale' if stale else 'up to date'}.")
        return int(stale)
    print(f"{'Wrote' if write(args.output) else 'Unchanged:'} {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
