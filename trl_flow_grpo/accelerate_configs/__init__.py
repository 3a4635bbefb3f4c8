"""Accelerate configurations shipped with trl-flow-grpo (data files, named as TRL's `trl/accelerate_configs`), and
how `trl-flow-grpo train --accelerate_config` finds one and splits its arguments between `accelerate launch` and
the script.

`accelerate launch --config_file <path to one of them> -m trl_flow_grpo.cli train ...`, or by name with
`trl-flow-grpo train --accelerate_config multi_gpu ...`. Find them with
`importlib.resources.files("trl_flow_grpo.accelerate_configs") / "multi_gpu.yaml"`. See docs/multi_gpu.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib.resources import files

ALIASES: dict[str, str] = {"deepspeed_zero2": "zero2", "fsdp": "fsdp2"}
"""Earlier names of shipped configurations -> their TRL names (`--accelerate_config deepspeed_zero2` still works)."""

SET_BY_ACCELERATE_CONFIG = ("--config_file", "-m", "--module", "--no_python")
"""`accelerate launch` flags that `--accelerate_config` sets itself (the config file, and running the CLI module)."""


def shipped_names() -> list[str]:
    """Names of the shipped configurations (TRL's names), without the earlier aliases."""
    return sorted(p.name.removesuffix(".yaml") for p in files(__name__).iterdir() if p.name.endswith(".yaml"))


def config_path(name_or_path: str) -> str:
    """The file of a shipped configuration by name (`single_gpu`, `multi_gpu`, `zero1`, `zero2`, `zero3`, `fsdp1`,
    `fsdp2`; `deepspeed_zero2` and `fsdp` are aliases of `zero2` and `fsdp2`), or `name_or_path` if it is a file.

    Raises:
        ValueError: neither a file nor a shipped name; the message lists the names.
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path.removesuffix(".yaml")
    name = ALIASES.get(name, name)
    names = shipped_names()
    if name not in names:
        aliases = ", ".join(f"{old} = {new}" for old, new in ALIASES.items())
        raise ValueError(
            f"--accelerate_config {name_or_path!r} is neither a file nor a shipped config; shipped configs: "
            f"{', '.join(names)} (aliases: {aliases})."
        )
    return str(files(__name__) / f"{name}.yaml")


def split_launch_args(argv: list[str], script_options: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split a command's arguments into `accelerate launch`'s flags and the script's, as `trl <cmd>` does: a flag of
    `accelerate launch` (`--num_processes 4`, `--main_process_port=29501`, `--mixed_precision bf16`, ...) that the
    script does not have goes to accelerate, with its value; everything else stays with the script, in order (a
    flag both have, such as `--debug`, is the script's).

    Args:
        argv: The command's arguments, `--accelerate_config` already removed.
        script_options: The script's flag names without the leading `--`.

    Raises:
        ValueError: a flag `--accelerate_config` sets itself (`--config_file`, `-m`), or a launch flag without its
            value.
    """
    from accelerate.commands.launch import launch_command_parser

    actions = launch_command_parser()._option_string_actions
    script = set(script_options)
    launch, rest, i = [], [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        action = actions.get(flag) if flag.startswith("-") and flag.lstrip("-") not in script else None
        if action is None:
            rest.append(argv[i])
            i += 1
            continue
        if flag in SET_BY_ACCELERATE_CONFIG:
            raise ValueError(
                f"{flag} is set by --accelerate_config; pass your own accelerate config file as --accelerate_config "
                "PATH."
            )
        takes_value = action.nargs != 0 and "=" not in argv[i]
        if takes_value and action.nargs == "?":
            takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        end = i + 2 if takes_value else i + 1
        if end > len(argv):
            raise ValueError(f"the accelerate launch flag {flag} needs a value.")
        launch += argv[i:end]
        i = end
    return launch, rest
