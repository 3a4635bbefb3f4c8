"""Speed and memory knobs: `steps_per_backward`, `attention_backend`, `compile_transformer`, `offload_text_encoders`
(tiny offline pipelines, CPU)."""

import pytest
import torch
from test_trainer import PROMPTS, lora_params, make_args, prompt_dataset

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer, acceleration
from trl_flow_grpo.pipelines import base as pipelines_base
from trl_flow_grpo.pipelines import get_adapter
from trl_flow_grpo.sampling import step_log_prob, steps_log_prob
from trl_flow_grpo.testing import make_tiny_flux_pipeline, make_tiny_sd3_pipeline, tiny_lora_config


def gradients(trainer: FlowGRPOTrainer, batch, steps_per_backward: int) -> tuple[dict[str, torch.Tensor], float]:
    """The gradient of the trained parameters and the loss after one `training_step` on `batch`."""
    trainer.args.steps_per_backward = steps_per_backward
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.training_step(trainer.model, batch)
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return grads, loss.item()


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_steps_per_backward_gives_the_gradient_of_one_step_at_a_time(tmp_path, beta):
    # 3 recorded steps: chunks of 1 (today's order), 2 (2 + 1) and all 3 in one batched forward.
    args = make_args(tmp_path, beta=beta, num_inference_steps=4, timestep_fraction=0.75, guidance_scale=3.0)
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(), "jpeg_compressibility", args=args, train_dataset=prompt_dataset(),
        peft_config=tiny_lora_config(),
    )  # fmt: skip
    groups = [[{"prompt": PROMPTS[i], "_row": i}] * 4 for i in range(2)]
    batch = trainer._generate_and_score(groups)[0].to(trainer.accelerator.device)
    assert len(batch.step_indices) == 3 and batch.advantages.abs().sum() > 0
    with torch.no_grad():  # off-policy, so that the clipped ratio and the KL both have a gradient
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))

    reference, reference_loss = gradients(trainer, batch, 1)
    scale = max(g.abs().max().item() for g in reference.values())
    assert scale > 0
    for size in (2, 3, 8):  # 8 > the number of steps: all of them in one pass
        grads, loss = gradients(trainer, batch, size)
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert loss == pytest.approx(reference_loss, rel=1e-5, abs=1e-7)


def test_steps_log_prob_is_step_log_prob_per_step():
    pipe = make_tiny_sd3_pipeline()
    adapter = get_adapter(pipe)
    cond = adapter.encode_prompts(PROMPTS[:2], torch.device("cpu"), True, 16)
    sigmas = adapter.sigmas(4, 32, 32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 3, *adapter.latent_shape(32, 32)), generator=generator)
    next_latents = torch.randn(latents.shape, generator=generator)
    steps = [0, 2, 3]
    kwargs = dict(noise_level=0.7, sde_type="sde", guidance_scale=3.0)
    batched = steps_log_prob(adapter, pipe.transformer, cond, sigmas, steps, latents, next_latents, **kwargs)
    assert len(batched) == 3
    for k, step in enumerate(steps):
        single = step_log_prob(
            adapter, pipe.transformer, cond, sigmas, step, latents[:, k], next_latents[:, k], **kwargs
        )
        for ours, theirs in zip(batched[k], single):
            torch.testing.assert_close(ours, theirs.expand_as(ours), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"must hold the 2 steps \[0, 2\]"):
        steps_log_prob(adapter, pipe.transformer, cond, sigmas, [0, 2], latents, next_latents, **kwargs)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_steps_per_backward_must_be_a_positive_integer(tmp_path, value):
    with pytest.raises(ValueError, match="steps_per_backward must be"):
        make_args(tmp_path, steps_per_backward=value)


def test_a_bad_attention_backend_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"attention_backend='flash_attn' is not .*'native'.*'xformers'"):
        FlowGRPOConfig(str(tmp_path), report_to="none", attention_backend="flash_attn")


def test_attention_backend_is_set_on_the_transformer_and_native_trains_the_same(tmp_path):
    weights = {}
    for backend in (None, "native"):
        pipe = make_tiny_flux_pipeline()
        args = make_args(tmp_path / str(backend), max_steps=1, guidance_scale=3.5, attention_backend=backend)
        trainer = FlowGRPOTrainer(
            pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
        )
        backends = {
            getattr(m.processor, "_attention_backend", "-")
            for m in pipe.transformer.modules()
            if hasattr(m, "processor")
        }
        assert backends == ({None} if backend is None else {acceleration_name(backend)})
        trainer.train()
        weights[backend] = lora_params(pipe.transformer)
    for name, value in weights[None].items():
        torch.testing.assert_close(weights["native"][name], value, rtol=1e-5, atol=1e-6)


def acceleration_name(name: str):
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName(name)


def test_attention_backend_on_sd3_says_it_would_change_nothing(tmp_path):
    # diffusers' SD3 processors call torch's attention directly: setting a backend there would be a silent no-op.
    args = make_args(tmp_path, attention_backend="native")
    with pytest.raises(ValueError, match=r"would have no effect.*JointAttnProcessor2_0"):
        FlowGRPOTrainer(make_tiny_sd3_pipeline(), "jpeg_compressibility", args=args, train_dataset=prompt_dataset())


def test_compile_transformer_compiles_the_repeated_blocks_after_the_lora(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(self, *args, **kwargs):  # record, do not compile: inductor is slow on CPU
        compiled.append((type(self).__name__, any("lora_" in name for name, _ in self.named_parameters())))

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    pipe = make_tiny_sd3_pipeline()
    blocks = len(pipe.transformer.transformer_blocks)
    FlowGRPOTrainer(
        pipe, "jpeg_compressibility", args=make_args(tmp_path, compile_transformer=True, beta=0.04),
        train_dataset=prompt_dataset(), peft_config=tiny_lora_config(),
    )  # fmt: skip
    # SD3 lists no `_repeated_blocks`: the adapter's JointTransformerBlock, every one, with its LoRA layers in it.
    assert compiled == [("JointTransformerBlock", True)] * blocks

    compiled.clear()
    flux = make_tiny_flux_pipeline()  # FLUX lists its blocks: diffusers' own compile_repeated_blocks
    calls = []
    original = type(flux.transformer).compile_repeated_blocks
    monkeypatch.setattr(
        type(flux.transformer),
        "compile_repeated_blocks",
        lambda self, *a, **kw: calls.append(kw) or original(self, *a, **kw),
    )
    assert acceleration.compile_blocks(flux.transformer, ()) == 2
    assert calls == [{}]
    assert sorted(name for name, _ in compiled) == ["FluxSingleTransformerBlock", "FluxTransformerBlock"]


def test_compiled_blocks_give_the_same_velocity():
    pipe = make_tiny_sd3_pipeline()
    adapter = get_adapter(pipe)
    cond = adapter.encode_prompts(PROMPTS[:2], torch.device("cpu"), False, 16)
    latents = torch.randn((2, *adapter.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        eager = adapter.velocity(pipe.transformer, latents, sigma, cond, 1.0)
        # The "eager" backend traces the blocks with dynamo without inductor's code generation: a few seconds on CPU.
        assert acceleration.compile_blocks(pipe.transformer, adapter.repeated_blocks, backend="eager") == 2
        compiled = adapter.velocity(pipe.transformer, latents, sigma, cond, 1.0)
    torch.testing.assert_close(compiled, eager)


def test_compile_without_repeated_blocks_is_an_error():
    with pytest.raises(ValueError, match="compile_transformer=True: Linear has no repeated block"):
        acceleration.compile_blocks(torch.nn.Linear(2, 2), ("JointTransformerBlock",))


def test_offloaded_text_encoders_stay_on_the_cpu_and_train_identically(tmp_path, monkeypatch):
    moves = []
    original = pipelines_base.offload_models

    def recording(*modules, device, offload):
        moves.append((len(modules), torch.device(device).type, offload))
        return original(*modules, device=device, offload=offload)

    monkeypatch.setattr(pipelines_base, "offload_models", recording)
    weights = {}
    for offload in (False, True):
        pipe = make_tiny_sd3_pipeline()
        args = make_args(tmp_path / str(offload), max_steps=1, offload_text_encoders=offload)
        trainer = FlowGRPOTrainer(
            pipe, "jpeg_compressibility", args=args, train_dataset=prompt_dataset(), peft_config=tiny_lora_config()
        )
        moves.clear()
        trainer.train()
        encoders = trainer.adapter.text_encoders
        assert len(encoders) == 2  # the tiny SD3 has its two CLIP encoders (no T5)
        assert all(p.device.type == "cpu" for encoder in encoders for p in encoder.parameters())
        # One encoding per micro-batch of rollouts (2), the encoders moved only when offloading.
        assert moves == [(2 if offload else 0, trainer.accelerator.device.type, offload)] * 2
        weights[offload] = lora_params(pipe.transformer)
    for name, value in weights[False].items():
        assert torch.equal(weights[True][name], value), name
