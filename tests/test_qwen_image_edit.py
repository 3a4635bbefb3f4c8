"""Qwen-Image-Edit-Plus and Qwen-Image-Edit: rollouts conditioned on a source image (seen by the vision-language text
encoder and appended as latent tokens) equal diffusers' own pipelines, training on (source image, instruction) rows
reaches the reward functions with the sources, and the LoRA loads in diffusers."""

import inspect
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import QwenImageEditPlusPipeline, QwenImagePipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
from PIL import Image
from test_trainer import lora_params, make_args

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.pipelines import (
    QwenImageEditAdapter,
    QwenImageEditPlusAdapter,
    get_adapter,
    select,
    unsupported_pipeline_message,
)
from trl_flow_grpo.sampling import rollout
from trl_flow_grpo.testing import (
    make_tiny_qwen_image_edit_pipeline,
    make_tiny_qwen_image_edit_plus_pipeline,
    tiny_lora_config,
)

STEPS, SIZE = 4, 32
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def pipeline_sizes_at_the_training_size(monkeypatch):
    """The pipelines encode the source for the VAE at about one megapixel at its aspect ratio; the adapters at the
    output size (the class docstrings). At 1024 x 1024 with square sources the two are the same; here, at 32 x 32,
    the pipelines are given the training size instead of a megapixel, which is what makes them comparable."""
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", SIZE * SIZE)
    # QwenImageEditPipeline computes its 1024 * 1024 in `__call__`: its `calculate_dimensions` gives the size.
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (SIZE, SIZE, None))


def source_image(seed: int, width: int = SIZE, height: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def edit_dataset(column: str = "image") -> Dataset:
    prompts = ["make it red", "add a circle", "make it darker", "turn it blue"]
    return Dataset.from_dict({"prompt": prompts, column: [source_image(i) for i in range(len(prompts))]})


def pipeline_output(
    pipe, prompt: str, source: Image.Image, noise: torch.Tensor, guidance: float, output_type: str = "latent"
):
    """diffusers' own pipeline from the same (unpacked) noise, at the training size; latents come back unpacked."""
    batch, channels, height, width = noise.shape
    cfg = {"negative_prompt": " ", "true_cfg_scale": guidance} if guidance > 1 else {"true_cfg_scale": 1.0}
    out = pipe(
        image=source, prompt=prompt, latents=QwenImagePipeline._pack_latents(noise, batch, channels, height, width),
        num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type=output_type, **cfg,
    ).images  # fmt: skip
    if output_type != "latent":
        return out
    return QwenImagePipeline._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]


def our_latents(adapter, transformer, prompts, sources, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    cond = adapter.encode_edit(list(prompts), list(sources), noise, CPU, guidance > 1, 512)
    sigmas = adapter.sigmas(STEPS, SIZE, SIZE, CPU)
    return rollout(
        adapter, transformer, cond, sigmas, noise.clone(), sde_steps=[], noise_level=0.7, sde_type="sde",
        guidance_scale=guidance,
    ).final_latents  # fmt: skip


def noise_for(adapter, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn((batch, *adapter.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511-zero-cond-t"])
def test_edit_plus_ode_rollout_and_decoding_match_diffusers_pipeline(zero_cond_t):
    pipe = make_tiny_qwen_image_edit_plus_pipeline(seed=0, zero_cond_t=zero_cond_t)
    adapter = get_adapter(pipe)
    assert isinstance(adapter, QwenImageEditPlusAdapter) and adapter.edits_images
    noise = noise_for(adapter)
    finals = {}
    for guidance in (1.0, 4.0):  # 4.0: true CFG with the negative prompt " " (and the source), norm-rescaled
        ours = our_latents(adapter, pipe.transformer, ["make it red"], [source_image(0)], noise, guidance)
        theirs = pipeline_output(pipe, "make it red", source_image(0), noise, guidance)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        finals[guidance] = ours
    assert (finals[1.0] - finals[4.0]).abs().max() > 1e-3
    # Decoding equals the pipeline's to one grey level.
    ours = np.asarray(adapter.decode(finals[4.0])[0], dtype=np.int16)
    theirs = pipeline_output(pipe, "make it red", source_image(0), noise, 4.0, output_type="pil")[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    # The source conditions the sample: another source, another edit.
    other = our_latents(adapter, pipe.transformer, ["make it red"], [source_image(1)], noise, 4.0)
    assert (other - finals[4.0]).abs().max() > 1e-3


def test_edit_plus_sources_of_other_sizes_and_batches_of_different_lengths_match_the_pipeline():
    pipe = make_tiny_qwen_image_edit_plus_pipeline(seed=0)
    adapter = get_adapter(pipe)
    # A 48 x 32 source: the vision-language encoder sees it at the pipeline's ~384^2 at 3:2 (480 x 320), the VAE at
    # the output size (the pipeline's VAE size for it here, see the fixture).
    wide = source_image(2, width=48, height=SIZE)
    noise = noise_for(adapter, seed=1)
    ours = our_latents(adapter, pipe.transformer, ["add a circle"], [wide], noise, 4.0)
    torch.testing.assert_close(ours, pipeline_output(pipe, "add a circle", wide, noise, 4.0), rtol=1e-5, atol=1e-5)
    # The pipeline samples one prompt at a time; a batch pads each conditioning to the longest with a mask, and
    # every sample equals its own pipeline call.
    prompts, sources = ["make it red", "turn the whole picture blue"], [source_image(0), wide]
    noise = noise_for(adapter, seed=2, batch=2)
    cond = adapter.encode_edit(prompts, sources, noise, CPU, True, 512)
    assert cond["prompt_embeds_mask"][0].sum() < cond["prompt_embeds_mask"][1].sum()
    negative = {"negative_prompt_embeds", "negative_prompt_embeds_mask"}
    assert set(cond) == {"prompt_embeds", "prompt_embeds_mask", "image_latents"} | negative
    batched = our_latents(adapter, pipe.transformer, prompts, sources, noise, 4.0)
    for index in range(2):
        theirs = pipeline_output(pipe, prompts[index], sources[index], noise[index : index + 1], 4.0)
        torch.testing.assert_close(batched[index : index + 1], theirs, rtol=1e-5, atol=1e-5)
    assert select(cond, [1])["image_latents"].shape == (1, (SIZE // 4) ** 2, 16)


def test_qwen_image_edit_pipeline_is_served_by_the_same_module():
    pipe = make_tiny_qwen_image_edit_pipeline(seed=0)
    adapter = get_adapter(pipe)
    assert type(adapter) is QwenImageEditAdapter and adapter.edits_images
    noise = noise_for(adapter)
    for guidance in (1.0, 4.0):
        ours = our_latents(adapter, pipe.transformer, ["make it red"], [source_image(0)], noise, guidance)
        theirs = pipeline_output(pipe, "make it red", source_image(0), noise, guidance)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # Its template differs from Edit-Plus's (no "Picture 1: " and the source at the VAE's size), so the same weights
    # give another edit.
    plus = get_adapter(QwenImageEditPlusPipeline(**pipe.components))
    assert (our_latents(plus, pipe.transformer, ["make it red"], [source_image(0)], noise, 4.0) - ours).abs().max() > 0


def test_guidance_defaults_lora_targets_and_sizes():
    pipe = make_tiny_qwen_image_edit_plus_pipeline()
    adapter = get_adapter(pipe)
    for pipeline_class in (QwenImageEditPlusPipeline, QwenImageEditPipeline):
        # The trainer's default guidance is the pipeline's default true_cfg_scale, sampled with the negative prompt.
        default = inspect.signature(pipeline_class.__call__).parameters["true_cfg_scale"].default
        assert default == 4.0
    assert adapter.default_guidance_scale == 4.0
    assert adapter.pipeline_call_kwargs(4.0) == {"true_cfg_scale": 4.0, "negative_prompt": " "}
    assert adapter.pipeline_call_kwargs(1.0) == {}
    assert adapter.forwards_per_sample(4.0) == 2 and adapter.forwards_per_sample(1.0) == 1
    with pytest.raises(ValueError, match=r"height=30 is not divisible by 4 .* use height=28"):
        adapter.check_inputs(30, 32)
    # The CLI's default LoRA targets (SD3's names) reach every projection of every block of Qwen-Image's transformer.
    pipe.transformer.add_adapter(tiny_lora_config())
    names = {name for name, _ in pipe.transformer.named_parameters() if "lora_A" in name}
    blocks = [name for name, _ in pipe.transformer.named_modules() if name.endswith(".attn")]
    assert len(blocks) == len(pipe.transformer.transformer_blocks) == 1
    projections = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    for block in blocks:
        for projection in projections:
            assert any(name.startswith(f"{block}.{projection}.lora_A") for name in names), (block, projection)


def test_the_unsupported_pipeline_error_lists_both_editing_families_and_the_hook():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from test_unsupported_pipelines import MyFlowPipeline

    message = unsupported_pipeline_message(MyFlowPipeline(FlowMatchEulerDiscreteScheduler()))
    supported = message.split("Supported pipelines: ")[1].split(". To add it")[0].split(", ")
    assert {"FluxKontextPipeline", "QwenImageEditPlusPipeline", "QwenImageEditPipeline"} <= set(supported)
    assert len(supported) == len(set(supported))
    assert "`encode_edit`" in message


def test_edit_needs_its_source_image(tmp_path):
    pipe = make_tiny_qwen_image_edit_plus_pipeline()
    adapter = get_adapter(pipe)
    with pytest.raises(ValueError, match=r"encodes each instruction together with its source image.*encode_edit"):
        adapter.encode_prompts(["make it red"], CPU, False, 512)
    with pytest.raises(ValueError, match=r"Got 2 instructions and 1 source images for 2 samples"):
        adapter.encode_edit(["a", "b"], [source_image(0)], noise_for(adapter, batch=2), CPU, False, 512)
    with pytest.raises(ValueError, match=r"train_dataset has no column 'image' of source images"):
        FlowGRPOTrainer(pipe, lambda images, **kw: [0.0] * len(images), args=make_args(tmp_path),
                        train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))  # fmt: skip


def test_edit_plus_training_gives_rewards_the_source_images_and_the_lora_loads_in_diffusers(tmp_path):
    dataset = edit_dataset(column="source")
    by_prompt = {row["prompt"]: np.asarray(row["source"]) for row in dataset}
    calls = []

    def closeness_to_source(prompts, images, source_images, **kwargs):
        calls.append((list(prompts), source_images))
        return [
            -float(np.abs(np.asarray(i, dtype=np.float64) - np.asarray(s.resize(i.size))).mean() / 255.0)
            for i, s in zip(images, source_images)
        ]

    pipe = make_tiny_qwen_image_edit_plus_pipeline(seed=0)
    args = make_args(
        tmp_path, learning_rate=1e-2, max_steps=2, guidance_scale=4.0, source_image_column="source",
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
    metrics = trainer.evaluate()
    assert "eval_reward" in metrics and len(calls[-1][1]) == 2
    shown, _ = trainer._last_eval_samples
    assert shown[0].size == (2 * SIZE, SIZE)  # source left of the edit

    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    transformer = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = make_tiny_qwen_image_edit_plus_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    noise = noise_for(trainer.adapter, seed=3)
    ours = our_latents(trainer.adapter, transformer, ["add a circle"], [source_image(5)], noise, 4.0)
    theirs = pipeline_output(loaded, "add a circle", source_image(5), noise, 4.0)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    reference = pipeline_output(make_tiny_qwen_image_edit_plus_pipeline(seed=0), "add a circle", source_image(5),
                                noise, 4.0)  # fmt: skip
    assert (theirs - reference).abs().max() > 1e-3  # the LoRA really changes the edits


def test_the_edit_plus_example_builds_its_config(monkeypatch, tmp_path):
    """examples/qwen_image_edit_plus.py imports the Kontext example's rewards from its folder and builds a valid
    configuration (nothing is downloaded)."""
    import importlib.util
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    monkeypatch.syspath_prepend(str(examples))  # `python examples/qwen_image_edit_plus.py` puts it on sys.path
    spec = importlib.util.spec_from_file_location("qwen_image_edit_plus", examples / "qwen_image_edit_plus.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cli = example.parse_args(["--dataset_name", "my-edits", "--output_dir", str(tmp_path)])
    config = example.make_config(cli, evaluate=False)
    assert cli.model_id == "Qwen/Qwen-Image-Edit-2509" and (config.height, config.width) == (1024, 1024)
    assert config.guidance_scale == QwenImageEditPlusAdapter.default_guidance_scale
    assert config.source_image_column == "image" and len(config.reward_weights) == 2
    assert set(example.LORA_CONFIG.target_modules) == set(tiny_lora_config().target_modules)
