"""Vision-language judges that compare two images of one prompt (UnifiedReward-Think style pairwise preferences).

A judge is a preference function (see `trl_flow_grpo.rewards.preferences`): it is shown the caption and two images,
Image 1 (`images_a`) and Image 2 (`images_b`), reasons about them and ends with "Image 1 is better" or "Image 2 is
better". `parse_verdict` turns that text into P(Image 1 preferred): 1.0, 0.0, or 0.5 when no verdict can be read.

Two ways to run the judge are provided:

- [`TransformersJudge`]: the model runs in this process through transformers (default
  [CodeGoat24/UnifiedReward-Think-qwen-7b](https://huggingface.co/CodeGoat24/UnifiedReward-Think-qwen-7b), a
  Qwen2.5-VL model, as in Pref-GRPO);
- [`OpenAIJudge`]: the model is served elsewhere behind an OpenAI-compatible chat-completions endpoint (vLLM,
  SGLang), which keeps the judge off the training GPUs. It needs nothing beyond the standard library.

The prompt (`JUDGE_PROMPT_TEMPLATE`) follows the structure of UnifiedReward-Think's pairwise image-generation prompt
(the `get_unifiedreward_think_image_template` of the Pref-GRPO repository): score semantic consistency, aesthetics and
authenticity from 1 to 10 for both images, sum the scores inside `<think>`, then answer inside `<answer>`.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import logging
import math
import numbers
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .compression import _to_rgb_image

__all__ = [
    "DEFAULT_JUDGE_MODEL_ID",
    "JUDGE_PROMPT_TEMPLATE",
    "JudgeRequestError",
    "OpenAIJudge",
    "TransformersJudge",
    "build_judge_prompt",
    "encode_image",
    "parse_verdict",
]

DEFAULT_JUDGE_MODEL_ID = "CodeGoat24/UnifiedReward-Think-qwen-7b"
"""The UnifiedReward-Think checkpoint Pref-GRPO uses as its pairwise judge (Qwen2.5-VL-7B architecture)."""

JUDGE_PROMPT_TEMPLATE = """\
You are an objective and precise evaluator of text-to-image generation. You are given a text caption and two images \
generated from it: Image 1 (shown first) and Image 2 (shown second). Analyse both images carefully and decide which \
image is better.

The caption of the generated images is: 「{prompt}」

Compare the two images on these core dimensions:
- Semantic consistency: how closely the image content matches the caption.
- Aesthetics: composition, use of colour and artistic expression.
- Authenticity: realism and attention to detail.
You may add up to two further dimensions when the caption or the images make them relevant (for example creativity, \
spatial layout or fine detail); otherwise keep the three core dimensions.

For each dimension, give both Image 1 and Image 2 a score from 1 to 10 with a short rationale. Then compute the total \
score of each image, showing the sum explicitly. Write all of this reasoning inside <think> and </think>. After \
</think>, give the final judgment inside <answer> and </answer>, containing exactly "Image 1 is better" or \
"Image 2 is better" and nothing else.

Required output format:
<think>
1. Semantic consistency: Image 1 (9/10) - ...; Image 2 (7/10) - ...
2. Aesthetics: Image 1 (8/10) - ...; Image 2 (8/10) - ...
3. Authenticity: Image 1 (8/10) - ...; Image 2 (6/10) - ...
Total score:
Image 1: 9+8+8=25
Image 2: 7+8+6=21
</think>
<answer>Image 1 is better</answer>

The example only illustrates the format; base your evaluation on the given caption and images."""
"""The pairwise judging prompt; `{prompt}` is replaced by the caption (see `build_judge_prompt`)."""

_VERDICT_PATTERN = re.compile(r"image\s*([12])\s*is\s+(?:the\s+)?better", re.IGNORECASE)
_ANSWER_PATTERN = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.IGNORECASE | re.DOTALL)
logger = logging.getLogger(__name__)

_MAX_ERROR_BODY_CHARS = 500
_RETRYABLE_HTTP_STATUS = 429


def build_judge_prompt(prompt: str) -> str:
    """Return the judging instruction for the caption `prompt` (`JUDGE_PROMPT_TEMPLATE` filled in)."""
    return JUDGE_PROMPT_TEMPLATE.format(prompt=prompt)


def _parse_verdict_or_none(text: str) -> float | None:
    """P(Image 1 preferred) read from a judge's reply, or None when the reply holds no usable verdict."""
    text = str(text).replace("*", "")  # tolerate Markdown emphasis such as "**Image 1** is better"
    answers = _ANSWER_PATTERN.findall(text)
    if answers:
        # The final <answer> block is the verdict; a block naming both images (or neither) is no verdict.
        winners = {match.group(1) for match in _VERDICT_PATTERN.finditer(answers[-1])}
        if len(winners) == 1:
            return 1.0 if winners == {"1"} else 0.0
        if winners:
            return None
    matches = _VERDICT_PATTERN.findall(text)  # thinking models discuss both images: the last verdict wins
    if not matches:
        return None
    return 1.0 if matches[-1] == "1" else 0.0


def parse_verdict(text: str) -> float:
    """Read a pairwise verdict from a judge's reply.

    The verdict is the last "Image N is better" in the text (case and spacing do not matter), looked for first in the
    last `<answer>...</answer>` block (an unclosed `<answer>` at the end of a truncated reply counts), then anywhere.
    Thinking judges mention both images while reasoning, so the last verdict wins.

    Returns:
        1.0 if Image 1 (the first image, `images_a`) is better, 0.0 if Image 2 is, and 0.5 (a tie) when no verdict
        can be read: no "Image N is better" at all, or an answer block that names both images.
    """
    verdict = _parse_verdict_or_none(text)
    return 0.5 if verdict is None else verdict


def encode_image(image: Any, format: str = "PNG") -> str:
    """Encode an image as a base64 `data:` URL (what OpenAI-compatible vision endpoints accept in `image_url`).

    Args:
        image: A PIL image (any mode) or a `uint8` numpy array; it is converted to RGB.
        format: A PIL format name, e.g. `"PNG"` (lossless, the default) or `"JPEG"` (smaller requests).
    """
    buffer = io.BytesIO()
    _to_rgb_image(image).save(buffer, format=format)
    subtype = format.lower()
    if subtype == "jpg":
        subtype = "jpeg"
    return f"data:image/{subtype};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _check_pairs(prompts: Sequence[str], images_a: Sequence[Any], images_b: Sequence[Any]) -> None:
    if len(images_a) != len(prompts) or len(images_b) != len(prompts):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(images_a)} images_a and {len(images_b)} images_b; a preference "
            "function needs exactly one prompt and one image on each side per pair"
        )


def _warn_no_verdict(judge: Any, completions: Sequence[str | None], num_unparsed: int) -> None:
    """One line when no reply of a call held a verdict: every pair is then a tie and the call trains nothing."""
    if not completions or num_unparsed < len(completions):
        return
    empty = sum(not text for text in completions)
    reason = f", {empty} with no content (content: null or empty)" if empty else ""
    logger.warning(
        '%r: none of the %d replies held a verdict ("Image 1/2 is better")%s, so every pair is a tie and this '
        "step gets no preference signal. Raise max_tokens (thinking judges answer last) or check the served model "
        "and its chat template.",
        judge,
        len(completions),
        reason,
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses redirects: following one would send the request, and its `Authorization` header, to another address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise JudgeRequestError(
            f"the judge server at {req.full_url} answered HTTP {code}, a redirect to {newurl}; redirects are not "
            "followed (the API key would be sent there). Set base_url to the address that serves the API."
        )


_OPENER = urllib.request.build_opener(_NoRedirect)


def _check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    valid_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not valid_type or math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        kind = "an integer" if integer else "a number"
        raise ValueError(f"`{name}` must be {kind} {bound}, got {value!r}")


# --------------------------------------------------------------------------------------------- local judge


class TransformersJudge:
    """A pairwise judge that runs a vision-language model in this process with transformers.

    The model and processor are loaded on the first call (`AutoProcessor` / `AutoModelForImageTextToText`), so
    constructing a judge is cheap. Pairs are judged in batches of `batch_size`: each conversation holds Image 1, Image
    2 and the judging prompt (`build_judge_prompt`), rendered with `processor.apply_chat_template`, left-padded and
    decoded greedily; only the generated tokens are parsed (`parse_verdict`).

    The default checkpoint is a Qwen2.5-VL model; with transformers 5, loading its processor needs `torchvision`.

    Args:
        model_id: Hub id or local path of the judge (default `DEFAULT_JUDGE_MODEL_ID`).
        device: Where to load the model (`device_map` of `from_pretrained`); default: this process's current CUDA
            device when available (each training process gets its own judge on its own GPU), else `"cpu"`. Ignored
            for a `model` you pass.
        dtype: Weight dtype when loading, a `torch.dtype` or its name (`"bfloat16"`, `"float16"`, `"float32"`,
            `"auto"`).
        max_new_tokens: Generation budget per pair. Thinking judges write their reasoning before the verdict; a reply
            cut off before it yields a tie (0.5).
        batch_size: Number of pairs generated together.
        trust_remote_code: Passed to `from_pretrained`; only enable it for checkpoints you trust.
        model: An already loaded model to use instead of loading `model_id`.
        processor: An already loaded processor to use instead of loading `model_id`. Its tokenizer is switched to
            left padding, which batched generation requires.

    Attributes:
        last_completions: The decoded replies of the last call, one per pair.
        last_num_unparsed: How many replies of the last call held no readable verdict (scored 0.5).
    """

    def __init__(
        self,
        model_id: str = DEFAULT_JUDGE_MODEL_ID,
        *,
        device: Any = None,
        dtype: Any = "bfloat16",
        max_new_tokens: int = 1024,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        model: Any = None,
        processor: Any = None,
    ) -> None:
        _check_positive("max_new_tokens", max_new_tokens, integer=True)
        _check_positive("batch_size", batch_size, integer=True)
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self.model = model
        self.processor = processor
        if processor is not None:
            self._use_left_padding(processor)
        self.last_completions: list[str] = []
        self.last_num_unparsed = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, max_new_tokens={self.max_new_tokens}, "
            f"batch_size={self.batch_size})"
        )

    @staticmethod
    def _use_left_padding(processor: Any) -> None:
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"

    def _torch_dtype(self) -> Any:
        import torch

        if isinstance(self.dtype, torch.dtype) or self.dtype == "auto":
            return self.dtype
        dtype = getattr(torch, str(self.dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f"Unknown dtype {self.dtype!r} for TransformersJudge; use a torch.dtype or one of 'bfloat16', "
                "'float16', 'float32', 'auto'"
            )
        return dtype

    def _load(self) -> None:
        """Load the processor and model from `model_id` (whichever was not passed in)."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self.processor is None:
            self.processor = AutoProcessor.from_pretrained(self.model_id, trust_remote_code=self.trust_remote_code)
            self._use_left_padding(self.processor)
        if self.model is None:
            device = self.device
            if device is None:  # this process's current GPU (set per process by accelerate), else the CPU
                device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.model_id, dtype=self._torch_dtype(), device_map=device, trust_remote_code=self.trust_remote_code
            ).eval()

    def _judge_batch(self, prompts: Sequence[str], images_a: Sequence[Any], images_b: Sequence[Any]) -> list[str]:
        """Generate the replies for one batch of pairs."""
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "image"},
                        {"type": "text", "text": build_judge_prompt(prompt)},
                    ],
                }
            ]
            for prompt in prompts
        ]
        texts = self.processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        images = [_to_rgb_image(image) for pair in zip(images_a, images_b) for image in pair]
        return self._generate(texts, images)

    def _generate(self, texts: Sequence[str], images: Sequence[Any]) -> list[str]:
        """Greedy replies to the chat-rendered `texts` with their RGB `images`; only the generated tokens, decoded."""
        import torch

        inputs = self.processor(text=list(texts), images=list(images), padding=True, return_tensors="pt")
        parameter = next(self.model.parameters())
        inputs = {
            key: value.to(parameter.device, dtype=parameter.dtype if value.is_floating_point() else None)
            if isinstance(value, torch.Tensor)
            else value
            for key, value in inputs.items()
        }
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        return list(self.processor.batch_decode(new_tokens, skip_special_tokens=True))

    def __call__(
        self, prompts: Sequence[str], images_a: Sequence[Any], images_b: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        """Judge each pair `(images_a[i], images_b[i])` for caption `prompts[i]`.

        Returns:
            P(`images_a[i]` preferred) per pair: 1.0, 0.0, or 0.5 when the reply holds no verdict.
        """
        _check_pairs(prompts, images_a, images_b)
        if self.model is None or self.processor is None:
            self._load()
        completions: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            completions.extend(self._judge_batch(prompts[start:stop], images_a[start:stop], images_b[start:stop]))
        verdicts = [_parse_verdict_or_none(text) for text in completions]
        self.last_completions = completions
        self.last_num_unparsed = sum(verdict is None for verdict in verdicts)
        _warn_no_verdict(self, completions, self.last_num_unparsed)
        return [0.5 if verdict is None else verdict for verdict in verdicts]


# --------------------------------------------------------------------------------------------- remote judge


class JudgeRequestError(RuntimeError):
    """A request to a judge server failed: rejected by the server, or still failing after every retry."""


class OpenAIJudge:
    """A pairwise judge served behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, ...).

    Each pair is one `POST {base_url}/chat/completions` whose user message holds Image 1, Image 2 (base64 `data:`
    URLs) and the judging prompt (`build_judge_prompt`). At most `max_concurrency` requests are in flight at once.
    Connection errors, timeouts, HTTP 429 and 5xx responses are retried `max_retries` times, waiting
    `backoff * 2**attempt` seconds before retry `attempt` (0, 1, ...); other 4xx responses fail at once with the
    server's message. Only the standard library is used.

    It is an async preference function: the trainer awaits it concurrently with the other async functions; to call
    it yourself, use `asyncio.run(judge(prompts=..., images_a=..., images_b=...))`.

    Example (serving the judge with vLLM):

    ```bash
    vllm serve CodeGoat24/UnifiedReward-Think-qwen-7b --served-model-name UnifiedReward --port 8080
    ```

    ```python
    judge = OpenAIJudge(base_url="http://localhost:8080/v1", model="UnifiedReward")
    ```

    Args:
        base_url: The API root, e.g. `"http://localhost:8000/v1"` (`/chat/completions` is appended).
        model: The served model name sent in each request.
        api_key: Sent as `Authorization: Bearer <api_key>`; defaults to the `OPENAI_API_KEY` environment variable
            (no header when neither is set). It never appears in `repr`, logs or error messages.
        timeout: Seconds to wait for each response.
        max_retries: Retries per request after the first attempt.
        backoff: Base of the exponential wait between retries, in seconds.
        max_concurrency: Maximum number of requests in flight at once.
        max_tokens: Generation budget per reply. Thinking judges write their reasoning before the verdict; a reply
            cut off before it yields a tie (0.5).
        temperature: Sampling temperature (0 = greedy, the default).
        image_format: How images are encoded: `"PNG"` (lossless) or `"JPEG"` (smaller requests).

    Attributes:
        last_latencies: Seconds each request of the last call took (retries included), one per pair.
        last_completions: The replies of the last call, one per pair.
        last_num_unparsed: How many replies of the last call held no readable verdict (scored 0.5).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 16,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        image_format: str = "PNG",
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"`base_url` must be an http(s) URL of the OpenAI-compatible API root, e.g. "
                f"'http://localhost:8000/v1'; got {base_url!r}"
            )
        if not isinstance(model, str) or not model:
            raise ValueError(f"`model` must be the served model name (a non-empty string), got {model!r}")
        _check_positive("timeout", timeout)
        _check_positive("max_retries", max_retries, integer=True, allow_zero=True)
        _check_positive("backoff", backoff, allow_zero=True)
        _check_positive("max_concurrency", max_concurrency, integer=True)
        _check_positive("max_tokens", max_tokens, integer=True)
        _check_positive("temperature", temperature, allow_zero=True)
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self._api_key = api_key if api_key is not None else (os.environ.get("OPENAI_API_KEY") or None)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.image_format = image_format
        self.last_latencies: list[float] = []
        self.last_completions: list[str] = []
        self.last_num_unparsed = 0

    def __repr__(self) -> str:  # the API key is deliberately left out
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
            f"max_concurrency={self.max_concurrency}, max_retries={self.max_retries})"
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _request_body(self, prompt: str, url_a: str, url_b: str) -> bytes:
        content = [
            {"type": "image_url", "image_url": {"url": url_a}},
            {"type": "image_url", "image_url": {"url": url_b}},
            {"type": "text", "text": build_judge_prompt(prompt)},
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return json.dumps(body).encode("utf-8")

    def _post(self, body: bytes) -> str:
        """Send one request (blocking, run in a worker thread) and return the reply text.

        Raises:
            _RetryableError: the attempt may succeed if repeated.
            JudgeRequestError: the server rejected the request, or answered with something that is not a chat
                completion.
        """
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            try:
                message = error.read().decode("utf-8", errors="replace")[:_MAX_ERROR_BODY_CHARS]
            except Exception:
                message = ""
            failure = f"HTTP {error.code} {self._redact(message or str(error.reason))}"
            if error.code == _RETRYABLE_HTTP_STATUS or error.code >= 500:
                raise _RetryableError(failure) from None
            raise JudgeRequestError(f"the judge server at {self.url} rejected the request: {failure}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
            raise _RetryableError(self._redact(f"{type(error).__name__}: {error}")) from None
        except urllib.error.URLError as error:  # connection refused, DNS failure, timeout while connecting
            raise _RetryableError(self._redact(f"{type(error.reason).__name__}: {error.reason}")) from None
        try:
            content = json.loads(payload)["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = self._redact(payload[:_MAX_ERROR_BODY_CHARS].decode("utf-8", errors="replace"))
            raise JudgeRequestError(
                f"the judge server at {self.url} did not answer with a chat completion "
                f"(expected JSON with choices[0].message.content); got: {snippet!r}"
            ) from None
        return content if isinstance(content, str) else ""  # content: null (a refusal, a tool call): no verdict

    async def _request(
        self, body: bytes, semaphore: asyncio.Semaphore, executor: ThreadPoolExecutor
    ) -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        async with semaphore:
            start = time.perf_counter()
            for attempt in range(self.max_retries + 1):
                try:
                    text = await loop.run_in_executor(executor, self._post, body)
                    return text, time.perf_counter() - start
                except _RetryableError as error:
                    last_failure = str(error)
                if attempt < self.max_retries:
                    await asyncio.sleep(self.backoff * 2**attempt)
        raise JudgeRequestError(
            f"the judge server at {self.url} failed {self.max_retries + 1} attempt(s); last failure: {last_failure}. "
            "Check that the server is up and reachable, or raise `timeout` / `max_retries`."
        )

    async def __call__(
        self, prompts: Sequence[str], images_a: Sequence[Any], images_b: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        """Judge each pair `(images_a[i], images_b[i])` for caption `prompts[i]`, one request per pair.

        Returns:
            P(`images_a[i]` preferred) per pair: 1.0, 0.0, or 0.5 when the reply holds no verdict.

        Raises:
            JudgeRequestError: a request was rejected (4xx other than 429), or still failed after `max_retries`
                retries.
        """
        _check_pairs(prompts, images_a, images_b)
        if not prompts:
            self.last_latencies, self.last_completions, self.last_num_unparsed = [], [], 0
            return []
        loop = asyncio.get_running_loop()
        # A dedicated pool: the loop's default executor may have fewer threads than `max_concurrency`.
        executor = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(prompts)), thread_name_prefix="openai-judge"
        )
        try:
            # Each image object is encoded once (an image of a group appears in several pairs), off the event loop.
            distinct = {id(image): image for image in [*images_a, *images_b]}
            encoded = await asyncio.gather(
                *(
                    loop.run_in_executor(executor, encode_image, image, self.image_format)
                    for image in distinct.values()
                )
            )
            urls = dict(zip(distinct, encoded))
            bodies = [
                self._request_body(prompt, urls[id(image_a)], urls[id(image_b)])
                for prompt, image_a, image_b in zip(prompts, images_a, images_b)
            ]
            semaphore = asyncio.Semaphore(self.max_concurrency)
            results = await asyncio.gather(*(self._request(body, semaphore, executor) for body in bodies))
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
        completions = [text for text, _ in results]
        verdicts = [_parse_verdict_or_none(text) for text in completions]
        self.last_latencies = [latency for _, latency in results]
        self.last_completions = completions
        self.last_num_unparsed = sum(verdict is None for verdict in verdicts)
        _warn_no_verdict(self, completions, self.last_num_unparsed)
        return [0.5 if verdict is None else verdict for verdict in verdicts]


class _RetryableError(Exception):
    """An attempt that failed in a way worth retrying (its message says how; never contains the API key)."""
