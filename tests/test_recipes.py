"""Every YAML recipe in examples/ parses with the parser of `trl-flow-grpo train`, so a misspelt or removed field
fails here rather than at the start of a GPU job. Nothing is trained or downloaded."""

from pathlib import Path

import pytest
import yaml

from trl_flow_grpo.cli import _parser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = sorted(EXAMPLES.glob("*.yaml"))


def test_there_are_recipes():
    names = {path.name for path in RECIPES}
    for name in ("sd35_geneval.yaml", "sd35_ocr.yaml", "sd35_pickscore.yaml", "sd35_mixgrpo.yaml"):
        assert name in names
    assert "sd35_pref_grpo.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=[path.name for path in RECIPES])
def test_recipe_parses_with_the_cli_parser(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict), f"{path.name} must be a YAML mapping"
    # Unknown keys raise in TrlParser ("Unknown arguments from config file"); invalid values raise in
    # FlowGRPOConfig.__post_init__ (e.g. a batch that is not a multiple of num_generations on one process).
    script_args, config = _parser(demo=False).parse_args_and_config(["--config", str(path)])

    # Every key reached its dataclass with the value written in the file.
    for key, value in raw.items():
        if key == "env":
            continue
        target = script_args if hasattr(script_args, key) else config
        assert hasattr(target, key), f"{path.name}: {key!r} is not a field"
        parsed = getattr(target, key)
        if key == "report_to":
            parsed = [] if parsed in ("none", ["none"]) else parsed
            value = [] if value in ("none", ["none"]) else ([value] if isinstance(value, str) else value)
        if hasattr(parsed, "value"):  # enums such as lr_scheduler_type, eval_strategy, save_strategy
            parsed = parsed.value
        assert parsed == value, f"{path.name}: {key} = {value!r} in the file, {parsed!r} after parsing"

    # A recipe for a real model names a dataset and at least one reward or preference function.
    if script_args.model_name_or_path is not None:
        assert script_args.dataset_name, f"{path.name} needs dataset_name"
        assert script_args.reward_funcs or getattr(script_args, "preference_funcs", None)


SHAPES_RECIPE_FILE = EXAMPLES / "shapes_grpo.yaml"


def test_the_shapes_recipe_is_the_demos():
    """examples/shapes_grpo.yaml holds the shapes world's recipe and the demo's settings: when the recipe in
    trl_flow_grpo/toy/recipe.py changes, this file must change with it."""
    from trl_flow_grpo.cli import DEMO_OVERRIDES
    from trl_flow_grpo.toy.recipe import SHAPES_RECIPE

    raw = yaml.safe_load(SHAPES_RECIPE_FILE.read_text(encoding="utf-8"))
    expected = {**SHAPES_RECIPE, **DEMO_OVERRIDES}
    assert {key: raw.get(key) for key in expected} == expected
    assert raw["model_name_or_path"] == raw["dataset_name"] == "builtin:shapes"


def test_the_shapes_recipe_trains_offline(tmp_path, capsys, monkeypatch):
    """The offline recipe runs as written (HF_HUB_OFFLINE=1), shrunk to two tiny steps from the command line."""
    import huggingface_hub.constants

    from trl_flow_grpo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    main(
        ["train", "--config", str(SHAPES_RECIPE_FILE), "--output_dir", str(tmp_path), "--max_steps", "2"]
        + ["--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
        + ["--num_inference_steps", "2", "--eval_num_inference_steps", "1", "--logging_steps", "1"]
        + ["--disable_tqdm", "true"]
    )
    out = capsys.readouterr().out
    assert "step    2/2 | reward" in out
    assert "eval_rewards/shapes_geneval/mean" in out  # held-out reward before and after
    assert (tmp_path / "transformer" / "config.json").is_file()


@pytest.mark.parametrize("name", ["flux_kontext_edit.yaml", "qwen_image_edit_plus.yaml"])
def test_the_editing_recipes_rewards_resolve_and_read_the_source(name, monkeypatch):
    """The editing recipes name the example script's rewards by import path (with PYTHONPATH=examples, as their
    header says): they resolve, and the source-preservation reward scores an edit against its own source."""
    from PIL import Image

    from trl_flow_grpo.rewards import resolve_reward_func

    monkeypatch.syspath_prepend(str(EXAMPLES))
    raw = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    assert raw["source_image_column"] == "image" and len(raw["reward_weights"]) == len(raw["reward_funcs"])
    funcs = [resolve_reward_func(reward) for reward in raw["reward_funcs"]]
    preservation = funcs[[r.endswith("source_preservation") for r in raw["reward_funcs"]].index(True)]
    red, black = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8))
    assert preservation(images=[red, red], source_images=[red, black]) == pytest.approx([1.0, 2 / 3])
