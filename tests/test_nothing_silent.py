"""Issue 14: every bad input and damaged file gets a clear error (or a one-line warning), and no secret leaves.

One test (or parametrized family) per class of case: bad config values, bad data, bad reward returns, non-finite
training values, hangs with a timeout, a hostile judge server on 127.0.0.1, damaged checkpoints, secret redaction,
the distributed launch check and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image
from test_resume import make_trainer, trained_weights
from test_trainer import make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.checkpoint_integrity import MANIFEST_NAME, DamagedCheckpointError, verify_checkpoint
from trl_flow_grpo.cli import main
from trl_flow_grpo.file_names import TRAINING_ARGS_NAME
from trl_flow_grpo.finite import NonFiniteError, check_finite
from trl_flow_grpo.hub import save_training_args
from trl_flow_grpo.rewards import OpenAIJudge, call_reward_funcs, with_timeout
from trl_flow_grpo.rewards.judge import JudgeRequestError
from trl_flow_grpo.rewards.preferences import call_preference_funcs
from trl_flow_grpo.validation import check_launch


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L")).mean() / 255.0) for image in images]


def make(tmp_path, **kwargs) -> FlowGRPOConfig:
    return FlowGRPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


# --------------------------------------------------------------------------------------------- bad config values

BAD_CONFIG = [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"max_sequence_length": -1}, "max_sequence_length"),
    ({"max_steps": 0}, "max_steps"),
    ({"num_train_epochs": 0}, "num_train_epochs"),
    ({"guidance_scale": -3.0}, "guidance_scale"),
    ({"num_images_to_log": -1}, "num_images_to_log"),
    ({"learning_rate": -1e-4}, "learning_rate"),
    ({"reward_weights": [1.0, math.nan]}, "reward_weights[1]"),
    ({"preference_weights": [math.inf]}, "preference_weights[0]"),
    ({"noise_level": math.nan}, "noise_level"),
    ({"adv_clip_max": math.nan}, "adv_clip_max"),
    ({"beta": math.inf}, "beta"),
    ({"preference_temperature": math.nan}, "preference_temperature"),
    ({"reward_timeout": 0.0}, "reward_timeout"),
    ({"model_init_kwargs": {"torch_dtype": "bfloat61"}}, "Did you mean 'bfloat16'"),
    ({"model_init_kwargs": {"dtype": "float23"}}, "'float32'"),
]


@pytest.mark.parametrize("kwargs, expected", BAD_CONFIG, ids=[e for _, e in BAD_CONFIG])
def test_bad_config_values_raise_at_construction_naming_the_value(tmp_path, kwargs, expected):
    with pytest.raises(ValueError) as excinfo:
        make(tmp_path, **kwargs)
    assert expected in str(excinfo.value)


def test_learning_rate_zero_is_accepted_with_a_one_line_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_flow_grpo.validation"):
        config = make(tmp_path, learning_rate=0.0)
    assert config.learning_rate == 0.0
    warnings = [r.getMessage() for r in caplog.records if "learning_rate=0" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]


# --------------------------------------------------------------------------------------------- secrets


def test_secrets_never_appear_in_repr_str_dict_json_or_the_saved_args(tmp_path):
    config = make(tmp_path, hub_token="hf_SECRET_1", model_init_kwargs={"token": "hf_SECRET_2", "dtype": "float32"})
    texts = [repr(config), str(config), json.dumps(config.to_dict()), config.to_json_string()]
    save_training_args(config, str(tmp_path))  # the training_args.json an upload carries
    texts.append((tmp_path / TRAINING_ARGS_NAME).read_bytes().decode("latin-1"))
    for text in texts:
        assert "hf_SECRET" not in text
    assert "<REDACTED>" in repr(config) and "model_init_kwargs" in repr(config)
    assert config.hub_token == "hf_SECRET_1" and config.model_init_kwargs["token"] == "hf_SECRET_2"  # still usable


# --------------------------------------------------------------------------------------------- distributed


def test_a_multi_process_launch_that_trains_as_one_process_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*use_cpu=True.*accelerate launch"):
        check_launch(world_size=1)
    check_launch(world_size=2)  # the processes did join one group
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(world_size=1)


# --------------------------------------------------------------------------------------------- bad data


def _streamed():
    return Dataset.from_dict({"prompt": ["a", "b"]}).to_iterable_dataset()


BAD_DATA = [
    (_streamed, TypeError, "IterableDataset"),
    (lambda: [{"prompt": "a red cube"}] * 4, TypeError, "Dataset.from_list"),
    (lambda: ["a red cube"] * 4, TypeError, "Dataset.from_dict"),
    (lambda: {"prompt": ["a red cube"] * 4}, TypeError, "Dataset.from_dict"),
    (lambda: DatasetDict(train=prompt_dataset()), TypeError, "train_dataset['train']"),
    (lambda: Dataset.from_list([{"prompt": "a"}, {"prompt": None}]), TypeError, "row 1 has prompt None"),
    (lambda: Dataset.from_dict({"prompt": [["a", "b"], ["c"]]}), TypeError, "row 0 has prompt ['a', 'b']"),
    (lambda: Dataset.from_dict({"prompt": [1, 2, 3]}), TypeError, "of type int"),
]


@pytest.mark.parametrize("make_dataset, error, expected", BAD_DATA, ids=[e for _, _, e in BAD_DATA])
def test_bad_datasets_raise_at_construction_naming_the_row_or_the_fix(tmp_path, make_dataset, error, expected):
    with pytest.raises(error) as excinfo:  # raised before the model is even loaded
        FlowGRPOTrainer("not/loaded", brightness, args=make_args(tmp_path), train_dataset=make_dataset())
    assert expected in str(excinfo.value)


def test_all_zero_weights_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="nothing is trained"):
        FlowGRPOTrainer(
            "not/loaded", brightness, args=make_args(tmp_path, reward_weights=[0.0]), train_dataset=prompt_dataset()
        )


def test_two_reward_functions_with_the_same_name_get_distinct_metrics(tmp_path, caplog):
    def score(images, **kwargs):
        return [1.0] * len(images)

    other = (lambda: lambda images, **kwargs: [0.0] * len(images))()
    other.__name__ = "score"
    with caplog.at_level(logging.WARNING, logger="trl_flow_grpo.validation"):
        trainer = make_trainer(tmp_path, reward=[score, other], max_steps=1, save_strategy="no")
    assert trainer.reward_func_names == ["score", "score_2"]
    assert "'score_2'" in caplog.text


# --------------------------------------------------------------------------------------------- bad reward returns


def test_a_reward_finite_in_float64_but_inf_in_float32_is_an_error():
    def huge(images, **kwargs):
        return [1.0, 1e39]

    with pytest.raises(ValueError, match=r"'huge' returned 1e\+39 for sample 1, which overflows float32"):
        call_reward_funcs([huge], ["a", "b"], [None, None])


def test_non_finite_advantages_are_an_error_naming_the_step():
    check_finite(torch.tensor([0.5, -0.5]), "advantages", step=3)
    with pytest.raises(NonFiniteError, match=r"Step 4: 1 of the advantages are not finite \(e.g. nan at index 1"):
        check_finite(torch.tensor([0.5, math.nan]), "advantages", step=3)


def test_a_non_finite_gradient_stops_before_the_update_and_saves_the_last_good_step(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, save_steps=100)
    step_loss = trainer._step_loss

    def poisoned(model, inputs, k, step):
        loss = step_loss(model, inputs, k, step)
        return loss * math.nan if trainer.state.global_step == 1 else loss

    trainer._step_loss = poisoned
    with pytest.raises(NonFiniteError, match=r"Step 2: the loss \(nan\) and the gradient of \d+ parameter"):
        trainer.train()
    weights = trained_weights(trainer)
    assert all(torch.isfinite(w).all() for w in weights.values())  # no NaN reached the weights
    assert os.listdir(tmp_path) == ["checkpoint-1"]  # the last good step
    resumed = make_trainer(tmp_path, max_steps=1)
    resumed._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    saved = trained_weights(resumed)
    assert all(torch.equal(weights[name], saved[name]) for name in weights)


# --------------------------------------------------------------------------------------------- hangs


def test_a_sync_reward_that_hangs_times_out_naming_the_function():
    def stuck(images, **kwargs):
        time.sleep(3)
        return [0.0] * len(images)

    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"reward function 'stuck' did not return within reward_timeout=0.2 s"):
        call_reward_funcs([with_timeout(stuck, 0.2, "stuck")], ["a"], [None])
    assert time.perf_counter() - start < 2


def test_an_async_preference_that_hangs_times_out_naming_the_function():
    async def slow_judge(prompts, images_a, images_b, **kwargs):
        await asyncio.sleep(3)
        return [0.5] * len(prompts)

    start = time.perf_counter()
    limited = with_timeout(slow_judge, 0.2, "slow_judge", "preference function")
    with pytest.raises(TimeoutError, match=r"preference function 'slow_judge' did not return .* after 0\.\d s"):
        call_preference_funcs([limited], ["a"], [None], [None])
    assert time.perf_counter() - start < 2


def test_timeouts_leave_fast_functions_and_their_keywords_alone():
    def exact(images, **kwargs):
        return [0.25] * len(images)

    async def named_only(prompts, images):  # no **kwargs: only the keywords it names are passed
        return [0.75] * len(prompts)

    rewards = call_reward_funcs(
        [with_timeout(exact, 5, "exact"), with_timeout(named_only, 5, "named_only")], ["a"], [None], {"x": [1]}
    )
    assert rewards.tolist() == [[0.25, 0.75]]


def test_reward_timeout_stops_training_naming_the_reward(tmp_path):
    def hangs(images, **kwargs):
        time.sleep(5)
        return [0.0] * len(images)

    trainer = make_trainer(tmp_path, reward=hangs, max_steps=1, save_strategy="no", reward_timeout=0.5)
    assert trainer.reward_func_names == ["hangs"]
    with pytest.raises(TimeoutError, match=r"reward function 'hangs' did not return within reward_timeout=0.5 s"):
        trainer.train()


# --------------------------------------------------------------------------------------------- hostile judge server


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, respond):
        super().__init__((host, 0), _Handler)
        self.respond, self.requests = respond, []

    def url(self, host: str | None = None) -> str:
        return f"http://{host or self.server_address[0]}:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append(
            {"path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)}
        )
        status, headers, body = self.server.respond(self)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(respond, host="127.0.0.1"):
        server = _Server(host, respond)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _reply(content, finish_reason="stop"):
    body = {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}]}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _pairs(n=2):
    image = Image.new("RGB", (8, 8))
    return {"prompts": ["a cat"] * n, "images_a": [image] * n, "images_b": [image] * n}


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_the_http_judge_does_not_follow_a_redirect_with_its_api_key(serve, code):
    target = serve(lambda handler: _reply("<answer>Image 1 is better</answer>"))
    # The target is another host name (localhost) on another port: a credential must never travel there.
    location = target.url("localhost") + "/v1/chat/completions"
    hostile = serve(lambda handler: (code, {"Location": location}, b""))
    judge = OpenAIJudge(hostile.url() + "/v1", "m", api_key="sk-SECRET", max_retries=0, backoff=0)
    with pytest.raises(JudgeRequestError, match=rf"HTTP {code}, a redirect to .*not followed") as excinfo:
        asyncio.run(judge(**_pairs(1)))
    assert "sk-SECRET" not in str(excinfo.value)
    assert hostile.requests and hostile.requests[0]["headers"]["Authorization"] == "Bearer sk-SECRET"
    assert target.requests == []  # nothing, let alone the Authorization header, reached the redirect target


def test_a_judge_that_never_gives_a_verdict_warns_once_per_call(serve, caplog):
    server = serve(lambda handler: _reply("Both images are lovely."))
    judge = OpenAIJudge(server.url() + "/v1", "m", max_retries=0)
    with caplog.at_level(logging.WARNING, logger="trl_flow_grpo.rewards.judge"):
        assert asyncio.run(judge(**_pairs(3))) == [0.5, 0.5, 0.5]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "none of the 3 replies held a verdict" in lines[0] and "\n" not in lines[0]


def test_content_null_replies_are_ties_and_the_warning_says_so(serve, caplog):
    server = serve(lambda handler: _reply(None, finish_reason="length"))
    judge = OpenAIJudge(server.url() + "/v1", "m", max_retries=0)
    with caplog.at_level(logging.WARNING, logger="trl_flow_grpo.rewards.judge"):
        assert asyncio.run(judge(**_pairs(2))) == [0.5, 0.5]
    assert judge.last_num_unparsed == 2
    assert "2 with no content (content: null" in caplog.text


def test_a_judge_with_some_verdicts_does_not_warn(serve, caplog):
    answers = iter(["<answer>Image 2 is better</answer>", "no idea"])
    server = serve(lambda handler: _reply(next(answers)))
    judge = OpenAIJudge(server.url() + "/v1", "m", max_retries=0, max_concurrency=1)
    with caplog.at_level(logging.WARNING, logger="trl_flow_grpo.rewards.judge"):
        assert sorted(asyncio.run(judge(**_pairs(2)))) == [0.0, 0.5]
    assert caplog.text == ""


# --------------------------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("saved")
    make_trainer(folder, max_steps=2).train()
    return str(folder / "checkpoint-2")


def _copy(saved: str, tmp_path) -> str:
    target = str(tmp_path / "checkpoint-2")
    shutil.copytree(saved, target)
    return target


def _zero_tail(path: str, size: int = 64) -> None:
    with open(path, "r+b") as f:
        f.seek(-size, os.SEEK_END)
        f.write(b"\0" * size)


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = [
    (lambda folder: os.remove(os.path.join(folder, "optimizer.pt")), "optimizer.pt is missing"),
    (lambda folder: os.remove(os.path.join(folder, "scheduler.pt")), "scheduler.pt is missing"),
    (
        lambda folder: _zero_tail(os.path.join(folder, "pytorch_lora_weights.safetensors")),
        "pytorch_lora_weights.safetensors does not match the checksum",
    ),
    (lambda folder: _truncate(os.path.join(folder, "optimizer.pt")), "optimizer.pt is truncated or changed"),
    (lambda folder: os.remove(os.path.join(folder, "rng_state.pth")), "rng_state.pth is missing"),
]


@pytest.mark.parametrize("damage, expected", DAMAGE, ids=[e.split(" ")[0] + "-" + e.split(" ")[2] for _, e in DAMAGE])
def test_a_damaged_checkpoint_fails_naming_the_file(saved_checkpoint, tmp_path, damage, expected):
    folder = _copy(saved_checkpoint, tmp_path)
    verify_checkpoint(folder)  # intact
    damage(folder)
    with pytest.raises(DamagedCheckpointError) as excinfo:
        verify_checkpoint(folder)
    assert expected in str(excinfo.value) and "resume_allow_damaged_checkpoint=True" in str(excinfo.value)


def test_a_temporary_file_of_another_process_is_not_part_of_the_checkpoint(tmp_path):
    """With several processes, rank 0 writes the manifest while another rank's safetensors write may still hold its
    temporary `.tmpXXXXXX` file in the folder; once renamed it is gone, and the checkpoint must still verify."""
    from trl_flow_grpo.checkpoint_integrity import write_manifest

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "optimizer.pt").write_bytes(b"state")
    (folder / "trainer_state.json").write_text("{}")
    (folder / ".tmpRBdrKo").write_bytes(b"half-written rollout_buffer_1")
    write_manifest(str(folder))
    (folder / ".tmpRBdrKo").unlink()
    verify_checkpoint(str(folder), require_optimizer=False)
    (folder / "optimizer.pt").unlink()  # a real file of the checkpoint is still checked
    with pytest.raises(DamagedCheckpointError, match="optimizer.pt is missing"):
        verify_checkpoint(str(folder), require_optimizer=False)


def test_without_a_manifest_a_truncated_file_is_still_named(saved_checkpoint, tmp_path):
    folder = _copy(saved_checkpoint, tmp_path)
    os.remove(os.path.join(folder, MANIFEST_NAME))  # a checkpoint written before manifests existed
    verify_checkpoint(folder)
    _truncate(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    with pytest.raises(DamagedCheckpointError, match="pytorch_lora_weights.safetensors is"):
        verify_checkpoint(folder)


def test_resuming_a_damaged_checkpoint_fails_before_training_or_continues_when_allowed(
    saved_checkpoint, tmp_path, caplog
):
    folder = _copy(saved_checkpoint, tmp_path)
    os.remove(os.path.join(folder, "optimizer.pt"))
    trainer = make_trainer(tmp_path, max_steps=3)
    with pytest.raises(DamagedCheckpointError, match="optimizer.pt is missing"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0
    allowed = make_trainer(tmp_path, max_steps=3, resume_allow_damaged_checkpoint=True)
    with caplog.at_level(logging.WARNING, logger="trl_flow_grpo.checkpoint_integrity"):
        allowed.train(resume_from_checkpoint=folder)
    assert allowed.state.global_step == 3
    assert "optimizer.pt is missing" in caplog.text


# --------------------------------------------------------------------------------------------- CLI


def test_a_misspelt_cli_flag_suggests_the_right_one():
    with pytest.raises(SystemExit) as excinfo:
        main(["train", "--lerning_rate", "1e-3"])
    assert "did you mean --learning_rate?" in str(excinfo.value.code)


def test_sample_with_a_missing_lora_folder_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        main(["sample", "--prompts", "a cat", "--lora", str(tmp_path / "nonexistent")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no pytorch_lora_weights.safetensors"):
        main(["sample", "--prompts", "a cat", "--lora", str(tmp_path / "empty")])
