"""benchmarks/shapes_learning.py: the drift control's reward carries no task signal, and the strict table lists only
the runs whose evaluation recorded extra objects."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trl_flow_grpo.toy.shapes import Scene, ShapeObject, render

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("shapes_learning", ROOT / "benchmarks" / "shapes_learning.py")
sl = importlib.util.module_from_spec(_spec)
sys.modules["shapes_learning"] = sl
_spec.loader.exec_module(sl)


def test_random_control_ignores_the_caption_and_is_reproducible():
    right = render(Scene("a red circle", "single_object", [ShapeObject("circle", "red", 16, 16, 6)]), size=32)
    blank = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    scores = sl.random_control(["a red circle", "a blue square", "a red circle"], [right, right, blank])
    assert scores[0] == scores[1]  # the same image scores the same whatever its caption
    assert scores[0] != scores[2]
    assert all(0.0 <= s < 1.0 for s in scores)
    assert sl.random_control(["x"], [blank]) == [scores[2]]
    many = sl.random_control(["x"] * 200, [Image.fromarray(np.full((4, 4, 3), i, np.uint8)) for i in range(200)])
    assert 0.4 < np.mean(many) < 0.6 and len(set(many)) == 200  # spread over [0, 1), not a task score
    assert sl.REWARDS["random_control"] is sl.random_control


def _estimate(value: float) -> dict:
    return {"value": value, "low": value - 0.01, "high": value + 0.01}


def _run(seed: int, strict: bool) -> dict:
    keys = ["accuracy"] + (["strict_accuracy", "extra_objects"] if strict else [])
    curve = [{"step": 0, "accuracy": 0.3, **({"strict_accuracy": 0.2} if strict else {})}]
    return {
        "seed": seed,
        "optimizer_steps": 10,
        "curve": curve,
        "before": {"estimates": {k: _estimate(0.3) for k in keys}},
        "after": {"estimates": {k: _estimate(0.4) for k in keys}},
        "change": {k: _estimate(0.1) for k in keys},
    }


def test_strict_table_lists_runs_with_strict_keys_only(capsys):
    sl.strict_table([{"overrides": ["reward=x"], "runs": [_run(0, strict=True), _run(1, strict=False)]}])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `reward=x`")]
    assert rows == [
        "| `reward=x` | 0 | 10 | 0.300 -> 0.400 (+0.100 [+0.090, +0.110]) | 0.300 -> 0.400 (+0.100 "
        "[+0.090, +0.110]) | 0.300 -> 0.400 (+0.100 [+0.090, +0.110]) | 0.200 |"
    ]
    sl.strict_table([{"overrides": [], "runs": [_run(0, strict=False)]}])
    assert capsys.readouterr().out == ""  # no table for runs from before strict accuracy was recorded


def _evaluated(seed: int, correct: float, extra: float) -> dict:
    """A run whose final evaluation has 4 captions x 2 images, `correct` and `extra` the share of each."""
    prompts = ["a red circle", "a blue square", "two red circles", "a red circle left of a blue square"]
    categories = ["single_object", "single_object", "counting", "position"]
    scores = [[1.0 if (i * 2 + k) < correct * 8 else 0.0 for k in range(2)] for i in range(4)]
    extras = [[1.0 if (i * 2 + k) < extra * 8 else 0.0 for k in range(2)] for i in range(4)]
    after = {"prompts": prompts, "categories": categories, "scores": scores, "extras": extras, "settings": {"k": 2}}
    return {"seed": seed, "optimizer_steps": 10, "after": after}


def test_control_table_pairs_each_run_with_the_control_of_its_settings_seed_and_steps(capsys):
    control = {"overrides": ["beta=0.04", "reward=random_control"], "runs": [_evaluated(0, 0.25, 0.5)]}
    arm = {"overrides": ["reward=shapes_geneval_strict", "beta=0.04"], "runs": [_evaluated(0, 0.75, 0.0)]}
    other_seed = {"overrides": ["beta=0.04", "reward=x"], "runs": [_evaluated(1, 1.0, 0.0)]}
    other_settings = {"overrides": ["reward=x"], "runs": [_evaluated(0, 1.0, 0.0)]}
    longer = {**_evaluated(0, 1.0, 0.0), "optimizer_steps": 20}
    other_steps = {"overrides": ["beta=0.04", "reward=x"], "runs": [longer]}
    sl.control_table([arm, other_seed, other_settings, other_steps, control], [control])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == 1  # no control for seed 1, other settings or 20 steps; the control is not its own arm
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[:3] == ["`reward=shapes_geneval_strict`, `beta=0.04`", "0", "10"]
    assert cells[3].startswith("+0.500 [") and cells[5].startswith("-0.500 [")  # accuracy and extras: arm - control
    assert cells[4].startswith("+0.750 [")  # strict: 0.75 - 0.0 (the control's 2 correct images both have extras)


def test_a_base_loaded_from_another_folder_of_the_same_name_is_the_same_base(capsys):
    """The rows name the base by its last two path parts, so that a control run from the shipped copy of the
    longer-pretrained base (benchmarks/assets) pairs with an arm that loaded it from /tmp; another base does not."""
    control = {
        "overrides": ["reward=random_control", "base_transformer=benchmarks/assets/longer_base/transformer"],
        "runs": [_evaluated(0, 0.25, 0.5)],
    }
    arm = {
        "overrides": ["reward=shapes_geneval_strict", "base_transformer=/tmp/longer_base/transformer"],
        "runs": [_evaluated(0, 0.75, 0.0)],
    }
    other_base = {"overrides": ["reward=x", "base_transformer=/tmp/other/transformer"], "runs": [_evaluated(0, 1, 0)]}
    sl.control_table([arm, other_base], [control])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == 1
    assert rows[0].startswith("| `reward=shapes_geneval_strict`, `base_transformer=longer_base/transformer` | 0 |")


def test_the_shipped_longer_pretrained_base_is_the_one_its_readme_names_and_loads_over_the_shapes_model():
    """The study's base (benchmarks/assets/longer_base) is reproducible from the repository: its weights are the ones
    whose sha256 the README gives, and they load as a transformer of the shipped model's architecture."""
    import hashlib
    import re

    from diffusers import SD3Transformer2DModel

    from trl_flow_grpo.toy.model import SHAPES_MODEL_PATH

    folder = ROOT / "benchmarks" / "assets" / "longer_base"
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    (named,) = re.findall(r"sha256\s+`([0-9a-f]{64})`", (folder / "README.md").read_text(encoding="utf-8"))
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == named
    longer = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    shipped = SD3Transformer2DModel.from_pretrained(Path(SHAPES_MODEL_PATH) / "transformer")
    architecture = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (longer, shipped)]
    assert architecture[0] == architecture[1]
    assert not all(torch.equal(a, b) for a, b in zip(longer.state_dict().values(), shipped.state_dict().values()))
