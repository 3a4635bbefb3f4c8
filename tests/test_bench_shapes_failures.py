"""benchmarks/shapes_failures.py: the reason it gives a failing image, on drawn scenes whose fault is known."""

import importlib.util
import sys
from pathlib import Path

import pytest

from trl_flow_grpo.toy.shapes import Scene, ShapeObject, render

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("shapes_failures", ROOT / "benchmarks" / "shapes_failures.py")
sf = importlib.util.module_from_spec(_spec)
sys.modules["shapes_failures"] = sf
_spec.loader.exec_module(sf)


def _image(*objects: ShapeObject):
    return render(Scene("unused", "position", list(objects)), size=32)


RED_CIRCLE_TOP = ShapeObject("circle", "red", 16, 7, 5)
BLUE_SQUARE_BOTTOM = ShapeObject("square", "blue", 16, 24, 5)


@pytest.mark.parametrize(
    ("prompt", "objects", "reason"),
    [
        ("a red circle above a blue square", [RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM], "correct"),
        ("a red circle below a blue square", [RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM], "relation reversed"),
        (
            "a red circle left of a blue square",  # one above the other: neither left of nor right of
            [RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM],
            "relation unclear",
        ),
        ("a red circle above a green square", [RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM], "an object's colour wrong"),
        ("a red circle above a blue triangle", [RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM], "an object's shape wrong"),
        ("a red circle and a yellow triangle", [RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM], "an object missing"),
        ("a red circle and a blue square", [RED_CIRCLE_TOP], "fewer than 2 objects detected"),
        ("three red circles", [RED_CIRCLE_TOP], "too few"),
        ("a blue square", [RED_CIRCLE_TOP], "wrong colour and shape"),
        ("a red square", [RED_CIRCLE_TOP], "wrong shape"),
        ("a green circle", [RED_CIRCLE_TOP], "wrong colour"),
        ("a green circle", [], "nothing detected"),
    ],
)
def test_the_reason_names_what_is_wrong(prompt, objects, reason):
    assert sf.verdict(prompt, _image(*objects))[0] == reason


def test_extra_objects_are_counted_even_when_correct():
    extra = ShapeObject("triangle", "yellow", 6, 24, 4)
    image = _image(RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM, extra)
    reason, detected = sf.verdict("a red circle above a blue square", image)
    assert reason == "correct" and detected == 3
