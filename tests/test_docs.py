"""The documentation stays true to the code: the configuration reference is generated from `FlowGRPOConfig` and up
to date, every field is documented in the class docstring, and the mkdocs site builds without warnings."""

import ast
import dataclasses
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_flow_grpo import FlowGRPOConfig
from trl_flow_grpo.cli import TrainScriptArguments

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _public_fields(cls):
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def test_the_committed_reference_is_up_to_date():
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == gen.generate(), "docs/configuration.md is stale: run `python docs/gen_config_reference.py`"


def test_every_added_field_is_in_the_reference_with_its_help():
    reference = gen.generate()
    added, changed = gen.config_fields()
    assert {f.name for f in added} >= {"num_generations", "beta", "sde_window", "noise_level"}
    for f in added:
        assert f"### `{f.name}`" in reference, f.name
        help_text = f.metadata.get("help")
        assert help_text, f"FlowGRPOConfig.{f.name} has no metadata['help']"
        assert help_text in reference, f"the help of {f.name} is missing from the reference"
    for f, _ in changed:
        assert f"| `{f.name}` |" in reference, f.name
        assert f.metadata.get("help", "") in reference


def test_changed_defaults_are_detected():
    _, changed = gen.config_fields()
    names = {f.name for f, _ in changed}
    assert {"learning_rate", "lr_scheduler_type", "remove_unused_columns", "logging_steps"} <= names
    assert "output_dir" not in names


def _check_docstring(cls, fields):
    entries = gen.parse_docstring_parameters(cls.__doc__)
    missing = [f.name for f in fields if f.name not in entries]
    assert not missing, f"{cls.__name__} fields not documented in its docstring's Parameters section: {missing}"
    stale = [name for name in entries if name not in {f.name for f in _public_fields(cls)}]
    assert not stale, f"{cls.__name__}'s docstring documents fields that do not exist: {stale}"
    for f in fields:
        entry = entries[f.name]
        assert entry.description, f"{cls.__name__}.{f.name} has an empty description in the docstring"
        if entry.default is not None:  # "defaults to `value`" must be the real default
            documented = ast.literal_eval(entry.default.strip("`"))
            actual = gen.field_default(f)
            assert documented == actual, f"{cls.__name__}.{f.name}: docstring says {documented!r}, code {actual!r}"


def test_every_field_added_by_flow_grpo_config_is_documented_in_its_docstring():
    added, changed = gen.config_fields()
    _check_docstring(FlowGRPOConfig, added)
    # The changed TrainingArguments defaults are listed in the docstring's closing paragraph.
    for f, _ in changed:
        assert f"`{f.name}" in FlowGRPOConfig.__doc__, f"changed default {f.name} is not mentioned in the docstring"


def test_every_script_argument_is_documented_in_its_docstring():
    _check_docstring(TrainScriptArguments, _public_fields(TrainScriptArguments))
    for f in _public_fields(TrainScriptArguments):
        assert f.metadata.get("help"), f"TrainScriptArguments.{f.name} has no metadata['help']"


def test_the_docstring_parser_fails_on_an_undocumented_field():
    @dataclasses.dataclass
    class Config(FlowGRPOConfig):
        __doc__ = FlowGRPOConfig.__doc__
        brand_new_knob: int = dataclasses.field(default=3, metadata={"help": "A knob."})

    entries = gen.parse_docstring_parameters(Config.__doc__)
    assert "num_generations" in entries and "brand_new_knob" not in entries
    with pytest.raises(AssertionError, match="brand_new_knob"):
        _check_docstring(Config, [f for f in dataclasses.fields(Config) if f.name == "brand_new_knob"])


def test_docstring_parser_reads_groups_types_and_defaults():
    doc = """Summary.

    Parameters:
        > Parameters that control the model

        alpha (`int`, *optional*, defaults to `3`):
            First line
            second line.
        beta (`str` or `bool`, *optional*):
            Text.

        > Parameters that control logging

        gamma (`list[float]`):
            More.

    Other text.
    """
    entries = gen.parse_docstring_parameters(doc)
    assert list(entries) == ["alpha", "beta", "gamma"]
    assert entries["alpha"].type == "`int`" and entries["alpha"].default == "`3`"
    assert entries["alpha"].description == "First line second line."
    assert entries["alpha"].group == "Parameters that control the model"
    assert entries["beta"].type == "`str` or `bool`" and entries["beta"].default is None
    assert entries["gamma"].group == "Parameters that control logging"


def _nav_files(nav):
    for item in nav:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for value in item.values():
                yield from _nav_files(value) if isinstance(value, list) else [value]


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = list(_nav_files(config["nav"]))
    pages = sorted(path.name for path in DOCS.glob("*.md"))
    assert sorted(nav) == pages
    for name in ("installation.md", "configuration.md", "multi_gpu.md", "pref_grpo.md", "troubleshooting.md"):
        assert name in nav


@pytest.mark.skipif(
    shutil.which("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason='needs the docs extra: pip install -e ".[docs]"',
)
def test_the_site_builds_in_strict_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


# What the installed libraries deprecate, with the current spelling the docs use instead.
DEPRECATED_USAGE = {
    r"\.getdata\(\)": "Pillow 12.1 deprecates Image.getdata (removed in 14): use numpy, e.g. np.asarray(image)",
    r"from_pretrained\([^)]*\btorch_dtype=": "diffusers and transformers take `dtype=` (torch_dtype warns)",
    r"[\"']torch_dtype[\"']\s*:|^\s*torch_dtype:": "model_init_kwargs go to from_pretrained: use `dtype`",
    r"gradient_checkpointing\s*=\s*(True|cli\.)|gradient_checkpointing:\s*true|--gradient_checkpointing\b": (
        "transformers renamed it `activation_checkpointing` (the old name warns and goes in v6)"
    ),
}


def _user_facing_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((ROOT / "examples").glob("*.*"))]


@pytest.mark.parametrize(
    "pattern", DEPRECATED_USAGE, ids=["getdata", "from_pretrained", "init_kwargs", "checkpointing"]
)
def test_docs_and_examples_use_current_apis(pattern):
    import re

    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _user_facing_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if re.search(pattern, line)
    ]
    assert not hits, f"{DEPRECATED_USAGE[pattern]}:\n" + "\n".join(hits)


def test_the_documented_checkpointing_flag_does_not_warn(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = FlowGRPOConfig(output_dir=str(tmp_path), report_to="none", activation_checkpointing=True)
    assert config.gradient_checkpointing  # the old name mirrors it, which the trainer reads
