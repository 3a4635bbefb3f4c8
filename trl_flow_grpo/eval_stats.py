"""Confidence intervals for evaluations that sample several images per prompt: pure numpy, no torch.

An evaluation scores `K` images (seeds) for each of `P` prompts. The images of one prompt are not independent
samples of the model's quality (a hard caption fails on every seed), so an interval that treats all `P x K` images as
independent is too narrow. `cluster_bootstrap` resamples whole prompts (with all their seeds), within each category
(stratified, so every resample keeps the evaluation's category mix); the seed-to-seed noise is inside each prompt's
mean and so inside the interval. Resampling the seeds a second time, inside the resampled prompts, would count that
noise twice and widen the interval for nothing (the two-stage bootstrap's known bias), so it is not done.

`paired_cluster_bootstrap` gives the interval of a change (after - before) measured on the same prompts and seeds: a
prompt's two means are resampled together, so what the prompts have in common cancels out and the interval of the
change is narrower than the two intervals side by side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Estimate", "cluster_bootstrap", "paired_cluster_bootstrap"]


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap confidence interval.

    Attributes:
        value: The mean over all images (each prompt weighs by its number of images).
        low: Lower end of the interval.
        high: Upper end of the interval.
        num_prompts: Prompts it rests on.
        num_images: Images it rests on.
        level: Confidence level of the interval (0.95: a 95% interval).
    """

    value: float
    low: float
    high: float
    num_prompts: int
    num_images: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        """Half the interval's width: the "+-" of the estimate."""
        return (self.high - self.low) / 2

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (for a change: a change beyond the noise)."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _check(values: Sequence[Sequence[float]], strata: Sequence[str] | None, name: str) -> list[np.ndarray]:
    rows = [np.asarray(v, dtype=np.float64) for v in values]
    if not rows:
        raise ValueError(f"{name} is empty: the bootstrap needs at least one prompt.")
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"{name}[{i}] must be a non-empty list of per-image values, got shape {row.shape}.")
        if not np.all(np.isfinite(row)):
            raise ValueError(f"{name}[{i}] has a non-finite value: {row.tolist()}.")
    if strata is not None and len(strata) != len(rows):
        raise ValueError(f"got {len(strata)} strata for {len(rows)} prompts in {name}; give one per prompt.")
    return rows


def _resample_indices(strata: Sequence[str] | None, num_prompts: int, num_resamples: int, seed: int) -> np.ndarray:
    """(num_resamples, num_prompts) prompt indices, drawn with replacement within each stratum."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, stratum in enumerate(strata if strata is not None else [""] * num_prompts):
        groups.setdefault(stratum, []).append(i)
    columns = []
    for members in groups.values():
        members = np.asarray(members)
        columns.append(members[rng.integers(0, len(members), size=(num_resamples, len(members)))])
    return np.concatenate(columns, axis=1)


def _interval(
    sums: np.ndarray, counts: np.ndarray, strata, num_resamples: int, level: float, seed: int, num_images: int
) -> Estimate:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if num_resamples < 100:
        raise ValueError(f"num_resamples must be >= 100 for a stable interval, got {num_resamples}.")
    index = _resample_indices(strata, len(sums), num_resamples, seed)
    means = sums[index].sum(axis=1) / counts[index].sum(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    value = float(sums.sum() / counts.sum())
    return Estimate(value, float(low), float(high), len(sums), num_images, level)


def cluster_bootstrap(
    values: Sequence[Sequence[float]],
    strata: Sequence[str] | None = None,
    *,
    num_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean of per-image values and its percentile interval, resampling prompts (clusters) within strata.

    Args:
        values: One list per prompt of its images' values (e.g. 1.0 / 0.0 for correct / wrong, or a score).
        strata: One label per prompt (e.g. its category); prompts are resampled within their label. `None`: one
            stratum.
        num_resamples: Bootstrap resamples (with 2000, the 95% ends of the shapes world's held-out accuracy move by
            about 0.001 from one resampling seed to another).
        level: Confidence level.
        seed: Seed of the resampling (the interval is reproducible).
    """
    rows = _check(values, strata, "values")
    sums = np.array([row.sum() for row in rows])
    counts = np.array([row.size for row in rows], dtype=np.float64)
    return _interval(sums, counts, strata, num_resamples, level, seed, int(counts.sum()))


def paired_cluster_bootstrap(
    before: Sequence[Sequence[float]],
    after: Sequence[Sequence[float]],
    strata: Sequence[str] | None = None,
    *,
    num_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The change `mean(after) - mean(before)` on the same prompts, resampling each prompt's pair together.

    Args:
        before: One list per prompt of its images' values before.
        after: The same prompts, in the same order, after (the same number of images per prompt).
        strata, num_resamples, level, seed: As in `cluster_bootstrap`.
    """
    rows_before = _check(before, strata, "before")
    rows_after = _check(after, strata, "after")
    if len(rows_before) != len(rows_after):
        raise ValueError(f"before has {len(rows_before)} prompts and after {len(rows_after)}; pair them one to one.")
    for i, (a, b) in enumerate(zip(rows_before, rows_after)):
        if a.size != b.size:
            raise ValueError(f"prompt {i} has {a.size} images before and {b.size} after; use the same seeds.")
    sums = np.array([b.sum() - a.sum() for a, b in zip(rows_before, rows_after)])
    counts = np.array([a.size for a in rows_before], dtype=np.float64)
    return _interval(sums, counts, strata, num_resamples, level, seed, int(counts.sum()))
