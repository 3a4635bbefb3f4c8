"""The trl-flow-grpo command."""

import pytest

from trl_flow_grpo.cli import main


def test_help_lists_the_commands(capsys):
    main(["--help"])
    assert "train" in capsys.readouterr().out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit, match="unknown command 'trian'"):
        main(["trian"])


def test_train_without_a_model_runs_the_shapes_demo(tmp_path, capsys):
    main(
        ["train", "--output_dir", str(tmp_path), "--max_steps", "1", "--num_generations", "2"]
        + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--num_inference_steps", "2"]
        + ["--eval_num_inference_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
        + ["--heldout_images_per_prompt", "1"]
    )
    out = capsys.readouterr().out
    assert "shapes model" in out and "SHAPES_RECIPE" in out  # the demo says which recipe it trains
    assert "step    1/1 | reward" in out
    assert "accuracy/position" in out  # the held-out table, before and after, with intervals
    assert "95% intervals: bootstrap over captions" in out and "1 image per caption" in out
    assert (tmp_path / "transformer" / "config.json").is_file()  # the demo fine-tunes the whole transformer
    assert list((tmp_path / "samples").glob("train_step*.png"))
    # `sample` loads the fully fine-tuned transformer from the training output over the shapes model.
    grid = tmp_path / "grid.png"
    main(
        ["sample", "--lora", str(tmp_path), "--prompts", "a red circle", "--num_inference_steps", "2"]
        + ["--output", str(grid)]
    )
    assert grid.is_file()


def test_a_real_model_needs_a_dataset():
    with pytest.raises(ValueError, match="--dataset_name is required"):
        main(["train", "--model_name_or_path", "some/model", "--output_dir", "unused", "--report_to", "none"])


def test_help_lists_sample_too(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "sample" in out and "train" in out


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_accelerate_config_relaunches_train_under_accelerate(monkeypatch, form):
    import os
    import subprocess

    from trl_flow_grpo import cli

    calls = []
    monkeypatch.setattr(
        cli.subprocess, "run", lambda cmd, check: calls.append(cmd) or subprocess.CompletedProcess(cmd, 3)
    )
    option = ["--accelerate_config", "multi_gpu"] if form == "separate" else ["--accelerate_config=multi_gpu"]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "recipe.yaml", *option, "--learning_rate", "1e-4"])
    assert exit_info.value.code == 3  # the launched run's exit status
    (cmd,) = calls
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    config = cmd[cmd.index("--config_file") + 1]
    assert os.path.isfile(config) and config.endswith("multi_gpu.yaml")
    assert cmd[cmd.index("--config_file") + 2 :] == [
        "-m", "trl_flow_grpo.cli", "train", "--config", "recipe.yaml", "--learning_rate", "1e-4",
    ]  # fmt: skip


def test_accelerate_config_accepts_a_file_and_rejects_unknown_names(tmp_path):
    from trl_flow_grpo.cli import accelerate_config_path

    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: NO\n")
    assert accelerate_config_path(str(own)) == str(own)
    with pytest.raises(SystemExit, match="shipped configs: deepspeed_zero2, fsdp, multi_gpu, single_gpu"):
        accelerate_config_path("zero3")


def _lora_folder(tmp_path, pipe):
    """A LoRA with non-zero weights on the tiny transformer, saved the way the trainer saves it."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    from trl_flow_grpo.testing import tiny_lora_config

    pipe.transformer.add_adapter(tiny_lora_config())
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "lora"
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    return folder


def test_sample_renders_a_grid_and_applies_the_lora(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from trl_flow_grpo.testing import make_tiny_sd3_pipeline

    base = tmp_path / "base"
    make_tiny_sd3_pipeline(seed=0, with_t5=True).save_pretrained(base)
    lora = _lora_folder(tmp_path, make_tiny_sd3_pipeline(seed=0, with_t5=True))
    common = ["--model_name_or_path", str(base), "--prompts", "a red circle", "two blue squares"]
    common += ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--images_per_prompt", "2"]
    main(["sample", *common, "--output", str(tmp_path / "base.png")])
    main(["sample", *common, "--lora", str(lora), "--output", str(tmp_path / "lora.png")])
    assert "Wrote 4 images" in capsys.readouterr().out
    without, with_lora = Image.open(tmp_path / "base.png"), Image.open(tmp_path / "lora.png")
    assert without.size == with_lora.size
    assert without.width == 2 * 128  # 2 images per prompt side by side, tiny tiles upscaled to 128 px
    assert not np.array_equal(np.asarray(without), np.asarray(with_lora))


def test_sample_needs_prompts():
    with pytest.raises(SystemExit, match="no prompts"):
        main(["sample", "--output", "unused.png"])


def test_train_resumes_from_the_newest_checkpoint(tmp_path, capsys):
    common = ["train", "--output_dir", str(tmp_path), "--num_generations", "2", "--per_device_train_batch_size", "2"]
    common += ["--gradient_accumulation_steps", "1", "--num_inference_steps", "2", "--eval_num_inference_steps", "1"]
    common += ["--logging_steps", "1", "--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "1"]
    main([*common, "--max_steps", "1"])
    assert (tmp_path / "checkpoint-1").is_dir()
    capsys.readouterr()
    main([*common, "--max_steps", "2", "--resume_from_checkpoint", "true"])
    out = capsys.readouterr().out
    assert "step    2/2 | reward" in out and "step    1/2" not in out  # step 1 was not trained again


def test_ctrl_c_during_train_saves_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from trl_flow_grpo import FlowGRPOTrainer

    generate, calls = FlowGRPOTrainer._generate_and_score, []

    def interrupted_in_step_2(self, batches):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return generate(self, batches)

    monkeypatch.setattr(FlowGRPOTrainer, "_generate_and_score", interrupted_in_step_2)
    common = ["train", "--output_dir", str(tmp_path), "--num_generations", "2", "--per_device_train_batch_size", "2"]
    common += ["--gradient_accumulation_steps", "1", "--num_inference_steps", "2", "--eval_num_inference_steps", "1"]
    common += ["--logging_steps", "1", "--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "100"]
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--max_steps", "3"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert f"Interrupted (SIGINT). Newest checkpoint: {tmp_path / 'checkpoint-1'}" in err
    assert "--resume_from_checkpoint true" in err
    assert not (tmp_path / "transformer").exists()  # the unfinished model is not saved as the result


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image"])
def test_train_a_saved_pipeline_from_a_prompt_file(tmp_path, capsys, family):
    """The path a real run takes: a pipeline folder (`from_pretrained`), a .txt of prompts, a built-in reward, the
    default LoRA targets; the LoRA it writes loads into the same pipeline with diffusers."""
    from diffusers import DiffusionPipeline

    from trl_flow_grpo import testing

    build = {
        "sd3": lambda: testing.make_tiny_sd3_pipeline(seed=0, with_t5=True),
        "flux": lambda: testing.make_tiny_flux_pipeline(seed=0),
        "qwen_image": lambda: testing.make_tiny_qwen_image_pipeline(seed=0),
    }[family]
    base, prompts, out = tmp_path / "base", tmp_path / "prompts.txt", tmp_path / "out"
    build().save_pretrained(base)
    prompts.write_text("a red circle\ntwo blue squares\na green triangle\n", encoding="utf-8")
    main(
        ["train", "--model_name_or_path", str(base), "--dataset_name", str(prompts), "--reward_funcs"]
        + ["jpeg_compressibility", "--output_dir", str(out), "--max_steps", "1", "--num_generations", "2"]
        + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--height", "32"]
        + ["--width", "32", "--num_inference_steps", "2", "--max_sequence_length", "256", "--lora_r", "4"]
        + ["--lora_alpha", "8", "--learning_rate", "1e-2", "--save_strategy", "no", "--report_to", "none"]
        + ["--disable_tqdm", "true", "--logging_steps", "1", "--guidance_scale", "3.0"]
    )
    assert "step    1/1 | reward" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(out))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())
