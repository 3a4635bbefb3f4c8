"""The shipped Accelerate configurations (trl_flow_grpo/accelerate_configs/) load with the installed Accelerate the
way `accelerate launch --config_file` loads them, and the FSDP one wraps a block class that SD3 really has."""

import importlib.resources
import os
from pathlib import Path
from unittest import mock

import pytest
import yaml

CONFIGS = importlib.resources.files("trl_flow_grpo.accelerate_configs")
NAMES = ["single_gpu", "multi_gpu", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"]  # TRL's names
EXPECTED = {  # distributed type, processes, ZeRO stage / FSDP version
    "single_gpu": ("NO", 1, None),
    "multi_gpu": ("MULTI_GPU", 8, None),
    "zero1": ("DEEPSPEED", 8, 1),
    "zero2": ("DEEPSPEED", 8, 2),
    "zero3": ("DEEPSPEED", 8, 3),
    "fsdp1": ("FSDP", 8, 1),
    "fsdp2": ("FSDP", 8, 2),
}


def _path(name: str) -> str:
    return str(CONFIGS.joinpath(f"{name}.yaml"))


def test_the_configs_are_package_data():
    shipped = sorted(entry.name for entry in CONFIGS.iterdir() if entry.name.endswith(".yaml"))
    assert shipped == sorted(f"{name}.yaml" for name in NAMES)
    trl_configs = importlib.resources.files("trl.accelerate_configs")
    trl_names = sorted(e.name for e in trl_configs.iterdir() if e.name.endswith(".yaml"))
    assert set(trl_names) <= set(shipped), "a config name TRL ships is missing here"
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert '"trl_flow_grpo.accelerate_configs" = ["*.yaml"]' in pyproject


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_like_accelerate_launch(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    raw = yaml.safe_load(Path(_path(name)).read_text(encoding="utf-8"))
    config = ClusterConfig.from_yaml_file(_path(name))  # raises on keys this Accelerate does not know
    distributed_type, num_processes, level = EXPECTED[name]
    assert config.distributed_type.value == distributed_type
    assert config.num_processes == num_processes
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False

    # The nested keys become `accelerate launch` options (fsdp_config.x -> --fsdp_x): each must be one.
    options = {action.dest for action in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section, {}):
            assert key in options, f"{name}.yaml: {section}.{key} is not an `accelerate launch` option"

    # What `accelerate launch --config_file <file> -m trl_flow_grpo.cli train` does, short of starting processes.
    from accelerate.commands import launch

    validate = getattr(launch, "_validate_launch_command", None)
    if validate is None:
        pytest.skip("this Accelerate has no _validate_launch_command")
    args = launch_command_parser().parse_args(["--config_file", _path(name), "-m", "trl_flow_grpo.cli", "train"])
    args, _, _ = validate(args)
    assert args.num_processes == num_processes
    assert args.mixed_precision == "bf16"
    assert bool(args.multi_gpu) == (name == "multi_gpu")
    assert bool(args.use_deepspeed) == name.startswith("zero")
    assert bool(args.use_fsdp) == name.startswith("fsdp")
    if name.startswith("zero"):
        assert args.zero_stage == level
    if name.startswith("fsdp"):
        assert int(args.fsdp_version) == level
        assert args.fsdp_transformer_layer_cls_to_wrap == "JointTransformerBlock"


@pytest.mark.parametrize(("alias", "name"), [("deepspeed_zero2", "zero2"), ("fsdp", "fsdp2")])
def test_the_earlier_names_are_aliases(alias, name):
    from trl_flow_grpo.accelerate_configs import ALIASES
    from trl_flow_grpo.cli import accelerate_config_path

    assert ALIASES[alias] == name
    assert accelerate_config_path(alias) == _path(name)


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_config_builds_a_plugin_that_wraps_sd3_blocks(version):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from trl_flow_grpo.testing import make_tiny_sd3_pipeline

    path = _path(f"fsdp{version}")
    args = launch_command_parser().parse_args(["--config_file", path, "-m", "trl_flow_grpo.cli", "train"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)  # the environment each launched process gets
    assert env["FSDP_VERSION"] == str(version)
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "JointTransformerBlock"
    if version == 1:
        assert env["FSDP_USE_ORIG_PARAMS"] == "true"  # a LoRA's trainable parameters next to frozen ones
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()  # validates the FSDP options as Accelerator() would
    assert plugin.fsdp_version == version
    assert plugin.transformer_cls_names_to_wrap == ["JointTransformerBlock"]

    transformer = make_tiny_sd3_pipeline(seed=0).transformer
    plugin.set_auto_wrap_policy(transformer)  # raises if the class is not in the model
    blocks = [m for m in transformer.modules() if type(m).__name__ == "JointTransformerBlock"]
    assert blocks and all(plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0) for m in blocks)
    assert not plugin.auto_wrap_policy(module=transformer, recurse=False, nonwrapped_numel=0)


def test_launch_flags_are_split_from_the_scripts_with_their_values():
    from trl_flow_grpo.accelerate_configs import split_launch_args

    argv = ["--config", "r.yaml", "--num_processes", "4", "--learning_rate", "1e-4", "--main_process_port=29501"]
    argv += ["--multi_gpu", "--debug", "underflow_overflow", "--gpu_ids", "0,1,2,3", "--seed", "-1"]
    launch, rest = split_launch_args(argv, ["config", "learning_rate", "debug", "seed"])
    assert launch == ["--num_processes", "4", "--main_process_port=29501", "--multi_gpu", "--gpu_ids", "0,1,2,3"]
    assert rest == ["--config", "r.yaml", "--learning_rate", "1e-4", "--debug", "underflow_overflow", "--seed", "-1"]
    with pytest.raises(ValueError, match="--config_file is set by --accelerate_config"):
        split_launch_args(["--config_file", "x.yaml"], [])
    with pytest.raises(ValueError, match="--num_processes needs a value"):
        split_launch_args(["--num_processes"], [])
