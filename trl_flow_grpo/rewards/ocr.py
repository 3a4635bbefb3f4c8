"""OCR text-rendering reward, Flow-GRPO's definition.

The text an image should show is the first double-quoted part of its prompt (`A sign that says "OPEN 24 HOURS"`
-> `OPEN 24 HOURS`). The image is read with an OCR engine (RapidOCR: PP-OCRv4 detection and recognition run by
ONNX Runtime on the CPU; the models ship inside the `rapidocr-onnxruntime` wheel, so nothing is downloaded). Both
texts are lowercased and stripped of whitespace, then

    reward = 1 - min(distance, len(target)) / len(target)

where `distance` is 0 if the target occurs in the recognised text and their Levenshtein distance otherwise. The
reward is in [0, 1]; it is `None` (not applicable) for a prompt without a quoted text.

RapidOCR never uses the accelerator, so `offload` concerns only an injected engine that is a torch module.

Install the engine with `pip install "trl-flow-grpo[ocr]"`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._models import RewardModel
from .compression import _to_rgb_image

__all__ = [
    "OCRReward",
    "extract_quoted_text",
    "levenshtein_distance",
    "normalize_text",
    "ocr_reward",
    "ocr_similarity",
]

# The first text between straight double quotes, or between typographic ones (“...”).
_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def levenshtein_distance(a: str, b: str) -> int:
    """Edit distance between `a` and `b`: the fewest single-character insertions, deletions and substitutions that
    turn one into the other."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def extract_quoted_text(prompt: str) -> str | None:
    """The text inside the first pair of double quotes (`"..."` or `“...”`) of `prompt`, or `None` if there is none.

    Example: `extract_quoted_text('A neon sign that says "OPEN 24 HOURS" at night')` is `'OPEN 24 HOURS'`.
    """
    match = _QUOTED.search(prompt)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def normalize_text(text: str) -> str:
    """Lowercase `text` and remove all whitespace: the form in which OCR output and target are compared."""
    return "".join(text.split()).lower()


def ocr_similarity(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR score of `recognized` text for the `target` text, in [0, 1].

    Both are normalised with [`normalize_text`]. The score is 1 if the target occurs in the recognised text, else
    `1 - min(levenshtein_distance, len(target)) / len(target)`.

    Raises:
        ValueError: if the normalised target is empty.
    """
    recognized, target = normalize_text(recognized), normalize_text(target)
    if not target:
        raise ValueError("the OCR target text is empty (or only whitespace)")
    distance = 0 if target in recognized else levenshtein_distance(recognized, target)
    return 1.0 - min(distance, len(target)) / len(target)


class OCRReward(RewardModel):
    """How well each image renders the quoted text of its prompt (see the module docstring), in [0, 1] or `None`.

    The OCR engine (`rapidocr_onnxruntime.RapidOCR`) is created on the first call that needs it. It runs on the
    CPU, without the angle classifier (as Flow-GRPO's PaddleOCR setup), and keeps recognised lines with a
    confidence of at least 0.5 (RapidOCR's default), joined in reading order.

    Args:
        engine: An already created `RapidOCR` instance (or any callable with its interface: `engine(bgr_array,
            use_cls=False)` returns `(results, elapsed)` where `results` is `None` or a list of `[box, text,
            confidence]`), to use instead of creating one.
        engine_kwargs: Keyword arguments for `RapidOCR(...)`, e.g. `{"intra_op_num_threads": 4}` to bound ONNX
            Runtime's CPU threads, or `{"text_score": 0.3}` to keep less confident lines.
        offload: For an injected engine that is a `torch.nn.Module`: keep it on the CPU between calls and move it to
            the device it was given on only while reading (as the other model rewards' `offload`; it is put in eval
            mode without gradients on first use). RapidOCR runs on the CPU, so for it this changes nothing.

    Raises:
        ImportError: on the first call, if `rapidocr-onnxruntime` is not installed and no `engine` was given.
    """

    def __init__(
        self, *, engine: Any = None, engine_kwargs: dict[str, Any] | None = None, offload: bool = False
    ) -> None:
        super().__init__(offload=offload)
        self.engine = engine
        self.engine_kwargs = dict(engine_kwargs or {})

    def _models(self) -> list[torch.nn.Module]:
        return [self.engine] if isinstance(self.engine, torch.nn.Module) else []

    def _load_models(self) -> bool:
        if self.engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as error:
                raise ImportError(
                    f'The "ocr" reward needs the RapidOCR engine, which failed to import ({error}). Install it with: '
                    'pip install "trl-flow-grpo[ocr]" (or pip install "rapidocr-onnxruntime>=1.4"; its wheels need '
                    "Python < 3.13), or pass a compatible engine: OCRReward(engine=...)."
                ) from error
            self.engine = RapidOCR(**self.engine_kwargs)
        return False  # an injected torch engine keeps its device; RapidOCR has none to move

    def read_text(self, image: Image.Image | np.ndarray) -> str:
        """The text OCR recognises in `image` (lines concatenated in reading order; `""` if none)."""
        with self._on_device():
            return self._read_text(image)

    def _read_text(self, image: Image.Image | np.ndarray) -> str:
        bgr = np.ascontiguousarray(np.asarray(_to_rgb_image(image))[:, :, ::-1])  # RapidOCR reads arrays as BGR
        results, _ = self.engine(bgr, use_cls=False)
        return "".join(str(line[1]) for line in results or [])

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray], **kwargs: Any
    ) -> list[float | None]:
        """Reward-function entry point: one score in [0, 1] per image, `None` where the prompt quotes no text.

        Args:
            prompts: One prompt per image; the target text is the first double-quoted part.
            images: PIL images (any mode; converted to RGB) or `uint8` numpy arrays of shape `(H, W[, C])`.
            **kwargs: Other dataset columns and `trainer_state`; ignored.
        """
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        targets = [extract_quoted_text(prompt) for prompt in prompts]
        rewards: list[float | None] = [None] * len(images)
        read = [i for i, target in enumerate(targets) if target is not None and normalize_text(target)]
        if read:  # the engine is created (and moved, with `offload`) only when some prompt has a target
            with self._on_device():
                for i in read:
                    rewards[i] = ocr_similarity(self._read_text(images[i]), targets[i])
        return rewards

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine_kwargs={self.engine_kwargs!r}, loaded={self.engine is not None})"


ocr_reward = OCRReward()
"""The built-in `"ocr"` reward; the OCR engine is created on first use."""
