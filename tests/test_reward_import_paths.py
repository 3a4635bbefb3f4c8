"""Tests for naming user reward functions by import path ("pkg.module.func" / "pkg.module:func")."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
from PIL import Image

from trl_flow_grpo.rewards import REWARD_FUNCS, call_reward_funcs, resolve_reward_func, reward_func_name

MODULE_SOURCE = """
class Scorer:
    def __init__(self, value):
        self.value = value

    def __call__(self, prompts, images, **kwargs):
        return [self.value] * len(prompts)


def prompt_length(prompts, images, **kwargs):
    return [float(len(p)) for p in prompts]


class Namespace:
    @staticmethod
    def nested(prompts, images, **kwargs):
        return [-1.0] * len(prompts)


scorer = Scorer(0.5)
NOT_CALLABLE = 3
"""


@pytest.fixture
def user_rewards(tmp_path, monkeypatch) -> str:
    """A package `user_pkg_rewards_test.rewards` written to tmp_path and importable; returns the module's name."""
    package = tmp_path / "user_pkg_rewards_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rewards.py").write_text(textwrap.dedent(MODULE_SOURCE))
    (package / "broken.py").write_text("import a_module_that_does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [name for name in sys.modules if name.startswith("user_pkg_rewards_test")]:
        monkeypatch.delitem(sys.modules, name)
    yield "user_pkg_rewards_test.rewards"
    for name in [name for name in sys.modules if name.startswith("user_pkg_rewards_test")]:
        del sys.modules[name]


def test_dotted_and_colon_paths_resolve_to_the_module_attribute(user_rewards):
    module = importlib.import_module(user_rewards)
    assert resolve_reward_func(f"{user_rewards}.prompt_length") is module.prompt_length
    assert resolve_reward_func(f"{user_rewards}:prompt_length") is module.prompt_length
    assert resolve_reward_func(f"{user_rewards}.scorer") is module.scorer  # a callable instance
    assert resolve_reward_func(f"{user_rewards}:Namespace.nested") is module.Namespace.nested
    assert resolve_reward_func("trl_flow_grpo.rewards.compression.jpeg_size_kb").__name__ == "jpeg_size_kb"


def test_reward_func_name_of_a_path_is_the_functions_name(user_rewards):
    assert reward_func_name(f"{user_rewards}.prompt_length") == "prompt_length"
    assert reward_func_name(f"{user_rewards}:scorer") == "Scorer"  # an instance: its class name
    assert reward_func_name(f"{user_rewards}:Namespace.nested") == "nested"
    # A path to a built-in object gets the built-in's registry name.
    assert reward_func_name("trl_flow_grpo.rewards.compression.jpeg_compressibility") == "jpeg_compressibility"


def test_paths_work_in_call_reward_funcs(user_rewards):
    prompts = ["ab", "abcd"]
    images = [Image.new("RGB", (8, 8))] * 2
    rewards = call_reward_funcs([f"{user_rewards}.prompt_length", f"{user_rewards}:scorer"], prompts, images)
    assert rewards.tolist() == [[2.0, 0.5], [4.0, 0.5]]


def test_failing_import_names_the_path(user_rewards):
    with pytest.raises(ImportError, match=r"'user_pkg_rewards_test\.missing\.func'.*No module named") as info:
        resolve_reward_func("user_pkg_rewards_test.missing.func")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    # A module whose own imports fail: the path and the underlying error are both reported.
    with pytest.raises(ImportError, match=r"'user_pkg_rewards_test\.broken\.f'.*a_module_that_does_not_exist_xyz"):
        resolve_reward_func("user_pkg_rewards_test.broken.f")


def test_bad_attribute_class_and_non_callable_are_rejected(user_rewards):
    with pytest.raises(ValueError, match=r"has no attribute 'no_such_reward'"):
        resolve_reward_func(f"{user_rewards}.no_such_reward")
    with pytest.raises(TypeError, match="is a class"):
        resolve_reward_func(f"{user_rewards}.Scorer")
    with pytest.raises(TypeError, match="not callable"):
        resolve_reward_func(f"{user_rewards}:NOT_CALLABLE")


@pytest.mark.parametrize("path", ["pkg.", ".pkg.func", "pkg..func", "pkg:a:b", "pkg:", "my-pkg.func", "a b.c"])
def test_malformed_paths_raise_value_error(path):
    with pytest.raises(ValueError, match="Invalid reward function import path"):
        resolve_reward_func(path)


def test_plain_unknown_names_still_list_the_builtins():
    with pytest.raises(ValueError, match="Unknown reward function 'nope'") as info:
        resolve_reward_func("nope")
    assert all(name in str(info.value) for name in REWARD_FUNCS)
    assert "import path" in str(info.value)
