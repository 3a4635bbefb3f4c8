"""Reward strings resolved as TRL resolves them: known reward models' Hub ids map to their built-in, a URL gives the
reward-server client, anything else keeps the clear error."""

from __future__ import annotations

import pytest

from trl_flow_grpo import FlowGRPOConfig
from trl_flow_grpo.rewards import REWARD_FUNCS, resolve_reward_func, reward_func_name
from trl_flow_grpo.rewards.base import MISSING_BUILTINS, REWARD_MODEL_IDS
from trl_flow_grpo.rewards.remote import DEFAULT_TOKEN_ENV, RemoteReward
from trl_flow_grpo.scoring import Scorer


@pytest.mark.parametrize("model_id", ["yuvalkirstain/PickScore_v1", "YuvalKirstain/pickscore_v1"])
def test_pickscore_hub_id_is_the_pickscore_builtin(model_id):
    assert resolve_reward_func(model_id) is REWARD_FUNCS["pickscore"]
    assert reward_func_name(model_id) == "pickscore"


def test_a_hub_id_in_a_run_logs_under_the_builtins_name(tmp_path):
    args = FlowGRPOConfig(output_dir=str(tmp_path), report_to="none", num_generations=2)
    scorer = Scorer(["yuvalkirstain/PickScore_v1", "jpeg_compressibility"], None, args)
    assert scorer.reward_func_names == ["pickscore", "jpeg_compressibility"]


def test_every_hub_id_names_a_builtin_or_a_known_missing_one():
    for model_id, builtin in REWARD_MODEL_IDS.items():
        assert builtin in REWARD_FUNCS or builtin in MISSING_BUILTINS, (model_id, builtin)
    stale = set(MISSING_BUILTINS) & set(REWARD_FUNCS)
    assert not stale, f"{stale} are built-ins now: remove them from MISSING_BUILTINS"


@pytest.mark.parametrize(
    "model_id, builtin",
    [("THUDM/ImageReward", "image_reward"), ("xswu/HPSv2", "hpsv2"), ("thudm/imagereward", "image_reward")],
)
def test_image_reward_and_hpsv2_hub_ids_are_their_builtins(model_id, builtin):
    assert resolve_reward_func(model_id) is REWARD_FUNCS[builtin]
    assert reward_func_name(model_id) == builtin


def test_hub_id_of_a_missing_builtin_says_what_is_missing(monkeypatch):
    from trl_flow_grpo.rewards import base

    monkeypatch.setitem(base.REWARD_MODEL_IDS, "someone/FutureReward", "future_reward")
    monkeypatch.setitem(base._REWARD_MODEL_IDS_LOWER, "someone/futurereward", "future_reward")
    monkeypatch.setitem(base.MISSING_BUILTINS, "future_reward", "FutureReward (its package is `future-reward`)")
    with pytest.raises(ValueError) as info:
        resolve_reward_func("someone/FutureReward")
    message = str(info.value)
    assert "'someone/FutureReward'" in message and "'future_reward'" in message
    assert "does not ship that built-in yet" in message and "future-reward" in message
    with pytest.raises(ValueError, match="does not ship"):
        reward_func_name("someone/FutureReward")


def test_unknown_strings_keep_the_error_listing_the_choices():
    with pytest.raises(ValueError) as info:
        resolve_reward_func("someone/unknown-reward-model")
    message = str(info.value)
    assert "'someone/unknown-reward-model'" in message
    for name in [*REWARD_FUNCS, *REWARD_MODEL_IDS]:
        assert repr(name) in message
    assert "http(s) URL" in message


@pytest.mark.parametrize(
    "url, endpoint",
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/score"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/score"),
        ("https://rewards.example.com/v1/score", "https://rewards.example.com/v1/score"),
    ],
)
def test_a_url_gives_the_remote_client(url, endpoint, monkeypatch):
    monkeypatch.setenv(DEFAULT_TOKEN_ENV, "secret-from-env")
    reward = resolve_reward_func(url)
    assert isinstance(reward, RemoteReward)
    assert reward.url == endpoint
    assert reward._token == "secret-from-env"
    assert "secret-from-env" not in repr(reward)
    assert reward_func_name(url) == "remote"


def test_import_paths_still_resolve():
    assert (
        resolve_reward_func("trl_flow_grpo.rewards.compression:jpeg_compressibility")
        is REWARD_FUNCS["jpeg_compressibility"]
    )
