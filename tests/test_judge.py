"""Tests for trl_flow_grpo.rewards.judge: verdict parsing, the local transformers judge and the HTTP judge."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from trl_flow_grpo.rewards import (
    DEFAULT_JUDGE_MODEL_ID,
    JudgeRequestError,
    OpenAIJudge,
    TransformersJudge,
    build_judge_prompt,
    call_preference_funcs,
    encode_image,
    parse_verdict,
)
from trl_flow_grpo.testing import make_tiny_qwen2_5_vl, make_tiny_qwen2_tokenizer

# --------------------------------------------------------------------------------------------- prompt and verdicts


def test_judge_prompt_holds_the_caption_and_both_verdicts():
    caption = "a {curly} red cube left of a sphere"
    prompt = build_judge_prompt(caption)
    assert caption in prompt
    assert "Image 1 is better" in prompt and "Image 2 is better" in prompt
    assert "<answer>" in prompt and "<think>" in prompt
    assert DEFAULT_JUDGE_MODEL_ID == "CodeGoat24/UnifiedReward-Think-qwen-7b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Image 1 is better", 1.0),
        ("image 2 is better.", 0.0),
        ("  IMAGE  1   IS\nBETTER ", 1.0),
        ("**Image 2** is better", 0.0),
        ("Image 2 is the better", 0.0),
        ("<answer> Image 1 is better </answer>", 1.0),
        ("Image 2 is better than Image 1.", 0.0),
        # Thinking judges discuss both images: the last verdict wins.
        ("<think>Image 1 is better in colour, but Image 2 is better overall.</think>", 0.0),
        ("<think>Image 2 is better for the caption ...</think>\n<answer>Image 1 is better</answer>", 1.0),
        ("<think>totals 25 vs 21</think><answer>Image 2 is better", 0.0),  # truncated before </answer>
        # No usable verdict: a tie.
        ("", 0.5),
        ("Both images are equally good.", 0.5),
        ("Neither image is better.", 0.5),
        ("Image 1 is not better than Image 2", 0.5),
        ("<answer>Image 1 is better or Image 2 is better</answer>", 0.5),
        ("Image 3 is better", 0.5),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_encode_image_round_trips():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    url = encode_image(Image.fromarray(pixels))
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    np.testing.assert_array_equal(np.asarray(decoded), pixels)

    rgba = Image.new("RGBA", (5, 7), (1, 2, 3, 4))
    jpeg = encode_image(rgba, format="JPEG")
    assert jpeg.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(jpeg.split(",", 1)[1]))).size == (5, 7)


# --------------------------------------------------------------------------------------------- TransformersJudge


class _ImageOnlyQwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
    """A Qwen2.5-VL processor without a video processor (which needs torchvision in transformers 5)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm():
    """A randomly initialised tiny Qwen2.5-VL (one text layer, one vision layer) and its processor, built offline."""
    tokenizer = make_tiny_qwen2_tokenizer()
    image_processor_class = (
        getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    )
    image_processor = image_processor_class(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = _ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE
    )
    torch.manual_seed(0)
    model = make_tiny_qwen2_5_vl(tokenizer).eval()
    return model, processor


class _SpyModel:
    """Wraps a model: records each `generate` call, and can replace the generated tokens by given replies."""

    def __init__(self, model, tokenizer=None, replies=None):
        self.model = model
        self.tokenizer = tokenizer
        self.replies = list(replies or [])
        self.calls = []

    def parameters(self):
        return self.model.parameters()

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        if not self.replies:
            return self.model.generate(**kwargs)
        batch = kwargs["input_ids"].shape[0]
        replies, self.replies = self.replies[:batch], self.replies[batch:]
        encoded = [self.tokenizer.encode(reply, add_special_tokens=False) for reply in replies]
        width = max(len(ids) for ids in encoded)
        new = [ids + [self.tokenizer.pad_token_id] * (width - len(ids)) for ids in encoded]
        return torch.cat([kwargs["input_ids"], torch.tensor(new, dtype=kwargs["input_ids"].dtype)], dim=1)


def _pairs(n: int) -> tuple[list[str], list[Image.Image], list[Image.Image]]:
    """`n` pairs whose two sides differ in size (28x28 vs 56x28) so that their order can be checked."""
    prompts = ["a cat" if i % 2 else f"two dogs on a red sofa number {i}" for i in range(n)]
    images_a = [Image.new("RGB", (28, 28), (10 * i, 0, 0)) for i in range(n)]
    images_b = [Image.new("RGB", (56, 28), (0, 10 * i, 0)) for i in range(n)]
    return prompts, images_a, images_b


def test_transformers_judge_loads_lazily_and_judges_every_pair(tiny_vlm, tmp_path, monkeypatch):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path)
    processor_loads = []

    def fake_processor_from_pretrained(model_id, **kwargs):  # the real one needs torchvision for Qwen2.5-VL
        processor_loads.append((model_id, kwargs))
        return processor

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fake_processor_from_pretrained)
    processor.tokenizer.padding_side = "right"
    judge = TransformersJudge(str(tmp_path), device="cpu", dtype="float32", max_new_tokens=3, batch_size=2)
    assert judge.model is None and judge.processor is None

    prompts, images_a, images_b = _pairs(3)
    result = judge(prompts=prompts, images_a=images_a, images_b=images_b, trainer_state=None)

    assert len(result) == 3 and set(result) <= {0.0, 0.5, 1.0}
    assert processor_loads == [(str(tmp_path), {"trust_remote_code": False})]
    assert isinstance(judge.model, transformers.Qwen2_5_VLForConditionalGeneration)
    assert judge.model.dtype == torch.float32 and judge.model.device.type == "cpu" and not judge.model.training
    assert processor.tokenizer.padding_side == "left"  # batched generation needs left padding
    assert len(judge.last_completions) == 3
    # A second call reuses the loaded model.
    assert len(judge(prompts=prompts[:1], images_a=images_a[:1], images_b=images_b[:1])) == 1
    assert len(processor_loads) == 1


def test_transformers_judge_batches_pairs_with_both_images_and_the_prompt(tiny_vlm, monkeypatch):
    model, processor = tiny_vlm
    spy = _SpyModel(model)
    judge = TransformersJudge(model=spy, processor=processor, max_new_tokens=2, batch_size=2)
    rendered = []
    original = processor.apply_chat_template

    def recording_apply_chat_template(conversations, **kwargs):
        texts = original(conversations, **kwargs)
        rendered.extend(zip(conversations, texts))
        return texts

    monkeypatch.setattr(processor, "apply_chat_template", recording_apply_chat_template)
    prompts, images_a, images_b = _pairs(5)
    result = judge(prompts=prompts, images_a=images_a, images_b=images_b)

    assert len(result) == 5 and set(result) <= {0.0, 0.5, 1.0}
    assert [call["input_ids"].shape[0] for call in spy.calls] == [2, 2, 1]
    assert all(call["max_new_tokens"] == 2 and call["do_sample"] is False for call in spy.calls)
    for call in spy.calls:
        # Two images per pair, Image 1 (28x28: a 2x2 patch grid) before Image 2 (56x28: 2x4).
        grids = call["image_grid_thw"].tolist()
        assert grids == [[1, 2, 2], [1, 2, 4]] * call["input_ids"].shape[0]
        assert call["attention_mask"][:, -1].all()  # left padding: every row ends with a real token
    assert not spy.calls[0]["attention_mask"].all()  # the two prompts of the first batch differ in length
    assert len(rendered) == 5
    for (conversation, text), prompt in zip(rendered, prompts):
        content = conversation[0]["content"]
        assert [item["type"] for item in content] == ["image", "image", "text"]
        assert content[2]["text"] == build_judge_prompt(prompt)
        assert text.count("<|vision_start|>") == 2 and prompt in text


def test_transformers_judge_parses_only_the_generated_tokens(tiny_vlm):
    model, processor = tiny_vlm
    replies = [
        "<think>Image 1: 7+7=14, Image 2: 9+9=18</think><answer>Image 2 is better</answer>",
        "I cannot tell.",  # the prompt ends with "Image 1 is better": parsing it too would give 1.0
        "<answer>Image 1 is better</answer>",
    ]
    spy = _SpyModel(model, tokenizer=processor.tokenizer, replies=replies)
    judge = TransformersJudge(model=spy, processor=processor, batch_size=2)
    prompts, images_a, images_b = _pairs(3)
    assert judge(prompts=prompts, images_a=images_a, images_b=images_b) == [0.0, 0.5, 1.0]
    assert judge.last_completions == replies
    assert judge.last_num_unparsed == 1


def test_transformers_judge_validates_settings_and_inputs():
    with pytest.raises(ValueError, match="`batch_size` must be an integer > 0, got 0"):
        TransformersJudge(batch_size=0)
    with pytest.raises(ValueError, match="`max_new_tokens` must be an integer > 0, got 1.5"):
        TransformersJudge(max_new_tokens=1.5)
    image = Image.new("RGB", (28, 28))
    with pytest.raises(ValueError, match="got 1 prompts, 2 images_a and 1 images_b"):
        TransformersJudge()(prompts=["p"], images_a=[image, image], images_b=[image])
    with pytest.raises(ValueError, match="Unknown dtype 'float99'"):
        TransformersJudge(dtype="float99")._torch_dtype()


# --------------------------------------------------------------------------------------------- OpenAIJudge


class _JudgeServer(ThreadingHTTPServer):
    """A local OpenAI-compatible endpoint. `respond(index, body, headers)` gives (status, reply, delay_seconds)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.lock = threading.Lock()
        self.active_changed = threading.Condition(self.lock)
        self.requests = []
        self.active = 0
        self.max_active = 0
        self.respond = _answer_by_caption
        self.hold_until_active = 0  # hold each request until this many are in flight (at most `hold_timeout` s)
        self.hold_timeout = 2.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _JudgeHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        server = self.server
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        body = json.loads(raw)
        with server.lock:
            index = len(server.requests)
            server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            server.active += 1
            server.max_active = max(server.max_active, server.active)
            server.active_changed.notify_all()
            server.active_changed.wait_for(lambda: server.active >= server.hold_until_active, server.hold_timeout)
        try:
            status, reply, delay = server.respond(index, body, self.headers)
            time.sleep(delay)
            payload = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout)
            pass
        finally:
            with server.lock:
                server.active -= 1

    def log_message(self, format, *args):
        pass


def _completion(content):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def _answer_by_caption(index, body, headers):
    """Prefer Image 1 for captions containing 'pick 1', Image 2 for 'pick 2', and ramble otherwise."""
    text = body["messages"][0]["content"][2]["text"]
    if "pick 1" in text:
        content = "<think>Image 2 is better in colour; totals 25 vs 20.</think><answer>Image 1 is better</answer>"
    elif "pick 2" in text:
        content = "<answer>Image 2 is better</answer>"
    else:
        content = "These images are hard to compare."
    return 200, _completion(content), 0.0


def _slow_answers(delay):
    """A responder that answers like `_answer_by_caption` after `delay(index)` seconds."""

    def respond(index, body, headers):
        status, reply, _ = _answer_by_caption(index, body, headers)
        return status, reply, delay(index)

    return respond


@pytest.fixture
def server():
    server = _JudgeServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _decode_data_url(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _judge_pairs(captions):
    images_a = [Image.new("RGB", (24, 16), (200, 0, 0)) for _ in captions]
    images_b = [Image.new("RGB", (8, 12), (0, 0, 200)) for _ in captions]
    return list(captions), images_a, images_b


def test_openai_judge_sends_chat_completions_and_parses_verdicts(server):
    judge = OpenAIJudge(server.base_url + "/", "UnifiedReward", api_key="sk-test", max_tokens=64)
    a, b, c = (Image.new("RGB", size, (200, 0, 0)) for size in [(24, 16), (8, 12), (10, 10)])
    prompts = ["pick 1 please", "pick 2 please", "anything"]
    images_a, images_b = [a, b, a], [b, c, c]  # images shared between pairs, as within a group
    result = asyncio.run(judge(prompts=prompts, images_a=images_a, images_b=images_b, trainer_state=None))

    assert result == [1.0, 0.0, 0.5]
    assert judge.last_num_unparsed == 1
    assert len(judge.last_latencies) == 3 and all(latency > 0 for latency in judge.last_latencies)
    assert len(server.requests) == 3
    expected_sizes = {
        build_judge_prompt(prompt): (image_a.size, image_b.size)
        for prompt, image_a, image_b in zip(prompts, images_a, images_b)
    }
    sent = {}
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer sk-test"
        assert request["headers"]["Content-Type"] == "application/json"
        body = request["body"]
        assert body["model"] == "UnifiedReward"
        assert body["max_tokens"] == 64 and body["temperature"] == 0.0
        (message,) = body["messages"]
        assert message["role"] == "user"
        image_1, image_2, text = message["content"]
        assert image_1["type"] == image_2["type"] == "image_url" and text["type"] == "text"
        sent[text["text"]] = tuple(_decode_data_url(image["image_url"]["url"]).size for image in (image_1, image_2))
    assert sent == expected_sizes  # each prompt went with its own pair's images, Image 1 first


def test_openai_judge_api_key_comes_from_the_environment_and_stays_hidden(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    judge = OpenAIJudge(server.base_url, "judge")
    assert "sk-from-env" not in repr(judge) and "sk-from-env" not in str(vars(judge).get("api_key", ""))
    asyncio.run(judge(*_judge_pairs(["pick 1"])))
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer sk-from-env"

    monkeypatch.delenv("OPENAI_API_KEY")
    asyncio.run(OpenAIJudge(server.base_url, "judge")(*_judge_pairs(["pick 1"])))
    assert "Authorization" not in server.requests[-1]["headers"]


def test_openai_judge_retries_server_errors(server):
    def flaky(index, body, headers):
        if index < 2:
            return (503 if index == 0 else 429), {"error": "busy"}, 0.0
        return _answer_by_caption(index, body, headers)

    server.respond = flaky
    judge = OpenAIJudge(server.base_url, "judge", backoff=0.01)
    assert asyncio.run(judge(*_judge_pairs(["pick 2"]))) == [0.0]
    assert len(server.requests) == 3


def test_openai_judge_gives_up_after_the_retries(server):
    server.respond = lambda index, body, headers: (500, {"error": {"message": "out of memory"}}, 0.0)
    judge = OpenAIJudge(server.base_url, "judge", max_retries=2, backoff=0.01)
    with pytest.raises(JudgeRequestError) as error:
        asyncio.run(judge(*_judge_pairs(["pick 1"])))
    message = str(error.value)
    assert f"{server.base_url}/chat/completions" in message
    assert "3 attempt(s)" in message and "HTTP 500" in message and "out of memory" in message
    assert len(server.requests) == 3


def test_openai_judge_fails_at_once_on_client_errors_without_showing_the_key(server):
    def reject(index, body, headers):  # a server that echoes the credentials it got
        return 400, {"error": {"message": f"image too large (auth: {headers['Authorization']})"}}, 0.0

    server.respond = reject
    judge = OpenAIJudge(server.base_url, "judge", api_key="sk-secret-123", max_retries=3, backoff=0.01)
    with pytest.raises(JudgeRequestError) as error:
        asyncio.run(judge(*_judge_pairs(["pick 1"])))
    message = str(error.value)
    assert "HTTP 400" in message and "image too large" in message and "rejected" in message
    assert "sk-secret-123" not in message and "***" in message
    assert len(server.requests) == 1


def test_openai_judge_retries_timeouts(server):
    server.respond = _slow_answers(lambda index: 1.0 if index else 0.6)
    judge = OpenAIJudge(server.base_url, "judge", timeout=0.2, max_retries=1, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(JudgeRequestError, match=r"failed 2 attempt\(s\); last failure: .*timed out"):
        asyncio.run(judge(*_judge_pairs(["pick 1"])))
    assert time.perf_counter() - start < 0.9  # gave up on each attempt after `timeout`, not after the server

    server.respond = _slow_answers(lambda index: 0.6 if index == 2 else 0.0)  # this call's first attempt times out
    assert asyncio.run(judge(*_judge_pairs(["pick 2"]))) == [0.0]


def test_openai_judge_retries_refused_connections():
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "judge", max_retries=1, backoff=0.01)
    with pytest.raises(JudgeRequestError, match=rf"127.0.0.1:{port}/v1/chat/completions failed 2 attempt"):
        asyncio.run(judge(*_judge_pairs(["pick 1"])))


@pytest.mark.parametrize("max_concurrency", [2, 8])
def test_openai_judge_bounds_concurrency(server, max_concurrency):
    # Each request is held until `max_concurrency` are in flight, so that a client sending more at once is caught
    # and one sending fewer times out the hold.
    server.hold_until_active = max_concurrency
    server.respond = _slow_answers(lambda index: 0.05)
    judge = OpenAIJudge(server.base_url, "judge", max_concurrency=max_concurrency)
    captions = ["pick 1", "pick 2"] * 4
    assert asyncio.run(judge(*_judge_pairs(captions))) == [1.0, 0.0] * 4
    assert server.max_active == max_concurrency


def test_openai_judge_rejects_replies_that_are_not_chat_completions(server):
    server.respond = lambda index, body, headers: (200, "<html>proxy error</html>", 0.0)
    judge = OpenAIJudge(server.base_url, "judge")
    with pytest.raises(JudgeRequestError, match="did not answer with a chat completion.*proxy error"):
        asyncio.run(judge(*_judge_pairs(["pick 1"])))

    server.respond = lambda index, body, headers: (200, _completion(None), 0.0)  # e.g. cut off by max_tokens
    assert asyncio.run(judge(*_judge_pairs(["pick 1"]))) == [0.5]


def test_openai_judge_as_a_preference_function(server):
    judge = OpenAIJudge(server.base_url, "judge")
    probabilities, seconds = call_preference_funcs([judge], *_judge_pairs(["pick 2", "pick 1", "none"]))
    assert probabilities[:, 0].tolist() == [0.0, 1.0, 0.5]
    assert seconds[0] > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "localhost:8000/v1"}, "`base_url` must be an http"),
        ({"model": ""}, "`model` must be the served model name"),
        ({"timeout": 0}, "`timeout` must be a number > 0, got 0"),
        ({"max_concurrency": 0}, "`max_concurrency` must be an integer > 0, got 0"),
        ({"max_retries": -1}, "`max_retries` must be an integer >= 0, got -1"),
    ],
)
def test_openai_judge_validates_settings(kwargs, match):
    settings = {"base_url": "http://localhost:8000/v1", "model": "judge", **kwargs}
    with pytest.raises(ValueError, match=match):
        OpenAIJudge(**settings)
