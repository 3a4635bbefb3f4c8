"""The reward server (`trl-flow-grpo reward-server`, `rewards.server`) and its client (`rewards.remote.RemoteReward`),
against real HTTP servers on free 127.0.0.1 ports, with the offline `shapes_geneval` reward."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from trl_flow_grpo.cli import main as cli_main
from trl_flow_grpo.rewards import call_reward_funcs
from trl_flow_grpo.rewards import server as server_module
from trl_flow_grpo.rewards.remote import RemoteReward, RewardServerError, decode_image, encode_png
from trl_flow_grpo.rewards.server import RewardServer
from trl_flow_grpo.toy import render, sample_scene, shapes_geneval

TOKEN = "test-token-0123456789abcdef"


def _batch(n: int = 7, seed: int = 0) -> tuple[list[str], list[Image.Image]]:
    """Shapes-world scenes with their captions; every third caption is swapped for another scene's (partial
    credit), so the rewards vary."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    prompts = [scene.caption for scene in scenes]
    for i in range(0, n - 1, 3):
        prompts[i] = scenes[i + 1].caption
    return prompts, [render(scene) for scene in scenes]


def _serve(server: RewardServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def served() -> Iterator:
    """Start `RewardServer(reward, **kwargs)` on a free port; shut every started server down afterwards."""
    servers = []

    def start(reward="shapes_geneval", **kwargs) -> RewardServer:
        server = RewardServer(reward, port=0, **kwargs)
        _serve(server)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


class _Stub:
    """A hand-written HTTP server on a free port: `answers` is a list of (status, headers, body) given to the POST
    requests in turn (the last one repeats); every request's headers are recorded."""

    def __init__(self, answers: list[tuple[int, dict[str, str], bytes]]):
        self.answers, self.requests = answers, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stub.requests.append({"headers": dict(self.headers), "body": body})
                status, headers, payload = stub.answers[min(len(stub.requests), len(stub.answers)) - 1]
                self.send_response(status)
                for key, value in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub() -> Iterator:
    stubs = []

    def start(*answers) -> _Stub:
        stubs.append(_Stub(list(answers)))
        return stubs[-1]

    yield start
    for s in stubs:
        s.close()


def _json(payload) -> bytes:
    return json.dumps(payload).encode()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post(url: str, payload, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/score", data=_json(payload), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- the protocol


def test_remote_rewards_equal_the_local_call(served):
    prompts, images = _batch(7)
    local = shapes_geneval(prompts=prompts, images=images)
    assert len(set(local)) > 1  # the batch has rewards that differ, so a misaligned answer would show
    server = served()
    remote = RemoteReward(server.url)
    assert remote.score(prompts, images) == local
    # Through the trainer's calling machinery (async, with a column and the keywords that stay in-process).
    rewards = call_reward_funcs([remote], prompts, images, columns={"label": list(range(7))}, trainer_state=object())
    assert rewards[:, 0].tolist() == pytest.approx(local)
    assert server.url.startswith("http://127.0.0.1:")  # bound to the loopback address by default


def test_source_images_of_an_edit_reach_the_served_reward_as_images(served):
    """An editing run's `source_images` travel as PNG and arrive as PIL images, so a served edit judge can compare
    each edit with its own source; a source that is not a PNG is a 400 naming the column."""
    prompts, images = _batch(4)
    _, sources = _batch(4, seed=1)

    def preservation(prompts, images, source_images, **kwargs):
        return [
            1.0 - float(np.abs(np.asarray(i, dtype=np.float64) - np.asarray(s, dtype=np.float64)).mean()) / 255
            for i, s in zip(images, source_images)
        ]

    local = preservation(prompts, images, sources)
    assert len(set(local)) == 4
    server = served(preservation)
    assert RemoteReward(server.url).score(prompts, images, source_images=sources) == local
    status, answer = _post(
        server.url,
        {"prompts": prompts[:1], "images": [encode_png(images[0])], "source_images": ["not a png"]},
    )
    assert status == 400 and "source_images[0] is not a base64 PNG" in answer["error"]


def test_max_batch_size_splits_a_request_into_consecutive_calls(served):
    calls = []

    def recording(prompts, images, label, **kwargs):
        calls.append((len(prompts), list(label), sorted(kwargs)))
        return shapes_geneval(prompts=prompts, images=images)

    prompts, images = _batch(7)
    server = served(recording, max_batch_size=3)
    remote = RemoteReward(server.url)
    assert remote.score(prompts, images, label=list("abcdefg"), trainer_state=object()) == shapes_geneval(
        prompts=prompts, images=images
    )
    assert [size for size, _, _ in calls] == [3, 3, 1]
    assert [label for _, labels, _ in calls for label in labels] == list("abcdefg")  # columns split with the images
    assert all(names == ["trainer_state"] for _, _, names in calls)  # the server's own call, never the client's state
    calls.clear()
    assert served(recording).max_batch_size is None
    RemoteReward(served(recording).url).score(prompts, images, label=list("abcdefg"))
    assert [size for size, _, _ in calls] == [7]  # without a limit the request is one batch


def test_rewards_travel_at_full_precision_and_async_rewards_are_served(served):
    async def tenths(prompts, images, **kwargs):
        return [0.1 * (i + 1) for i in range(len(prompts))]  # not float32 values

    prompts, images = _batch(3)
    assert RemoteReward(served(tenths, max_batch_size=2).url).score(prompts, images) == [0.1, 0.2, 0.1]


def test_a_reward_answering_wrongly_on_the_server_is_a_500_naming_it(served):
    def short(prompts, images, **kwargs):
        return [1.0]

    prompts, images = _batch(2)
    with pytest.raises(RewardServerError, match=r"HTTP 500 .*reward 'short' raised ValueError.*returned 1 values"):
        RemoteReward(served(short).url, retries=0).score(prompts, images)


def test_a_post_without_a_content_length_is_refused(served):
    server = served()
    with socket.create_connection((server.host, server.port), timeout=10) as connection:
        connection.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert connection.recv(100).startswith(b"HTTP/1.1 411")


def test_none_travels_as_null_and_comes_back_as_not_applicable(served):
    def odd_only(prompts, images, **kwargs):
        return [float(i) if i % 2 else None for i in range(len(prompts))]

    prompts, images = _batch(4)
    remote = RemoteReward(served(odd_only).url)
    assert remote.score(prompts, images) == [None, 1.0, None, 3.0]
    rewards = call_reward_funcs([remote, "shapes_geneval"], prompts, images)
    assert rewards[:, 0].isnan().tolist() == [True, False, True, False]


def test_health_answers_without_a_token(served):
    server = served(token=TOKEN, max_batch_size=8)
    status, payload = _get(f"{server.url}/health")
    assert status == 200
    assert payload == {"status": "ok", "reward": "shapes_geneval", "max_batch_size": 8}
    assert _get(f"{server.url}/nothing")[0] == 404


def test_the_token_is_required_and_compared_in_constant_time(served, monkeypatch):
    compared = []
    real = server_module.hmac.compare_digest
    monkeypatch.setattr(server_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    prompts, images = _batch(3)
    server = served(token=TOKEN)
    assert TOKEN not in repr(server) and TOKEN not in server.startup_line()
    with pytest.raises(RewardServerError, match="the bearer token is wrong") as wrong:
        RemoteReward(server.url, token="not-the-token", retries=2, backoff=0).score(prompts, images)
    assert "not-the-token" not in str(wrong.value)
    with pytest.raises(RewardServerError, match=r"needs a bearer token; set \$MY_REWARD_TOKEN"):
        RemoteReward(server.url, token_env="MY_REWARD_TOKEN").score(prompts, images)
    status, payload = _post(server.url, {"prompts": prompts, "images": [encode_png(i) for i in images]}, "x" + TOKEN)
    assert status == 401 and "token" in payload["error"] and TOKEN not in json.dumps(payload)
    assert len(compared) >= 3
    monkeypatch.setenv("MY_REWARD_TOKEN", TOKEN)
    assert RemoteReward(server.url, token_env="MY_REWARD_TOKEN").score(prompts, images) == shapes_geneval(
        prompts=prompts, images=images
    )


@pytest.mark.parametrize(
    "payload, match",
    [
        ([1, 2], "must be a JSON object"),
        ({"prompts": ["a"], "images": []}, "one image per prompt"),
        ({"prompts": ["a"], "images": ["bm90IGEgcG5n"]}, r"images\[0\] is not a base64 PNG"),
        ({"prompts": ["a"], "images": ["%%%"]}, r"images\[0\] is not a base64 PNG"),
        ({"prompts": "a", "images": []}, "list of strings"),
        ({"prompts": ["a"], "images": ["x"], "label": [1, 2]}, "column 'label'"),
        ({"prompts": ["a"], "images": ["x"], "trainer_state": [1]}, "reserved"),
    ],
)
def test_malformed_requests_are_answered_400(served, payload, match):
    status, answer = _post(served().url, payload)
    assert status == 400
    assert re.search(match, answer["error"]), answer


def test_a_jpeg_is_not_accepted_as_png():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="JPEG")
    with pytest.raises(ValueError, match=r"images\[2\] is not a base64 PNG"):
        decode_image(base64.b64encode(buffer.getvalue()).decode(), 2)
    png = encode_png(Image.new("RGB", (8, 8), "red"))
    assert decode_image(f"data:image/png;base64,{png}", 0).getpixel((0, 0)) == (255, 0, 0)


def test_an_oversized_body_is_refused_before_it_is_read(served):
    prompts, images = _batch(2)
    server = served(max_request_bytes=100)
    with pytest.raises(RewardServerError, match="HTTP 413"):
        RemoteReward(server.url, retries=0).score(prompts, images)


def test_a_failing_reward_answers_500_and_the_client_reports_its_message(served):
    def broken(prompts, images, **kwargs):
        raise RuntimeError("the reward model is not loaded")

    prompts, images = _batch(2)
    with pytest.raises(RewardServerError, match="failed 2 attempt.*HTTP 500.*the reward model is not loaded"):
        RemoteReward(served(broken).url, retries=1, backoff=0).score(prompts, images)


# ------------------------------------------------------------------------------------------------- the client


def test_the_client_retries_a_server_that_fails_once(stub):
    prompts, images = _batch(3)
    expected = shapes_geneval(prompts=prompts, images=images)
    server = stub((503, {}, b"busy"), (200, {}, _json({"rewards": expected})))
    remote = RemoteReward(server.url, token=TOKEN, retries=2, backoff=0.05)
    start = time.perf_counter()
    assert remote.score(prompts, images) == expected
    assert len(server.requests) == 2
    assert time.perf_counter() - start >= 0.05  # waited `backoff` before the retry
    assert server.requests[0]["body"] == server.requests[1]["body"]  # the same request again
    assert server.requests[1]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    sent = json.loads(server.requests[0]["body"])
    assert sent["prompts"] == prompts and len(sent["images"]) == 3

    server = stub((503, {}, b"busy"))
    with pytest.raises(RewardServerError, match=r"failed 3 attempt\(s\); last failure: HTTP 503 busy"):
        RemoteReward(server.url, retries=2, backoff=0).score(prompts, images)
    assert len(server.requests) == 3


def test_a_server_that_is_down_gives_a_clear_error():
    prompts, images = _batch(1)
    remote = RemoteReward(f"http://127.0.0.1:{_free_port()}", retries=1, backoff=0, timeout=5)
    with pytest.raises(RewardServerError, match=r"failed 2 attempt\(s\).*Check that the server is up \(GET /health\)"):
        remote.score(prompts, images)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"<html>Bad Gateway</html>", "did not answer with rewards"),
        (_json({"scores": [1.0, 2.0]}), "did not answer with rewards"),
        (_json({"rewards": 1.0}), "did not answer with rewards"),
        (_json({"rewards": [1.0]}), "answered 1 rewards for 2 images"),
        (b'{"rewards": [1.0, NaN]}', "answered nan for image 1"),
        (b'{"rewards": [Infinity, 1.0]}', "answered inf for image 0"),
        (_json({"rewards": [1.0, "high"]}), "answered 'high' for image 1"),
        (_json({"rewards": [True, 1.0]}), "answered True for image 0"),
    ],
)
def test_garbage_answers_are_errors_and_are_not_retried(stub, body, match):
    prompts, images = _batch(2)
    server = stub((200, {"Content-Type": "application/json"}, body))
    with pytest.raises(RewardServerError, match=match):
        RemoteReward(server.url, retries=3, backoff=0).score(prompts, images)
    assert len(server.requests) == 1


def test_redirects_are_refused_so_the_token_stays_put(stub):
    prompts, images = _batch(2)
    elsewhere = stub((200, {}, _json({"rewards": [1.0, 1.0]})))
    for code in (301, 302, 307, 308):
        redirecting = stub((code, {"Location": f"{elsewhere.url}/score"}, b""))
        with pytest.raises(RewardServerError, match=f"answered HTTP {code}, a redirect to {elsewhere.url}/score"):
            RemoteReward(redirecting.url, token=TOKEN, retries=2, backoff=0).score(prompts, images)
        assert len(redirecting.requests) == 1
    assert elsewhere.requests == []  # nothing, and no token, ever reached the other address


def test_columns_that_are_not_json_are_refused_before_sending(stub):
    prompts, images = _batch(2)
    server = stub((200, {}, _json({"rewards": [1.0, 1.0]})))
    with pytest.raises(TypeError, match="dataset column 'when' cannot be sent"):
        RemoteReward(server.url).score(prompts, images, when=[object(), object()])
    with pytest.raises(TypeError, match="dataset column 'x' cannot be sent"):
        RemoteReward(server.url).score(prompts, images, x=[float("nan"), 1.0])
    assert server.requests == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"url": "127.0.0.1:8000"}, "http"),
        ({"timeout": 0}, "timeout"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"backoff": float("nan")}, "backoff"),
        ({"token": ""}, "token"),
    ],
)
def test_client_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RemoteReward(**{"url": "http://127.0.0.1:8000", **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_batch_size": 0}, "max_batch_size"), ({"token": ""}, "token"), ({"reward": "nope"}, "nope")],
)
def test_server_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardServer(**{"reward": "shapes_geneval", "port": 0, **kwargs})


# ------------------------------------------------------------------------------------------------- the command


def test_reward_server_command_serves_and_never_prints_the_token(monkeypatch):
    monkeypatch.delenv("UNSET_REWARD_TOKEN", raising=False)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MY_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "trl_flow_grpo.cli", "reward-server", "--reward", "shapes_geneval"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--token-env", "MY_TOKEN", "--max-batch-size", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert f"Serving reward 'shapes_geneval' at http://127.0.0.1:{port}" in line, line
        assert "bearer token required" in line and "at most 4 images" in line
        prompts, images = _batch(5)
        remote = RemoteReward(f"http://127.0.0.1:{port}", token=TOKEN)
        assert remote.score(prompts, images) == shapes_geneval(prompts=prompts, images=images)
        with pytest.raises(RewardServerError, match="needs a bearer token"):
            RemoteReward(f"http://127.0.0.1:{port}", token_env="UNSET_REWARD_TOKEN").score(prompts, images)
        assert _get(f"http://127.0.0.1:{port}/health")[1]["reward"] == "shapes_geneval"
    finally:
        process.terminate()
        output = line + process.communicate(timeout=30)[0]
    assert TOKEN not in output


def test_reward_server_command_refuses_an_unset_token_variable(monkeypatch, capsys):
    monkeypatch.delenv("UNSET_REWARD_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        cli_main(["reward-server", "--reward", "shapes_geneval", "--token-env", "UNSET_REWARD_TOKEN"])
    assert "UNSET_REWARD_TOKEN is not set" in capsys.readouterr().err
