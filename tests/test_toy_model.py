"""The shipped shapes model and the script that pretrains it."""

import torch
from diffusers import StableDiffusion3Pipeline

from trl_flow_grpo.toy import COLORS, detect_objects
from trl_flow_grpo.toy.model import SHAPES_MODEL_PATH, SHAPES_SAMPLING, generate, load_shapes_pipeline
from trl_flow_grpo.toy.pretrain import main as pretrain_main


def test_shipped_model_loads_with_plain_diffusers_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusion3Pipeline.from_pretrained(SHAPES_MODEL_PATH)
    image = pipe(
        "a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), **SHAPES_SAMPLING
    ).images[0]
    assert image.size == (32, 32)


def test_shipped_model_draws_the_colour_it_is_asked_for():
    pipe = load_shapes_pipeline()
    names = list(COLORS)
    prompts = [f"a {color} square" for color in names for _ in range(4)]
    images = generate(pipe, prompts, num_inference_steps=20, guidance_scale=4.5, seed=0)
    asked = other = 0
    for i, image in enumerate(images):
        colors = {d.color for d in detect_objects(image)}
        asked += names[i // 4] in colors
        other += names[(i // 4 + 1) % len(names)] in colors  # a colour nobody asked for: the chance level
    assert asked >= 0.6 * len(prompts)
    assert asked > other + 0.3 * len(prompts)


def test_pretraining_script_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "shapes"
    pretrain_main(
        ["--output_dir", str(out), "--num_images", "64", "--vae_steps", "2", "--transformer_steps", "2"]
        + ["--batch_size", "8", "--vae_batch_size", "8"]
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 1.0  # latent statistics were measured and recorded
    assert (out / "pretrain_log.jsonl").is_file()
    image = pipe("two blue squares", num_inference_steps=2, **SHAPES_SAMPLING).images[0]
    assert image.size == (32, 32)


def test_pretraining_continues_a_pretrained_pipeline_keeping_its_vae(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    small = ["--num_images", "64", "--batch_size", "8", "--vae_batch_size", "8"]
    pretrain_main(["--output_dir", str(first), "--vae_steps", "2", "--transformer_steps", "2"] + small)
    pretrain_main(
        ["--output_dir", str(second), "--init_from", str(first), "--transformer_steps", "3", "--final_lr", "0"] + small
    )
    a, b = StableDiffusion3Pipeline.from_pretrained(first), StableDiffusion3Pipeline.from_pretrained(second)
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor
    assert all(torch.equal(p, q) for p, q in zip(a.vae.state_dict().values(), b.vae.state_dict().values()))
    assert not torch.equal(a.transformer.proj_out.weight, b.transformer.proj_out.weight)  # stage 2 went on
    log = [line for line in (second / "pretrain_log.jsonl").read_text().splitlines() if '"init"' in line]
    assert log and str(first) in log[0]
