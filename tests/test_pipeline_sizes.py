"""Image sizes a pipeline cannot sample are rejected when the trainer is built, naming `height` / `width`, the limit
and the fix, instead of failing inside diffusers during the first rollout."""

import pytest
import torch
from datasets import Dataset

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.pipelines import get_adapter
from trl_flow_grpo.testing import make_tiny_flux_pipeline, make_tiny_qwen_image_pipeline, make_tiny_sd3_pipeline
from trl_flow_grpo.toy.model import load_shapes_pipeline
from trl_flow_grpo.toy.recipe import SHAPES_RECIPE


def sd3_limit(pipe) -> int:
    return pipe.transformer.config.pos_embed_max_size * pipe.patch_size * pipe.vae_scale_factor


def test_shapes_model_at_the_default_512_px_fails_at_construction_with_the_fix(tmp_path):
    pipe = load_shapes_pipeline()
    before = {name: value.clone() for name, value in pipe.transformer.state_dict().items()}
    args = FlowGRPOConfig(output_dir=str(tmp_path), report_to="none", num_generations=8)
    assert (args.height, args.width) == (512, 512)
    with pytest.raises(ValueError) as excinfo:
        FlowGRPOTrainer(
            pipe,
            "shapes_geneval",
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["a circle", "a square", "a star"]}),
        )
    message = str(excinfo.value)
    assert "height=512 and width=512 are larger" in message
    assert f"at most {sd3_limit(pipe)} pixels" in message
    assert "height=32, width=32" in message and "SHAPES_RECIPE" in message
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # nothing was done to the model


def test_shapes_recipe_size_is_accepted():
    get_adapter(load_shapes_pipeline()).check_inputs(SHAPES_RECIPE["height"], SHAPES_RECIPE["width"])


def test_sd3_limit_is_the_one_diffusers_enforces():
    pipe = make_tiny_sd3_pipeline()
    adapter, limit = get_adapter(pipe), sd3_limit(pipe)
    step = pipe.vae_scale_factor * pipe.patch_size
    adapter.check_inputs(limit, limit)
    latent = torch.zeros(1, pipe.transformer.config.in_channels, limit // pipe.vae_scale_factor, step)
    pipe.transformer.pos_embed(latent)  # the largest accepted size really runs
    with pytest.raises(ValueError, match=rf"^width={limit + step} is larger .* at most {limit} pixels"):
        adapter.check_inputs(step, limit + step)
    too_large = torch.zeros(1, pipe.transformer.config.in_channels, step, (limit + step) // pipe.vae_scale_factor)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        pipe.transformer.pos_embed(too_large)  # and the next multiple is what diffusers refuses


def test_sd3_limit_follows_the_transformer_config():
    pipe = make_tiny_sd3_pipeline(sample_size=64)
    pipe.transformer.config.pos_embed_max_size = 8  # a smaller positional table: 8 x 2 x 2 = 32 px
    with pytest.raises(ValueError, match=r"height=64 is larger .* at most 32 pixels .* height=64, width=64"):
        get_adapter(pipe).check_inputs(64, 32)


@pytest.mark.parametrize("builder", [make_tiny_flux_pipeline, make_tiny_qwen_image_pipeline], ids=["flux", "qwen"])
def test_packed_families_need_multiples_of_twice_the_vae_factor_and_have_no_maximum(builder):
    pipe = builder()
    adapter, multiple = get_adapter(pipe), pipe.vae_scale_factor * 2
    with pytest.raises(ValueError, match=rf"width={multiple + 2} is not divisible by {multiple} .* width={multiple}"):
        adapter.check_inputs(multiple, multiple + 2)
    adapter.check_inputs(2048, 2048)  # rotary embeddings: no table to outgrow
