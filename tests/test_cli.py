"""The trl-flow-grpo command."""

import json
import os

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
    assert "One optimizer step: 2 images (1 prompt x 2), 1 SDE step each." in out  # no "1 prompts"
    assert "accuracy/position" in out  # the held-out table, before and after, with intervals
    assert "strict_accuracy" in out and "extra_objects" in out  # and how much of it is extra objects
    assert "95% intervals: bootstrap over captions" in out and "1 image per caption" in out
    assert (tmp_path / "transformer" / "config.json").is_file()  # the demo fine-tunes the whole transformer
    assert list((tmp_path / "samples").glob("train_step*.png"))
    assert (tmp_path / "README.md").is_file()  # the model card
    # `sample` loads the fully fine-tuned transformer from the training output over the shapes model.
    samples = tmp_path / "grid"
    main(
        ["sample", "--lora", str(tmp_path), "--prompts", "a red circle", "--num_inference_steps", "2"]
        + ["--output_dir", str(samples)]
    )
    assert (samples / "grid.png").is_file() and (samples / "0000.png").is_file()


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
        main(
            ["train", "--config", "recipe.yaml", "--num_processes", "2", *option, "--learning_rate", "1e-4"]
            + ["--main_process_port=29501", "--debug", "underflow_overflow", "--mixed_precision", "no"]
        )
    assert exit_info.value.code == 3  # the launched run's exit status
    (cmd,) = calls
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    config = cmd[cmd.index("--config_file") + 1]
    assert os.path.isfile(config) and config.endswith("multi_gpu.yaml")
    # accelerate launch's own flags go before the script (as with `trl <cmd> --accelerate_config`); `--debug`,
    # which both have, stays with the script (TrainingArguments.debug).
    assert cmd[cmd.index("--config_file") + 2 :] == [
        "--num_processes", "2", "--main_process_port=29501", "--mixed_precision", "no",
        "-m", "trl_flow_grpo.cli", "train", "--config", "recipe.yaml", "--learning_rate", "1e-4",
        "--debug", "underflow_overflow",
    ]  # fmt: skip
    # What the launched `accelerate launch` reads from that command line.
    from accelerate.commands.launch import launch_command_parser

    launch_args = launch_command_parser().parse_args(cmd[3:])
    assert (launch_args.num_processes, launch_args.main_process_port, launch_args.mixed_precision) == (2, 29501, "no")
    assert launch_args.training_script == "trl_flow_grpo.cli" and launch_args.module


def test_accelerate_config_accepts_a_file_and_rejects_unknown_names(tmp_path):
    from trl_flow_grpo.cli import accelerate_config_path

    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: NO\n")
    assert accelerate_config_path(str(own)) == str(own)
    with pytest.raises(SystemExit, match="shipped configs: fsdp1, fsdp2, multi_gpu, single_gpu, zero1, zero2, zero3"):
        accelerate_config_path("zero4")


@pytest.mark.parametrize(
    ("name", "file"), [("zero3", "zero3.yaml"), ("deepspeed_zero2", "zero2.yaml"), ("fsdp", "fsdp2.yaml")]
)
def test_accelerate_configs_have_trl_names_and_the_old_names_still_work(name, file):
    from trl_flow_grpo.cli import accelerate_config_path

    path = accelerate_config_path(name)
    assert os.path.basename(path) == file and os.path.isfile(path)


def test_accelerate_config_rejects_the_flags_it_sets():
    with pytest.raises(SystemExit, match="--config_file is set by --accelerate_config"):
        main(["train", "--accelerate_config", "multi_gpu", "--config_file", "other.yaml"])


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


def test_sample_renders_a_grid_and_applies_the_lora(tmp_path, capfd):
    import numpy as np
    from PIL import Image

    from trl_flow_grpo.testing import make_tiny_sd3_pipeline

    base = tmp_path / "base"
    make_tiny_sd3_pipeline(seed=0, with_t5=True).save_pretrained(base)
    lora = _lora_folder(tmp_path, make_tiny_sd3_pipeline(seed=0, with_t5=True))
    common = ["--model_name_or_path", str(base), "--prompts", "a red circle", "two blue squares"]
    common += ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--images_per_prompt", "2"]
    main(["sample", *common, "--output_dir", str(tmp_path / "base")])
    main(["sample", *common, "--lora", str(lora), "--output_dir", str(tmp_path / "lora")])
    captured = capfd.readouterr()
    assert f"Wrote 4 images of 2 prompts to {tmp_path / 'lora'}/" in captured.out
    # Our LoRAs have no text encoder keys: diffusers' warning about it, once per text encoder, is not shown.
    assert "No LoRA keys associated" not in captured.err
    without, with_lora = Image.open(tmp_path / "base" / "grid.png"), Image.open(tmp_path / "lora" / "grid.png")
    assert without.size == with_lora.size
    assert without.width == 2 * 128  # 2 images per prompt side by side, tiny tiles upscaled to 128 px
    assert not np.array_equal(np.asarray(without), np.asarray(with_lora))


def test_sample_needs_prompts():
    with pytest.raises(SystemExit, match="no prompts"):
        main(["sample", "--output_dir", "unused"])


def test_train_resumes_from_the_newest_checkpoint(tmp_path, capsys):
    common = ["train", "--output_dir", str(tmp_path), "--num_generations", "2", "--per_device_train_batch_size", "2"]
    common += ["--gradient_accumulation_steps", "1", "--num_inference_steps", "2", "--eval_num_inference_steps", "1"]
    common += ["--logging_steps", "1", "--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "1"]
    common += ["--heldout_images_per_prompt", "1"]
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
    common += ["--heldout_images_per_prompt", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--max_steps", "3"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert f"Interrupted (SIGINT) after 1 optimizer step of 3. Newest checkpoint: {tmp_path / 'checkpoint-1'}" in err
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


_TINY_DEMO = ["--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
_TINY_DEMO += ["--num_inference_steps", "2", "--eval_num_inference_steps", "1", "--logging_steps", "1"]
_TINY_DEMO += ["--disable_tqdm", "true", "--heldout_images_per_prompt", "1"]


def _interrupt_in_call(monkeypatch, call: int) -> None:
    """SIGINT during the `call`-th rollout of the run."""
    import signal

    from trl_flow_grpo import FlowGRPOTrainer

    generate, calls = FlowGRPOTrainer._generate_and_score, []

    def interrupted(self, batches):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return generate(self, batches)

    monkeypatch.setattr(FlowGRPOTrainer, "_generate_and_score", interrupted)


def test_ctrl_c_in_the_demo_saves_the_weights_of_the_last_step(tmp_path, capsys, monkeypatch):
    """The demo writes no checkpoints (save_strategy "no"): Ctrl-C saves the last completed step's weights, says
    where and why there is nothing to resume from, and `sample` renders them."""
    _interrupt_in_call(monkeypatch, 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output_dir", str(tmp_path), "--max_steps", "3", *_TINY_DEMO])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    saved = tmp_path / "interrupted-step-1"
    assert "Interrupted (SIGINT) after 1 optimizer step of 3. save_strategy is 'no'" in err
    assert f"the weights after step 1 are saved in {saved}" in err
    assert (saved / "transformer" / "config.json").is_file()  # the demo fine-tunes the whole transformer
    assert not (tmp_path / "transformer").exists() and not list(tmp_path.glob("checkpoint-*"))
    main(["sample", "--lora", str(saved), "--prompts", "a red circle", "--num_inference_steps", "1"]
         + ["--output_dir", str(tmp_path / "rendered")])  # fmt: skip
    assert (tmp_path / "rendered" / "grid.png").is_file()


def test_ctrl_c_before_the_first_step_says_nothing_was_saved_and_why(tmp_path, capsys, monkeypatch):
    _interrupt_in_call(monkeypatch, 1)
    with pytest.raises(SystemExit):
        main(["train", "--output_dir", str(tmp_path), "--max_steps", "3", *_TINY_DEMO])
    err = capsys.readouterr().err
    assert "after 0 optimizer steps of 3. Nothing was saved: no optimizer step had completed" in err
    assert not tmp_path.exists() or not any(
        p.name.startswith(("interrupted", "checkpoint")) for p in tmp_path.iterdir()
    )


def test_train_help_groups_the_options_and_says_what_the_demo_changes(capsys, tmp_path, monkeypatch):
    from trl_flow_grpo.cli import demo_defaults

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where the help text is cached

    main(["train", "--help"])  # prints and returns
    out = capsys.readouterr().out
    script = out.index("trl-flow-grpo train: model, data, rewards, LoRA:")
    flow = out.index("Flow-GRPO (FlowGRPOConfig):")
    inherited = out.index("Training arguments inherited from transformers (TrainingArguments):")
    assert script < flow < inherited
    assert script < out.index("--lora_dropout") < flow
    assert flow < out.index("--num_generations") < inherited  # a FlowGRPOConfig field
    assert flow < out.index("--learning_rate") < inherited  # FlowGRPOConfig sets its own default
    assert inherited < out.index("--adam_beta1")
    assert "--optim {adamw_torch" not in out.split("\n\n")[0]  # the usage line is short
    # The demo's values, read from its recipe, next to the options they change.
    demo = demo_defaults()
    block = out[out.index("--max_steps MAX_STEPS") :][:400]
    assert f"[demo: {demo['max_steps']}]" in " ".join(block.split())
    block = out[out.index("--height HEIGHT") :][:400]
    assert f"[demo: {demo['height']}]" in " ".join(block.split())
    block = out[out.index("--no_use_peft") :][:200]
    assert "full fine-tuning" in block and "Train a LoRA instead" not in block


def test_lora_options_reach_the_lora_config():
    from trl_flow_grpo.cli import _parser, lora_config

    args = ["--model_name_or_path", "x/y", "--dataset_name", "p.txt", "--output_dir", "unused", "--lora_r", "4"]
    args += ["--lora_dropout", "0.1", "--use_rslora", "true", "--use_dora", "true", "--lora_target_modules", "to_q"]
    script_args, _ = _parser(demo=False).parse_args_and_config(args + ["--report_to", "none"])
    config = lora_config(script_args)
    assert (config.r, config.lora_dropout, config.use_rslora, config.use_dora) == (4, 0.1, True, True)
    assert config.target_modules == {"to_q"}
    script_args, _ = _parser(demo=False).parse_args_and_config(args[:6] + ["--report_to", "none"])
    from trl_flow_grpo.pipelines.sd3 import LORA_TARGET_MODULES

    assert lora_config(script_args).target_modules == set(LORA_TARGET_MODULES)  # the attention projections
    assert lora_config(script_args).lora_dropout == 0.0  # Flow-GRPO's LoRA has no dropout
    script_args, _ = _parser(demo=False).parse_args_and_config(args[:6] + ["--no_use_peft", "--report_to", "none"])
    assert lora_config(script_args) is None


def test_model_revision_is_passed_to_from_pretrained(tmp_path, monkeypatch):
    from trl_flow_grpo import flow_grpo_trainer

    seen = {}

    def load(model, init_kwargs):
        seen.update(model=model, **(init_kwargs or {}))
        raise KeyboardInterrupt  # stop before anything else runs

    monkeypatch.setattr(flow_grpo_trainer, "_load_pipeline", load)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        main(
            ["train", "--model_name_or_path", "org/pipe", "--model_revision", "v2", "--dataset_name", str(prompts)]
            + ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
        )
    assert seen == {"model": "org/pipe", "revision": "v2"}


def test_hub_dataset_ids_are_recorded_files_are_not(tmp_path):
    from trl_flow_grpo.cli import hub_dataset_id

    assert hub_dataset_id("someone/prompts") == "someone/prompts"
    assert hub_dataset_id("prompts.jsonl") is None and hub_dataset_id("builtin:shapes") is None
    assert hub_dataset_id(str(tmp_path)) is None and hub_dataset_id(None) is None


def test_the_dataset_name_reaches_the_model_card(tmp_path, monkeypatch):
    from datasets import Dataset

    from trl_flow_grpo import cli

    monkeypatch.setattr(
        cli, "_load_datasets", lambda args: (Dataset.from_dict({"prompt": ["a red circle"] * 2}), None)
    )
    out = tmp_path / "out"
    main(
        [
            "train",
            "--model_name_or_path",
            "builtin:shapes",
            "--dataset_name",
            "someone/shape-prompts",
            "--reward_funcs",
        ]
        + ["shapes_geneval", "--output_dir", str(out), "--max_steps", "1", "--no_use_peft", "--height", "32"]
        + ["--width", "32", "--max_sequence_length", "16", "--save_strategy", "no", "--report_to", "none"]
        + _TINY_DEMO[:-2]
    )
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "datasets:\n- someone/shape-prompts" in card


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_a_hub_name_that_is_not_cached_offline_is_a_one_line_error(tmp_path, monkeypatch, kind):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    model = "nobody-xyz/not-a-cached-pipeline" if kind == "model" else "builtin:shapes"
    dataset = "nobody-xyz/not-a-cached-dataset" if kind == "dataset" else str(prompts)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["train", "--model_name_or_path", model, "--dataset_name", dataset, "--output_dir", str(tmp_path / "o")]
            + ["--report_to", "none"]
        )
    message = str(exit_info.value.code)
    name = model if kind == "model" else dataset
    assert message.startswith(f"trl-flow-grpo train: the {kind} {name!r} is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in message and "examples/shapes_grpo.yaml" in message and "\n" not in message
    if kind == "model":  # `sample` says the same about its base pipeline
        with pytest.raises(SystemExit, match=r"^trl-flow-grpo sample: the model 'nobody-xyz/not-a-cached-pipeline'"):
            main(["sample", "--model_name_or_path", model, "--prompts", "a cat", "--output_dir", str(tmp_path / "s")])


def test_sample_writes_into_its_output_dir_and_prints_each_images_rewards(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from trl_flow_grpo.rewards import REWARD_FUNCS

    monkeypatch.chdir(tmp_path)
    main(
        ["sample", "--prompts", "a red circle", "two blue squares", "--num_inference_steps", "2"]
        + ["--reward_funcs", "shapes_geneval", "jpeg_compressibility"]
    )
    out = capsys.readouterr().out
    folder = tmp_path / "samples"  # the default output_dir, named in the message
    assert "Wrote 2 images of 2 prompts to samples/" in out
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "grid.png", "rewards.jsonl"]
    rows = [json.loads(line) for line in (folder / "rewards.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == ["a red circle", "two blue squares"]
    images = [Image.open(folder / row["file"]).convert("RGB") for row in rows]
    for name in ("shapes_geneval", "jpeg_compressibility"):  # the rewards of the written images, as printed
        expected = REWARD_FUNCS[name](prompts=[row["prompt"] for row in rows], images=images)
        assert [row["rewards"][name] for row in rows] == pytest.approx(list(map(float, expected)), abs=1e-4)
        assert name in out
    table = out[out.index("shapes_geneval") :].splitlines()
    assert "a red circle" in table[1] and f"{rows[0]['rewards']['shapes_geneval']:.4f}" in table[1]


def test_the_log_line_shows_each_reward_when_there_are_several():
    from types import SimpleNamespace

    from trl_flow_grpo.cli import _log_line

    state = SimpleNamespace(global_step=3, max_steps=10)
    logs = {"reward": 0.5, "rewards/ocr/mean": 0.8, "rewards/pickscore/mean": 0.2, "kl": 0.0, "loss": 0.1}
    assert "reward +0.5000 (ocr +0.8000, pickscore +0.2000) | kl" in _log_line(state, logs)
    assert "reward +0.5000 | kl" in _log_line(state, {"reward": 0.5, "rewards/ocr/mean": 0.5})
    eval_logs = {"eval_reward": 0.1, "eval_rewards/a/mean": 0.3, "eval_rewards/b/mean": -0.1}
    assert _log_line(state, eval_logs).endswith("held-out reward +0.1000 (a +0.3000, b -0.1000)")


def test_only_the_two_torchvision_fallback_warnings_are_silenced():
    import logging

    from trl_flow_grpo.cli import _silence_torchvision_fallback

    logger = logging.getLogger("transformers.utils.import_utils")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        _silence_torchvision_fallback()
        _silence_torchvision_fallback()  # installed once
        for name in ("CLIPImageProcessor", "SiglipImageProcessor"):
            logger.warning(f"`{name}` requires torchvision (not installed); falling back to `{name}Pil` for ...")
        logger.warning("`SomethingElse` requires torchvision (not installed); falling back to `SomethingElsePil`")
        logger.warning("an unrelated warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage()[:15] for r in records] == ["`SomethingElse`", "an unrelated wa"]


def test_no_rollout_bar_under_the_step_bar(tmp_path, monkeypatch):
    """The rollout's bar would interleave with the step bar where the output is not a terminal."""
    from trl_flow_grpo import flow_grpo_trainer

    flags, real = [], flow_grpo_trainer.tqdm

    def recording(*args, **kwargs):
        if kwargs.get("desc") == "rollout":
            flags.append(kwargs["disable"])
        return real(*args, **kwargs)

    monkeypatch.setattr(flow_grpo_trainer, "tqdm", recording)
    tiny = [a for a in _TINY_DEMO if a not in ("--disable_tqdm", "true")]
    main(["train", "--output_dir", str(tmp_path), "--max_steps", "2", *tiny])
    assert flags and all(flags)  # the step bar was shown (disable_tqdm false), the rollout bar never


def test_a_misspelt_flag_fails_before_accelerate_launches(monkeypatch):
    from trl_flow_grpo import cli

    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: pytest.fail("launched despite a misspelt flag"))
    with pytest.raises(SystemExit, match="did you mean --learning_rate"):
        main(["train", "--accelerate_config", "multi_gpu", "--num_processes", "2", "--lerning_rate", "1e-4"])


def test_an_unknown_recipe_key_names_the_file_the_key_and_the_fix_before_anything_loads(tmp_path, monkeypatch):
    """A misspelt YAML key gets the nearest option; a key of the launch (`accelerate_config`, `num_processes`) is
    said to belong on the command line, with the command; with --accelerate_config this fails before launching."""
    from trl_flow_grpo import cli

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lerning_rate: 1e-4\nnum_processes: 2\nmax_steps: 1\nenv:\n  FOO: '1'\n", encoding="utf-8")
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: pytest.fail("launched despite a wrong recipe"))
    for argv in (
        ["train", "--config", str(recipe)],
        ["train", "--accelerate_config", "multi_gpu", f"--config={recipe}"],
    ):
        with pytest.raises(SystemExit) as error:
            main(argv)
        message = str(error.value)
        assert f"{recipe}: unknown keys 'lerning_rate', 'num_processes'." in message  # `env:` is TRL's, not unknown
        assert "--lerning_rate: did you mean --learning_rate?" in message
        assert "num_processes: an option of the launch, not of the recipe; give it on the command line: " in message
        assert f"`trl-flow-grpo train --config {recipe} --num_processes 2`" in message
    recipe.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="is not a YAML mapping of option: value"):
        main(["train", "--config", str(recipe)])


def test_train_help_is_printed_from_the_cache_without_importing_transformers(tmp_path):
    """`train --help` needs TrainingArguments (torch, peft: seconds to import): the second time it comes from the
    user's cache, and a change to the package's sources would key a new entry."""
    import subprocess
    import sys

    code = (
        "import sys; from trl_flow_grpo.cli import main; main(['train', '--help']); "
        "print('IMPORTED', 'transformers' in sys.modules)"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "100"}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True) for _ in range(2)]
    first, second = (run.stdout.rsplit("IMPORTED", 1) for run in runs)
    assert first[1].strip() == "True" and second[1].strip() == "False"
    assert first[0] == second[0] and "Flow-GRPO (FlowGRPOConfig):" in second[0]
    (entry,) = (tmp_path / "trl-flow-grpo").iterdir()
    assert entry.read_text(encoding="utf-8") == first[0]


def test_a_dora_rslora_lora_from_train_loads_in_diffusers_as_trained(tmp_path, capsys):
    """The LoRA options reach the saved file: diffusers loads the DoRA magnitudes and the rsLoRA scaling."""
    from diffusers import DiffusionPipeline

    from trl_flow_grpo import testing

    base, prompts, out = tmp_path / "base", tmp_path / "prompts.txt", tmp_path / "out"
    testing.make_tiny_sd3_pipeline(seed=0, with_t5=True).save_pretrained(base)
    prompts.write_text("a red circle\ntwo blue squares\n", encoding="utf-8")
    main(
        ["train", "--model_name_or_path", str(base), "--dataset_name", str(prompts), "--reward_funcs"]
        + ["jpeg_compressibility", "--output_dir", str(out), "--max_steps", "1", "--num_generations", "2"]
        + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--height", "32"]
        + ["--width", "32", "--num_inference_steps", "2", "--max_sequence_length", "256", "--lora_r", "4"]
        + ["--lora_alpha", "8", "--use_dora", "true", "--use_rslora", "true", "--lora_dropout", "0.1"]
        + ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"]
    )
    assert "step    1/1 | reward" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(out))
    (config,) = pipe.transformer.peft_config.values()
    assert (config.r, config.lora_alpha, config.use_dora, config.use_rslora) == (4, 8, True, True)
    assert any("lora_magnitude_vector" in name for name, _ in pipe.transformer.named_parameters())


def test_the_real_torchvision_fallback_warnings_are_silenced_and_nothing_else():
    """Importing the pipelines (diffusers) without torchvision logs transformers' two fallback warnings; with the
    CLI's filter they are gone, and a warning from the same logger still shows."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers does not warn")
    code = (
        "import logging, sys; from trl_flow_grpo import cli\n"
        "if sys.argv[1] == 'filtered': cli._silence_torchvision_fallback()\n"
        "import trl_flow_grpo.pipelines\n"
        "logging.getLogger('transformers.utils.import_utils').warning('another warning')\n"
    )
    runs = {  # side by side: each is mostly the import of transformers and diffusers
        mode: subprocess.Popen([sys.executable, "-c", code, mode], stderr=subprocess.PIPE, text=True)
        for mode in ("plain", "filtered")
    }
    plain, filtered = (runs[mode].communicate(timeout=300)[1] for mode in ("plain", "filtered"))
    assert "`CLIPImageProcessor` requires torchvision" in plain and "`SiglipImageProcessor`" in plain
    assert "requires torchvision" not in filtered and "another warning" in filtered
