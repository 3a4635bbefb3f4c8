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
    )
    out = capsys.readouterr().out
    assert "shapes model" in out
    assert "step    1/1 | reward" in out
    assert "accuracy/position" in out  # the held-out table, before and after
    assert (tmp_path / "transformer" / "config.json").is_file()  # the demo fine-tunes the whole transformer
    assert list((tmp_path / "samples").glob("train_step*.png"))


def test_a_real_model_needs_a_dataset():
    with pytest.raises(ValueError, match="--dataset_name is required"):
        main(["train", "--model_name_or_path", "some/model", "--output_dir", "unused", "--report_to", "none"])
