"""The prompt data of a run: dataset checks, row ids (the prompt groups) and the group sampler."""

from typing import Any

import torch
from PIL import Image
from torch.utils.data import Sampler

from .validation import check_dataset

__all__ = [
    "SOURCE_IMAGES_KEYWORD",
    "GroupSampler",
    "RowIndexed",
    "SourceImageRows",
    "check_prompt_dataset",
    "check_train_dataset",
]

SOURCE_IMAGES_KEYWORD = "source_images"
"""The keyword under which reward and preference functions receive the source images of an image-editing run."""


def _column_names(dataset: Any) -> list[str]:
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        columns = list(dataset[0].keys()) if len(dataset) else []
    return list(columns)


def check_prompt_dataset(dataset: Any, name: str) -> None:
    """Raise if `dataset` (when given) has no `prompt` column or no rows; `name` is the argument it came from."""
    if dataset is None:
        return
    check_dataset(dataset, name)  # the type (no IterableDataset, list or dict) and every prompt a string
    columns = _column_names(dataset)
    if "prompt" not in columns:
        raise ValueError(
            f"{name} needs a 'prompt' column with the text prompts, but its columns are {columns}. Rename the text "
            f"column, e.g. `{name} = {name}.rename_column('caption', 'prompt')`."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")


def check_train_dataset(dataset: Any, generation_batch_size: int, num_generations: int) -> None:
    """Raise unless `dataset` is a prompt dataset with at least the prompts of one optimizer step."""
    if dataset is None:
        raise ValueError("FlowGRPOTrainer needs a train_dataset with a 'prompt' column.")
    check_prompt_dataset(dataset, "train_dataset")
    prompts_per_batch = generation_batch_size // num_generations
    if len(dataset) < prompts_per_batch:
        raise ValueError(
            f"train_dataset has {len(dataset)} prompts, but one optimizer step needs {prompts_per_batch} "
            f"(generation_batch_size {generation_batch_size} / num_generations {num_generations}). Add prompts or "
            "lower per_device_train_batch_size / gradient_accumulation_steps."
        )


class RowIndexed(torch.utils.data.Dataset):
    """The user's dataset, each row extended with its index (`_row`): the id of its prompt group."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "_row": index}


class GroupSampler(Sampler[int]):
    """Yields each prompt `num_generations` times in a row, in whole generation batches.

    Every generation batch (`prompts_per_batch` prompts) is yielded `repeat` times in a row (`num_iterations`). The
    order is a permutation seeded by `seed` and the epoch, identical on every process; an incomplete last batch
    is dropped so that no optimizer step mixes epochs or holds a partial group.
    """

    def __init__(self, num_rows: int, num_generations: int, prompts_per_batch: int, repeat: int = 1, seed: int = 0):
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_batch, self.repeat, self.seed = prompts_per_batch, repeat, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        usable = len(order) - len(order) % self.prompts_per_batch
        for start in range(0, usable, self.prompts_per_batch):
            chunk = order[start : start + self.prompts_per_batch]
            for _ in range(self.repeat):
                for row in chunk:
                    yield from [row] * self.num_generations

    def __len__(self) -> int:
        return (self.num_rows - self.num_rows % self.prompts_per_batch) * self.num_generations * self.repeat


class SourceImageRows(torch.utils.data.Dataset):
    """The rows of an image-editing dataset with their source image under `SOURCE_IMAGES_KEYWORD`: rollouts are
    conditioned on it and reward functions receive it as `source_images`, whatever the dataset calls the column.

    Column access (`rows["prompt"]`) reads the wrapped dataset.

    Raises:
        ValueError: if `dataset` has no column `column`, or also has a different column named `source_images`.
    """

    def __init__(self, dataset: Any, column: str, name: str):
        columns = _column_names(dataset)
        if column not in columns:
            raise ValueError(
                f"{name} has no column {column!r} of source images (its columns are {columns}), but the pipeline "
                "edits images: each row needs the image its instruction edits. Set `source_image_column` to the "
                f"column that holds them, or add one, e.g. `{name}.add_column({column!r}, images)`."
            )
        if SOURCE_IMAGES_KEYWORD in columns and column != SOURCE_IMAGES_KEYWORD:
            raise ValueError(
                f"{name} has a column {SOURCE_IMAGES_KEYWORD!r} besides the source-image column {column!r}; reward "
                f"functions receive the source images under that keyword. Rename or drop one of them."
            )
        self.dataset, self.column, self.name = dataset, column, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | str) -> Any:
        if isinstance(index, str):
            return self.dataset[index]
        row = dict(self.dataset[index])
        image = row.pop(self.column)
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"{self.name} row {index}: the source image ({self.column!r}) is a {type(image).__name__}, not a "
                f"PIL image. Cast the column, e.g. `{self.name}.cast_column({self.column!r}, datasets.Image())`."
            )
        return {**row, SOURCE_IMAGES_KEYWORD: image}
