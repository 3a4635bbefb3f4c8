"""FLUX.2 klein (`Flux2KleinPipeline`) and dev (`Flux2Pipeline`): the adapters against diffusers' own sampler and
decoder, and LoRA round trips."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig
from test_trainer import lora_params, make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.pipelines import Flux2Adapter, Flux2KleinAdapter, get_adapter
from trl_flow_grpo.pipelines.flux2 import LORA_TARGET_MODULES
from trl_flow_grpo.pipelines.sd3 import LORA_TARGET_MODULES as SD3_LORA_TARGET_MODULES
from trl_flow_grpo.sampling import rollout
from trl_flow_grpo.testing import make_tiny_flux2_klein_pipeline, make_tiny_flux2_pipeline

STEPS, SIZE, TEXT = 4, 32, 64  # the byte-level tokenizer spends ~30 tokens on klein's chat template
DEV_TEXT = 256  # and ~200 on FLUX.2-dev's system message


def brightness(images, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES))


def pipeline_output(pipe, prompt, noise, guidance: float, output_type: str = "latent", text: int = TEXT):
    """diffusers' own sampler from the same noise. klein's "latent" is the VAE's latent (batch norm and patchify
    undone), dev's the packed trajectory latent (B, h * w, 4C)."""
    return pipe(
        prompt=prompt, latents=noise.clone(), num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE,
        width=SIZE, max_sequence_length=text, output_type=output_type,
    ).images  # fmt: skip


def packed(latents: torch.Tensor) -> torch.Tensor:
    return latents.flatten(2).transpose(1, 2)


def our_latents(adapter, transformer, prompt, noise, guidance: float, text: int = TEXT) -> torch.Tensor:
    cond = adapter.encode_prompts([prompt], torch.device("cpu"), guidance > 1, text)
    sigmas = adapter.sigmas(STEPS, SIZE, SIZE, torch.device("cpu"))
    return rollout(
        adapter, transformer, cond, sigmas, noise.clone(), sde_steps=[], noise_level=0.7, sde_type="sde",
        guidance_scale=guidance,
    ).final_latents  # fmt: skip


@pytest.mark.parametrize("is_distilled", [False, True], ids=["base", "distilled"])
def test_ode_rollout_and_decoding_match_diffusers_flux2_klein_pipeline(is_distilled):
    pipe = make_tiny_flux2_klein_pipeline(seed=0, is_distilled=is_distilled)
    adapter = get_adapter(pipe)
    assert isinstance(adapter, Flux2KleinAdapter)
    assert adapter.latent_shape(SIZE, 48) == (16, 8, 12)  # 4 VAE channels patchified 2x2
    noise = torch.randn((1, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    finals = {}
    for guidance in (1.0, 4.0):
        ours = our_latents(adapter, pipe.transformer, "a red circle", noise, guidance)
        theirs = pipeline_output(pipe, "a red circle", noise, guidance)
        torch.testing.assert_close(adapter._to_vae_latents(ours), theirs, rtol=1e-5, atol=1e-5)
        finals[guidance] = ours
    # CFG (a second forward with the empty prompt) in the base model; the step-distilled model ignores the scale.
    assert torch.equal(finals[1.0], finals[4.0]) == is_distilled
    assert adapter.forwards_per_sample(4.0) == (1 if is_distilled else 2)
    ours = np.asarray(adapter.decode(finals[4.0])[0], dtype=np.int16)
    theirs = np.asarray(pipeline_output(pipe, "a red circle", noise, 4.0, output_type="pil")[0], dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 1


def test_the_grid_is_flux2s_empirical_shift():
    # Not FLUX.1's calculate_shift: the shift depends on the step count too.
    adapter = get_adapter(make_tiny_flux2_klein_pipeline())
    four, eight = (
        adapter.sigmas(4, SIZE, SIZE, torch.device("cpu")),
        adapter.sigmas(8, SIZE, SIZE, torch.device("cpu")),
    )
    assert four[0] == 1.0 and four[-1] == 0.0 and len(four) == 5
    assert not torch.allclose(four[2], eight[4])  # sigma at half-way differs between the two step counts


def test_sizes_must_fit_the_vae_and_the_patches():
    adapter = get_adapter(make_tiny_flux2_klein_pipeline())
    with pytest.raises(ValueError, match=r"width=34 is not divisible by 4 .* use width=32"):
        adapter.check_inputs(32, 34)


def test_flux2_lora_targets_reach_the_single_stream_blocks():
    pipe = make_tiny_flux2_klein_pipeline()
    pipe.transformer.add_adapter(lora_config())
    wrapped = {name for name, _ in pipe.transformer.named_parameters() if "lora_A" in name}
    blocks = [name for name, _ in pipe.transformer.named_modules() if name.count(".") == 1 and "blocks." in name]
    assert blocks == ["transformer_blocks.0", "single_transformer_blocks.0"]
    for block in blocks:
        assert any(name.startswith(block + ".") for name in wrapped), block
    # SD3's list (the CLI's default) has no name of a single-stream block.
    assert not {"to_qkv_mlp_proj"} & set(SD3_LORA_TARGET_MODULES)


def test_lora_training_on_flux2_klein_loads_in_plain_diffusers(tmp_path):
    pipe = make_tiny_flux2_klein_pipeline(seed=0)
    args = make_args(
        tmp_path, learning_rate=1e-2, beta=0.04, max_steps=2, guidance_scale=4.0, max_sequence_length=TEXT
    )
    trainer = FlowGRPOTrainer(pipe, brightness, args=args, train_dataset=prompt_dataset(), peft_config=lora_config())
    before = lora_params(pipe.transformer)
    trainer.train()
    after = lora_params(pipe.transformer)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no LoRA weight changed"
    assert any("single_transformer_blocks" in name and not torch.equal(before[name], after[name]) for name in before)
    history = {key for entry in trainer.state.log_history for key in entry}
    assert {"loss", "reward", "kl", "ratio/mean"} <= history

    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    pipe.to("cpu")
    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = make_tiny_flux2_klein_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    base = make_tiny_flux2_klein_pipeline(seed=0)
    noise = torch.randn((1, *trainer.adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    ours = trainer.adapter._to_vae_latents(our_latents(trainer.adapter, transformer, "a green triangle", noise, 4.0))
    theirs = pipeline_output(loaded, "a green triangle", noise, 4.0)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - pipeline_output(base, "a green triangle", noise, 4.0)).abs().max() > 1e-3


def test_ode_rollout_and_decoding_match_diffusers_flux2_dev_pipeline():
    pipe = make_tiny_flux2_pipeline(seed=0)
    adapter = get_adapter(pipe)
    assert isinstance(adapter, Flux2Adapter)
    noise = torch.randn((1, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    finals = {}
    for guidance in (1.0, 4.0):
        ours = our_latents(adapter, pipe.transformer, "a red circle", noise, guidance, DEV_TEXT)
        theirs = pipeline_output(pipe, "a red circle", noise, guidance, text=DEV_TEXT)
        torch.testing.assert_close(packed(ours), theirs, rtol=1e-5, atol=1e-5)
        finals[guidance] = ours
    # The embedded guidance changes the samples, with one forward per step and no negative prompt.
    assert (finals[1.0] - finals[4.0]).abs().max() > 1e-3
    assert adapter.forwards_per_sample(4.0) == 1
    assert set(adapter.encode_prompts(["a cat"], torch.device("cpu"), True, DEV_TEXT)) == {"prompt_embeds"}
    ours = np.asarray(adapter.decode(finals[4.0])[0], dtype=np.int16)
    theirs = pipeline_output(pipe, "a red circle", noise, 4.0, output_type="pil", text=DEV_TEXT)[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1


def test_lora_training_on_flux2_dev_loads_in_plain_diffusers(tmp_path):
    pipe = make_tiny_flux2_pipeline(seed=0)
    args = make_args(
        tmp_path, learning_rate=1e-2, beta=0.04, max_steps=2, guidance_scale=4.0, max_sequence_length=DEV_TEXT
    )
    trainer = FlowGRPOTrainer(pipe, brightness, args=args, train_dataset=prompt_dataset(), peft_config=lora_config())
    before = lora_params(pipe.transformer)
    trainer.train()
    after = lora_params(pipe.transformer)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no LoRA weight changed"
    calls = [
        e["rollout/transformer_calls_per_image"]
        for e in trainer.state.log_history
        if "rollout/transformer_calls_per_image" in e
    ]
    assert calls and all(c == args.num_inference_steps for c in calls)  # embedded guidance: one forward per step

    trainer.save_model()
    pipe.to("cpu")
    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = make_tiny_flux2_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    noise = torch.randn((1, *trainer.adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    ours = packed(our_latents(trainer.adapter, transformer, "a green triangle", noise, 4.0, DEV_TEXT))
    theirs = pipeline_output(loaded, "a green triangle", noise, 4.0, text=DEV_TEXT)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    reference = pipeline_output(make_tiny_flux2_pipeline(seed=0), "a green triangle", noise, 4.0, text=DEV_TEXT)
    assert (theirs - reference).abs().max() > 1e-3


def test_the_flux2_recipe_targets_flux2s_lora_modules():
    recipe = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "examples/flux2_klein_pickscore.yaml").read_text()
    )
    assert tuple(recipe["lora_target_modules"]) == LORA_TARGET_MODULES
