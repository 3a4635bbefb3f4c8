"""Tests for the `ocr` built-in reward: text extraction, edit distance, and the real RapidOCR engine (offline)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from trl_flow_grpo.rewards import REWARD_FUNCS, call_reward_funcs, reward_func_name
from trl_flow_grpo.rewards.ocr import (
    OCRReward,
    extract_quoted_text,
    levenshtein_distance,
    normalize_text,
    ocr_similarity,
)

# ------------------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("open24hours", "open24hours", 0),
        ("open24hours", "opem24hours", 1),  # substitution
        ("open24hours", "open24hour", 1),  # deletion
        ("open24hours", "openn24hours", 1),  # insertion
        ("ab", "ba", 2),  # no transpositions in Levenshtein distance
    ],
)
def test_levenshtein_distance(a, b, expected):
    assert levenshtein_distance(a, b) == expected
    assert levenshtein_distance(b, a) == expected


def test_extract_quoted_text():
    assert extract_quoted_text('A neon sign that says "OPEN 24 HOURS" at night') == "OPEN 24 HOURS"
    assert extract_quoted_text('a mug with "coffee" and a shirt with "tea"') == "coffee"  # the first quote only
    assert extract_quoted_text("a poster reading “Hello World”") == "Hello World"
    assert extract_quoted_text("a photo of a cat") is None
    assert extract_quoted_text('an unclosed "quote') is None
    assert extract_quoted_text('empty quotes ""') == ""


def test_normalize_text_lowercases_and_removes_whitespace():
    assert normalize_text(" Open 24\tHOURS\n") == "open24hours"


def test_ocr_similarity_follows_flow_grpo():
    assert ocr_similarity("OPEN 24 HOURS", "open 24 hours") == 1.0  # case and spaces are ignored
    assert ocr_similarity("Welcome! OPEN 24 HOURS today", "OPEN 24 HOURS") == 1.0  # target contained in the text
    assert ocr_similarity("OPEN 24 HOUR", "OPEN 24 HOURS") == pytest.approx(1 - 1 / 11)
    assert ocr_similarity("OPEM 2A HOURS", "OPEN 24 HOURS") == pytest.approx(1 - 2 / 11)
    assert ocr_similarity("", "OPEN") == 0.0
    assert ocr_similarity("something else entirely, and long", "OPEN") == 0.0  # clipped at 0
    with pytest.raises(ValueError, match="empty"):
        ocr_similarity("text", "   ")


# --------------------------------------------------------------------------------------------- with a fake engine


class FakeEngine:
    """Mimics RapidOCR's interface: `engine(bgr_array, use_cls=...)` -> `(results | None, elapsed)`."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.calls: list[tuple[tuple[int, ...], dict]] = []

    def __call__(self, image, **kwargs):
        self.calls.append((image.shape, kwargs))
        if not self.lines:
            return None, None
        return [[[[0, 0], [1, 0], [1, 1], [0, 1]], line, 0.9] for line in self.lines], [0.0, 0.0, 0.0]


def test_reward_with_injected_engine():
    engine = FakeEngine(["OPEN 24", "HOURS"])
    reward = OCRReward(engine=engine)
    image = Image.new("L", (40, 30), 255)  # any mode: converted to an RGB (then BGR) array
    prompts = ['a sign that says "open 24 hours"', "a cat", 'a sign saying "CLOSED"', 'blank ""']
    rewards = reward(prompts=prompts, images=[image] * 4)
    assert rewards[0] == 1.0  # lines are joined, then compared without spaces or case
    assert rewards[1] is None  # no quoted text: not applicable
    assert rewards[2] == 0.0  # edit distance 10 > len("closed"): clipped at 0
    assert rewards[3] is None  # empty target: not applicable
    assert len(engine.calls) == 2  # the engine only reads images whose prompt has a target
    assert engine.calls[0] == ((30, 40, 3), {"use_cls": False})
    assert OCRReward(engine=FakeEngine([]))(prompts=['"hi"'], images=[image]) == [0.0]  # nothing read
    misread = OCRReward(engine=FakeEngine(["CL0SED"]))(prompts=['a "Closed" sign'], images=[image])
    assert misread == [pytest.approx(1 - 1 / 6)]


class TorchEngine(torch.nn.Module):
    """A `FakeEngine` that is a torch module (an OCR model run by torch). Its one parameter is on the meta device,
    which stands in for an accelerator (the reward takes an injected engine's device as its compute device); `.to`
    records where it is sent without moving, and each read records where the engine last went."""

    def __init__(self, lines: list[str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.fake = FakeEngine(lines)
        self.moves: list[str] = []
        self.reads_on: list[str] = []

    def to(self, device, *args, **kwargs):
        self.moves.append(str(device))
        return self

    def forward(self, image, **kwargs):
        self.reads_on.append(self.moves[-1] if self.moves else "none")
        return self.fake(image, **kwargs)


def test_offload_keeps_a_torch_engine_on_the_cpu_between_calls():
    engine = TorchEngine(["OPEN"])
    reward = OCRReward(engine=engine, offload=True)
    image = Image.new("RGB", (40, 30), 255)
    assert reward(prompts=['"open"', "no text", '"open"'], images=[image] * 3) == [1.0, None, 1.0]
    assert engine.moves == ["cpu", "meta", "cpu"]  # parked at first use, on its device for the call, back after it
    assert engine.reads_on == ["meta", "meta"]  # each read ran on the device
    assert reward(prompts=["no text"], images=[image]) == [None]
    assert engine.moves == ["cpu", "meta", "cpu"]  # nothing to read: not moved
    assert reward.read_text(image) == "OPEN" and engine.moves == ["cpu", "meta", "cpu", "meta", "cpu"]
    assert not engine.training and not engine.weight.requires_grad
    assert OCRReward().offload is False
    resident = TorchEngine(["OPEN"])
    OCRReward(engine=resident)(prompts=['"open"'], images=[image])
    assert resident.moves == ["meta"] and resident.reads_on == ["meta"]  # without offload it stays where it was


def test_missing_engine_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # makes the import fail
    reward = OCRReward()
    assert reward(prompts=["no quotes here"], images=[Image.new("RGB", (8, 8))]) == [None]  # engine not needed
    with pytest.raises(ImportError, match=r'pip install "trl-flow-grpo\[ocr\]"'):
        reward(prompts=['"text"'], images=[Image.new("RGB", (8, 8))])


def test_builtin_registration():
    builtin = REWARD_FUNCS["ocr"]
    assert isinstance(builtin, OCRReward)
    assert reward_func_name("ocr") == "ocr"
    assert reward_func_name(builtin) == "ocr"
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        builtin(prompts=['"a"'], images=[Image.new("RGB", (8, 8))] * 2)


def test_importing_the_registry_loads_no_ocr_engine_or_model():
    code = (
        "import sys; from trl_flow_grpo.rewards import REWARD_FUNCS; "
        "assert 'rapidocr_onnxruntime' not in sys.modules, 'rapidocr imported'; "
        "assert REWARD_FUNCS['ocr'].engine is None; assert not REWARD_FUNCS['pickscore'].is_loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------- the real engine


def _render(text: str, size: tuple[int, int] = (560, 120)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 30), text, fill="black", font=ImageFont.load_default(size=48))
    return image


@pytest.fixture(scope="module")
def ocr_reward() -> OCRReward:
    # Skip only when the engine is not installed; an installed engine that fails to import (e.g. OpenCV missing a
    # system library) is an error.
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip('needs pip install "trl-flow-grpo[ocr]"')
    return OCRReward(engine_kwargs={"intra_op_num_threads": 1, "inter_op_num_threads": 1})


def test_real_ocr_reads_rendered_text(ocr_reward):
    image = _render("OPEN 24 HOURS")
    assert normalize_text(ocr_reward.read_text(image)) == "open24hours"
    prompts = [
        'A neon sign that says "OPEN 24 HOURS"',  # the rendered text
        'A sign that says "open 24 hours"',  # same text, other case
        'A sign that says "CLOSED FOR LUNCH"',  # another text
        "A sign on a shop window",  # no quoted text
    ]
    rewards = ocr_reward(prompts=prompts, images=[image] * len(prompts))
    assert rewards[0] == pytest.approx(1.0)
    assert rewards[1] == pytest.approx(1.0)
    assert rewards[2] < 0.3
    assert rewards[3] is None


def test_real_ocr_blank_image_and_trainer_call(ocr_reward):
    blank = Image.new("RGB", (256, 256), "white")
    prompts = ['a sign that says "HELLO"', 'a sign that says "HELLO"', "a cat"]
    with pytest.warns(UserWarning, match="sample 2"):  # no reward applies to the prompt without quotes
        rewards = call_reward_funcs([ocr_reward], prompts, [blank, _render("HELLO"), blank])
    assert rewards.shape == (3, 1)
    assert rewards[0, 0].item() == 0.0  # nothing to read
    assert rewards[1, 0].item() == pytest.approx(1.0)
    assert torch.isnan(rewards[2, 0])  # None -> NaN (not applicable)


def test_real_ocr_accepts_numpy_rgb(ocr_reward):
    array = np.asarray(_render("STOP"))  # RGB array; converted to BGR for RapidOCR
    assert ocr_reward(prompts=['a "STOP" sign'], images=[array]) == [pytest.approx(1.0)]
