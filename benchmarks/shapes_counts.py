"""How many objects does a shapes-world model draw when a caption asks for n? The check behind the exact-count terms
of the `shapes_geneval` score (docs/toy_world.md, "The reward").

    python benchmarks/shapes_counts.py [--transformer DIR] [--images_per_prompt 4] [--grid counts.png]

Renders every counting caption (train and held-out split) `--images_per_prompt` times with the evaluation's sampling
(10 ODE steps, CFG 4.5, fixed seeds), detects the objects with `score_image` and prints, per requested count n, how
many images show k objects of the requested colour and shape. `--transformer` is a trained transformer folder (e.g.
one written by `shapes_learning.py --save_model_dir`); default: the shipped base model.
"""

from __future__ import annotations

import argparse
import collections

from trl_flow_grpo.toy.geneval import score_image
from trl_flow_grpo.toy.model import generate, load_shapes_pipeline
from trl_flow_grpo.toy.shapes import all_captions, caption_category


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformer", default=None, help="A trained SD3Transformer2DModel folder.")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="Also save the images, one row per caption, to this PNG.")
    cli = parser.parse_args()
    pipe = load_shapes_pipeline()
    if cli.transformer:
        from diffusers import SD3Transformer2DModel

        pipe.transformer = SD3Transformer2DModel.from_pretrained(cli.transformer)
    captions = [c for c in all_captions() if caption_category(c) == "counting"]
    prompts = [c for c in captions for _ in range(cli.images_per_prompt)]
    images = generate(pipe, prompts, num_inference_steps=10, guidance_scale=4.5, seed=cli.seed)
    table: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for prompt, image in zip(prompts, images):
        _, details = score_image(prompt, image)
        table[details["expected_count"]][details["detected_count"]] += 1
    print(f"{cli.transformer or 'base model'}: {len(captions)} counting captions x {cli.images_per_prompt} images")
    for n in sorted(table):
        total = sum(table[n].values())
        row = ", ".join(f"{k}: {table[n][k]}" for k in sorted(table[n]))
        more = sum(v for k, v in table[n].items() if k > n)
        print(f"  asked for {n}: detected {{{row}}}; more than {n} in {more} of {total}")
    if cli.grid:
        from PIL import Image

        k = cli.images_per_prompt
        grid = Image.new("RGB", (k * 34, len(captions) * 34))
        for i, image in enumerate(images):
            grid.paste(image, ((i % k) * 34, (i // k) * 34))
        grid.save(cli.grid)
        print(f"wrote {cli.grid}")


if __name__ == "__main__":
    main()
