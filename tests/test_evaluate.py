"""`trl-flow-grpo evaluate`: a pipeline on a prompt dataset, each reward's mean with a 95% interval per category,
a grid and results.json (the shipped shapes model with its held-out captions; a tiny offline pipeline with a file)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from trl_flow_grpo.cli import main
from trl_flow_grpo.evaluate import reward_estimates
from trl_flow_grpo.toy.shapes import CATEGORIES

FAST = ["--num_inference_steps", "2", "--images_per_prompt", "1"]


def test_shapes_model_on_held_out_captions(tmp_path, capsys):
    main(["evaluate", "--max_prompts", "3", *FAST, "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert (tmp_path / "grid.png").is_file()
    estimates = results["rewards"]["shapes_geneval"]
    overall = estimates["all"]
    assert overall["num_prompts"] == 3 and overall["num_images"] == 3
    assert overall["low"] <= overall["mean"] <= overall["high"]
    assert set(estimates) - {"all"} <= set(CATEGORIES)  # the held-out captions carry their category
    scores = [image["rewards"]["shapes_geneval"] for image in results["images"]]
    assert overall["mean"] == pytest.approx(np.mean(scores))
    assert "95% interval" in out and "Evaluated 3 prompts x 1 image" in out


REWARDS = """
import numpy as np


def brightness(prompts, images, **kwargs):
    return [float(np.asarray(image.convert("L")).mean() / 255) for image in images]


def only_red(prompts, images, target, **kwargs):
    return [1.0 if t == "red" else None for t in target]
"""


def test_tiny_pipeline_with_categories_columns_and_rewards_that_do_not_apply(tmp_path, capsys, monkeypatch):
    from trl_flow_grpo.testing import make_tiny_sd3_pipeline

    base = tmp_path / "base"
    make_tiny_sd3_pipeline(seed=0, with_t5=True).save_pretrained(base)
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARDS), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    rows = [("a red circle", "warm", "red"), ("an orange sun", "warm", "orange"), ("a blue sea", "cool", "blue")]
    rows += [("a green leaf", "cool", "green")]
    prompts.write_text("".join(json.dumps({"text": p, "kind": c, "target": t}) + "\n" for p, c, t in rows))
    argv = ["evaluate", "--model_name_or_path", str(base), "--dataset_name", str(prompts)]
    argv += ["--prompt_column", "text", "--category_column", "kind", "--height", "32", "--width", "32"]
    argv += ["--num_inference_steps", "2", "--images_per_prompt", "2", "--output_dir", str(tmp_path / "out")]
    argv += ["--reward_funcs", "my_rewards.brightness", "my_rewards.only_red"]
    main(argv)
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    images = results["images"]
    assert [(i["prompt"], i["category"], i["seed"]) for i in images[:2]] == [
        ("a red circle", "warm", 0),
        ("a red circle", "warm", 1),
    ]
    assert len(images) == 8
    brightness = results["rewards"]["brightness"]
    assert set(brightness) == {"all", "warm", "cool"}
    for category in ("warm", "cool"):
        values = [i["rewards"]["brightness"] for i in images if i["category"] == category]
        assert brightness[category]["mean"] == pytest.approx(np.mean(values))
        assert brightness[category]["num_prompts"] == 2 and brightness[category]["num_images"] == 4
        assert brightness[category]["low"] <= brightness[category]["mean"] <= brightness[category]["high"]
    # A reward that applies to one prompt only: its images alone are averaged, categories without any are left out.
    assert results["rewards"]["only_red"] == {
        "all": {"mean": 1.0, "low": 1.0, "high": 1.0, "num_prompts": 1, "num_images": 2},
        "warm": {"mean": 1.0, "low": 1.0, "high": 1.0, "num_prompts": 1, "num_images": 2},
    }
    assert [i["rewards"]["only_red"] for i in images[2:4]] == [None, None]
    table = out[out.index("brightness") :].splitlines()
    assert table[1].split() == ["category", "mean", "95%", "interval", "prompts", "images"]
    assert [line.split()[0] for line in table[2:5]] == ["all", "warm", "cool"]

    # --lora: the same prompts and seeds through the LoRA give other images, hence other rewards.
    from test_cli import _lora_folder

    lora = _lora_folder(tmp_path, make_tiny_sd3_pipeline(seed=0, with_t5=True))
    main([str(tmp_path / "lora") if a == str(tmp_path / "out") else a for a in argv] + ["--lora", str(lora)])
    tuned = json.loads((tmp_path / "lora" / "results.json").read_text(encoding="utf-8"))
    assert tuned["settings"]["lora"] == str(lora)
    assert [i["rewards"]["brightness"] for i in tuned["images"]] != [i["rewards"]["brightness"] for i in images]
    with pytest.raises(SystemExit, match="trl-flow-grpo evaluate: --lora .*missing: no such folder"):
        main([*argv, "--lora", str(tmp_path / "missing")])


def test_intervals_are_over_prompts_and_reproducible():
    # Two prompts, one always 1 and one always 0: the images within a prompt are not independent samples.
    values = np.array([[1.0] * 8, [0.0] * 8])
    estimate = reward_estimates(values, None)["all"]
    assert estimate["mean"] == 0.5 and estimate["num_prompts"] == 2 and estimate["num_images"] == 16
    assert estimate["low"] == 0.0 and estimate["high"] == 1.0  # resampling 2 prompts, not 16 images
    assert reward_estimates(values, None) == reward_estimates(values, None)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--images_per_prompt must be >= 1, got 0"):
        main(["evaluate", "--images_per_prompt", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--max_prompts must be >= 1, got 0"):
        main(["evaluate", "--max_prompts", "0", "--output_dir", str(tmp_path)])
    missing = tmp_path / "p.csv"
    missing.write_text("caption\na cat\n")
    with pytest.raises(SystemExit, match=r"has no column 'prompt'; columns: \['caption'\]\. Pass --prompt_column"):
        main(["evaluate", "--dataset_name", str(missing), "--output_dir", str(tmp_path)])


def test_the_trainer_evaluates_with_its_eval_rewards_at_the_eval_size(tmp_path):
    from datasets import Dataset

    from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer, hub
    from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config

    def brightness(prompts, images, **kwargs):
        return [float(np.asarray(image.convert("L")).mean() / 255) for image in images]

    args = FlowGRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        num_generations=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        height=32,
        width=32,
        eval_height=48,
        eval_width=40,
        eval_num_inference_steps=2,
        max_sequence_length=16,
        disable_tqdm=True,
    )
    prompts = Dataset.from_dict({"prompt": ["a red circle", "two blue squares"]})
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(),
        "jpeg_compressibility",
        args=args,
        train_dataset=prompts,
        eval_dataset=prompts,
        peft_config=tiny_lora_config(),
        eval_reward_funcs=[brightness],
    )
    sizes = []
    evaluate = trainer.eval_scorer.evaluate

    def recording(images, *args, **kwargs):
        sizes.extend(image.size for image in images)
        return evaluate(images, *args, **kwargs)

    trainer.eval_scorer.evaluate = recording
    metrics = trainer.evaluate()
    assert sizes == [(40, 48), (40, 48)]  # (width, height): eval_width x eval_height, not the training 32 x 32
    assert "eval_rewards/brightness/mean" in metrics and "eval_rewards/jpeg_compressibility/mean" not in metrics
    assert metrics["eval_reward"] == pytest.approx(metrics["eval_rewards/brightness/mean"])  # weight 1
    assert trainer.reward_func_names == ["jpeg_compressibility"]  # training is unchanged
    card = hub.last_eval_scores(trainer.state.log_history, trainer.reward_func_names)
    assert [score.metric for score in card] == ["brightness", "reward"]  # the model card's evaluation results


def test_eval_size_must_be_positive(tmp_path):
    from trl_flow_grpo import FlowGRPOConfig

    with pytest.raises(ValueError, match=r"eval_width must be positive \(or unset: the training size\), got 0"):
        FlowGRPOConfig(output_dir=str(tmp_path), eval_width=0)
