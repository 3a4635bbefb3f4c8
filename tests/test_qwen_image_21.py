"""Qwen-Image 2.1 (`QwenImage21Pipeline`): its own adapter against diffusers' own sampler and decoder, and a LoRA
round trip."""

import os

import numpy as np
import pytest
import torch
from test_trainer import lora_params, make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.pipelines import QwenImage21Adapter, QwenImageAdapter, get_adapter
from trl_flow_grpo.sampling import rollout
from trl_flow_grpo.testing import make_tiny_qwen_image_21_pipeline, tiny_lora_config

STEPS, SIZE = 4, 64  # the 16x VAE and 2x2 image slots: multiples of 32 px


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


def pipeline_output(pipe, prompt: str, noise: torch.Tensor, guidance: float, output_type="latent", **kwargs):
    """diffusers' own sampler from the same noise; its latents come back flattened, (B, h * w, C)."""
    return pipe(
        prompt, latents=noise.flatten(2).transpose(1, 2).clone(), num_inference_steps=STEPS, height=SIZE, width=SIZE,
        output_type=output_type, **get_adapter(pipe).pipeline_call_kwargs(guidance), **kwargs,
    ).images  # fmt: skip


def flat(latents: torch.Tensor) -> torch.Tensor:
    return latents.flatten(2).transpose(1, 2)


def our_latents(adapter, transformer, prompts: list[str], noise: torch.Tensor, guidance: float) -> torch.Tensor:
    cond = adapter.encode_prompts(prompts, torch.device("cpu"), guidance > 1, 512)
    sigmas = adapter.sigmas(STEPS, SIZE, SIZE, torch.device("cpu"))
    return rollout(
        adapter, transformer, cond, sigmas, noise.clone(), sde_steps=[], noise_level=0.7, sde_type="sde",
        guidance_scale=guidance,
    ).final_latents  # fmt: skip


def test_ode_rollout_and_decoding_match_diffusers_qwen_image_21_pipeline():
    pipe = make_tiny_qwen_image_21_pipeline(seed=0)
    adapter = get_adapter(pipe)
    assert isinstance(adapter, QwenImage21Adapter) and not isinstance(adapter, QwenImageAdapter)
    assert adapter.latent_shape(SIZE, 96) == (4, 4, 6)  # 16x VAE, unpatched channels
    noise = torch.randn((1, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    finals = {}
    for guidance in (1.0, 4.0):  # 4.0: true CFG with the negative prompt " "
        ours = our_latents(adapter, pipe.transformer, ["a red circle"], noise, guidance)
        for kv_cache in (True, False):  # the pipeline's key/value cache of the text changes nothing
            theirs = pipeline_output(pipe, "a red circle", noise, guidance, use_kv_cache=kv_cache)
            torch.testing.assert_close(flat(ours), theirs, rtol=1e-5, atol=1e-5)
        finals[guidance] = ours
    assert (finals[1.0] - finals[4.0]).abs().max() > 1e-3  # guidance changes the samples
    ours = np.asarray(adapter.decode(finals[4.0])[0], dtype=np.int16)
    theirs = np.asarray(pipeline_output(pipe, "a red circle", noise, 4.0, output_type="pil")[0], dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 1


def test_a_batch_of_prompts_of_different_lengths_matches_the_pipelines_batch():
    # Padding shifts the image tokens' positions in the joint sequence, so (in the pipeline too) a prompt's sample
    # depends on the longest prompt of its batch; the padded, masked conditioning must give the pipeline's samples.
    pipe = make_tiny_qwen_image_21_pipeline(seed=0)
    adapter = get_adapter(pipe)
    prompts = ["a cat", "two blue squares next to a small tree"]
    cond = adapter.encode_prompts(prompts, torch.device("cpu"), True, 512)
    assert cond["prompt_embeds_mask"][0].sum() < cond["prompt_embeds_mask"][1].sum()
    noise = torch.randn((2, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    ours = our_latents(adapter, pipe.transformer, prompts, noise, 4.0)
    theirs = pipe(
        prompts, negative_prompt=[" "] * 2, true_cfg_scale=4.0, latents=flat(noise).clone(), num_inference_steps=STEPS,
        height=SIZE, width=SIZE, output_type="latent",
    ).images  # fmt: skip
    torch.testing.assert_close(flat(ours), theirs, rtol=1e-5, atol=1e-5)


def test_an_author_grid_fixes_the_step_count():
    pipe = make_tiny_qwen_image_21_pipeline()
    pipe.register_to_config(sample_sigmas=[1.0, 0.8, 0.5])
    adapter = get_adapter(pipe)
    with pytest.raises(ValueError, match=r"num_inference_steps=4, but .* grid of 3 steps .* to 3"):
        adapter.sigmas(4, SIZE, SIZE, torch.device("cpu"))
    sigmas = adapter.sigmas(3, SIZE, SIZE, torch.device("cpu"))
    pipe(
        "a cat", num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent",
        latents=torch.zeros(1, 16, 4),
    )  # fmt: skip
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float())  # the pipeline's own grid, shift included
    with pytest.raises(ValueError, match=r"height=48 is not divisible by 32 .* use height=32"):
        adapter.check_inputs(48, 64)


def test_lora_training_on_qwen_image_21_loads_in_plain_diffusers(tmp_path):
    pipe = make_tiny_qwen_image_21_pipeline(seed=0)
    args = make_args(tmp_path, learning_rate=1e-2, beta=0.04, max_steps=2, guidance_scale=4.0, height=SIZE, width=SIZE)
    trainer = FlowGRPOTrainer(
        pipe, brightness, args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    # The default targets (SD3's attention names) reach the attention of every block.
    for index, _ in enumerate(pipe.transformer.transformer_blocks):
        assert any(f"transformer_blocks.{index}.attn.to_q.lora_A" in name for name in lora_params(pipe.transformer))
    before = lora_params(pipe.transformer)
    trainer.train()
    after = lora_params(pipe.transformer)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no LoRA weight changed"

    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    (call,) = [line for line in card.splitlines() if line.startswith("image = pipe(")]
    assert "true_cfg_scale=4.0, negative_prompt=' '" in call and "guidance_scale" not in call
    pipe.to("cpu")
    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = make_tiny_qwen_image_21_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    noise = torch.randn((1, *trainer.adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    ours = flat(our_latents(trainer.adapter, transformer, ["a green triangle"], noise, 4.0))
    theirs = pipeline_output(loaded, "a green triangle", noise, 4.0)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    reference = pipeline_output(make_tiny_qwen_image_21_pipeline(seed=0), "a green triangle", noise, 4.0)
    assert (theirs - reference).abs().max() > 1e-3
