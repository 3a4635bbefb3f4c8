"""FLUX.1 (`FluxPipeline`): the adapter against diffusers' own sampler, and training a LoRA that diffusers loads."""

import os

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from test_trainer import lora_params, make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.pipelines import FluxAdapter, get_adapter
from trl_flow_grpo.sampling import rollout
from trl_flow_grpo.testing import make_tiny_flux_pipeline, tiny_lora_config

STEPS, SIZE = 4, 32


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


def pipeline_latents(pipe: FluxPipeline, prompt: str, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """diffusers' own sampler from the same (unpacked) noise, unpacked again."""
    batch, channels, height, width = noise.shape
    packed = FluxPipeline._pack_latents(noise, batch, channels, height, width)
    out = pipe(
        prompt,
        latents=packed,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        max_sequence_length=16,
        output_type="latent",
    ).images
    return FluxPipeline._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)


def our_latents(adapter, transformer, prompt: str, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    cond = adapter.encode_prompts([prompt], torch.device("cpu"), guidance > 1, 16)
    sigmas = adapter.sigmas(STEPS, SIZE, SIZE, torch.device("cpu"))
    trajectory = rollout(
        adapter, transformer, cond, sigmas, noise.clone(), sde_steps=[], noise_level=0.7, sde_type="sde",
        guidance_scale=guidance,
    )  # fmt: skip
    return trajectory.final_latents


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_ode_rollout_matches_diffusers_flux_pipeline(guidance_embeds):
    pipe = make_tiny_flux_pipeline(seed=0, guidance_embeds=guidance_embeds)
    adapter = get_adapter(pipe)
    assert isinstance(adapter, FluxAdapter)
    noise = torch.randn((2, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))[:1]
    results = {}
    for guidance in (1.0, 3.5):
        ours = our_latents(adapter, pipe.transformer, "a red circle", noise, guidance)
        theirs = pipeline_latents(pipe, "a red circle", noise, guidance)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        results[guidance] = ours
    # The guidance embedding is used by FLUX.1-dev and ignored by schnell.
    assert torch.equal(results[1.0], results[3.5]) != guidance_embeds
    # The grid is FluxPipeline's: linspace(1, 1/T) shifted by the token count, then 0.
    sigmas = adapter.sigmas(STEPS, SIZE, SIZE, torch.device("cpu"))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == STEPS + 1


def test_packing_is_diffusers_and_round_trips():
    latents = torch.randn(2, 4, 6, 8)
    packed = FluxAdapter.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(FluxAdapter.unpack(packed, 6, 8), latents)


def test_sizes_must_fit_the_vae_and_the_packing():
    adapter = get_adapter(make_tiny_flux_pipeline())
    with pytest.raises(ValueError, match=r"height=30 is not divisible by 4 .* use height=28"):
        adapter.check_inputs(30, 32)
    assert adapter.latent_shape(32, 48) == (4, 16, 24)


def test_lora_training_on_flux_loads_in_plain_diffusers(tmp_path):
    pipe = make_tiny_flux_pipeline(seed=0)
    args = make_args(tmp_path, learning_rate=1e-2, beta=0.04, max_steps=2, guidance_scale=3.5)
    trainer = FlowGRPOTrainer(
        pipe, brightness, args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
    )
    before = lora_params(pipe.transformer)
    trainer.train()
    after = lora_params(pipe.transformer)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no LoRA weight changed"
    history = {key for entry in trainer.state.log_history for key in entry}
    assert {"loss", "reward", "kl", "ratio/mean"} <= history
    # Embedded guidance: one forward per step and image, not two.
    calls = [
        e["rollout/transformer_calls_per_image"]
        for e in trainer.state.log_history
        if "rollout/transformer_calls_per_image" in e
    ]
    assert calls and all(c == args.num_inference_steps for c in calls)

    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    pipe.to("cpu")
    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = make_tiny_flux_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    base = make_tiny_flux_pipeline(seed=0)
    noise = torch.randn((1, *trainer.adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    ours = our_latents(trainer.adapter, transformer, "a green triangle", noise, 3.5)
    theirs = pipeline_latents(loaded, "a green triangle", noise, 3.5)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    reference = pipeline_latents(base, "a green triangle", noise, 3.5)
    assert (theirs - reference).abs().max() > 1e-3  # the LoRA really changes the samples
