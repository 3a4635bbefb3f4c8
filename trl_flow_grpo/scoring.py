"""Scoring a generation batch: reward calls, gathering across processes, advantages, and Pref-GRPO's pairing protocol.

`Scorer.score` turns this process's images (and the dataset rows they came from) into advantages for the whole
gathered batch: group-relative advantages of the reward functions (`advantages.compute_advantages`), and with
preference functions the win-rate advantages of pairs within each group, mixed at the advantage level. The math is
in `advantages`; this module does the calls and the collective operations, which every process runs at the same
point.

Reward functions may log through TRL's keywords: `log_metric(name, value)` (a scalar, averaged over the calls of
every process into the batch's metrics) and `log_extra(column, values)` (one value per sample, kept in
`Scores.extra` over every process).

Reward calls overlap with sampling (`overlap_rewards`): `Scorer.stream` returns a `RewardStream`, to which the trainer
submits each micro-batch's images as soon as they are sampled; one worker thread calls the reward functions on them
(async ones in that thread's own event loop) while the next micro-batch samples, in submission order. `Scorer.score`
then collects the rewards. Reward functions marked `whole_batch = True`, and every preference function, still run
after sampling on the whole batch.
"""

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image

from . import validation
from .advantages import (
    AdvantageOutput,
    compute_advantages,
    group_stats,
    mix_advantages,
    preference_pairs,
    symmetric_preference,
    win_rate_advantages,
    win_rates,
)
from .finite import check_finite
from .flow_grpo_config import FlowGRPOConfig
from .rewards import call_reward_funcs, resolve_reward_func, reward_func_name, with_timeout
from .rewards.preferences import call_preference_funcs, preference_func_name, resolve_preference_func
from .seeds import stable_seed

__all__ = ["RewardLogs", "RewardStream", "Scorer", "Scores", "whole_batch"]


def _as_list(funcs: Any) -> list:
    if funcs is None:
        return []
    return list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]


def _columns(rows: list[dict], skip: tuple[str, ...] = ("prompt", "_row")) -> dict[str, list]:
    """The dataset columns of `rows` other than `skip`, as the reward functions' keyword arguments."""
    return {key: [row[key] for row in rows] for key in (rows[0] if rows else {}) if key not in skip}


def whole_batch(func: Any) -> bool:
    """Whether reward function `func` asks to see the whole generation batch of its process at once (an attribute
    `whole_batch = True` on the function or its class, e.g. a reward that ranks the images of a prompt against each
    other): it is then not overlapped with sampling but called after it, as when `overlap_rewards=False`."""
    while func is not None:
        if getattr(func, "whole_batch", False) is True:
            return True
        func = getattr(func, "__wrapped__", None)  # through `with_timeout`
    return False


class RewardLogs:
    """What the reward functions log during one batch through TRL's `log_extra` / `log_metric` keywords.

    `log_extra` and `log_metric` are passed to the reward functions (those whose signature names them, or takes
    `**kwargs`); `gather` combines every process's logs, a collective operation.

    Args:
        num_samples: The samples of this process's batch: each `log_extra` column holds one value per sample.
    """

    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self.extra: dict[str, list] = {}
        self.metrics: dict[str, list[float]] = {}

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        """Log a column with one value per sample of the batch (e.g. the text an OCR reward read)."""
        if not isinstance(column, str) or not column:
            raise ValueError(f"log_extra: the column name must be a non-empty string, got {column!r}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"log_extra({column!r}, ...): values must be a list, got {type(values).__name__}")
        if len(values) != self.num_samples:
            raise ValueError(
                f"log_extra({column!r}, ...): got {len(values)} values for a batch of {self.num_samples} samples; "
                "log one value per sample (None where there is nothing to log)"
            )
        if column in self.extra:
            raise ValueError(
                f"log_extra: column {column!r} was already logged for this batch (by this or another reward "
                "function); give each column its own name"
            )
        self.extra[column] = list(values)

    def log_metric(self, name: str, value: float) -> None:
        """Log a scalar for the batch; calls with the same name (every process's, every function's) are averaged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"log_metric: the metric name must be a non-empty string, got {name!r}")
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
            value = value.item()
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"log_metric({name!r}, ...): the value must be a finite number, got {value!r}")
        self.metrics.setdefault(name, []).append(float(value))

    def gather(self) -> tuple[dict[str, float], dict[str, list]]:
        """Every process's logs combined (a collective operation: every process calls it at the same point).

        Returns:
            The metrics (name -> the mean of every call with that name) and the extra columns (column -> one value
            per sample of every process, in the order `accelerator.gather` concatenates them; None for the samples
            of a process that did not log the column).
        """
        local = (self.num_samples, self.extra, {name: (sum(v), len(v)) for name, v in self.metrics.items()})
        parts = gather_object([local])
        totals: dict[str, list[float]] = {}
        for _, _, metrics in parts:
            for name, (total, count) in metrics.items():
                totals.setdefault(name, [0.0, 0])
                totals[name][0] += total
                totals[name][1] += count
        columns = sorted({column for _, extra, _ in parts for column in extra})
        extra = {column: [v for n, e, _ in parts for v in e.get(column, [None] * n)] for column in columns}
        return {name: total / count for name, (total, count) in sorted(totals.items())}, extra

    @classmethod
    def concatenate(cls, parts: Sequence["RewardLogs"]) -> "RewardLogs":
        """The logs of consecutive micro-batches as the logs of their whole batch: each `log_extra` column spans
        every sample (None for the samples of a micro-batch that did not log it), every `log_metric` call is kept."""
        logs = cls(sum(part.num_samples for part in parts))
        for column in sorted({column for part in parts for column in part.extra}):
            logs.extra[column] = [v for part in parts for v in part.extra.get(column, [None] * part.num_samples)]
        for part in parts:
            for name, values in part.metrics.items():
                logs.metrics.setdefault(name, []).extend(values)
        return logs


class RewardStream:
    """The reward calls of one generation batch, made micro-batch by micro-batch while the next one is sampled.

    `submit` hands a micro-batch's images to one worker thread (so calls run one at a time, in submission order);
    `collect` waits for them and returns this process's rewards in the order the micro-batches were submitted, exactly
    what one call on the whole batch returns for reward functions that score each sample on its own. The worker runs
    under `torch.no_grad()` on the caller's CUDA device (and its own CUDA stream, so that a reward model's kernels can
    run beside the sampler's), as the sequential call does. An exception raised by a reward function is re-raised by
    the next `submit` or by `collect`, with its original traceback. Without overlap (`overlap=False`, or no reward
    function that may be overlapped), `submit` only keeps the micro-batch and `collect` scores it all at once.

    Args:
        scorer: The run's `Scorer` (its reward functions, already wrapped with their timeout).
        trainer_state: Passed to the reward functions as `trainer_state`.
        overlap: Whether to call the reward functions in the worker thread during sampling.
    """

    def __init__(self, scorer: "Scorer", trainer_state: Any, overlap: bool):
        self.scorer, self.trainer_state = scorer, trainer_state
        self.overlapped = [j for j, f in enumerate(scorer.reward_funcs) if overlap and not whole_batch(f)]
        self.images: list[Image.Image] = []
        self.rows: list[dict] = []
        self._futures: list[Future] = []
        self._executor: ThreadPoolExecutor | None = None
        self._device = (
            torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )
        self._cuda_stream = torch.cuda.Stream() if self._device is not None and self.overlapped else None
        if self.overlapped:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")

    def submit(self, images: list[Image.Image], rows: list[dict]) -> None:
        """Start scoring one micro-batch (its images, one per dataset row of `rows`)."""
        self._raise_failed()
        self.images.extend(images)
        self.rows.extend(rows)
        if self._executor is not None:
            first = len(self.rows) - len(rows)
            self._futures.append(self._executor.submit(self._score, list(images), list(rows), first))

    def _raise_failed(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                self.close()
                raise future.exception()

    def _score(
        self, images: list[Image.Image], rows: list[dict], first: int
    ) -> tuple[torch.Tensor, RewardLogs, float]:
        """One micro-batch's rewards of the overlapped functions (its samples start at `first` in this process's
        generation batch), in the worker thread."""
        start = time.perf_counter()
        logs = RewardLogs(len(rows))
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())  # grad mode is per thread: the trainer samples under no_grad
            if self._cuda_stream is not None:
                torch.cuda.set_device(self._device)  # the current device is per thread too
                stack.enter_context(torch.cuda.stream(self._cuda_stream))
            funcs = [self.scorer.reward_funcs[j] for j in self.overlapped]
            try:
                rewards = self.scorer._call(funcs, images, rows, self.trainer_state, logs)
            except Exception as error:  # sample numbers in the message count from the micro-batch's first sample
                if hasattr(error, "add_note"):
                    error.add_note(
                        f"(scored with overlap_rewards: the micro-batch of samples {first}..{first + len(rows) - 1} "
                        "of this process's generation batch)"
                    )
                raise
        return rewards, logs, time.perf_counter() - start

    def collect(self) -> tuple[torch.Tensor, RewardLogs, float, float]:
        """Wait for the submitted micro-batches and score what was not overlapped.

        Returns:
            The rewards of every submitted sample (`(N, R)`, in submission order), their logs, the seconds spent in
            reward calls (overlapped or not), and the seconds this call waited for them (the reward time that sampling
            did not hide).
        """
        start = time.perf_counter()
        scorer, num_funcs = self.scorer, len(self.scorer.reward_funcs)
        rewards = torch.zeros((len(self.rows), num_funcs), dtype=torch.float32)
        try:
            parts = [future.result() for future in self._futures]  # re-raises a reward's exception
        finally:
            self.close()
        reward_time = sum(seconds for _, _, seconds in parts)
        logs = RewardLogs.concatenate([part_logs for _, part_logs, _ in parts])
        if parts:
            rewards[:, self.overlapped] = torch.cat([part for part, _, _ in parts])
        if not parts:
            logs = RewardLogs(len(self.rows))
        rest = [j for j in range(num_funcs) if j not in self.overlapped]
        if rest:
            began = time.perf_counter()
            funcs = [scorer.reward_funcs[j] for j in rest]
            rewards[:, rest] = scorer._call(funcs, self.images, self.rows, self.trainer_state, logs)
            reward_time += time.perf_counter() - began
        return rewards, logs, reward_time, time.perf_counter() - start

    def close(self) -> None:
        """Stop the worker: micro-batches not started yet are dropped (after an error, or when sampling failed)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


@dataclass
class Scores:
    """The scores of one generation batch, over every process (N samples, R reward functions)."""

    advantages: torch.Tensor
    """(N,): the advantage of each sample."""
    rewards: torch.Tensor
    """(N, R): each reward function's value (NaN: not applicable)."""
    pointwise: AdvantageOutput | None
    """The reward functions' advantages and weighted rewards; `None` with preference functions only."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Reward, advantage and preference statistics to log, and the reward functions' `log_metric` means."""
    extra: dict[str, list] = field(default_factory=dict)
    """The reward functions' `log_extra` columns: column -> one value per sample, aligned with `rewards`."""


def _add_logged_metrics(metrics: dict[str, float], logged: dict[str, float]) -> None:
    """Add the reward functions' `log_metric` means to `metrics`, refusing a name the Scorer already logs."""
    for name, value in logged.items():
        if name in metrics:
            raise ValueError(
                f"A reward function logged the metric {name!r} with log_metric, which is a name the trainer logs "
                "itself; choose another name (e.g. prefix it with the reward's name)."
            )
        metrics[name] = value


class Scorer:
    """The reward and preference functions of a run, and how their outcomes become advantages.

    Args:
        reward_funcs: Reward functions or built-in names (see `trl_flow_grpo.rewards`).
        preference_funcs: Pref-GRPO preference functions or built-in names (see `trl_flow_grpo.rewards.preferences`).
        args: The run's configuration (weights, advantage options, preference options, seed).
        reward_weights: The reward functions' weights, instead of `args.reward_weights` (e.g. 1 each for the
            evaluation rewards).

    Attributes:
        last_eval_extra: The reward functions' `log_extra` columns of the last `evaluate` call (column -> one value
            per gathered sample).
    """

    def __init__(
        self, reward_funcs: Any, preference_funcs: Any, args: FlowGRPOConfig, reward_weights: list[float] | None = None
    ):
        self.last_eval_extra: dict[str, list] = {}
        reward_funcs, preference_funcs = _as_list(reward_funcs), _as_list(preference_funcs)
        if not reward_funcs and not preference_funcs:
            raise ValueError(
                "Pass at least one reward function (reward_funcs) or preference function (preference_funcs)."
            )
        self.args = args
        self.preference_funcs = [
            resolve_preference_func(f, temperature=args.preference_temperature, tie_margin=args.preference_tie_margin)
            for f in preference_funcs
        ]
        self.preference_func_names = [preference_func_name(f) for f in self.preference_funcs]
        self.preference_func_names = validation.unique_names(self.preference_func_names, "preference function")
        if args.preference_weights is not None and len(args.preference_weights) != len(self.preference_funcs):
            raise ValueError(
                f"preference_weights has {len(args.preference_weights)} values but there are "
                f"{len(self.preference_funcs)} preference functions ({', '.join(self.preference_func_names)})."
            )
        self.preference_weights = list(args.preference_weights or [1.0] * len(self.preference_funcs))
        self.reward_func_names = [reward_func_name(f) for f in reward_funcs]
        self.reward_funcs: list[Callable] = [resolve_reward_func(f) for f in reward_funcs]
        self.reward_func_names = validation.unique_names(self.reward_func_names, "reward function")
        reward_weights = args.reward_weights if reward_weights is None else reward_weights
        if reward_weights is not None and len(reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(reward_weights)} values but there are {len(self.reward_funcs)} "
                f"reward functions ({', '.join(self.reward_func_names)})."
            )
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(self.reward_funcs))
        validation.check_weights(self.reward_weights.tolist(), self.reward_func_names, self.preference_weights)
        self.reward_funcs = [
            with_timeout(f, args.reward_timeout, n) for f, n in zip(self.reward_funcs, self.reward_func_names)
        ]
        self.preference_funcs = [
            with_timeout(f, args.reward_timeout, n, "preference function")
            for f, n in zip(self.preference_funcs, self.preference_func_names)
        ]

    def score(
        self,
        images: list[Image.Image],
        rows: list[dict],
        accelerator: Accelerator,
        generation: int,
        trainer_state: Any,
        dataset: Any,
        stream: RewardStream | None = None,
    ) -> Scores:
        """Score this process's `images` (one per dataset row of `rows`, each with its `_row` group id).

        A collective operation. `generation` seeds the preference pairs; `dataset` is the training dataset, whose rows
        give the preference functions the prompt and columns of each pair. `stream`: the `RewardStream` to which
        these images and rows were submitted during sampling (the rewards it computed are used); unset: the reward
        functions are called here.
        """
        args, device = self.args, accelerator.device
        if stream is None:
            stream = self.stream(trainer_state, overlap=False)
            stream.submit(images, rows)
        elif len(stream.rows) != len(rows) or [r["_row"] for r in stream.rows] != [r["_row"] for r in rows]:
            raise RuntimeError("The rows submitted to the reward stream are not the rows scored; this is a bug.")
        rewards, logs, reward_time, reward_wait = stream.collect()

        # Advantages need whole groups, which may span processes: gather, compute (every process the same).
        rewards = rewards.to(device)
        all_rows = accelerator.gather(torch.tensor([row["_row"] for row in rows], device=device))
        all_rewards = accelerator.gather(rewards) if self.reward_funcs else rewards.new_zeros((len(all_rows), 0))
        _, counts = torch.unique(all_rows, return_counts=True)
        if not torch.all(counts == args.num_generations):
            raise RuntimeError(f"Prompt groups are incomplete ({counts.tolist()}); this is a bug, please report it.")
        metrics: dict[str, float] = {}
        pointwise = None
        if self.reward_funcs:
            pointwise = compute_advantages(
                all_rewards,
                all_rows,
                self.reward_weights.to(device),
                scale_rewards=args.scale_rewards,
                aggregation=args.multi_objective_aggregation,
                adv_clip_max=args.adv_clip_max,
            )
            advantages = pointwise.advantages
        if self.preference_funcs:
            parts, metrics = self._preference_advantages(
                images, all_rows, accelerator, generation, trainer_state, dataset
            )
            weights = list(self.preference_weights)
            if pointwise is not None:
                # The pointwise advantage carries the reward functions' total weight (normalize_then_sum already
                # applied each weight), so that e.g. reward_weights=[0.4], preference_weights=[0.6] mixes 0.4 / 0.6.
                parts.insert(0, pointwise.advantages.cpu())
                summed = args.multi_objective_aggregation == "sum_then_normalize"
                weights.insert(0, float(self.reward_weights.sum()) if summed else 1.0)
            advantages = mix_advantages(parts, weights, args.adv_clip_max).to(device)
        check_finite(advantages, "advantages", trainer_state.global_step, "Check the rewards' scale.")
        metrics.update(self._reward_metrics(all_rewards, pointwise, advantages))
        metrics["time/reward_s"] = reward_time
        metrics["time/reward_wait_s"] = reward_wait
        logged, extra = logs.gather()
        _add_logged_metrics(metrics, logged)
        return Scores(advantages=advantages, rewards=all_rewards, pointwise=pointwise, metrics=metrics, extra=extra)

    def stream(self, trainer_state: Any, overlap: bool | None = None) -> RewardStream:
        """A `RewardStream` for one generation batch; `overlap` defaults to the config's `overlap_rewards`."""
        return RewardStream(self, trainer_state, self.args.overlap_rewards if overlap is None else overlap)

    def _call(
        self, funcs: list[Callable], images: list[Image.Image], rows: list[dict], trainer_state: Any, logs: RewardLogs
    ) -> torch.Tensor:
        return call_reward_funcs(
            funcs,
            [row["prompt"] for row in rows],
            images,
            _columns(rows),
            trainer_state=trainer_state,
            log_extra=logs.log_extra,
            log_metric=logs.log_metric,
        )

    def _reward_metrics(
        self, rewards: torch.Tensor, pointwise: AdvantageOutput | None, advantages: torch.Tensor
    ) -> dict[str, float]:
        metrics = {}
        for k, name in enumerate(self.reward_func_names):
            finite = rewards[:, k][~torch.isnan(rewards[:, k])]
            if finite.numel():  # a reward that applied to no sample of this batch has no mean to log
                metrics[f"rewards/{name}/mean"] = finite.mean().item()
                metrics[f"rewards/{name}/std"] = finite.std(unbiased=False).item()
        if pointwise is not None:
            metrics["reward"] = pointwise.rewards.mean().item()
            metrics["reward_std"] = pointwise.group_std.mean().item()
            metrics["frac_reward_zero_std"] = pointwise.frac_zero_std
        metrics["advantages/abs_mean"] = advantages.abs().mean().item()
        metrics["advantages/abs_max"] = advantages.abs().max().item()
        return metrics

    def _preference_advantages(
        self,
        images: list[Image.Image],
        all_rows: torch.Tensor,
        accelerator: Accelerator,
        generation: int,
        trainer_state: Any,
        dataset: Any,
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Pref-GRPO: compare the images of each group in pairs and turn win rates into advantages, one vector (over
        the whole gathered batch) per preference function, and the preference metrics.

        Every process gets every image (gathered as uint8 pixels), builds the same pairs (seeded by the generation),
        queries its share of them, and the verdicts are gathered back: groups split across processes are compared
        whole, and the judging work is spread over the processes.
        """
        args = self.args
        num_processes, rank = accelerator.num_processes, accelerator.process_index
        pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))
        all_pixels = accelerator.gather(pixels.to(accelerator.device)).cpu()
        group_ids = all_rows.cpu()
        generator = torch.Generator().manual_seed(stable_seed(args.seed, generation, -2))
        pairs = preference_pairs(group_ids, args.preference_num_opponents, generator)
        queries = torch.cat([pairs, pairs.flip(1)]) if args.preference_symmetric else pairs
        mine = queries[rank::num_processes]

        pil: dict[int, Image.Image] = {}  # one object per image, so that judges can recognise repeats

        def image(index: int) -> Image.Image:
            if index not in pil:
                pil[index] = Image.fromarray(all_pixels[index].numpy())
            return pil[index]

        dataset_rows = [dataset[int(group_ids[a])] for a in mine[:, 0].tolist()]
        prompts = [row["prompt"] for row in dataset_rows]
        num_funcs = len(self.preference_funcs)
        local = torch.full((math.ceil(len(queries) / num_processes), num_funcs), math.nan)
        seconds = [0.0] * num_funcs
        if len(mine):
            probs, seconds = call_preference_funcs(
                self.preference_funcs,
                prompts,
                [image(a) for a in mine[:, 0].tolist()],
                [image(b) for b in mine[:, 1].tolist()],
                _columns(dataset_rows, skip=("prompt",)),
                trainer_state=trainer_state,
            )
            local[: len(mine)] = probs
        gathered = accelerator.gather(local.to(accelerator.device)).cpu().reshape(num_processes, -1, num_funcs)
        probs = torch.empty(len(queries), num_funcs)
        for r in range(num_processes):  # process r answered queries r, r + P, r + 2P, ...
            probs[r::num_processes] = gathered[r, : len(queries[r::num_processes])]
        if args.preference_symmetric:
            probs = symmetric_preference(probs[: len(pairs)], probs[len(pairs) :])

        parts, metrics = [], {"preferences/pairs": float(len(queries))}
        for m, name in enumerate(self.preference_func_names):
            rates = win_rates(len(group_ids), pairs, probs[:, m])
            parts.append(
                win_rate_advantages(
                    rates, group_ids, scope=args.preference_std_scope, unbiased=args.preference_std_bessel
                )
            )
            _, rate_std = group_stats(rates, group_ids)
            metrics[f"preferences/{name}/win_rate_mean"] = rates.mean().item()
            metrics[f"preferences/{name}/win_rate_std"] = rate_std.mean().item()
            metrics[f"preferences/{name}/tie_fraction"] = (probs[:, m] - 0.5).abs().lt(1e-6).float().mean().item()
            metrics[f"preferences/{name}/latency_s"] = seconds[m]
        return parts, metrics

    def evaluate(
        self, images: list[Image.Image], rows: list[dict], trainer_state: Any, prefix: str = "eval"
    ) -> tuple[dict[str, float], torch.Tensor]:
        """The mean of every reward over the evaluation samples of every process (a collective operation), and the
        weighted reward of every gathered sample (for the sample grid).

        The reward functions' `log_metric` means are added as `{prefix}_{name}`; their `log_extra` columns are kept
        in `last_eval_extra`.
        """
        logs = RewardLogs(len(rows))
        rewards = self._call(self.reward_funcs, images, rows, trainer_state, logs)
        all_rewards = torch.tensor(gather_object(rewards.tolist()), dtype=torch.float32).reshape(
            -1, len(self.reward_funcs)
        )
        weighted = torch.nansum(all_rewards * self.reward_weights, dim=1)
        metrics = {f"{prefix}_reward": weighted.mean().item()}
        for k, name in enumerate(self.reward_func_names):
            metrics[f"{prefix}_rewards/{name}/mean"] = torch.nanmean(all_rewards[:, k]).item()
        logged, self.last_eval_extra = logs.gather()
        _add_logged_metrics(metrics, {f"{prefix}_{name}": value for name, value in logged.items()})
        return metrics, weighted
