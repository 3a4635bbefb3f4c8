"""UnifiedReward pointwise scores: a vision-language reward model rates each image for its prompt from 1 to 5.

[UnifiedReward](https://huggingface.co/CodeGoat24/UnifiedReward-qwen-7b) (Wang et al., 2025) is a Qwen2.5-VL model
trained to assess image generation, pairwise and pointwise. Used pointwise, it is shown one image and the prompt
`POINT_PROMPT_TEMPLATE` (which follows the structure of UnifiedReward's pointwise image-generation template: judge
alignment with the caption and overall image quality, then give a score from 1 to 5 after "Final Score:"), and
`parse_point_score` reads the number after the last "Final Score:" of its reply.

The reward is that number, in [1, 5] (`normalize=True` maps it to [0, 1] as `(score - 1) / 4`). A reply with no
readable score, or a score outside [1, 5], gives `None` for that image: not applicable, ignored by the trainer
(NaN in the reward matrix), and counted in `last_num_unparsed`; a call where no reply held a score logs a warning.

Two ways to run it, both reusing the pairwise judges' machinery of `trl_flow_grpo.rewards.judge`:

- [`TransformersUnifiedReward`] (the built-in `"unifiedreward"`): the model runs in this process through
  transformers, loaded on the first call;
- [`OpenAIUnifiedReward`]: the model is served behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang),
  one request per image, with the retries, bounded concurrency and API-key handling of `OpenAIJudge`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ._models import offloaded
from .compression import _to_rgb_image
from .judge import OpenAIJudge, TransformersJudge, encode_image

__all__ = [
    "POINT_MAX_SCORE",
    "POINT_MIN_SCORE",
    "POINT_PROMPT_TEMPLATE",
    "UNIFIEDREWARD_MODEL_ID",
    "OpenAIUnifiedReward",
    "TransformersUnifiedReward",
    "build_point_prompt",
    "parse_point_score",
    "unifiedreward_reward",
]

UNIFIEDREWARD_MODEL_ID = "CodeGoat24/UnifiedReward-qwen-7b"
"""The UnifiedReward checkpoint that scores single images (Qwen2.5-VL-7B architecture)."""

POINT_MIN_SCORE = 1.0
POINT_MAX_SCORE = 5.0

POINT_PROMPT_TEMPLATE = """\
You are given a text caption and a generated image based on that caption. Your task is to evaluate this image based \
on two key criteria:
1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the accuracy of \
depicted objects, their relationships, and attributes as described in the caption.
2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, color \
accuracy, and overall aesthetic appeal.
Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.
Your task is provided as follows:
Text Caption: [{prompt}]"""
"""The pointwise scoring prompt; `{prompt}` is replaced by the caption (see `build_point_prompt`)."""

_SCORE_PATTERN = re.compile(r"final\s*score\s*[:：]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
logger = logging.getLogger(__name__)


def build_point_prompt(prompt: str) -> str:
    """Return the scoring instruction for the caption `prompt` (`POINT_PROMPT_TEMPLATE` filled in)."""
    return POINT_PROMPT_TEMPLATE.format(prompt=prompt)


def parse_point_score(
    text: str | None, min_score: float = POINT_MIN_SCORE, max_score: float = POINT_MAX_SCORE
) -> float | None:
    """The score after the last "Final Score:" of a reply, or `None` when there is none or it is out of range.

    Case, spacing, Markdown emphasis (`**Final Score:** 4`) and a full-width colon do not matter; a fraction such as
    `4/5` reads as its numerator. The last occurrence wins (a model may restate the instruction before answering).

    Args:
        text: The model's reply (`None` or empty: no score).
        min_score: Smallest valid score.
        max_score: Largest valid score.
    """
    if not text:
        return None
    matches = _SCORE_PATTERN.findall(str(text).replace("*", ""))
    if not matches:
        return None
    score = float(matches[-1])
    return score if min_score <= score <= max_score else None


def _to_rewards(completions: Sequence[str | None], normalize: bool) -> tuple[list[float | None], int]:
    scores = [parse_point_score(text) for text in completions]
    if normalize:
        scores = [
            None if score is None else (score - POINT_MIN_SCORE) / (POINT_MAX_SCORE - POINT_MIN_SCORE)
            for score in scores
        ]
    return scores, sum(score is None for score in scores)


def _warn_no_score(reward: Any, completions: Sequence[str | None], num_unparsed: int) -> None:
    """One line when no reply of a call held a score: every image is then not applicable."""
    if not completions or num_unparsed < len(completions):
        return
    logger.warning(
        '%r: none of the %d replies held a score ("Final Score: N" with N in [%g, %g]), so every image of this call '
        "is scored None. Raise the token budget or check the served model and its chat template.",
        reward,
        len(completions),
        POINT_MIN_SCORE,
        POINT_MAX_SCORE,
    )


def _check_images(prompts: Sequence[str], images: Sequence[Any]) -> None:
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")


class TransformersUnifiedReward(TransformersJudge):
    """UnifiedReward pointwise scores computed in this process with transformers (a reward function).

    Loading is `TransformersJudge`'s: `AutoProcessor` / `AutoModelForImageTextToText` from `model_id` on the first
    call, `dtype`, `device_map=device`, eval mode. Images are scored in batches of `batch_size`: each conversation
    holds the image and `build_point_prompt(prompt)`, rendered with `processor.apply_chat_template`, left-padded and
    decoded greedily under `torch.inference_mode()`; only the generated tokens are parsed (`parse_point_score`).

    Args:
        model_id: Hub id or local path of the reward model (default `UNIFIEDREWARD_MODEL_ID`).
        device: Where to run the model; default: this process's current CUDA device when available, else `"cpu"`.
        dtype: Weight dtype when loading, a `torch.dtype` or its name (`"bfloat16"`, the default).
        max_new_tokens: Generation budget per image; a reply cut off before its "Final Score:" gives `None`.
        batch_size: Number of images generated for together.
        normalize: Map the 1-5 score to [0, 1] (`(score - 1) / 4`).
        offload: Keep the model on the CPU between calls and move it to `device` only while scoring.
        trust_remote_code: Passed to `from_pretrained`; only enable it for checkpoints you trust.
        model: An already loaded model to use instead of loading `model_id`.
        processor: An already loaded processor (switched to left padding).

    Attributes:
        last_completions: The decoded replies of the last call, one per image.
        last_num_unparsed: How many replies of the last call held no valid score (scored `None`).
    """

    def __init__(
        self,
        model_id: str = UNIFIEDREWARD_MODEL_ID,
        *,
        device: Any = None,
        dtype: Any = "bfloat16",
        max_new_tokens: int = 256,
        batch_size: int = 8,
        normalize: bool = False,
        offload: bool = False,
        trust_remote_code: bool = False,
        model: Any = None,
        processor: Any = None,
    ) -> None:
        super().__init__(
            model_id,
            device=device,
            dtype=dtype,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            model=model,
            processor=processor,
        )
        self.normalize = normalize
        self.offload = offload
        self._compute_device: Any = None

    def _prepare(self) -> None:
        import torch

        if self._compute_device is not None:
            return
        if self.model is None or self.processor is None:
            self._load()
        self._compute_device = next(self.model.parameters()).device
        if self.device is not None:
            self._compute_device = torch.device(self.device)
        if self.offload:
            self.model.to("cpu")

    def _score_batch(self, prompts: Sequence[str], images: Sequence[Any]) -> list[str]:
        """Generate the replies for one batch of images."""
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_point_prompt(prompt)}]}]
            for prompt in prompts
        ]
        texts = self.processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        return self._generate(texts, [_to_rgb_image(image) for image in images])

    def __call__(self, prompts: Sequence[str], images: Sequence[Any], **kwargs: Any) -> list[float | None]:  # type: ignore[override]
        """Score each image `images[i]` for caption `prompts[i]`.

        Returns:
            The 1-5 score per image (or its [0, 1] normalisation), `None` where the reply held no valid score.
        """
        _check_images(prompts, images)
        if not prompts:
            self.last_completions, self.last_num_unparsed = [], 0
            return []
        self._prepare()
        completions: list[str] = []
        with offloaded([self.model], self._compute_device, self.offload):
            for start in range(0, len(prompts), self.batch_size):
                stop = start + self.batch_size
                completions.extend(self._score_batch(prompts[start:stop], images[start:stop]))
        scores, self.last_num_unparsed = _to_rewards(completions, self.normalize)
        self.last_completions = completions
        _warn_no_score(self, completions, self.last_num_unparsed)
        return scores


class OpenAIUnifiedReward(OpenAIJudge):
    """UnifiedReward pointwise scores from a model served behind an OpenAI-compatible endpoint (an async reward).

    Each image is one `POST {base_url}/chat/completions` whose user message holds the image (a base64 `data:` URL)
    and `build_point_prompt(prompt)`. Retries, backoff, bounded concurrency, the refusal of redirects and the API key
    (from `api_key` or `OPENAI_API_KEY`, never shown) are `OpenAIJudge`'s; see it for every argument but these:

    Args:
        max_tokens: Generation budget per reply (default 256); a reply cut off before "Final Score:" gives `None`.
        normalize: Map the 1-5 score to [0, 1] (`(score - 1) / 4`).

    Example (serving the model with vLLM):

    ```bash
    vllm serve CodeGoat24/UnifiedReward-qwen-7b --served-model-name UnifiedReward --port 8080
    ```

    ```python
    reward = OpenAIUnifiedReward(base_url="http://localhost:8080/v1", model="UnifiedReward")
    trainer = FlowGRPOTrainer(model, reward_funcs=[reward], ...)
    ```

    Attributes:
        last_latencies: Seconds each request of the last call took (retries included), one per image.
        last_completions: The replies of the last call, one per image.
        last_num_unparsed: How many replies of the last call held no valid score (scored `None`).
    """

    def __init__(self, base_url: str, model: str, *, max_tokens: int = 256, normalize: bool = False, **kwargs: Any):
        super().__init__(base_url, model, max_tokens=max_tokens, **kwargs)
        self.normalize = normalize

    def _point_body(self, prompt: str, url: str) -> bytes:
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": build_point_prompt(prompt)},
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return json.dumps(body).encode("utf-8")

    async def __call__(self, prompts: Sequence[str], images: Sequence[Any], **kwargs: Any) -> list[float | None]:  # type: ignore[override]
        """Score each image `images[i]` for caption `prompts[i]`, one request per image.

        Returns:
            The 1-5 score per image (or its [0, 1] normalisation), `None` where the reply held no valid score.

        Raises:
            JudgeRequestError: a request was rejected (4xx other than 429), or still failed after `max_retries`
                retries.
        """
        _check_images(prompts, images)
        if not prompts:
            self.last_latencies, self.last_completions, self.last_num_unparsed = [], [], 0
            return []
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(prompts)), thread_name_prefix="openai-unifiedreward"
        )
        try:
            urls = await asyncio.gather(
                *(loop.run_in_executor(executor, encode_image, image, self.image_format) for image in images)
            )
            bodies = [self._point_body(prompt, url) for prompt, url in zip(prompts, urls)]
            semaphore = asyncio.Semaphore(self.max_concurrency)
            results = await asyncio.gather(*(self._request(body, semaphore, executor) for body in bodies))
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
        completions = [text for text, _ in results]
        scores, self.last_num_unparsed = _to_rewards(completions, self.normalize)
        self.last_latencies = [latency for _, latency in results]
        self.last_completions = completions
        _warn_no_score(self, completions, self.last_num_unparsed)
        return scores


unifiedreward_reward = TransformersUnifiedReward()
"""The built-in `"unifiedreward"` reward: UnifiedReward-qwen-7b's 1-5 score, run locally, loaded on first use."""
