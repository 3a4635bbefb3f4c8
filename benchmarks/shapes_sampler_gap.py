"""Does training improve the policy it samples from, and does that carry to the evaluation's sampler? (issue 12)

    OMP_NUM_THREADS=1 python benchmarks/shapes_sampler_gap.py --trained DIR [DIR ...] [--base DIR]
        [--split test|train] [--images_per_prompt 4] [--output benchmarks/results/shapes_sampler_gap/NAME.json]

Flow-GRPO improves the images of its rollout sampler (the recipe's: 10 steps, CPS with noise_level 0.8 on the first 5,
no CFG), while the held-out evaluation draws ODE samples with CFG 4.5. This script scores the base model and each
trained transformer on the same captions under both samplers, with fixed, paired seeds, and prints the before/after
table of each (accuracy, strict accuracy, extra objects and score, 95% bootstrap intervals over captions):

- `eval`: `toy.evaluation.evaluate_heldout` (ODE, 10 steps, CFG `--guidance_scale`);
- `rollout`: `sampling.sampler.sample` with the recipe's sigmas, SDE steps, `sde_type`, `noise_level` and rollout
  CFG (`--rollout_guidance`, 1.0 as the recipe's `train_cfg=False`); image `k` of caption `i` starts from the noise
  of seed `1000 + i * images_per_prompt + k` and each batch draws its SDE noise from its own fixed generator, so the
  base and the trained model see the same noise.

A gain under `rollout` that vanishes under `eval` says training improved what it was asked to (its own samples) but
not the ODE/CFG samples the evaluation reads. `--base` is a pipeline folder (default: the shipped base model);
`--trained` are transformer folders (e.g. `shapes_learning.py --save_model_dir`). Writes a JSON of every result.
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def rollout_result(
    pipe,
    captions: list[str],
    *,
    images_per_prompt: int,
    guidance_scale: float,
    batch_size: int,
    noise_level: float | None = None,
):
    """`HeldoutResult` of `captions` sampled by the recipe's rollout sampler (fixed seeds, see the module doc), with
    `noise_level` in place of the recipe's if given."""
    from trl_flow_grpo.pipelines import get_adapter
    from trl_flow_grpo.sampling.sampler import sample
    from trl_flow_grpo.sampling.windows import full_window
    from trl_flow_grpo.toy.evaluation import EVAL_SEED, score_heldout
    from trl_flow_grpo.toy.recipe import SHAPES_RECIPE

    recipe = dict(SHAPES_RECIPE)
    if noise_level is not None:
        recipe["noise_level"] = noise_level
    adapter = get_adapter(pipe)
    device = torch.device("cpu")
    sigmas = adapter.sigmas(recipe["num_inference_steps"], recipe["height"], recipe["width"], device)
    window = full_window(recipe["num_inference_steps"], recipe["timestep_fraction"])
    shape = adapter.latent_shape(recipe["height"], recipe["width"])
    repeated = [caption for caption in captions for _ in range(images_per_prompt)]
    seed = EVAL_SEED  # the evaluation's initial noise, image for image
    images = []
    pipe.transformer.eval()
    with torch.no_grad():
        for start in range(0, len(repeated), batch_size):
            chunk = repeated[start : start + batch_size]
            seeds = range(seed + start, seed + start + len(chunk))
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
            samples = sample(
                adapter,
                pipe.transformer,
                chunk,
                noise,
                sigmas,
                sde_steps=window.steps,
                noise_level=recipe["noise_level"],
                sde_type=recipe["sde_type"],
                guidance_scale=guidance_scale,
                max_sequence_length=recipe["max_sequence_length"],
                generator=torch.Generator().manual_seed(seed + 7919 * (start + 1)),
            )
            images += samples.images
    settings = {
        "sampler": f"{recipe['sde_type']} noise_level {recipe['noise_level']} on steps {window.steps}",
        "images_per_prompt": images_per_prompt,
        "num_inference_steps": recipe["num_inference_steps"],
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    return score_heldout(captions, images, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained", nargs="*", default=[], help="Trained SD3Transformer2DModel folders.")
    parser.add_argument("--base", default=None, help="A base pipeline folder (default: the shipped shapes model).")
    parser.add_argument("--split", default="test", choices=("test", "train"), help="train: every 4th train caption.")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--guidance_scale", type=float, default=4.5, help="CFG of the evaluation's ODE samples.")
    parser.add_argument("--rollout_guidance", type=float, default=1.0, help="Rollout CFG (1: train_cfg off).")
    parser.add_argument(
        "--noise_levels",
        type=float,
        nargs="+",
        default=None,
        help="Rollout noise levels to sample (default: the recipe's); the base alone at several levels shows how far "
        "each one's samples are from the evaluation's.",
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--output", required=True, help="JSON file to write.")
    cli = parser.parse_args()

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from trl_flow_grpo.toy.evaluation import evaluate_heldout, format_comparison, format_result
    from trl_flow_grpo.toy.model import load_shapes_pipeline
    from trl_flow_grpo.toy.recipe import SHAPES_RECIPE
    from trl_flow_grpo.toy.shapes import all_captions

    pipe = load_shapes_pipeline() if cli.base is None else StableDiffusion3Pipeline.from_pretrained(cli.base)
    pipe.set_progress_bar_config(disable=True)
    captions = list(all_captions("test")) if cli.split == "test" else list(all_captions("train"))[::4]

    levels = cli.noise_levels or [SHAPES_RECIPE["noise_level"]]

    def rollout_key(level: float) -> str:  # "rollout" for the recipe's noise level
        return "rollout" if level == SHAPES_RECIPE["noise_level"] else f"rollout_noise_{level:g}"

    def measure(name: str) -> dict:
        print(f"sampling {name} ...", flush=True)
        results = {
            "eval": evaluate_heldout(
                pipe,
                images_per_prompt=cli.images_per_prompt,
                guidance_scale=cli.guidance_scale,
                prompts=captions,
                keep_images=False,
                batch_size=cli.batch_size,
            )
        }
        for level in levels:
            results[rollout_key(level)] = rollout_result(
                pipe,
                captions,
                images_per_prompt=cli.images_per_prompt,
                guidance_scale=cli.rollout_guidance,
                batch_size=cli.batch_size,
                noise_level=level,
            )
        return results

    base = measure(cli.base or "the shipped base model")
    for sampler, result in base.items():
        print(f"\nbase model, {sampler} sampler ({result.settings})")
        print(format_result(result, title=f"{cli.split} split, {sampler}"))
    record = {
        "split": cli.split,
        "base": cli.base or "shipped",
        "base_results": {k: r.to_dict() for k, r in base.items()},
        "trained": {},
    }
    for path in cli.trained:
        pipe.transformer = SD3Transformer2DModel.from_pretrained(path)
        after = measure(path)
        record["trained"][path] = {k: r.to_dict() for k, r in after.items()}
        for sampler, result in after.items():
            print(f"\n{path}: {sampler} sampler ({result.settings})")
            print(format_comparison(base[sampler], result, title=f"{cli.split} split, {sampler}"))
    os.makedirs(os.path.dirname(os.path.abspath(cli.output)), exist_ok=True)
    with open(cli.output, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {cli.output}")


if __name__ == "__main__":
    main()
