"""Tests for the `unifiedreward` built-in (UnifiedReward pointwise scores): score parsing, the local transformers
path with a tiny random Qwen2.5-VL built offline, and the OpenAI-compatible path against a local HTTP server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import transformers
from PIL import Image

from trl_flow_grpo.rewards import REWARD_FUNCS, JudgeRequestError, call_reward_funcs, reward_func_name
from trl_flow_grpo.rewards.unifiedreward import (
    UNIFIEDREWARD_MODEL_ID,
    OpenAIUnifiedReward,
    TransformersUnifiedReward,
    build_point_prompt,
    parse_point_score,
)
from trl_flow_grpo.testing import make_tiny_qwen2_5_vl, make_tiny_qwen2_tokenizer

# --------------------------------------------------------------------------------------------- prompt and parsing


def test_point_prompt_holds_the_caption_and_the_answer_format():
    text = build_point_prompt("a red bus next to a tree")
    assert "Text Caption: [a red bus next to a tree]" in text
    assert "from 1 to 5 after 'Final Score:'" in text
    assert "Alignment with the Caption" in text and "Overall Image Quality" in text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The image matches well.\nFinal Score: 4", 4.0),
        ("final score:3.5", 3.5),
        ("**Final Score:** 5", 5.0),
        ("Final Score：2", 2.0),  # full-width colon
        ("Final Score: 4/5", 4.0),
        ("Assign a score after 'Final Score:'. ... Final Score: 2", 2.0),  # the last one wins
        ("Final Score: 7", None),  # out of [1, 5]
        ("Final Score: 0", None),
        ("I would give it a 4.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_point_score(text, expected):
    assert parse_point_score(text) == expected


# --------------------------------------------------------------------------------------------- local model


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
    """A randomly initialised tiny Qwen2.5-VL and its processor, built offline."""
    tokenizer = make_tiny_qwen2_tokenizer()
    image_processor_class = (
        getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    )
    image_processor = image_processor_class(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = _ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_tiny_qwen2_5_vl(tokenizer).eval()
    return model, processor


class _SpyModel:
    """Wraps a model: records each `generate` call and, when given replies, returns them as the generated tokens."""

    def __init__(self, model, tokenizer=None, replies=None):
        self.model = model
        self.tokenizer = tokenizer
        self.replies = list(replies or [])
        self.calls = []

    def parameters(self):
        return self.model.parameters()

    def to(self, device):
        self.model.to(device)
        return self

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


def _images(n):
    """`n` images of different sizes (28x28, 56x28, ...) so that their order can be checked in the inputs."""
    return [Image.new("RGB", (28 * (1 + i % 2), 28), (20 * i, 0, 0)) for i in range(n)]


def test_local_scores_parse_only_the_generated_tokens_in_batches(tiny_vlm, monkeypatch):
    model, processor = tiny_vlm
    replies = ["Final Score: 4", "It is blurry. Final Score: 2", "no idea", "**Final Score:** 5", "Final Score: 3"]
    spy = _SpyModel(model, tokenizer=processor.tokenizer, replies=replies)
    reward = TransformersUnifiedReward(model=spy, processor=processor, batch_size=2, max_new_tokens=7)
    rendered = []
    original = processor.apply_chat_template

    def recording_apply_chat_template(conversations, **kwargs):
        texts = original(conversations, **kwargs)
        rendered.extend(zip(conversations, texts))
        return texts

    monkeypatch.setattr(processor, "apply_chat_template", recording_apply_chat_template)
    prompts = [f"prompt number {i}" for i in range(5)]
    # the prompt itself contains "Final Score:" (the instruction): parsing it too would misread the third reply
    assert reward(prompts=prompts, images=_images(5), trainer_state=None) == [4.0, 2.0, None, 5.0, 3.0]
    assert reward.last_completions == replies and reward.last_num_unparsed == 1
    assert [call["input_ids"].shape[0] for call in spy.calls] == [2, 2, 1]
    assert all(call["max_new_tokens"] == 7 and call["do_sample"] is False for call in spy.calls)
    assert spy.calls[0]["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]  # one image per row, in order
    for (conversation, text), prompt in zip(rendered, prompts):
        content = conversation[0]["content"]
        assert [item["type"] for item in content] == ["image", "text"]
        assert content[1]["text"] == build_point_prompt(prompt)
        assert text.count("<|vision_start|>") == 1


def test_local_normalize_and_the_reward_matrix(tiny_vlm):
    model, processor = tiny_vlm
    spy = _SpyModel(model, tokenizer=processor.tokenizer, replies=["Final Score: 5", "Final Score: 2", "?"])
    reward = TransformersUnifiedReward(model=spy, processor=processor, normalize=True)
    with pytest.warns(UserWarning, match="All reward functions returned None for 1 sample"):
        rewards = call_reward_funcs([reward], ["a", "b", "c"], _images(3))
    torch.testing.assert_close(rewards[:, 0], torch.tensor([1.0, 0.25, float("nan")]), equal_nan=True)


def test_local_loads_lazily_once_and_generates(tiny_vlm, tmp_path, monkeypatch):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path)
    loads = []

    def fake_processor_from_pretrained(model_id, **kwargs):  # the real one needs torchvision for Qwen2.5-VL
        loads.append(model_id)
        return processor

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fake_processor_from_pretrained)
    reward = TransformersUnifiedReward(str(tmp_path), device="cpu", dtype="float32", max_new_tokens=3, offload=True)
    assert reward.model is None
    result = reward(prompts=["a cat", "a dog"], images=_images(2))
    assert len(result) == 2 and all(score is None or 1 <= score <= 5 for score in result)
    assert isinstance(reward.model, transformers.Qwen2_5_VLForConditionalGeneration) and not reward.model.training
    assert reward.model.device.type == "cpu"
    assert len(reward.last_completions) == 2
    reward(prompts=["a cat"], images=_images(1))
    assert loads == [str(tmp_path)]  # loaded once


def test_local_input_checks():
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        TransformersUnifiedReward()(prompts=["p"], images=_images(2))
    assert TransformersUnifiedReward()(prompts=[], images=[]) == []
    with pytest.raises(ValueError, match="batch_size"):
        TransformersUnifiedReward(batch_size=0)


# --------------------------------------------------------------------------------------------- served model


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, respond):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond = respond
        self.requests = []
        self.lock = threading.Lock()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            index = len(self.server.requests)
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        status, reply = self.server.respond(index, body)
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):
        pass


def _completion(content):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def _score_by_caption(index, body):
    """Answers 'Final Score: N' for a caption ending in 'score N', and rambles otherwise."""
    text = body["messages"][0]["content"][1]["text"]
    caption = text.rsplit("Text Caption: [", 1)[1].rstrip("]")
    if caption.startswith("score "):
        return 200, _completion(f"Alignment is fine.\nFinal Score: {caption.split()[1]}")
    return 200, _completion("I cannot rate this.")


@pytest.fixture
def server():
    servers = []

    def start(respond=_score_by_caption):
        server = _Server(respond)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_served_scores_one_request_per_image(server):
    srv = server()
    reward = OpenAIUnifiedReward(srv.base_url, "UnifiedReward", api_key="sk-test", max_tokens=32)
    prompts = ["score 4", "score 1.5", "something else"]
    images = [Image.new("RGB", size, (200, 0, 0)) for size in [(24, 16), (8, 12), (10, 10)]]
    assert asyncio.run(reward(prompts=prompts, images=images, trainer_state=None)) == [4.0, 1.5, None]
    assert reward.last_num_unparsed == 1 and len(reward.last_latencies) == 3
    sent = {}
    for request in srv.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer sk-test"
        body = request["body"]
        assert body["model"] == "UnifiedReward" and body["max_tokens"] == 32 and body["temperature"] == 0.0
        image, text = body["messages"][0]["content"]
        assert image["type"] == "image_url" and text["type"] == "text"
        header, data = image["image_url"]["url"].split(",", 1)
        assert header == "data:image/png;base64"
        sent[text["text"]] = Image.open(io.BytesIO(base64.b64decode(data))).size
    assert sent == {build_point_prompt(p): i.size for p, i in zip(prompts, images)}  # each image with its prompt
    assert "sk-test" not in repr(reward)


def test_served_normalize_through_call_reward_funcs_and_no_score_warning(server, caplog):
    srv = server()
    reward = OpenAIUnifiedReward(srv.base_url, "UnifiedReward", normalize=True)
    rewards = call_reward_funcs([reward], ["score 5", "score 3"], _images(2))
    torch.testing.assert_close(rewards[:, 0], torch.tensor([1.0, 0.5]))
    with caplog.at_level(logging.WARNING, logger="trl_flow_grpo.rewards.unifiedreward"):
        assert asyncio.run(reward(prompts=["x", "y"], images=_images(2))) == [None, None]
    assert "none of the 2 replies held a score" in caplog.text


def test_served_client_errors_fail_at_once_and_server_errors_are_retried(server):
    srv = server(lambda index, body: (400, {"error": "bad request"}))
    reward = OpenAIUnifiedReward(srv.base_url, "m", max_retries=2, backoff=0.0)
    with pytest.raises(JudgeRequestError, match="HTTP 400"):
        asyncio.run(reward(prompts=["score 3"], images=_images(1)))
    assert len(srv.requests) == 1
    flaky = server(lambda index, body: (503, {}) if index == 0 else _score_by_caption(index, body))
    reward = OpenAIUnifiedReward(flaky.base_url, "m", max_retries=2, backoff=0.0)
    assert asyncio.run(reward(prompts=["score 3"], images=_images(1))) == [3.0]
    assert len(flaky.requests) == 2


def test_builtin_registration_is_lazy():
    builtin = REWARD_FUNCS["unifiedreward"]
    assert isinstance(builtin, TransformersUnifiedReward)
    assert builtin.model_id == UNIFIEDREWARD_MODEL_ID == "CodeGoat24/UnifiedReward-qwen-7b"
    assert builtin.model is None and builtin.processor is None  # importing the registry loads nothing
    assert reward_func_name("unifiedreward") == "unifiedreward"
