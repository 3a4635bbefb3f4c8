"""Qwen-Image (`QwenImagePipeline`): the adapter against diffusers' own sampler and decoder, and a LoRA round trip."""

import os

import numpy as np
import torch
from diffusers import QwenImagePipeline
from test_trainer import lora_params, make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.pipelines import QwenImageAdapter, get_adapter
from trl_flow_grpo.sampling import rollout
from trl_flow_grpo.testing import make_tiny_qwen_image_pipeline, tiny_lora_config

STEPS, SIZE, TEXT = 4, 32, 256  # the tiny byte-level tokenizer spends ~130 tokens on the template


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


def pipeline_output(pipe, prompt: str, noise: torch.Tensor, guidance: float, output_type: str = "latent"):
    """diffusers' own sampler from the same (unpacked) noise; latents come back unpacked."""
    batch, channels, height, width = noise.shape
    packed = QwenImagePipeline._pack_latents(noise, batch, channels, height, width)
    cfg = {"negative_prompt": " ", "true_cfg_scale": guidance} if guidance > 1 else {}
    out = pipe(
        prompt, latents=packed, num_inference_steps=STEPS, height=SIZE, width=SIZE, max_sequence_length=TEXT,
        output_type=output_type, **cfg,
    ).images  # fmt: skip
    if output_type != "latent":
        return out
    return QwenImagePipeline._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]


def our_latents(adapter, transformer, prompt: str, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    cond = adapter.encode_prompts([prompt], torch.device("cpu"), guidance > 1, TEXT)
    sigmas = adapter.sigmas(STEPS, SIZE, SIZE, torch.device("cpu"))
    return rollout(
        adapter, transformer, cond, sigmas, noise.clone(), sde_steps=[], noise_level=0.7, sde_type="sde",
        guidance_scale=guidance,
    ).final_latents  # fmt: skip


def test_ode_rollout_and_decoding_match_diffusers_qwen_image_pipeline():
    pipe = make_tiny_qwen_image_pipeline(seed=0)
    adapter = get_adapter(pipe)
    assert isinstance(adapter, QwenImageAdapter)
    noise = torch.randn((1, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    finals = {}
    for guidance in (1.0, 4.0):  # 4.0: true CFG with the negative prompt " ", norm-rescaled
        ours = our_latents(adapter, pipe.transformer, "a red circle", noise, guidance)
        torch.testing.assert_close(ours, pipeline_output(pipe, "a red circle", noise, guidance), rtol=1e-5, atol=1e-5)
        finals[guidance] = ours
    assert (finals[1.0] - finals[4.0]).abs().max() > 1e-3  # guidance changes the samples
    # Decoding (per-channel latents_mean / latents_std, a one-frame video VAE) equals the pipeline's.
    ours = np.asarray(adapter.decode(finals[4.0])[0], dtype=np.int16)
    theirs = np.asarray(pipeline_output(pipe, "a red circle", noise, 4.0, output_type="pil")[0], dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 1
    # Prompts of different lengths in one batch: padded embeddings with a mask, sliced per sample.
    cond = adapter.encode_prompts(["a cat", "two blue squares next to a small tree"], torch.device("cpu"), True, TEXT)
    assert cond["prompt_embeds_mask"][0].sum() < cond["prompt_embeds_mask"][1].sum()
    assert adapter.forwards_per_sample(4.0) == 2 and adapter.forwards_per_sample(1.0) == 1


def test_lora_training_on_qwen_image_loads_in_plain_diffusers(tmp_path):
    pipe = make_tiny_qwen_image_pipeline(seed=0)
    args = make_args(
        tmp_path, learning_rate=1e-2, beta=0.04, max_steps=2, guidance_scale=4.0, max_sequence_length=TEXT
    )
    trainer = FlowGRPOTrainer(
        pipe, brightness, args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    before = lora_params(pipe.transformer)
    trainer.train()
    after = lora_params(pipe.transformer)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no LoRA weight changed"

    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    # The model card's loading code samples with Qwen-Image's true CFG, not the (ignored) guidance_scale.
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    (call,) = [line for line in card.splitlines() if line.startswith("image = pipe(")]
    assert "true_cfg_scale=4.0, negative_prompt=' '" in call and "guidance_scale" not in call
    pipe.to("cpu")
    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = make_tiny_qwen_image_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    base = make_tiny_qwen_image_pipeline(seed=0)
    noise = torch.randn((1, *trainer.adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    ours = our_latents(trainer.adapter, transformer, "a green triangle", noise, 4.0)
    theirs = pipeline_output(loaded, "a green triangle", noise, 4.0)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - pipeline_output(base, "a green triangle", noise, 4.0)).abs().max() > 1e-3
