"""How wide the held-out evaluation's 95% interval is, per number of images per caption.

    OMP_NUM_THREADS=1 python benchmarks/heldout_noise.py [--images_per_prompt 16]
        [--output_dir benchmarks/results/heldout_noise]

Renders every held-out caption `--images_per_prompt` times with the base shapes model
(`toy.evaluation.evaluate_heldout`: fixed seeds, 10 ODE steps, CFG 4.5), then, for K = 1, 2, 4, ... up to that
number, takes the first K images of every caption and prints the bootstrap interval (over captions within their
category, as every before/after table computes it) of overall accuracy, and of each category at the largest K.

The seeds of an evaluation with K images depend on K (`seed + i * K + k`), so the first K columns of a 16-image
evaluation are not the very images a K-image evaluation renders; they are images of the same distribution, which is
all the interval's width depends on. Writes `results.json` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def widths(result, ks: list[int]) -> dict[int, dict]:
    """Per K: the overall and per-category accuracy `Estimate`s on the first K seeds of every caption."""
    from trl_flow_grpo.toy.evaluation import HeldoutResult

    out = {}
    for k in ks:
        sub = HeldoutResult(result.prompts, result.categories, result.scores[:, :k], settings=result.settings)
        out[k] = {key: sub.estimate(key) for key in sub.keys() if key.startswith("accuracy")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images_per_prompt", type=int, default=16, help="Images per held-out caption (the most K).")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--output_dir", default="benchmarks/results/heldout_noise")
    cli = parser.parse_args()
    if cli.images_per_prompt < 1:
        raise SystemExit(f"--images_per_prompt must be at least 1, got {cli.images_per_prompt}.")
    torch.set_num_threads(cli.threads)

    from trl_flow_grpo.toy.evaluation import evaluate_heldout
    from trl_flow_grpo.toy.model import load_shapes_pipeline

    start = time.perf_counter()
    result = evaluate_heldout(
        load_shapes_pipeline(), images_per_prompt=cli.images_per_prompt, keep_images=False, progress=True
    )
    seconds = time.perf_counter() - start
    ks = sorted({2**i for i in range(cli.images_per_prompt.bit_length())} | {cli.images_per_prompt})
    per_k = widths(result, ks)
    n = len(result.prompts)
    print(
        f"base model, {n} held-out captions x {cli.images_per_prompt} images in {seconds:.0f} s "
        f"({cli.threads} threads)"
    )
    print("images per caption | overall accuracy, 95% interval | +-      | images")
    for k, estimates in per_k.items():
        e = estimates["accuracy"]
        print(f"{k:>18} | {e}{'':>11} | {e.half_width:.4f}  | {n * k}")
    print(f"per category at {ks[-1]} images per caption:")
    for key, e in per_k[ks[-1]].items():
        if key.startswith("accuracy/"):
            print(f"  {key:<24} {e.value:.3f} +-{e.half_width:.3f} (n = {e.num_prompts} captions)")
    rows = [
        {"images_per_prompt": k, **{key: e.to_dict() for key, e in estimates.items()}}
        for k, estimates in per_k.items()
    ]
    os.makedirs(cli.output_dir, exist_ok=True)
    with open(os.path.join(cli.output_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(cli), "eval_seconds": seconds, "num_captions": n, "widths": rows}, f, indent=1)
    print(f"wrote {cli.output_dir}/results.json")


if __name__ == "__main__":
    main()
