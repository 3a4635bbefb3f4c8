"""Tests for the public tiny-pipeline helpers in `trl_flow_grpo.testing`."""

import socket

import huggingface_hub.constants
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from trl_flow_grpo.testing import (
    TINY_SD3_LORA_TARGET_MODULES,
    make_tiny_clip_tokenizer,
    make_tiny_sd3_pipeline,
    make_tiny_t5_tokenizer,
    tiny_lora_config,
)

MODEL_NAMES = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _models(pipe):
    return {name: getattr(pipe, name) for name in MODEL_NAMES if getattr(pipe, name) is not None}


def _generate(pipe, prompt="a red circle", output_type="pil", seed=0):
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=4.5,
        output_type=output_type,
        generator=torch.Generator().manual_seed(seed),
    ).images


def _encode(pipe, prompt):
    prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False
    )
    return prompt_embeds, pooled_prompt_embeds


@pytest.fixture
def no_network(monkeypatch):
    """Hub offline mode on, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("with_t5", [False, True])
def test_builds_offline_and_generates_pil_image(no_network, with_t5):
    pipe = make_tiny_sd3_pipeline(with_t5=with_t5)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert (pipe.text_encoder_3 is not None) == with_t5
    assert (pipe.tokenizer_3 is not None) == with_t5

    image = _generate(pipe)[0]
    assert isinstance(image, Image.Image)
    assert image.size == (32, 32)


def test_pipeline_is_on_cpu_in_eval_mode_and_not_frozen():
    pipe = make_tiny_sd3_pipeline(with_t5=True)
    for name, model in _models(pipe).items():
        assert not model.training, name
        assert all(p.device.type == "cpu" for p in model.parameters()), name
        assert all(p.dtype == torch.float32 for p in model.parameters()), name
        assert all(p.requires_grad for p in model.parameters()), name


def test_configs_are_consistent():
    pipe = make_tiny_sd3_pipeline(sample_size=32)
    transformer, vae = pipe.transformer.config, pipe.vae.config
    assert pipe.vae_scale_factor == 2
    assert transformer.in_channels == transformer.out_channels == vae.latent_channels
    assert transformer.sample_size * pipe.vae_scale_factor == 32
    assert vae.scaling_factor != 1.0 and vae.shift_factor is not None
    clip_hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    clip_projection = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert transformer.joint_attention_dim == clip_hidden
    assert transformer.pooled_projection_dim == clip_projection
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.scheduler.config.shift == 3.0

    with_t5 = make_tiny_sd3_pipeline(with_t5=True)
    assert with_t5.text_encoder_3.config.d_model == with_t5.transformer.config.joint_attention_dim


def test_sample_size_sets_the_default_image_size():
    pipe = make_tiny_sd3_pipeline(sample_size=64)
    assert pipe.transformer.config.sample_size == 32
    image = pipe("a dog", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    with pytest.raises(ValueError, match="multiple of 4"):
        make_tiny_sd3_pipeline(sample_size=30)


def test_torch_dtype():
    pipe = make_tiny_sd3_pipeline(torch_dtype=torch.bfloat16)
    for name, model in _models(pipe).items():
        assert all(p.dtype == torch.bfloat16 for p in model.parameters()), name
    assert _generate(pipe)[0].size == (32, 32)


@pytest.mark.parametrize("with_t5", [False, True])
def test_same_seed_gives_identical_weights(with_t5):
    first, second = make_tiny_sd3_pipeline(seed=3, with_t5=with_t5), make_tiny_sd3_pipeline(seed=3, with_t5=with_t5)
    for name, model in _models(first).items():
        other = getattr(second, name).state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, other[key], rtol=0, atol=0, msg=f"{name}.{key}")

    different = make_tiny_sd3_pipeline(seed=4, with_t5=with_t5)
    for name, model in _models(first).items():
        weights = dict(model.named_parameters())
        assert any(not torch.equal(weights[k], v) for k, v in getattr(different, name).named_parameters()), name


def test_global_rng_state_is_left_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_sd3_pipeline(seed=0, with_t5=True)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("with_t5", [False, True])
def test_different_prompts_give_different_embeddings(with_t5):
    pipe = make_tiny_sd3_pipeline(with_t5=with_t5)
    embeds_a, pooled_a = _encode(pipe, "a red circle")
    embeds_b, pooled_b = _encode(pipe, "a photo of two dogs")

    # 77 CLIP tokens followed by 256 (zero or T5) tokens, all projected to joint_attention_dim.
    assert embeds_a.shape == (1, 77 + 256, pipe.transformer.config.joint_attention_dim)
    assert pooled_a.shape == (1, pipe.transformer.config.pooled_projection_dim)
    assert not torch.allclose(embeds_a[:, :77], embeds_b[:, :77])
    assert not torch.allclose(pooled_a, pooled_b)
    t5_part = embeds_a[:, 77:]
    if with_t5:
        assert not torch.allclose(t5_part, embeds_b[:, 77:])
    else:
        assert torch.count_nonzero(t5_part) == 0

    again, pooled_again = _encode(pipe, "a red circle")
    torch.testing.assert_close(again, embeds_a, rtol=0, atol=0)
    torch.testing.assert_close(pooled_again, pooled_a, rtol=0, atol=0)


def test_tokenizers_cover_arbitrary_text():
    clip = make_tiny_clip_tokenizer()
    t5 = make_tiny_t5_tokenizer()
    prompts = ["a red circle", "a blue circle", "A photo of 3 zebras, playing xylophone!", "café ☃"]
    clip_ids = [tuple(clip(p).input_ids) for p in prompts]
    assert len(set(clip_ids)) == len(prompts)
    assert all(clip.unk_token_id not in ids[1:-1] for ids in clip_ids)  # byte-level: never unknown
    assert clip("a red circle").input_ids == [
        clip.bos_token_id,
        *clip.convert_tokens_to_ids(["a</w>", "red</w>", "circle</w>"]),
        clip.eos_token_id,
    ]
    padded = clip("a red circle", padding="max_length", max_length=clip.model_max_length).input_ids
    assert len(padded) == 77

    t5_ids = [tuple(t5(p).input_ids) for p in prompts[:3]]
    assert len(set(t5_ids)) == 3
    assert t5("a red circle").input_ids[-1] == t5.eos_token_id
    assert t5.unk_token_id not in t5(prompts[2]).input_ids


@pytest.mark.parametrize("with_t5", [False, True])
def test_save_and_reload_reproduces_images(tmp_path, with_t5):
    pipe = make_tiny_sd3_pipeline(with_t5=with_t5)
    expected = _generate(pipe, output_type="pt")
    pipe.save_pretrained(tmp_path)

    # diffusers lists the T5 slots of SD3 as required, so a pipeline saved without them has to be told so on reload.
    extra = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    reloaded = StableDiffusion3Pipeline.from_pretrained(tmp_path, **extra)
    assert reloaded.tokenizer.model_max_length == 77
    assert reloaded.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    if with_t5:
        assert reloaded.tokenizer_3("a red circle").input_ids == pipe.tokenizer_3("a red circle").input_ids
    torch.testing.assert_close(_generate(reloaded, output_type="pt"), expected, rtol=0, atol=0)


def test_lora_adapter_adds_trainable_params():
    pipe = make_tiny_sd3_pipeline()
    transformer = pipe.transformer
    assert not any(p.requires_grad and "lora" in n for n, p in transformer.named_parameters())
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds, pooled = _encode(pipe, "a red circle")
    inputs = {
        "hidden_states": latents,
        "encoder_hidden_states": embeds,
        "pooled_projections": pooled,
        "timestep": torch.tensor([500.0]),
        "return_dict": False,
    }
    with torch.no_grad():
        before = transformer(**inputs)[0]

    transformer.add_adapter(tiny_lora_config())

    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_")[0].split("attn.")[-1] for n in trainable}
    assert wrapped == set(TINY_SD3_LORA_TARGET_MODULES)
    assert tiny_lora_config().init_lora_weights == "gaussian"

    # LoRA B starts at zero: the adapter is a no-op until trained, but gradients reach it.
    output = transformer(**inputs)[0]
    torch.testing.assert_close(output.detach(), before)
    output.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


NEW_FAMILY_BUILDERS = {
    "z_image": "make_tiny_z_image_pipeline",
    "flux2_klein": "make_tiny_flux2_klein_pipeline",
    "flux2_dev": "make_tiny_flux2_pipeline",
    "qwen_image_21": "make_tiny_qwen_image_21_pipeline",
    "qwen_image_edit_plus": "make_tiny_qwen_image_edit_plus_pipeline",
    "qwen_image_edit": "make_tiny_qwen_image_edit_pipeline",
}


def _modules(pipe):
    return {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


@pytest.mark.parametrize("builder", NEW_FAMILY_BUILDERS.values(), ids=NEW_FAMILY_BUILDERS.keys())
def test_family_builders_are_offline_seeded_and_leave_the_global_rng_alone(no_network, builder):
    import trl_flow_grpo.testing as testing

    make = getattr(testing, builder)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second, other = make(seed=3), make(seed=3), make(seed=4)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    for name, module in _modules(first).items():
        assert not module.training, name
        twin, different = _modules(second)[name].state_dict(), _modules(other)[name].state_dict()
        state = module.state_dict()
        assert all(torch.equal(value, twin[key]) for key, value in state.items()), name
        assert any(not torch.equal(value, different[key]) for key, value in state.items()), name
    bf16 = make(seed=3, torch_dtype=torch.bfloat16)
    for name, module in _modules(bf16).items():
        assert all(p.dtype == torch.bfloat16 for p in module.parameters()), name
