"""Per-sample tables (`log_completions`): the parquet file, and the trackers' public APIs (faked in `sys.modules`)."""

import importlib.machinery
import io
import math
import sys
import types

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from PIL import Image
from transformers.integrations import TensorBoardCallback

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.hub import trackio_url
from trl_flow_grpo.sample_logging import SampleTable, completions_path, send_image, send_table
from trl_flow_grpo.testing import make_tiny_sd3_pipeline, tiny_lora_config


def colour_images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), (40 * i, 255 - 40 * i, 7)) for i in range(n)]


def make_table(n: int = 3) -> SampleTable:
    return SampleTable(
        step=5,
        prompts=[f"prompt {i}" for i in range(n)],
        images=colour_images(n),
        rewards={"brightness": [0.1 * i for i in range(n)], "ocr": [None] + [1.0] * (n - 1)},
        advantages=[float(i) - 1 for i in range(n)],
    )


class Recorder:
    """A fake tracker module: records `log` calls; `Table` and `Image` keep their arguments."""

    def __init__(self, name: str, run: object = True):
        self.module = types.ModuleType(name)
        self.logged: list[dict] = []
        recorder = self

        class Table:
            def __init__(self, columns=None, data=None):
                self.columns, self.data = columns, data

        class FakeImage:
            def __init__(self, value, caption=None):
                self.value, self.caption = value, caption

        self.module.Table, self.module.Image = Table, FakeImage
        self.module.log = lambda metrics, **kwargs: recorder.logged.append(metrics)
        if name == "wandb":
            self.module.run = object() if run else None


def test_parquet_has_one_row_per_image_with_png_bytes(tmp_path):
    table = make_table()
    path = completions_path(str(tmp_path), table.step)
    assert path == str(tmp_path / "completions" / "step_00005.parquet")
    table.write_parquet(path)

    read = pq.read_table(path)
    assert read.column_names == ["step", "prompt", "image", "brightness", "ocr", "advantage"]
    rows = read.to_pylist()
    assert [row["prompt"] for row in rows] == table.prompts
    assert [row["step"] for row in rows] == [5, 5, 5]
    assert [row["brightness"] for row in rows] == pytest.approx(table.rewards["brightness"])
    assert math.isnan(rows[0]["ocr"]) and rows[1]["ocr"] == 1.0  # None: not applicable
    assert [row["advantage"] for row in rows] == table.advantages
    for row, image in zip(rows, table.images):
        assert row["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(row["image"]["bytes"])) as decoded:
            assert np.array_equal(np.asarray(decoded), np.asarray(image))
    # datasets reads the image column back as PIL images.
    again = Dataset.from_parquet(path)
    assert np.array_equal(np.asarray(again[2]["image"]), np.asarray(table.images[2]))


def test_head_limits_rows_and_reward_names_never_shadow_fixed_columns():
    table = SampleTable(
        step=1, prompts=["a", "b"], images=colour_images(2), rewards={"advantage": [1.0, 2.0]}, advantages=[0.5, -0.5]
    )
    assert table.columns == ["step", "prompt", "image", "reward/advantage", "advantage"]
    head = table.head(1)
    assert len(head) == 1 and head.prompts == ["a"] and head.rewards == {"advantage": [1.0]}
    assert head.advantages == [0.5]
    with pytest.raises(ValueError, match=r"2 images but \{'advantages': 1\}"):
        SampleTable(step=1, prompts=["a", "b"], images=colour_images(2), rewards={}, advantages=[0.0])


def test_send_table_uses_wandb_and_trackio_public_apis(monkeypatch):
    wandb, trackio = Recorder("wandb"), Recorder("trackio")
    monkeypatch.setitem(sys.modules, "wandb", wandb.module)
    monkeypatch.setitem(sys.modules, "trackio", trackio.module)
    table = make_table(2)

    assert send_table(table, "train/completions", []) == []  # report_to names neither
    assert wandb.logged == trackio.logged == []

    assert send_table(table, "train/completions", ["wandb", "trackio"]) == ["wandb", "trackio"]
    (wandb_log,) = wandb.logged
    assert wandb_log["train/global_step"] == 5
    (trackio_log,) = trackio.logged
    for logged in (wandb_log["train/completions"], trackio_log["train/completions"]):
        assert logged.columns == ["step", "prompt", "image", "brightness", "ocr", "advantage"]
        assert [row[0] for row in logged.data] == [5, 5]
        assert [row[1] for row in logged.data] == table.prompts
        assert [row[2].value for row in logged.data] == table.images
        assert [row[2].caption for row in logged.data] == table.prompts
        assert [row[3] for row in logged.data] == table.rewards["brightness"]
        assert [row[5] for row in logged.data] == table.advantages


def test_send_table_skips_wandb_without_an_active_run(monkeypatch):
    wandb = Recorder("wandb", run=None)
    monkeypatch.setitem(sys.modules, "wandb", wandb.module)
    assert send_table(make_table(), "train/completions", ["wandb"]) == []
    assert wandb.logged == []


def test_send_image_reaches_tensorboard_through_the_callback_list(monkeypatch):
    added = []

    class Writer:
        def add_image(self, tag, array, step, dataformats):
            added.append((tag, array.shape, step, dataformats))

    callback = TensorBoardCallback.__new__(TensorBoardCallback)  # tensorboard itself is not installed here
    callback.tb_writer = Writer()
    trackio = Recorder("trackio")
    monkeypatch.setitem(sys.modules, "trackio", trackio.module)
    grid = Image.new("RGB", (16, 8))

    sent = send_image(grid, "eval/samples", 3, ["trackio", "tensorboard"], [object(), callback])
    assert sent == ["trackio", "tensorboard"]
    assert added == [("eval/samples", (8, 16, 3), 3, "HWC")]
    assert trackio.logged[0]["eval/samples"].value is grid

    # Only the trackers asked for: the training grid goes to TensorBoard, the table to W&B and Trackio.
    assert send_image(grid, "train/samples", 4, ["trackio"], [callback], trackers=("tensorboard",)) == ["tensorboard"]
    assert len(trackio.logged) == 1


class FakeTrackio:
    """The parts of `trackio` that transformers' `TrackioCallback` and the sample tables call, recording them."""

    def __init__(self, space_id: str | None = None):
        module = types.ModuleType("trackio")
        module.__spec__ = importlib.machinery.ModuleSpec("trackio", loader=None)  # found by `is_trackio_available`
        module.__version__ = "0.43.0"
        self.module, self.logged, self.inits = module, [], []

        class Config(dict):
            def update(self, values, allow_val_change=False):
                super().update(values)

        class Var:
            def __init__(self, value):
                self.value = value

            def get(self):
                return self.value

        module.context_vars = types.SimpleNamespace(current_space_id=Var(space_id), current_project=Var(None))
        module.config = Config()
        module.init = lambda **kwargs: self.inits.append(kwargs)
        module.log = lambda metrics, step=None: self.logged.append(metrics)
        module.finish = lambda: None
        module.Table, module.Image = Recorder("trackio").module.Table, Recorder("trackio").module.Image


def test_report_to_trackio_gets_metrics_and_the_sample_table_from_the_trainer(tmp_path, monkeypatch):
    trackio = FakeTrackio()
    monkeypatch.setitem(sys.modules, "trackio", trackio.module)
    args = FlowGRPOConfig(
        output_dir=str(tmp_path),
        report_to="trackio",
        log_completions=True,
        num_images_to_log=3,
        num_generations=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        height=32,
        width=32,
        num_inference_steps=2,
        max_steps=1,
        max_sequence_length=16,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = FlowGRPOTrainer(
        make_tiny_sd3_pipeline(),
        "jpeg_compressibility",
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a red circle", "a blue square"]}),
        peft_config=tiny_lora_config(),
    )
    trainer.train()

    assert len(trackio.inits) == 1  # transformers' TrackioCallback set the run up
    (table_log,) = [entry for entry in trackio.logged if "train/completions" in entry]
    table = table_log["train/completions"]
    assert table.columns == ["step", "prompt", "image", "jpeg_compressibility", "advantage"]
    assert len(table.data) == 2  # num_images_to_log=3, but the step sampled 2 images
    (metrics,) = [entry for entry in trackio.logged if "train/reward" in entry]
    assert np.mean([row[3] for row in table.data]) == pytest.approx(metrics["train/rewards/jpeg_compressibility/mean"])
    assert all(isinstance(row[2].value, Image.Image) for row in table.data)
    written = pq.read_table(tmp_path / "completions" / "step_00001.parquet").to_pylist()
    assert [row["jpeg_compressibility"] for row in written] == pytest.approx([row[3] for row in table.data])


def test_card_links_the_trackio_space(monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", FakeTrackio(space_id="someone/runs").module)
    assert trackio_url() == "https://huggingface.co/spaces/someone/runs"
    monkeypatch.setitem(sys.modules, "trackio", FakeTrackio(space_id=None).module)
    assert trackio_url() is None
