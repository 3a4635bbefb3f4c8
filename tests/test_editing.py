"""Image editing (FLUX.1-Kontext): rollouts conditioned on a source image equal diffusers' own pipeline, training on
(source image, instruction) rows reaches the reward functions with the sources, and the LoRA loads in diffusers."""

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import FluxPipeline
from PIL import Image
from test_trainer import lora_params, make_args

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.hub import side_by_side
from trl_flow_grpo.pipelines import FluxKontextAdapter, get_adapter
from trl_flow_grpo.sampling import rollout
from trl_flow_grpo.testing import make_tiny_flux_kontext_pipeline, make_tiny_flux_pipeline, tiny_lora_config

STEPS, SIZE = 4, 32
CPU = torch.device("cpu")


def source_image(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def edit_dataset(column: str = "image") -> Dataset:
    prompts = ["make it red", "add a circle", "make it darker", "turn it blue"]
    return Dataset.from_dict({"prompt": prompts, column: [source_image(i) for i in range(len(prompts))]})


def pipeline_latents(pipe, prompt: str, source: Image.Image, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """diffusers' own FluxKontextPipeline from the same (unpacked) noise, at the training size, unpacked again."""
    batch, channels, height, width = noise.shape
    out = pipe(
        image=source,
        prompt=prompt,
        latents=FluxPipeline._pack_latents(noise, batch, channels, height, width),
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        max_area=SIZE * SIZE,
        _auto_resize=False,
        max_sequence_length=16,
        output_type="latent",
    ).images
    return FluxPipeline._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)


def our_latents(adapter, transformer, prompt: str, source: Image.Image, noise: torch.Tensor, guidance: float):
    cond = adapter.encode_prompts([prompt], CPU, False, 16) | adapter.encode_source_images([source], noise)
    sigmas = adapter.sigmas(STEPS, SIZE, SIZE, CPU)
    trajectory = rollout(
        adapter, transformer, cond, sigmas, noise.clone(), sde_steps=[], noise_level=0.7, sde_type="sde",
        guidance_scale=guidance,
    )  # fmt: skip
    return trajectory.final_latents


def test_kontext_ode_rollout_matches_diffusers_pipeline_for_the_same_source():
    pipe = make_tiny_flux_kontext_pipeline(seed=0)
    adapter = get_adapter(pipe)
    assert isinstance(adapter, FluxKontextAdapter) and adapter.edits_images
    noise = torch.randn((1, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    results = {}
    for guidance in (1.0, 3.5):
        ours = our_latents(adapter, pipe.transformer, "make it red", source_image(0), noise, guidance)
        theirs = pipeline_latents(pipe, "make it red", source_image(0), noise, guidance)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        results[guidance] = ours
    assert not torch.equal(results[1.0], results[3.5])  # FLUX.1-dev's embedded guidance
    # The source conditions the sample: another source, another edit.
    other = our_latents(adapter, pipe.transformer, "make it red", source_image(1), noise, 3.5)
    assert (other - results[3.5]).abs().max() > 1e-3
    # A source of another size is resized to the output size first (one sequence length per batch), with the
    # pipeline's own image processor.
    big = source_image(0, size=2 * SIZE)
    resized = our_latents(adapter, pipe.transformer, "make it red", big, noise, 3.5)
    theirs = pipeline_latents(pipe, "make it red", pipe.image_processor.resize(big, SIZE, SIZE), noise, 3.5)
    torch.testing.assert_close(resized, theirs, rtol=1e-5, atol=1e-5)


def test_kontext_without_a_source_column_or_with_text_to_image_pipelines_is_an_error(tmp_path):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match=r"train_dataset has no column 'image' of source images"):
        FlowGRPOTrainer(make_tiny_flux_kontext_pipeline(), lambda images, **kw: [0.0] * len(images), args=args,
                        train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))  # fmt: skip
    adapter = get_adapter(make_tiny_flux_pipeline())
    assert not adapter.edits_images
    with pytest.raises(ValueError, match="generates from text only"):
        adapter.encode_source_images([source_image(0)], torch.zeros(1, 4, 16, 16))


def test_side_by_side_puts_the_source_left_of_the_edit():
    source, edit = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (4, 4), "blue")
    pair = side_by_side(source, edit)
    assert pair.size == (8, 4)
    assert pair.getpixel((1, 1)) == (255, 0, 0) and pair.getpixel((6, 1)) == (0, 0, 255)


def test_kontext_training_gives_rewards_the_source_images_and_the_lora_loads_in_diffusers(tmp_path):
    dataset = edit_dataset(column="source")
    by_prompt = {row["prompt"]: np.asarray(row["source"]) for row in dataset}
    calls = []

    def closeness_to_source(prompts, images, source_images, **kwargs):
        """Rewards edits that stay close to their source (a typical editing reward's input)."""
        calls.append((list(prompts), source_images))
        return [
            -float(np.abs(np.asarray(i, dtype=np.float64) - np.asarray(s.resize(i.size))).mean() / 255.0)
            for i, s in zip(images, source_images)
        ]

    pipe = make_tiny_flux_kontext_pipeline(seed=0)
    args = make_args(
        tmp_path, learning_rate=1e-2, max_steps=2, guidance_scale=3.5, source_image_column="source",
        per_device_eval_batch_size=2,
    )  # fmt: skip
    trainer = FlowGRPOTrainer(
        pipe, closeness_to_source, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(2)),
        peft_config=tiny_lora_config(),
    )  # fmt: skip
    before = lora_params(pipe.transformer)
    trainer.train()
    after = lora_params(pipe.transformer)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no LoRA weight changed"
    # Every reward call got, for each image, the source image of its own row.
    assert calls and all(len(prompts) == len(sources) for prompts, sources in calls)
    for prompts, sources in calls:
        for prompt, source in zip(prompts, sources):
            assert np.array_equal(np.asarray(source), by_prompt[prompt])
    assert {"loss", "reward"} <= {key for entry in trainer.state.log_history for key in entry}

    # Evaluation scores the edits and shows each next to its source.
    metrics = trainer.evaluate()
    assert "eval_reward" in metrics and len(calls[-1][1]) == 2
    shown, prompts = trainer._last_eval_samples
    assert prompts == ["make it red", "add a circle"] and shown[0].size == (2 * SIZE, SIZE)
    assert np.array_equal(np.asarray(shown[0])[:, :SIZE], by_prompt["make it red"])

    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = make_tiny_flux_kontext_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    noise = torch.randn((1, *trainer.adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    ours = our_latents(trainer.adapter, transformer, "add a circle", source_image(5), noise, 3.5)
    theirs = pipeline_latents(loaded, "add a circle", source_image(5), noise, 3.5)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    reference = pipeline_latents(make_tiny_flux_kontext_pipeline(seed=0), "add a circle", source_image(5), noise, 3.5)
    assert (theirs - reference).abs().max() > 1e-3  # the LoRA really changes the edits


def test_kontext_preference_functions_get_the_source_of_each_pair(tmp_path):
    dataset = edit_dataset()
    by_prompt = {row["prompt"]: np.asarray(row["image"]) for row in dataset}
    pairs = []

    def prefers_closer_to_source(prompts, images_a, images_b, source_images, **kwargs):
        pairs.extend(zip(prompts, source_images))

        def distance(edit, source):
            return np.abs(np.asarray(edit, dtype=np.float64) - np.asarray(source.resize(edit.size))).mean()

        return [float(distance(a, s) < distance(b, s)) for a, b, s in zip(images_a, images_b, source_images)]

    args = make_args(tmp_path, max_steps=1, learning_rate=1e-2)
    trainer = FlowGRPOTrainer(
        make_tiny_flux_kontext_pipeline(seed=0), args=args, train_dataset=dataset, peft_config=tiny_lora_config(),
        preference_funcs=prefers_closer_to_source,
    )  # fmt: skip
    trainer.train()
    assert pairs and all(np.array_equal(np.asarray(source), by_prompt[prompt]) for prompt, source in pairs)


def test_the_kontext_example_preservation_reward_ranks_unchanged_above_changed_edits():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "flux_kontext_edit.py"
    spec = importlib.util.spec_from_file_location("flux_kontext_edit", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    source = source_image(0, size=2 * SIZE)
    unchanged = source.resize((SIZE, SIZE))
    inverted = Image.fromarray(255 - np.asarray(unchanged))
    same, changed = example.source_preservation([unchanged, inverted], [source, source])
    assert same > 0.95 and changed < same
