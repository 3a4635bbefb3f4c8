"""pyproject.toml declares what the installed dependencies really need: a Python and lower bounds that are not below
those of trl / transformers / diffusers (pip would otherwise resolve an environment that cannot import them), and no
runtime dependency that the library never imports."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
UPSTREAM = ("trl", "transformers", "diffusers")
IMPORT_NAMES = {"pillow": "PIL", "huggingface-hub": "huggingface_hub"}


def _lower_bound(specifier: SpecifierSet) -> Version | None:
    """The smallest version `specifier` allows, as far as its `>=`, `>`, `==` and `~=` clauses say."""
    bounds = [Version(s.version) for s in specifier if s.operator in (">=", ">", "==", "~=")]
    return max(bounds) if bounds else None


def _declared() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["dependencies"])}


def _runtime_requirements(distribution: str) -> list[Requirement]:
    """The requirements of an installed distribution that apply without extras."""
    requirements = [Requirement(text) for text in importlib.metadata.requires(distribution) or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


@pytest.mark.parametrize("distribution", UPSTREAM)
def test_requires_python_is_not_below_an_upstream_minimum(distribution):
    ours = _lower_bound(SpecifierSet(PROJECT["requires-python"]))
    theirs = _lower_bound(SpecifierSet(importlib.metadata.metadata(distribution)["Requires-Python"] or ""))
    assert theirs is None or (ours is not None and ours >= theirs), (
        f"requires-python is {PROJECT['requires-python']!r}, but the installed {distribution} "
        f"{importlib.metadata.version(distribution)} needs Python >= {theirs}"
    )


@pytest.mark.parametrize("distribution", UPSTREAM)
def test_shared_dependencies_are_not_below_an_upstream_minimum(distribution):
    declared = _declared()
    too_low = []
    for requirement in _runtime_requirements(distribution):
        ours = declared.get(canonicalize_name(requirement.name))
        theirs = _lower_bound(requirement.specifier)
        if ours is None or theirs is None or _lower_bound(ours.specifier) is None:
            continue  # not shared, or no minimum stated on one side (pip then applies upstream's own)
        if _lower_bound(ours.specifier) < theirs:
            too_low.append(f"{ours} (the installed {distribution} needs {requirement})")
    assert not too_low, "declared lower bounds below what upstream requires: " + "; ".join(too_low)


def test_every_runtime_dependency_is_imported_by_the_library():
    sources = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "trl_flow_grpo").rglob("*.py"))
    unused = []
    for name in _declared():
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from) {re.escape(module)}\b", sources, flags=re.MULTILINE):
            unused.append(name)
    assert not unused, f"declared in [project] dependencies but never imported by trl_flow_grpo: {unused}"
