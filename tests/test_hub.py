"""`FlowGRPOTrainer.push_to_hub`, intermediate pushes and the model card, offline (the Hub API is faked)."""

import json
import logging
import os
import shutil
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.hub import format_number, hub_id_from_name_or_path
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "one yellow star"]
BASE_ID = "someone/tiny-sd3"
REPO_ID = "user/repo"
LORA = "pytorch_lora_weights.safetensors"
FLOW_GRPO_ID, MIXGRPO_ID, PREF_GRPO_ID = "2505.05470", "2507.21802", "2508.20751"


@dataclass
class Upload:
    repo_id: str
    path_in_repo: str | None
    commit_message: str
    token: str | None
    files: list[str]
    snapshot: Path  # a copy of exactly the files that would have been uploaded, taken at call time


@dataclass
class FakeHub:
    """Records `HfApi.create_repo` / `HfApi.upload_folder` calls instead of talking to the Hub."""

    root: Path
    repos: list[str] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)

    def create_repo(self, api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append(repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(
        self,
        api,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        token=None,
        run_as_future=False,
        allow_patterns=None,
        ignore_patterns=None,
        revision=None,
        **kwargs,
    ):
        folder = Path(folder_path)
        relative = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        files = list(filter_repo_objects(relative, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        snapshot = self.root / f"upload-{len(self.uploads)}"
        for name in files:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, snapshot / name)
        self.uploads.append(Upload(repo_id, path_in_repo, commit_message, token, files, snapshot))
        if run_as_future:
            future = Future()
            future.set_result(None)
            return future
        return None


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    return fake


def mean_brightness(prompts, images, **kwargs) -> list[float]:
    return [float(np.asarray(image.convert("L")).mean()) / 255 for image in images]


def make_args(tmp_path, **overrides) -> FlowGRPOConfig:
    """1 prompt x 2 images per optimizer step, 32 px, 2 denoising steps."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        num_generations=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        height=32,
        width=32,
        num_inference_steps=2,
        eval_num_inference_steps=2,
        per_device_eval_batch_size=4,
        max_steps=2,
        max_sequence_length=16,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        push_to_hub=True,
        hub_model_id=REPO_ID,
    )
    kwargs.update(overrides)
    return FlowGRPOConfig(**kwargs)


def make_trainer(tmp_path, lora: bool = True, name_or_path: str | None = BASE_ID, **overrides) -> FlowGRPOTrainer:
    pipe = make_tiny_sd3_pipeline()
    if name_or_path is not None:  # what `DiffusionPipeline.from_pretrained(name_or_path)` records
        pipe.register_to_config(_name_or_path=name_or_path)
    return FlowGRPOTrainer(
        pipe,
        ["jpeg_compressibility", mean_brightness],
        args=make_args(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
        peft_config=tiny_lora_config() if lora else None,
    )


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def first_last(trainer, key: str) -> tuple[tuple[int, float], tuple[int, float]]:
    """(step, value) of the first and last time `key` was logged."""
    points = [(entry["step"], entry[key]) for entry in trainer.state.log_history if key in entry]
    assert points, key
    return points[0], points[-1]


def test_push_to_hub_uploads_loadable_lora_card_and_samples(tmp_path, hub):
    trainer = make_trainer(tmp_path, log_completions=True, num_images_to_log=2, eval_strategy="steps", eval_steps=1)
    assert hub.repos == [REPO_ID]  # push_to_hub=True creates the repo up front, as transformers does
    trainer.train()

    trainer.push_to_hub(dataset_name="someone/prompts", tags=["my-tag"], license="mit")

    (upload,) = hub.uploads  # save_strategy="no": no intermediate push
    assert upload.repo_id == REPO_ID and upload.path_in_repo is None
    assert upload.commit_message == "End of training"
    assert {LORA, "README.md", "samples.png", "training_args.json"} <= set(upload.files)
    assert not any(name.startswith("checkpoint-") for name in upload.files)
    assert not any(name.endswith(".bin") or name.endswith(".pt") for name in upload.files)  # no pickle goes up
    # The per-step sample tables stay local, like the training grids.
    assert list(Path(trainer.args.output_dir, "completions").glob("step_*.parquet"))
    assert not any(name.startswith("completions/") for name in upload.files)
    # The evaluation grids go up; the training grids (one per logging step: gigabytes over a long run) do not.
    samples = Path(trainer.args.output_dir, "samples")
    assert list(samples.glob("train_step*.png"))
    assert (
        {name for name in upload.files if name.startswith("samples/")}
        == {f"samples/{path.name}" for path in samples.glob("eval_step*.png")}
        != set()
    )

    # The uploaded LoRA loads in plain diffusers and holds the trained weights.
    trained = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
    fresh = make_tiny_sd3_pipeline()
    fresh.load_lora_weights(str(upload.snapshot), adapter_name="flow_grpo")
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name="flow_grpo")
    assert loaded.keys() == trained.keys()
    assert any(("lora_B" in k) and v.abs().sum() > 0 for k, v in loaded.items()), "the LoRA was not trained"
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key].to("cpu", loaded[key].dtype))

    # The sample grid is the newest one (evaluation at the last step wins over the training grid of that step).
    newest = Path(trainer.args.output_dir, "samples", f"eval_step{trainer.state.global_step:06d}.png")
    assert (upload.snapshot / "samples.png").read_bytes() == newest.read_bytes()

    text = (upload.snapshot / "README.md").read_text(encoding="utf-8")
    assert ModelCard.load(upload.snapshot / "README.md").data.library_name == "diffusers"
    meta = card_metadata(text)
    assert meta["base_model"] == BASE_ID
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "mit"
    assert meta["datasets"] == ["someone/prompts"]
    assert meta["tags"] == [
        "trl",
        "flow-grpo",
        "diffusers",
        "lora",
        "text-to-image",
        "my-tag",
        "diffusers-training",
        "template:sd-lora",
    ]
    assert "instance_prompt" not in meta  # no trigger word: the LoRA applies to any prompt
    assert "![Samples](samples.png)" in text

    # The widget shows the last evaluation's images (ODE samples), uploaded next to the card.
    card = ModelCard.load(upload.snapshot / "README.md")
    eval_images, eval_prompts = trainer._last_eval_samples
    assert card.data.widget == [
        {"text": prompt, "output": {"url": f"images/sample_{i}.png"}} for i, prompt in enumerate(eval_prompts)
    ]
    assert eval_prompts == PROMPTS[:2]
    for i, image in enumerate(eval_images):
        assert f"images/sample_{i}.png" in upload.files
        with Image.open(upload.snapshot / "images" / f"sample_{i}.png") as uploaded:
            assert np.array_equal(np.asarray(uploaded), np.asarray(image.convert("RGB")))

    # The last evaluation's mean rewards are structured evaluation results (`model-index`).
    results = {result.metric_type: result for result in card.data.eval_results}
    assert set(results) == {"jpeg_compressibility", "mean_brightness", "reward"}
    last_eval = [entry for entry in trainer.state.log_history if "eval_reward" in entry][-1]
    assert results["reward"].metric_value == pytest.approx(last_eval["eval_reward"])
    for name in ("jpeg_compressibility", "mean_brightness"):
        assert results[name].metric_value == pytest.approx(last_eval[f"eval_rewards/{name}/mean"])
    for result in results.values():
        assert (result.task_type, result.dataset_type) == ("text-to-image", "someone/prompts")
    assert card.data.model_name == "repo"

    # Each reward, first and last logged value (and the change), as in log_history; the same for evaluation.
    for label, key in [
        ("`jpeg_compressibility`", "rewards/jpeg_compressibility/mean"),
        ("`mean_brightness`", "rewards/mean_brightness/mean"),
        ("reward (weighted total)", "reward"),
        ("eval: `mean_brightness`", "eval_rewards/mean_brightness/mean"),
        ("eval: reward (weighted total)", "eval_reward"),
    ]:
        (first_step, first), (last_step, last) = first_last(trainer, key)
        assert (first_step, last_step) == (1, 2)
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"{format_number(first)} (step {first_step})" in row
        assert f"{format_number(last)} (step {last_step})" in row
        assert format_number(last - first).lstrip("-") in row
    assert format_number(-1.5) == "-1.5000" and format_number(2e-5) == "2.000e-05"

    args = trainer.args
    for row in [
        "| Optimizer steps | 2 |",
        "| Images sampled | 4 |",
        "| num_generations (group size G) | 2 |",
        "| num_inference_steps (training rollouts) | 2 |",
        f"| guidance_scale | {trainer.guidance_scale} |",
        f"| noise_level | {args.noise_level} |",
        f"| sde_type | {args.sde_type} |",
        "| sde_window | full |",
        f"| beta (KL) | {args.beta} |",
        f"| learning_rate | {args.learning_rate} |",
        f"| epsilon | {args.epsilon} |",
        "| LoRA rank | 4 |",
        "| LoRA alpha | 8 |",
    ]:
        assert row in text, row
    assert "- Training prompts: 4" in text and "- Evaluation prompts: 2" in text
    assert f"| LoRA target modules | {', '.join(sorted(tiny_lora_config().target_modules))} |" in text

    assert f'pipe = DiffusionPipeline.from_pretrained("{BASE_ID}", torch_dtype=torch.bfloat16)' in text
    assert f'pipe.load_lora_weights("{REPO_ID}")' in text
    assert f"arxiv.org/abs/{FLOW_GRPO_ID}" in text and "@article{liu2025flowgrpo" in text
    assert MIXGRPO_ID not in text and PREF_GRPO_ID not in text  # full SDE window, no preference functions


def test_push_to_hub_uploads_the_ema_weights(tmp_path, hub):
    trainer = make_trainer(tmp_path, ema_decay=0.5, learning_rate=1e-2)
    trainer.train()
    transformer = trainer.accelerator.unwrap_model(trainer.model)
    raw = {key: value.cpu().clone() for key, value in get_peft_model_state_dict(transformer).items()}
    with trainer._averaged_weights():
        averaged = {key: value.cpu().clone() for key, value in get_peft_model_state_dict(transformer).items()}

    trainer.push_to_hub()

    uploaded = load_file(hub.uploads[-1].snapshot / LORA)
    assert len(uploaded) == len(averaged)
    by_suffix = {key.removeprefix("transformer."): value for key, value in uploaded.items()}
    for key, value in averaged.items():
        torch.testing.assert_close(by_suffix[key], value)
    assert any(not torch.equal(raw[key], averaged[key]) for key in raw), "EMA equals the raw weights"
    # The raw weights are back in the model after the push.
    for key, value in get_peft_model_state_dict(transformer).items():
        assert torch.equal(value.cpu(), raw[key])


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_intermediate_pushes_upload_the_lora_and_the_card(tmp_path, hub, strategy):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, hub_strategy=strategy)
    trainer.train()

    model_pushes = [u for u in hub.uploads if u.path_in_repo is None]
    assert [u.commit_message for u in model_pushes] == ["Training in progress, step 1", "Training in progress, step 2"]
    for step, upload in enumerate(model_pushes, start=1):
        assert {LORA, "README.md", "training_args.json"} <= set(upload.files)
        assert "training_args.bin" not in upload.files
        assert not any(name.startswith("checkpoint-") for name in upload.files)
        checkpoint = Path(trainer.args.output_dir, f"checkpoint-{step}")
        assert (upload.snapshot / LORA).read_bytes() == (checkpoint / LORA).read_bytes()
        card = (upload.snapshot / "README.md").read_text(encoding="utf-8")
        assert f"| Optimizer steps | {step} |" in card
        # No evaluation: the widget shows the step's training rollouts (one prompt x 2 images), uploaded too.
        widget = ModelCard(card).data.widget
        assert [entry["output"]["url"] for entry in widget] == ["images/sample_0.png", "images/sample_1.png"]
        assert len({entry["text"] for entry in widget}) == 1 and widget[0]["text"] in PROMPTS
        assert {"images/sample_0.png", "images/sample_1.png"} <= set(upload.files)

    checkpoint_pushes = [u for u in hub.uploads if u.path_in_repo is not None]
    expected_paths = {
        "every_save": [],
        "checkpoint": ["last-checkpoint", "last-checkpoint"],
        "all_checkpoints": ["checkpoint-1", "checkpoint-2"],
    }[strategy]
    assert [u.path_in_repo for u in checkpoint_pushes] == expected_paths
    for upload in checkpoint_pushes:  # the whole checkpoint, to resume from
        assert {LORA, "optimizer.pt", "trainer_state.json"} <= set(upload.files)
    # Everything pushed still loads in diffusers.
    fresh = make_tiny_sd3_pipeline()
    fresh.load_lora_weights(str(model_pushes[-1].snapshot))
    assert load_file(model_pushes[-1].snapshot / LORA)


def test_intermediate_pushes_upload_the_ema_weights_and_checkpoints_keep_the_raw_ones(tmp_path, hub):
    trainer = make_trainer(
        tmp_path, save_strategy="steps", save_steps=2, hub_strategy="checkpoint", ema_decay=0.5, learning_rate=1e-2
    )
    trainer.train()
    model_push, checkpoint_push = hub.uploads[-2:]
    assert (model_push.path_in_repo, checkpoint_push.path_in_repo) == (None, "last-checkpoint")
    transformer = trainer.accelerator.unwrap_model(trainer.model)
    with trainer._averaged_weights():
        averaged = get_peft_model_state_dict(transformer)
        averaged = {f"transformer.{key}": value.cpu().clone() for key, value in averaged.items()}
    raw = load_file(checkpoint_push.snapshot / LORA)
    pushed = load_file(model_push.snapshot / LORA)
    assert pushed.keys() == averaged.keys() == raw.keys()
    for key in averaged:
        torch.testing.assert_close(pushed[key], averaged[key], rtol=0, atol=0)
    assert any(not torch.equal(raw[key], pushed[key]) for key in raw), "pushed the raw weights"


def test_hub_token_is_used_but_never_written_or_logged(tmp_path, hub, caplog, capsys):
    args_token, call_token = "hf_argsSECRETargsSECRET", "hf_callSECRETcallSECRET"
    caplog.set_level(logging.DEBUG)
    trainer = make_trainer(
        tmp_path,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        hub_token=args_token,
        logging_steps=1,
        disable_tqdm=False,
    )
    trainer.train()
    trainer.push_to_hub(token=call_token)

    assert [u.token for u in hub.uploads] == [args_token, call_token]
    captured = capsys.readouterr()
    for secret in (args_token, call_token):
        assert secret not in caplog.text
        assert secret not in captured.out + captured.err
        for upload in hub.uploads:
            for name in upload.files:
                assert secret.encode() not in (upload.snapshot / name).read_bytes(), name
        for path in Path(trainer.args.output_dir).rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    # The uploaded training_args.json holds the arguments, without the token, and rebuilds the config.
    for upload in hub.uploads:
        saved = json.loads((upload.snapshot / "training_args.json").read_text(encoding="utf-8"))
        assert saved["hub_token"] != args_token and saved["num_generations"] == 2
        rebuilt = FlowGRPOConfig(**{k: v for k, v in saved.items() if not k.endswith("_token")})
        assert rebuilt.num_generations == 2 and rebuilt.hub_model_id == REPO_ID
    assert trainer.args.hub_token == args_token  # the trainer's own config is untouched


def test_card_citations_and_full_fine_tuning_loading_code(tmp_path, hub, monkeypatch):
    cache_path = str(tmp_path / "hub-cache" / "models--org--base-model" / "snapshots" / "0123abcd")
    trainer = make_trainer(
        tmp_path,
        lora=False,
        name_or_path=cache_path,
        push_to_hub=False,
        sde_window="sliding",
        sde_window_size=1,
        sde_window_range=[0, 2],
    )
    trainer.create_model_card(model_name="my-model")
    readme = Path(trainer.args.output_dir, "README.md")
    text = readme.read_text(encoding="utf-8")
    meta = card_metadata(text)
    assert meta["base_model"] == "org/base-model"  # recovered from the Hub cache path
    # No `lora` / `template:sd-lora` tag; nothing sampled yet: no widget, no evaluation results.
    assert meta["tags"] == ["trl", "flow-grpo", "diffusers", "text-to-image", "diffusers-training"]
    assert "widget" not in meta and "model-index" not in meta
    assert not Path(trainer.args.output_dir, "images").exists()
    assert "\n# my-model\n" in text
    assert (
        f'transformer = SD3Transformer2DModel.from_pretrained("{REPO_ID}", subfolder="transformer", '
        "torch_dtype=torch.bfloat16)" in text
    )
    assert 'DiffusionPipeline.from_pretrained("org/base-model", transformer=transformer' in text
    assert "load_lora_weights" not in text
    assert "| sde_window | sliding |" in text and "| sde_window_size | 1 |" in text
    assert "No reward was logged yet." in text
    assert FLOW_GRPO_ID in text and MIXGRPO_ID in text and "@article{li2025mixgrpo" in text
    assert PREF_GRPO_ID not in text

    monkeypatch.setattr(trainer, "preference_funcs", ["jpeg_compressibility"], raising=False)
    trainer.create_model_card()
    text = readme.read_text(encoding="utf-8")
    assert PREF_GRPO_ID in text and "@article{wang2025prefgrpo" in text and "`jpeg_compressibility`" in text

    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['languag'\]"):
        trainer.create_model_card(languag="en")
    assert hub.uploads == [] and hub.repos == []


def test_base_model_id_from_name_or_path(tmp_path):
    assert hub_id_from_name_or_path("stabilityai/stable-diffusion-3.5-medium") == (
        "stabilityai/stable-diffusion-3.5-medium"
    )
    snapshot = os.path.join("/root", ".cache", "huggingface", "hub", "models--a--b", "snapshots", "abc")
    assert hub_id_from_name_or_path(snapshot) == "a/b"
    assert hub_id_from_name_or_path(str(tmp_path)) is None  # a local folder is not a Hub id
    assert hub_id_from_name_or_path(None) is None


def test_model_card_renders_from_the_packaged_template():
    from importlib.resources import files

    from trl_flow_grpo.hub import (
        FLOW_GRPO,
        MIXGRPO,
        MODEL_CARD_TEMPLATE,
        EvalScore,
        MetricChange,
        RunSummary,
        generate_model_card,
    )

    assert files("trl_flow_grpo").joinpath("templates", "model_card.md").is_file()
    assert MODEL_CARD_TEMPLATE.is_file()
    summary = RunSummary(
        model_name="shapes-lora",
        base_model=BASE_ID,
        hub_model_id=REPO_ID,
        is_lora=True,
        tags=["trl", "flow-grpo", "trl"],
        papers=[FLOW_GRPO, MIXGRPO],
        reward_names=["jpeg_compressibility", "a|b"],
        metric_rows=[MetricChange("`jpeg_compressibility`", "rewards/jpeg_compressibility/mean", -2.0, -1.5, 1, 9)],
        hyperparameters=[("Optimizer steps", 9), ("Images sampled", 72), ("LoRA target modules", "to_q, to_k")],
        sample_image="samples.png",
        sample_caption="Evaluation samples (ODE sampler) at step 9, with their prompts and rewards.",
        num_prompts=4,
        inference={"num_inference_steps": 10, "guidance_scale": 4.5},
        wandb_url="https://wandb.ai/someone/run",
        trackio_url="https://huggingface.co/spaces/someone/trackio",
        widget=[{"text": "a red circle", "output": {"url": "images/sample_0.png"}}],
        dataset_name="someone/prompts",
        num_eval_prompts=2,
        eval_results=[
            EvalScore("jpeg_compressibility", "Mean jpeg_compressibility (ODE samples, step 9)", -1.25, 9),
            EvalScore("reward", "Mean weighted reward (ODE samples, step 9)", -1.25, 9),
        ],
    )
    card = generate_model_card(summary)
    text = str(card)
    meta = card_metadata(text)
    assert meta["tags"] == ["trl", "flow-grpo", "diffusers", "diffusers-training", "lora", "template:sd-lora"]
    assert meta["base_model_relation"] == "adapter"
    parsed = ModelCard(text).data  # what the Hub reads back
    assert parsed.widget == [{"text": "a red circle", "output": {"url": "images/sample_0.png"}}]
    assert parsed.model_name == "shapes-lora"
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in parsed.eval_results] == [
        ("jpeg_compressibility", -1.25, "someone/prompts"),
        ("reward", -1.25, "someone/prompts"),
    ]
    assert parsed.eval_results[0].dataset_name == "Evaluation prompts (2 prompts)"
    assert "{%" not in text and "{{ " not in text  # every tag and variable of the template was rendered
    assert "\n# shapes-lora\n\nA LoRA adapter for [someone/tiny-sd3](https://huggingface.co/someone/tiny-sd3)" in text
    assert (
        "with mixed ODE-SDE sampling (an SDE window) from [MixGRPO](https://huggingface.co/papers/2507.21802)" in text
    )
    assert "maximise the rewards `jpeg_compressibility`, `a|b` for 9 optimizer steps on 72 sampled images" in text
    assert (
        "Training logs: [Weights & Biases](https://wandb.ai/someone/run), "
        "[Trackio](https://huggingface.co/spaces/someone/trackio)." in text
    )
    assert "![Samples](samples.png)\n\n*Evaluation samples (ODE sampler) at step 9" in text
    assert "| `jpeg_compressibility` | -2.0000 (step 1) | -1.5000 (step 9) | +0.5000 |" in text
    assert "| LoRA target modules | to_q, to_k |" in text
    assert 'pipe.load_lora_weights("user/repo")' in text
    assert 'image = pipe(prompt="a photo of a cat", num_inference_steps=10, guidance_scale=4.5).images[0]' in text
    assert (
        text.index("## How to use")
        < text.index("## Base model")
        < text.index("## Rewards")
        < text.index("## Citations")
    )
    assert "\n\n\n" not in text  # sections are separated by exactly one blank line
    assert text.endswith("```\n")
