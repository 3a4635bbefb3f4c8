"""Per-sample tables of the logged rollouts, written as parquet and sent to the trackers (`log_completions`).

The image counterpart of TRL's `GRPOTrainer` completion tables: one row per sampled image with the columns `step`,
`prompt`, `image`, one column per reward function (NaN: not applicable) and `advantage`. [`SampleTable`] holds the
rows; [`SampleTable.write_parquet`] writes them (images as PNG bytes, readable with `datasets.Dataset.from_parquet`
or `pandas.read_parquet`); [`send_table`] and [`send_image`] go through the trackers' public APIs only: `wandb.Table` /
`wandb.Image` when a W&B run is active, `trackio.Table` / `trackio.Image`, and TensorBoard's `SummaryWriter.add_image`
on the `TensorBoardCallback` of the trainer's callback list. The tracker packages are imported only when `report_to`
names them.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .file_names import COMPLETIONS_FILE, COMPLETIONS_FOLDER

__all__ = ["FIXED_COLUMNS", "SampleTable", "completions_path", "png_bytes", "send_image", "send_table"]

FIXED_COLUMNS = ("step", "prompt", "image", "advantage")
"""The columns every table has; a reward function with one of these names gets the column `reward/<name>`."""


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def completions_path(output_dir: str, step: int) -> str:
    """Where the table of optimizer step `step` is written: `output_dir/completions/step_XXXXX.parquet`."""
    return os.path.join(output_dir, COMPLETIONS_FOLDER, COMPLETIONS_FILE.format(step=step))


@dataclass
class SampleTable:
    """The rollouts of one generation batch, one row per image.

    Args:
        step (`int`):
            Optimizer step at which the rows are logged (the `step` column).
        prompts (`list[str]`):
            Prompt of each image.
        images (`list[PIL.Image.Image]`):
            The sampled images.
        rewards (`dict[str, list[float]]`):
            Each reward function's value per image, by reward function name, in the order of the columns (NaN or
            `None`: not applicable). Empty with preference functions only.
        advantages (`list[float]`):
            The advantage of each image (what the policy loss weighs it by).
    """

    step: int
    prompts: list[str]
    images: list[Image.Image]
    rewards: dict[str, list[float]]
    advantages: list[float]

    def __post_init__(self) -> None:
        n = len(self.images)
        lengths = {"prompts": len(self.prompts), "advantages": len(self.advantages)}
        lengths.update({f"rewards[{name!r}]": len(values) for name, values in self.rewards.items()})
        wrong = {name: length for name, length in lengths.items() if length != n}
        if wrong:
            raise ValueError(f"SampleTable has {n} images but {wrong}: give one value per image.")

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> SampleTable:
        """The first `n` rows (`num_images_to_log`)."""
        if n < 0:
            raise ValueError(f"SampleTable.head needs n >= 0, got {n}.")
        return SampleTable(
            step=self.step,
            prompts=self.prompts[:n],
            images=self.images[:n],
            rewards={name: values[:n] for name, values in self.rewards.items()},
            advantages=self.advantages[:n],
        )

    @property
    def reward_columns(self) -> list[str]:
        """The column of each reward function: its name, or `reward/<name>` if the name is a fixed column's."""
        return [f"reward/{name}" if name in FIXED_COLUMNS else name for name in self.rewards]

    @property
    def columns(self) -> list[str]:
        """`step`, `prompt`, `image`, one column per reward function, `advantage`."""
        return ["step", "prompt", "image", *self.reward_columns, "advantage"]

    def rows(self, image: Callable[[Image.Image, str], Any]) -> list[list[Any]]:
        """The rows in `columns` order, each image converted by `image(pil_image, prompt)` (e.g. `wandb.Image`)."""
        rewards = [[_float(values[i]) for values in self.rewards.values()] for i in range(len(self))]
        return [
            [self.step, prompt, image(picture, prompt), *reward_values, float(advantage)]
            for prompt, picture, reward_values, advantage in zip(self.prompts, self.images, rewards, self.advantages)
        ]

    def write_parquet(self, path: str) -> None:
        """Write the rows to `path` as parquet, images as PNG bytes (the `datasets.Image` layout: `{bytes, path}`, so
        `datasets.Dataset.from_parquet(path)` gives PIL images)."""
        import datasets

        columns = self.columns
        rows = self.rows(lambda picture, prompt: {"bytes": png_bytes(picture), "path": None})
        features = datasets.Features(
            {
                "step": datasets.Value("int64"),
                "prompt": datasets.Value("string"),
                "image": datasets.Image(),
                **{name: datasets.Value("float64") for name in self.reward_columns},
                "advantage": datasets.Value("float64"),
            }
        )
        data = {name: [row[i] for row in rows] for i, name in enumerate(columns)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        datasets.Dataset.from_dict(data, features=features).to_parquet(path)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _wandb_run_module(report_to: Iterable[str]) -> Any:
    """The `wandb` module if `report_to` names it and a run is active, else `None`."""
    if "wandb" not in report_to:
        return None
    import wandb

    return wandb if wandb.run is not None else None


def _trackio_module(report_to: Iterable[str]) -> Any:
    """The `trackio` module if `report_to` names it, else `None`."""
    if "trackio" not in report_to:
        return None
    import trackio

    return trackio


def send_table(table: SampleTable, key: str, report_to: Iterable[str]) -> list[str]:
    """Send `table` as `key` to the trackers of `report_to` that take tables: W&B (when a run is active) and Trackio.

    Returns the names of the trackers it was sent to.
    """
    report_to = list(report_to or [])
    sent = []
    wandb = _wandb_run_module(report_to)
    if wandb is not None:
        data = table.rows(lambda picture, prompt: wandb.Image(picture, caption=prompt))
        wandb.log({key: wandb.Table(columns=table.columns, data=data), "train/global_step": table.step})
        sent.append("wandb")
    trackio = _trackio_module(report_to)
    if trackio is not None:
        data = table.rows(lambda picture, prompt: trackio.Image(picture, caption=prompt))
        trackio.log({key: trackio.Table(columns=table.columns, data=data)})
        sent.append("trackio")
    return sent


def send_image(
    image: Image.Image,
    key: str,
    step: int,
    report_to: Iterable[str],
    callbacks: Iterable[Any],
    trackers: tuple[str, ...] = ("wandb", "trackio", "tensorboard"),
) -> list[str]:
    """Send `image` as `key` at `step` to those of `trackers` that are active: W&B and Trackio when `report_to` names
    them (W&B only with an active run), TensorBoard through the `SummaryWriter` of a `TensorBoardCallback` among
    `callbacks` (the trainer's public `callback_handler.callbacks`).

    Returns the names of the trackers it was sent to.
    """
    report_to = list(report_to or [])
    sent = []
    wandb = _wandb_run_module(report_to) if "wandb" in trackers else None
    if wandb is not None:
        wandb.log({key: wandb.Image(image), "train/global_step": step})
        sent.append("wandb")
    trackio = _trackio_module(report_to) if "trackio" in trackers else None
    if trackio is not None:
        trackio.log({key: trackio.Image(image)})
        sent.append("trackio")
    if "tensorboard" in trackers:
        from transformers.integrations import TensorBoardCallback

        for callback in callbacks:
            writer = getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
            if writer is not None:
                import numpy as np

                writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
                sent.append("tensorboard")
    return sent
