"""Why do shapes-world images fail? The reward's verdict on every held-out image, counted by reason, with a sheet of
failures to look at (issue 12: "look at the images of failures and at the reward's verdicts on them").

    OMP_NUM_THREADS=1 python benchmarks/shapes_failures.py [--transformer DIR] [--images_per_prompt 4]
        [--sheet_size 60] [--split test|train] [--output_dir benchmarks/results/shapes_failures/base]

Renders every held-out caption (or, with `--split train`, every 4th training caption) with the held-out evaluation's
sampling and seeds (`toy.evaluation.evaluate_heldout`: 10 ODE steps, CFG 4.5 or `--guidance_scale`), scores each
image with `toy.geneval.score_image` and gives each failure one reason:

- single object: nothing detected / wrong colour / wrong shape / wrong colour and shape;
- counting: too few / too many objects of the requested colour and shape;
- two objects and position: fewer than 2 objects detected; an object missing (no detection earns it any credit);
  an object's colour wrong / shape wrong (its best detection matches the other attribute); for position, both
  objects right but the relation does not hold, split into *reversed* (the opposite relation holds: "B above A"
  drawn for "A above B") and *unclear* (neither holds: side by side for "above", or too close).

Also counted: images with more objects than the caption asks for (correct or not), and the correct images with
nothing extra (the reward, like GenEval's rules, lets extra objects pass outside counting). `--transformer` is a
trained transformer folder (e.g. one written by `shapes_learning.py --save_model_dir`); default: the shipped base
model. Writes `failures.json`, `table.md` and `failures.png` (a sample of failures at 3x, each with its caption and
verdict) to `--output_dir`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random

from trl_flow_grpo.toy.geneval import (
    MIN_AXIS_FRACTION,
    MIN_OFFSET,
    REFERENCE_SIZE,
    parse_prompt,
    requested_objects,
    score_image,
)
from trl_flow_grpo.toy.shapes import CATEGORIES, all_captions, relation_holds


def verdict(prompt: str, image) -> tuple[str, int]:
    """The reason `image` fails `prompt` ("correct" if it does not), and how many objects were detected."""
    _, details = score_image(prompt, image)
    detections = details["detections"]  # score_image's own detections: colour, shape, centroid of each
    if details["correct"]:
        return "correct", len(detections)
    parsed = parse_prompt(prompt)
    category = parsed.category
    if category == "single_object":
        want = parsed.requirements[0]
        if not detections:
            return "nothing detected", 0
        if any(d["color"] == want.color and d["shape"] == want.shape for d in detections):  # cannot fail then
            raise AssertionError(f"{prompt!r}: a matching detection but not correct")
        if any(d["shape"] == want.shape for d in detections):
            return "wrong colour", len(detections)
        if any(d["color"] == want.color for d in detections):
            return "wrong shape", len(detections)
        return "wrong colour and shape", len(detections)
    if category == "counting":
        too_few = details["detected_count"] < details["expected_count"]
        return ("too few" if too_few else "too many"), len(detections)
    if len(detections) < 2:
        return "fewer than 2 objects detected", len(detections)
    credits = details["object_credits"]
    if min(credits) == 1.0:  # both objects drawn right: the relation fails
        a, b = parsed.requirements
        offset = MIN_OFFSET * min(image.size) / REFERENCE_SIZE  # scaled as score_image scales it
        pairs = [
            (da, db)
            for da in detections
            for db in detections
            if da is not db
            and (da["color"], da["shape"]) == (a.color, a.shape)
            and (db["color"], db["shape"]) == (b.color, b.shape)
        ]
        # "B <relation> A" holds: the two objects drawn the other way round ("B above A" for "A above B")
        reversed_ = any(
            relation_holds(parsed.relation, db["centroid"], da["centroid"], offset, MIN_AXIS_FRACTION)
            for da, db in pairs
        )
        return ("relation reversed" if reversed_ else "relation unclear"), len(detections)
    worst = parsed.requirements[credits.index(min(credits))]
    if min(credits) == 0.0:
        return "an object missing", len(detections)
    if any(d["shape"] == worst.shape for d in detections):
        return "an object's colour wrong", len(detections)
    return "an object's shape wrong", len(detections)


def sheet(items: list[tuple], path: str, columns: int = 6) -> None:
    """A contact sheet: each failure at 3x with its caption and verdict under it (wider tiles than
    `utils.image_grid`'s, so that a position caption and its verdict fit on a line each)."""
    from PIL import Image, ImageDraw

    tile_w, tile_h, scale = 250, 130, 3
    rows = (len(items) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tile_w, max(rows, 1) * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (prompt, image, reason) in enumerate(items):
        x, y = (n % columns) * tile_w, (n // columns) * tile_h
        big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        canvas.paste(big, (x + 4, y + 4))
        draw.text((x + 4, y + 6 + big.height), prompt, fill="black")
        draw.text((x + 4, y + 18 + big.height), reason, fill="firebrick")
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformer", default=None, help="A trained SD3Transformer2DModel folder.")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--sheet_size", type=int, default=60, help="Failures on the sheet (a random sample).")
    parser.add_argument(
        "--split",
        default="test",
        choices=("test", "train"),
        help="test: the held-out captions; train: every 4th training caption (seen in pretraining and RL), to tell "
        "what the model cannot draw from what it cannot generalise to.",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=4.5,
        help="CFG scale of the renders (4.5: the held-out evaluation's; 1.0: no CFG, as the recipe's rollouts).",
    )
    parser.add_argument("--output_dir", default="benchmarks/results/shapes_failures/base")
    cli = parser.parse_args()
    from trl_flow_grpo.toy.evaluation import evaluate_heldout
    from trl_flow_grpo.toy.model import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    if cli.transformer:
        from diffusers import SD3Transformer2DModel

        pipe.transformer = SD3Transformer2DModel.from_pretrained(cli.transformer)
    captions = None if cli.split == "test" else list(all_captions("train"))[::4]
    result = evaluate_heldout(
        pipe,
        images_per_prompt=cli.images_per_prompt,
        guidance_scale=cli.guidance_scale,
        prompts=captions,
        keep_images=True,
        progress=True,
    )
    k = cli.images_per_prompt
    prompts = [p for p in result.prompts for _ in range(k)]
    reasons = collections.defaultdict(collections.Counter)  # category -> reason -> images
    extra = collections.Counter()  # category -> images with more objects than asked for
    strict = collections.Counter()  # category -> correct images without any object not asked for
    totals = collections.Counter()
    failures = []
    for prompt, image in zip(prompts, result.images):
        category = parse_prompt(prompt).category
        reason, detected = verdict(prompt, image)
        reasons[category][reason] += 1
        totals[category] += 1
        extra[category] += detected > requested_objects(prompt)
        strict[category] += reason == "correct" and detected <= requested_objects(prompt)
        if reason != "correct":
            failures.append((prompt, image, reason))
    name = cli.transformer or "base model"
    lines = [
        f"{'Held-out' if cli.split == 'test' else 'Training-split'} images of {name} ({len(result.prompts)} captions "
        f"x {k}, the held-out evaluation's seeds, CFG {cli.guidance_scale:g}) by the reward's verdict: images (share "
        "of the category's images).",
        "",
        "| category | images | correct | reason of failure: images | more objects than asked | correct, nothing extra "
        "|",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for category in CATEGORIES:
        if not totals[category]:
            continue
        n = totals[category]
        why = ", ".join(
            f"{reason} {count} ({count / n:.0%})"
            for reason, count in reasons[category].most_common()
            if reason != "correct"
        )
        lines.append(
            f"| {category} | {n} | {reasons[category]['correct']} ({reasons[category]['correct'] / n:.0%}) | {why} | "
            f"{extra[category]} ({extra[category] / n:.0%}) | {strict[category]} ({strict[category] / n:.0%}) |"
        )
    n = sum(totals.values())
    correct = sum(r["correct"] for r in reasons.values())
    lines += [
        "",
        f"All: {correct} of {n} correct ({correct / n:.3f}); {sum(extra.values())} with more objects than asked "
        f"({sum(extra.values()) / n:.3f}); {sum(strict.values())} correct with nothing extra "
        f"({sum(strict.values()) / n:.3f}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(cli.output_dir, exist_ok=True)
    with open(os.path.join(cli.output_dir, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cli.output_dir, "failures.json"), "w") as f:
        json.dump(
            {
                "model": name,
                "split": cli.split,
                "captions": len(result.prompts),
                "images_per_prompt": k,
                "guidance_scale": cli.guidance_scale,
                "totals": totals,
                "reasons": reasons,
                "more_objects_than_asked": extra,
                "correct_nothing_extra": strict,
            },
            f,
            indent=1,
        )
    sample = random.Random(0).sample(failures, min(cli.sheet_size, len(failures)))
    sheet(sample, os.path.join(cli.output_dir, "failures.png"))
    print(
        f"wrote {cli.output_dir}/table.md, failures.json and failures.png ({len(sample)} of {len(failures)} failures)"
    )


if __name__ == "__main__":
    main()
