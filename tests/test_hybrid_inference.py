"""Hybrid inference (MixGRPO): the trained model for the first K ODE steps, the base model for the rest. In the
trainer's evaluation (`eval_hybrid_steps`), in `trl-flow-grpo sample --hybrid_steps` and in the model card's
loading code, all on the tiny offline SD3 pipeline."""

import json
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer, hub
from trl_flow_grpo.cli import main
from trl_flow_grpo.seeds import stable_seed
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config

PROMPTS = ["a red circle", "two blue squares"]
STEPS = 4  # eval_num_inference_steps
SEQ = 256  # max_sequence_length: diffusers' SD3 default, so that a plain pipeline call encodes like the trainer
RECORDED: list[np.ndarray] = []


def tiny(seed: int) -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline with its T5 encoder: a saved copy loads with `DiffusionPipeline.from_pretrained`."""
    return make_tiny_sd3_pipeline(seed=seed, with_t5=True)


def record_images(prompts, images, **kwargs) -> list[float]:
    """A reward that keeps the evaluation's images (as float arrays in [0, 1])."""
    RECORDED[:] = [np.asarray(image.convert("RGB"), dtype=np.float64) / 255 for image in images]
    return [0.0] * len(images)


def make_trainer(tmp_path, peft: bool = True, **overrides) -> FlowGRPOTrainer:
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        num_generations=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        height=32,
        width=32,
        num_inference_steps=2,
        eval_num_inference_steps=STEPS,
        max_sequence_length=SEQ,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        beta=0.0,
    )
    kwargs.update(overrides)
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    return FlowGRPOTrainer(
        tiny(0),
        record_images,
        args=FlowGRPOConfig(**kwargs),
        train_dataset=dataset,
        eval_dataset=dataset,
        peft_config=tiny_lora_config() if peft else None,
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A trainer whose LoRA changes the model a lot (random B, no training needed), saved like a run's output, with
    the evaluation images for each `eval_hybrid_steps`."""
    tmp_path = tmp_path_factory.mktemp("hybrid")
    trainer = make_trainer(tmp_path)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=generator)
    trainer.save_model()
    images = {}
    for k in (None, STEPS, 0, 2):
        trainer.args.eval_hybrid_steps = k
        trainer.evaluate()
        images[k] = list(RECORDED)
    base = tmp_path / "base"
    tiny(0).save_pretrained(base)
    return trainer, images, base


def eval_noise(trainer, index: int) -> torch.Tensor:
    """The initial noise `evaluate` uses for eval prompt `index`."""
    shape = trainer.adapter.latent_shape(32, 32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(stable_seed(0, -1, index)))[None]


def plain_images(pipe, trainer, guidance: float = 4.5) -> list[np.ndarray]:
    """The images a plain diffusers call makes from the evaluation's noise."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        image = pipe(
            prompt, latents=eval_noise(trainer, i), num_inference_steps=STEPS, guidance_scale=guidance, height=32,
            width=32, output_type="np",
        ).images[0]  # fmt: skip
        out.append(image.astype(np.float64))
    return out


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_eval_hybrid_steps_all_steps_is_the_lora_pipeline_zero_is_the_base_and_between_differs(lora_run):
    trainer, images, _ = lora_run
    lora_pipe = tiny(0)
    lora_pipe.load_lora_weights(trainer.args.output_dir)
    with_lora, base = plain_images(lora_pipe, trainer), plain_images(tiny(0), trainer)
    assert max_diff(with_lora, base) > 0.05  # the LoRA matters, or nothing below is shown

    pixel = 1.5 / 255  # PIL rounding of nearly equal floats
    assert max_diff(images[STEPS], images[None]) == 0  # K = all steps: the plain evaluation, bit for bit
    assert max_diff(images[STEPS], with_lora) <= pixel  # ... which is the LoRA pipeline's images
    assert max_diff(images[0], base) <= pixel  # K = 0: the base pipeline's
    assert max_diff(images[2], with_lora) > 0.01 and max_diff(images[2], base) > 0.01  # in between: neither


def test_model_card_loading_code_makes_the_hybrid_evaluation_images(lora_run, monkeypatch, tmp_path):
    trainer, images, base = lora_run
    trainer.args.eval_hybrid_steps = 2
    summary = trainer._run_summary(None, None, None)
    code = hub.generate_model_card(summary).content
    snippet = re.search(r"```python\n(.*?)```", code, re.S)[1]
    assert "callback_on_step_end=base_model_after" in snippet and "pipe.disable_lora()" in snippet
    # The snippet as the card prints it, run on this machine: the base pipeline and the LoRA are local folders, the
    # CPU in float32; the initial noise is the evaluation's (the pipeline's own `prepare_latents` draws another).
    snippet = snippet.replace('"path/to/base-model"', json.dumps(str(base)))
    snippet = snippet.replace('"run"', json.dumps(trainer.args.output_dir))
    snippet = snippet.replace('.to("cuda")', '.to("cpu")').replace("torch.bfloat16", "torch.float32")
    assert summary.example_prompt == PROMPTS[0]
    monkeypatch.setattr(StableDiffusion3Pipeline, "prepare_latents", lambda self, *a, **k: eval_noise(trainer, 0))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - the card's own code
    image = np.asarray(namespace["image"].convert("RGB"), dtype=np.float64) / 255
    assert (tmp_path / "sample.png").is_file()
    assert float(np.abs(image - images[2][0]).max()) <= 1.5 / 255
    assert float(np.abs(image - images[STEPS][0]).max()) > 0.01  # not the LoRA's plain image
    # The snippet turns the LoRA back on after the call: a second call without the callback is the LoRA's image.
    pipe = namespace["pipe"]
    call = dict(num_inference_steps=STEPS, guidance_scale=4.5, height=32, width=32, output_type="np")
    again = pipe(PROMPTS[0], **call).images[0]
    assert float(np.abs(again - images[STEPS][0]).max()) <= 1.5 / 255


def test_sample_hybrid_steps_renders_with_the_base_model_after_k_steps(lora_run, tmp_path):
    trainer, _, base = lora_run
    common = ["--model_name_or_path", str(base), "--prompts", PROMPTS[0], "--num_inference_steps", "4"]
    common += ["--height", "32", "--width", "32"]
    runs = {"base": [], "lora": ["--lora", trainer.args.output_dir]}
    for k in (0, 2, 4):
        runs[k] = ["--lora", trainer.args.output_dir, "--hybrid_steps", str(k)]
    out = {}
    for name, extra in runs.items():
        main(["sample", *common, *extra, "--output_dir", str(tmp_path / str(name))])
        out[name] = np.asarray(Image.open(tmp_path / str(name) / "0000.png"), dtype=np.float64) / 255
    pixel = 1.5 / 255
    assert float(np.abs(out[4] - out["lora"]).max()) <= pixel
    assert float(np.abs(out[0] - out["base"]).max()) <= pixel
    assert float(np.abs(out[2] - out["lora"]).max()) > 0.01 and float(np.abs(out[2] - out["base"]).max()) > 0.01


def test_sample_hybrid_steps_with_a_full_fine_tuning_output_switches_to_the_base_transformer(tmp_path):
    base = tmp_path / "base"
    tiny(0).save_pretrained(base)
    trained = tmp_path / "trained"
    tiny(1).transformer.save_pretrained(trained / "transformer")  # other weights
    common = ["--model_name_or_path", str(base), "--prompts", PROMPTS[0], "--num_inference_steps", "4"]
    common += ["--height", "32", "--width", "32"]
    out = {}
    for name, extra in {"base": [], "full": ["--lora", str(trained)]}.items():
        main(["sample", *common, *extra, "--output_dir", str(tmp_path / name)])
        out[name] = np.asarray(Image.open(tmp_path / name / "0000.png"), dtype=np.float64)
    for k in (0, 2, 4):
        main(
            ["sample", *common, "--lora", str(trained), "--hybrid_steps", str(k), "--output_dir", str(tmp_path / "h")]
        )
        out[k] = np.asarray(Image.open(tmp_path / "h" / "0000.png"), dtype=np.float64)
    assert np.abs(out["full"] - out["base"]).max() > 2
    assert np.abs(out[4] - out["full"]).max() <= 1 and np.abs(out[0] - out["base"]).max() <= 1
    assert np.abs(out[2] - out["full"]).max() > 2 and np.abs(out[2] - out["base"]).max() > 2


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--hybrid_steps", "2"], "pass the trained model with --lora"),
        (["--hybrid_steps", "5", "--lora", "."], r"--hybrid_steps must be in \[0, --num_inference_steps=4\]"),
    ],
)
def test_sample_hybrid_steps_errors(argv, match, tmp_path):
    (tmp_path / "transformer").mkdir()
    argv = [str(tmp_path) if a == "." else a for a in argv]
    with pytest.raises(SystemExit, match=match):
        main(["sample", "--prompts", "a cat", "--num_inference_steps", "4", *argv, "--output_dir", str(tmp_path)])


def test_eval_hybrid_steps_out_of_range_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match=r"eval_hybrid_steps must be in \[0, eval_num_inference_steps=4\].*got 5"):
        FlowGRPOConfig(output_dir=str(tmp_path), eval_num_inference_steps=4, eval_hybrid_steps=5, report_to="none")


@pytest.mark.parametrize(
    ("overrides", "ok"),
    [({"beta": 0.0}, False), ({"beta": 0.04, "ref_model_sync_steps": 1}, False), ({"beta": 0.04}, True)],
)
def test_full_fine_tuning_hybrid_needs_the_frozen_base_copy(tmp_path, overrides, ok):
    if not ok:
        with pytest.raises(ValueError, match="needs the base model for the last steps.*beta > 0"):
            make_trainer(tmp_path, peft=False, eval_hybrid_steps=2, **overrides)
        return
    trainer = make_trainer(tmp_path, peft=False, eval_hybrid_steps=2, **overrides)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    trainer.evaluate()
    hybrid = list(RECORDED)
    trainer.args.eval_hybrid_steps = 0
    trainer.evaluate()
    assert max_diff(RECORDED, plain_images(tiny(0), trainer)) <= 1.5 / 255  # the base copy
    assert max_diff(hybrid, RECORDED) > 0.01


def test_model_card_hybrid_code_with_k_0_disables_the_lora_before_the_call_and_full_fine_tuning_has_none():
    args = ("base/model", "me/lora", True, "SD3Transformer2DModel", "a cat", {"num_inference_steps": 4})
    code = hub._usage_code(*args, hybrid_steps=0).splitlines()
    call = next(i for i, line in enumerate(code) if line.startswith("image = pipe("))
    assert code[call - 1] == "pipe.disable_lora()" and code[call + 1] == "pipe.enable_lora()"
    assert "callback_on_step_end" not in hub._usage_code(*args)  # off: the plain loading code
    full = hub._usage_code("base/model", "me/full", False, "SD3Transformer2DModel", "a cat", {}, hybrid_steps=2)
    assert "disable_lora" not in full  # a fine-tuned transformer has no adapter to disable
