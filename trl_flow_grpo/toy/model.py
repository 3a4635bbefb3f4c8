"""The pretrained tiny shapes model that ships with the package, and how to sample and evaluate it.

The model is a regular diffusers `StableDiffusion3Pipeline` (32x32 images, 16x16x4 latents, a 2.3M-parameter SD3
transformer, frozen random stand-ins for CLIP-L/CLIP-G/T5), pretrained by `python -m trl_flow_grpo.toy.pretrain`.
"""

from pathlib import Path

import torch

from .geneval import evaluate
from .shapes import all_captions

SHAPES_MODEL_PATH = Path(__file__).parent / "weights" / "shapes-sd3"
"""Folder of the shipped pipeline: `StableDiffusion3Pipeline.from_pretrained(SHAPES_MODEL_PATH)` loads it."""

SHAPES_SAMPLING = {"height": 32, "width": 32, "max_sequence_length": 16}
"""Sampling settings the model was trained for (T5 prompts were encoded with 16 tokens)."""


def load_shapes_pipeline(dtype: torch.dtype = torch.float32):
    """The shipped shapes pipeline (no download)."""
    from diffusers import StableDiffusion3Pipeline

    if not (SHAPES_MODEL_PATH / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The shapes model is missing from {SHAPES_MODEL_PATH}; rebuild it with "
            f"`python -m trl_flow_grpo.toy.pretrain --output_dir {SHAPES_MODEL_PATH}`."
        )
    pipe = StableDiffusion3Pipeline.from_pretrained(SHAPES_MODEL_PATH, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = False,
) -> list:
    """ODE samples of `prompts`, image i seeded by `seed + i` (reproducible whatever the batch size).

    The transformer samples in eval mode (also when a trainer is in the middle of training it) and is put back in the
    mode it was in.
    """
    from tqdm.auto import tqdm

    images = []
    starts = range(0, len(prompts), batch_size)
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    try:
        for start in tqdm(starts, desc="held-out images", unit="batch", disable=not progress, leave=False):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            images += pipe(
                chunk,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                **SHAPES_SAMPLING,
            ).images
    finally:
        pipe.transformer.train(was_training)
    return images


def heldout_prompts(images_per_prompt: int = 4) -> list[str]:
    """Every held-out caption (compositions never seen in pretraining), `images_per_prompt` times."""
    return [caption for caption in all_captions("test") for _ in range(images_per_prompt)]


def evaluate_pipeline(pipe, prompts: list[str] | None = None, **generate_kwargs) -> dict[str, float]:
    """GenEval-like accuracy (overall and per category) of `pipe` on `prompts` (default: the held-out captions)."""
    prompts = heldout_prompts() if prompts is None else prompts
    return evaluate(prompts, generate(pipe, prompts, **generate_kwargs))
