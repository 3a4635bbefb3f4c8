"""Accelerate configurations shipped with trl-flow-grpo (data files, named as TRL's `trl/accelerate_configs`).

`accelerate launch --config_file <path to one of them> -m trl_flow_grpo.cli train ...`, or by name with
`trl-flow-grpo train --accelerate_config multi_gpu ...`. Find them with
`importlib.resources.files("trl_flow_grpo.accelerate_configs") / "multi_gpu.yaml"`. See docs/multi_gpu.md.
"""

ALIASES: dict[str, str] = {"deepspeed_zero2": "zero2", "fsdp": "fsdp2"}
"""Earlier names of shipped configurations -> their TRL names (`--accelerate_config deepspeed_zero2` still works)."""
