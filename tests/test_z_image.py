"""Z-Image (`ZImagePipeline`): the adapter against diffusers' own sampler and decoder, and a LoRA round trip."""

import os

import numpy as np
import pytest
import torch
from test_trainer import lora_params, make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.pipelines import ZImageAdapter, get_adapter
from trl_flow_grpo.pipelines.sd3 import LORA_TARGET_MODULES
from trl_flow_grpo.sampling import rollout
from trl_flow_grpo.testing import make_tiny_z_image_pipeline, tiny_lora_config

STEPS, SIZE, TEXT = 4, 32, 128  # the byte-level tokenizer spends ~30 tokens on the chat template


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


def pipeline_output(pipe, prompt: str, noise: torch.Tensor, guidance: float, output_type: str = "latent"):
    """diffusers' own sampler from the same noise, with the pipeline's spelling of our guidance scale."""
    out = pipe(
        prompt, latents=noise.clone(), num_inference_steps=STEPS, height=SIZE, width=SIZE,
        max_sequence_length=TEXT, output_type=output_type, **get_adapter(pipe).pipeline_call_kwargs(guidance),
    ).images  # fmt: skip
    return out


def our_latents(adapter, transformer, prompts: list[str], noise: torch.Tensor, guidance: float) -> torch.Tensor:
    cond = adapter.encode_prompts(prompts, torch.device("cpu"), guidance > 1, TEXT)
    sigmas = adapter.sigmas(STEPS, SIZE, SIZE, torch.device("cpu"))
    return rollout(
        adapter, transformer, cond, sigmas, noise.clone(), sde_steps=[], noise_level=0.7, sde_type="sde",
        guidance_scale=guidance,
    ).final_latents  # fmt: skip


def test_ode_rollout_and_decoding_match_diffusers_z_image_pipeline():
    pipe = make_tiny_z_image_pipeline(seed=0)
    adapter = get_adapter(pipe)
    assert isinstance(adapter, ZImageAdapter)
    noise = torch.randn((1, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    finals = {}
    for guidance in (1.0, 3.0):  # 3.0 here is ZImagePipeline's guidance_scale=2.0
        ours = our_latents(adapter, pipe.transformer, ["a red circle"], noise, guidance)
        torch.testing.assert_close(ours, pipeline_output(pipe, "a red circle", noise, guidance), rtol=1e-5, atol=1e-5)
        finals[guidance] = ours
    assert (finals[1.0] - finals[3.0]).abs().max() > 1e-3  # guidance changes the samples
    ours = np.asarray(adapter.decode(finals[3.0])[0], dtype=np.int16)
    theirs = np.asarray(pipeline_output(pipe, "a red circle", noise, 3.0, output_type="pil")[0], dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 1
    assert adapter.forwards_per_sample(3.0) == 2 and adapter.forwards_per_sample(1.0) == 1


def test_prompts_of_different_lengths_batch_like_single_prompts():
    pipe = make_tiny_z_image_pipeline(seed=0)
    adapter = get_adapter(pipe)
    prompts = ["a cat", "two blue squares next to a small tree"]
    cond = adapter.encode_prompts(prompts, torch.device("cpu"), True, TEXT)
    assert cond["prompt_embeds_mask"][0].sum() < cond["prompt_embeds_mask"][1].sum()
    # The padding the adapter adds for slicing is dropped again: a batch gives each prompt's own sample.
    noise = torch.randn((2, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    batched = our_latents(adapter, pipe.transformer, prompts, noise, 3.0)
    for i, prompt in enumerate(prompts):
        alone = our_latents(adapter, pipe.transformer, [prompt], noise[i : i + 1], 3.0)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_guidance_scale_is_the_pipelines_plus_one():
    adapter = get_adapter(make_tiny_z_image_pipeline())
    assert adapter.pipeline_call_kwargs(adapter.default_guidance_scale) == {"guidance_scale": 5.0}  # its default
    assert adapter.pipeline_call_kwargs(1.0) == {"guidance_scale": 0.0}  # Z-Image-Turbo's setting: no CFG


def test_sizes_must_fit_the_vae_and_the_patches():
    adapter = get_adapter(make_tiny_z_image_pipeline())
    with pytest.raises(ValueError, match=r"height=30 is not divisible by 4 .* use height=28"):
        adapter.check_inputs(30, 32)
    assert adapter.latent_shape(32, 48) == (4, 16, 24)


def test_default_lora_targets_reach_every_attention_block():
    # The CLI's default targets (the attention projections) must put a LoRA on each of Z-Image's attention layers.
    pipe = make_tiny_z_image_pipeline()
    pipe.transformer.add_adapter(tiny_lora_config())
    assert tiny_lora_config().target_modules == set(LORA_TARGET_MODULES)
    attentions = [name for name, _ in pipe.transformer.named_modules() if name.endswith(".attention")]
    assert len(attentions) == 3  # noise refiner, context refiner, main layer
    names = {name for name, _ in pipe.transformer.named_parameters() if "lora_A" in name}
    for attention in attentions:
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            assert any(name.startswith(f"{attention}.{projection}.lora_A") for name in names), (attention, projection)


def test_lora_training_on_z_image_loads_in_plain_diffusers(tmp_path):
    pipe = make_tiny_z_image_pipeline(seed=0)
    args = make_args(
        tmp_path, learning_rate=1e-2, beta=0.04, max_steps=2, guidance_scale=3.0, max_sequence_length=TEXT
    )
    trainer = FlowGRPOTrainer(
        pipe, brightness, args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    before = lora_params(pipe.transformer)
    trainer.train()
    after = lora_params(pipe.transformer)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no LoRA weight changed"
    history = {key for entry in trainer.state.log_history for key in entry}
    assert {"loss", "reward", "kl", "ratio/mean"} <= history

    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    # The model card's loading code passes the pipeline's own guidance_scale (ours minus one).
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    (call,) = [line for line in card.splitlines() if line.startswith("image = pipe(")]
    assert "guidance_scale=2.0" in call
    pipe.to("cpu")
    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = make_tiny_z_image_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    base = make_tiny_z_image_pipeline(seed=0)
    noise = torch.randn((1, *trainer.adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    ours = our_latents(trainer.adapter, transformer, ["a green triangle"], noise, 3.0)
    theirs = pipeline_output(loaded, "a green triangle", noise, 3.0)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - pipeline_output(base, "a green triangle", noise, 3.0)).abs().max() > 1e-3
