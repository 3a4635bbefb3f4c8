"""Tests for trl_flow_grpo.flow_grpo_config.FlowGRPOConfig: paper defaults, validation, docs and CLI parsing."""

from __future__ import annotations

import dataclasses
import re

import pytest
import transformers

from trl_flow_grpo.flow_grpo_config import FlowGRPOConfig


def make(tmp_path, **kwargs) -> FlowGRPOConfig:
    return FlowGRPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def added_fields() -> list[dataclasses.Field]:
    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    return [f for f in dataclasses.fields(FlowGRPOConfig) if f.name not in base]


# ---------------------------------------------------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_follow_the_paper(tmp_path):
    cfg = make(tmp_path)
    assert cfg.num_generations == 24
    assert cfg.num_inference_steps == 10
    assert cfg.eval_num_inference_steps == 40
    assert cfg.guidance_scale is None  # the pipeline family's: 4.5 for SD3 / SD3.5, the paper's (test_trainer.py)
    assert cfg.noise_level == 0.7
    assert cfg.beta == 0.04
    assert cfg.epsilon == 1e-4
    assert cfg.epsilon_high == 1e-4
    assert cfg.timestep_fraction == 0.99
    assert cfg.num_sde_steps == 9  # floor(10 * 0.99)
    assert cfg.learning_rate == 3e-4
    assert cfg.adv_clip_max == 5.0
    assert cfg.sde_type == "sde"
    assert cfg.kl_type == "mean"
    assert cfg.scale_rewards == "group"
    assert cfg.multi_objective_aggregation == "sum_then_normalize"
    assert cfg.num_iterations == 1
    assert cfg.remove_unused_columns is False


def test_default_generation_batch_holds_whole_groups(tmp_path):
    cfg = make(tmp_path)
    expected = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.world_size
    assert cfg.generation_batch_size == expected
    assert cfg.generation_batch_size % cfg.num_generations == 0


def test_generation_batch_size_follows_its_factors(tmp_path):
    cfg = make(tmp_path, num_generations=4, per_device_train_batch_size=2, gradient_accumulation_steps=6)
    assert cfg.generation_batch_size == 2 * 6 * cfg.world_size


def test_default_fills_in_both_trl_generation_fields(tmp_path):
    cfg = make(tmp_path, num_generations=4, per_device_train_batch_size=2, gradient_accumulation_steps=6)
    assert cfg.steps_per_generation == 6
    assert cfg.generation_batch_size == 2 * cfg.world_size * cfg.steps_per_generation


@pytest.mark.parametrize("field", ["generation_batch_size", "steps_per_generation"])
def test_trl_generation_field_equal_to_one_optimizer_step_is_accepted(tmp_path, field):
    value = {"generation_batch_size": 12 * make(tmp_path).world_size, "steps_per_generation": 3}[field]
    cfg = make(
        tmp_path, num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=3, **{field: value}
    )
    default = make(tmp_path, num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=3)
    assert (cfg.generation_batch_size, cfg.steps_per_generation) == (
        default.generation_batch_size,
        default.steps_per_generation,
    )


def test_trl_generation_fields_are_mutually_exclusive(tmp_path):
    with pytest.raises(ValueError, match="generation_batch_size .* and steps_per_generation .* cannot both be set"):
        make(
            tmp_path,
            num_generations=4,
            per_device_train_batch_size=4,
            generation_batch_size=8,
            steps_per_generation=3,
        )


def test_a_saved_config_with_both_derived_generation_fields_reloads(tmp_path):
    """training_args.json holds both fields (one derived from the other): the config it describes must rebuild."""
    saved = make(tmp_path, num_generations=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert saved.generation_batch_size == 4 and saved.steps_per_generation == 2
    reloaded = make(
        tmp_path,
        num_generations=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        generation_batch_size=saved.generation_batch_size,
        steps_per_generation=saved.steps_per_generation,
    )
    assert (reloaded.generation_batch_size, reloaded.steps_per_generation) == (4, 2)


def test_generation_batch_size_must_be_a_multiple_of_the_global_micro_batch(tmp_path):
    with pytest.raises(ValueError, match=r"generation_batch_size \(10\) must be divisible by the global batch size"):
        make(tmp_path, num_generations=2, per_device_train_batch_size=4, generation_batch_size=10)


@pytest.mark.parametrize("value", [0, -4])
@pytest.mark.parametrize("field", ["generation_batch_size", "steps_per_generation"])
def test_trl_generation_fields_must_be_positive(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, or unset; got {value}"):
        make(tmp_path, **{field: value})


@pytest.mark.parametrize("field, value", [("generation_batch_size", 48), ("steps_per_generation", 6)])
def test_generation_batch_over_several_optimizer_steps_is_rejected_with_the_supported_fix(tmp_path, field, value):
    kwargs = {"num_generations": 8, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 3}
    with pytest.raises(ValueError) as excinfo:
        make(
            tmp_path,
            **kwargs,
            **{field: value * make(tmp_path).world_size if field == "generation_batch_size" else value},
        )
    message = str(excinfo.value)
    assert "not supported" in message and "num_iterations" in message
    suggested = re.search(r"set gradient_accumulation_steps=(\d+)", message)
    assert suggested, message
    cfg = make(tmp_path, **{**kwargs, "gradient_accumulation_steps": int(suggested.group(1))})
    assert cfg.steps_per_generation == 6  # the suggested config samples the requested batch in one optimizer step


def test_trainer_rejects_a_config_whose_batch_changed_after_it_was_built(tmp_path):
    from trl_flow_grpo.validation import check_generation_batch

    cfg = make(tmp_path, num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    check_generation_batch(cfg)
    cfg.gradient_accumulation_steps = 4  # generation_batch_size was filled in for 2
    with pytest.raises(ValueError, match="build the config again"):
        check_generation_batch(cfg)


@pytest.mark.parametrize("steps, fraction, expected", [(10, 1.0, 10), (10, 0.5, 5), (20, 0.99, 19), (1, 1.0, 1)])
def test_num_sde_steps(tmp_path, steps, fraction, expected):
    assert make(tmp_path, num_inference_steps=steps, timestep_fraction=fraction).num_sde_steps == expected


# ---------------------------------------------------------------------------------------------------------------------
# divisibility
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_device, accum, num_generations", [(5, 1, 24), (16, 1, 24), (3, 3, 4), (6, 1, 4)])
def test_divisibility_error_names_fields_and_suggests_a_working_value(tmp_path, per_device, accum, num_generations):
    kwargs = {"per_device_train_batch_size": per_device, "num_generations": num_generations}
    with pytest.raises(ValueError) as excinfo:
        make(tmp_path, gradient_accumulation_steps=accum, **kwargs)
    message = str(excinfo.value)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations"):
        assert name in message
    suggested = re.search(r"gradient_accumulation_steps=(\d+)", message)
    assert suggested, message
    cfg = make(tmp_path, gradient_accumulation_steps=int(suggested.group(1)), **kwargs)
    assert cfg.generation_batch_size % num_generations == 0


# ---------------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------------

# (kwargs, name that must appear in the message). Batch sizes keep whole groups so only the bad field is wrong.
INVALID = [
    ({"num_generations": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}, "num_generations"),
    ({"num_generations": 0, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}, "num_generations"),
    ({"sde_type": "ode"}, "sde_type"),
    ({"kl_type": "reverse"}, "kl_type"),
    ({"loss_type": "ppo"}, "loss_type"),
    ({"ref_model_sync_steps": 0}, "ref_model_sync_steps"),
    ({"ref_model_sync_steps": 10, "beta": 0.0}, "ref_model_sync_steps"),
    ({"loss_type": "grpo_guard", "sde_type": "cps"}, "grpo_guard"),
    ({"preference_std_scope": "global"}, "preference_std_scope"),
    ({"scale_rewards": "global"}, "scale_rewards"),
    ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation"),
    ({"timestep_fraction": 0.0}, "timestep_fraction"),
    ({"timestep_fraction": -0.5}, "timestep_fraction"),
    ({"timestep_fraction": 1.5}, "timestep_fraction"),
    ({"num_inference_steps": 1, "timestep_fraction": 0.99}, "timestep_fraction"),
    ({"num_inference_steps": 3, "timestep_fraction": 0.2}, "timestep_fraction"),
    ({"noise_level": 0.0}, "noise_level"),
    ({"noise_level": -0.7}, "noise_level"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"epsilon": -1e-4}, "epsilon"),
    ({"epsilon_high": -1e-4}, "epsilon_high"),
    ({"beta": -0.01}, "beta"),
    ({"auto_find_batch_size": True}, "auto_find_batch_size"),
    ({"adv_clip_max": 0.0}, "adv_clip_max"),
    ({"num_iterations": 0}, "num_iterations"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"eval_num_inference_steps": 0}, "eval_num_inference_steps"),
    ({"height": 0}, "height"),
]


@pytest.mark.parametrize("kwargs, name", INVALID, ids=[f"{n}={list(k.values())[-1]}" for k, n in INVALID])
def test_invalid_values_raise_naming_the_field(tmp_path, kwargs, name):
    with pytest.raises(ValueError) as excinfo:
        make(tmp_path, **kwargs)
    assert name in str(excinfo.value)


def test_boundary_values_are_accepted(tmp_path):
    cfg = make(
        tmp_path,
        num_generations=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        timestep_fraction=1.0,
        beta=0.0,
        noise_level=1e-3,
        sde_type="cps",
        kl_type="velocity",
        scale_rewards="batch",
        multi_objective_aggregation="normalize_then_sum",
    )
    assert cfg.num_sde_steps == cfg.num_inference_steps
    assert cfg.beta == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(True, "group"), (False, "none"), ("batch", "batch"), ("none", "none")])
def test_scale_rewards_bool_maps_to_mode(tmp_path, value, expected):
    assert make(tmp_path, scale_rewards=value).scale_rewards == expected


def test_loss_and_win_rate_std_defaults_keep_the_plain_recipes(tmp_path):
    cfg = make(tmp_path)
    assert (cfg.loss_type, cfg.preference_std_scope, cfg.preference_std_bessel) == ("flow_grpo", "group", False)
    guard = make(tmp_path, loss_type="grpo_guard", preference_std_scope="batch", preference_std_bessel=True)
    assert (guard.loss_type, guard.epsilon, guard.epsilon_high) == ("grpo_guard", 1e-4, 1e-4)


def test_epsilon_high_defaults_to_epsilon(tmp_path):
    cfg = make(tmp_path, epsilon=3e-5)
    assert cfg.epsilon_high == 3e-5
    cfg = make(tmp_path, epsilon=3e-5, epsilon_high=2e-4)
    assert (cfg.epsilon, cfg.epsilon_high) == (3e-5, 2e-4)


# ---------------------------------------------------------------------------------------------------------------------
# documentation
# ---------------------------------------------------------------------------------------------------------------------


def test_added_fields_exist():
    names = {f.name for f in added_fields()}
    assert {"num_generations", "beta", "noise_level", "scale_rewards", "timestep_fraction"} <= names


@pytest.mark.parametrize("field", added_fields(), ids=lambda f: f.name)
def test_every_added_field_is_documented(field):
    assert f"{field.name} (`" in FlowGRPOConfig.__doc__, f"{field.name} is missing from the class docstring"
    assert field.metadata.get("help", "").strip(), f"{field.name} has no metadata help"


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def test_hf_argument_parser_parses_the_config(tmp_path):
    parser = transformers.HfArgumentParser(FlowGRPOConfig)
    args = [
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(tmp_path),
        "--report_to",
        "none",
    ]
    (cfg,) = parser.parse_args_into_dataclasses(args)
    assert isinstance(cfg, FlowGRPOConfig)
    assert cfg.num_generations == 4
    assert cfg.per_device_train_batch_size == 4
    assert cfg.output_dir == str(tmp_path)
    assert cfg.generation_batch_size % 4 == 0
    assert cfg.noise_level == 0.7  # untouched defaults survive


def test_trl_style_yaml_with_generation_batch_size_parses(tmp_path):
    from trl import TrlParser

    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"output_dir: {tmp_path}\nreport_to: none\nnum_generations: 4\nper_device_train_batch_size: 2\n"
        "gradient_accumulation_steps: 4\ngeneration_batch_size: 8\n",
        encoding="utf-8",
    )
    (cfg,) = TrlParser(FlowGRPOConfig).parse_args_and_config(["--config", str(path)])
    assert (cfg.generation_batch_size, cfg.steps_per_generation) == (8, 4)


def test_hf_argument_parser_parses_lists_and_bool_scale_rewards(tmp_path):
    parser = transformers.HfArgumentParser(FlowGRPOConfig)
    args = ["--output_dir", str(tmp_path), "--report_to", "none", "--reward_weights", "1.0", "0.5"]
    (cfg,) = parser.parse_args_into_dataclasses(args + ["--scale_rewards", "false", "--sde_type", "cps"])
    assert cfg.reward_weights == [1.0, 0.5]
    assert cfg.scale_rewards == "none"
    assert cfg.sde_type == "cps"
