"""Choosing the adapter: a pipeline without one fails at construction with what is supported and how to add it."""

import re

import pytest
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from test_trainer import make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.pipelines import ADAPTERS, PipelineAdapter, get_adapter
from trl_flow_grpo.testing import make_tiny_sd3_pipeline


class MyFlowPipeline(DiffusionPipeline):
    """A flow-matching pipeline no adapter knows (a user's own, or a diffusers family not covered yet)."""

    def __init__(self, scheduler):
        super().__init__()
        self.register_modules(scheduler=scheduler)


def test_a_flow_matching_pipeline_without_adapter_names_the_supported_ones_and_the_methods_to_write():
    with pytest.raises(ValueError) as error:
        get_adapter(MyFlowPipeline(FlowMatchEulerDiscreteScheduler()))
    message = str(error.value)
    assert message.startswith("MyFlowPipeline is a flow-matching pipeline, but no adapter supports it yet.")
    for adapter in ADAPTERS:
        assert adapter.pipeline_class.__name__ in message
    for method in ("check_inputs", "encode_prompts", "latent_shape", "sigmas", "velocity"):
        assert f"`{method}`" in message
    assert set(re.findall(r"`(\w+)`", message.split("the methods ")[1].split(" (")[0])) == set(
        PipelineAdapter.__abstractmethods__
    )
    assert "pipeline_class = MyFlowPipeline" in message and "docs/adding_a_family.md" in message


def test_a_pipeline_that_is_not_flow_matching_says_so():
    with pytest.raises(
        ValueError, match=r"MyFlowPipeline is not supported: .* this pipeline's scheduler is DDIMScheduler"
    ):
        get_adapter(MyFlowPipeline(DDIMScheduler()))


def test_the_trainer_refuses_it_before_training(tmp_path):
    with pytest.raises(ValueError, match="no adapter supports it yet"):
        FlowGRPOTrainer(
            MyFlowPipeline(FlowMatchEulerDiscreteScheduler()),
            lambda images, **kwargs: [0.0] * len(images),
            args=make_args(tmp_path),
            train_dataset=prompt_dataset(),
        )


def test_an_adapter_appended_to_adapters_is_chosen(monkeypatch):
    class MyAdapter(PipelineAdapter):
        pipeline_class = MyFlowPipeline
        default_guidance_scale = 1.0
        check_inputs = encode_prompts = latent_shape = sigmas = velocity = lambda *args: None

    monkeypatch.setattr("trl_flow_grpo.pipelines.ADAPTERS", [*ADAPTERS, MyAdapter])
    assert isinstance(get_adapter(MyFlowPipeline(FlowMatchEulerDiscreteScheduler())), MyAdapter)
    assert type(get_adapter(make_tiny_sd3_pipeline())).__name__ == "SD3Adapter"  # the built-ins still come first


def test_the_docs_show_the_error_and_the_real_smallest_adapter():
    from pathlib import Path

    from trl_flow_grpo.pipelines import flux

    page = (Path(__file__).resolve().parent.parent / "docs" / "adding_a_family.md").read_text(encoding="utf-8")
    source = Path(flux.__file__).read_text(encoding="utf-8")
    assert source[source.index("class FluxAdapter") :] in page  # the example is the shipped FluxAdapter, verbatim
    with pytest.raises(ValueError) as error:
        get_adapter(MyFlowPipeline(FlowMatchEulerDiscreteScheduler()))
    shown = page.split("```text\nValueError: ")[1].split("\n```")[0]
    assert " ".join(shown.split()) == str(error.value)  # the error as it is raised today
