"""Which denoising steps are SDE (recorded and trained) at a given training iteration: pure functions.

A rollout has ``T`` steps on the grid ``sigma_0 = 1 > ... > sigma_T = 0``. A *window* is a run of consecutive grid
steps ``[start, start + size)``; those steps are stochastic and recorded, every other step is an ODE step. Notation
follows ``docs/ALGORITHMS.md`` section 1 ("Where the step is SDE").

* ``"full"`` (Flow-GRPO): the first ``floor(T * timestep_fraction)`` steps, every iteration.
* ``"random"`` (Flow-GRPO-Fast): ``size`` steps starting at a random step in ``[range_start, range_end - size]``. The
  start is a hash of ``(seed, iteration)``: the same for every member of a group and on every process, with no RNG
  state to carry or to checkpoint.
* ``"sliding"`` (MixGRPO): the start moves by ``stride`` every ``shift_interval`` iterations from ``range_start``,
  until the window would pass ``range_end``; then it rolls back to ``range_start`` (or stays at the last position
  without ``roll_back``). With a decaying schedule the interval shrinks as the window moves to later (less noisy)
  steps, see :func:`shift_interval_at`.
* ``"frozen"`` (MixGRPO-Flash*): always ``[range_start, range_start + size)``.

Everything here is a pure function of its arguments (and of the iteration): nothing imports torch or touches a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..seeds import stable_seed

__all__ = [
    "WINDOW_SCHEDULES",
    "WINDOW_TYPES",
    "SDEWindow",
    "WindowSchedule",
    "default_window_range",
    "full_window",
    "random_window_start",
    "shift_interval_at",
    "sliding_window_positions",
    "sliding_window_start",
]

WINDOW_TYPES: tuple[str, ...] = ("full", "random", "sliding", "frozen")
"""The allowed values of ``sde_window``."""

WINDOW_SCHEDULES: tuple[str, ...] = ("constant", "linear_decay", "exp_decay")
"""How the shift interval of a sliding window evolves (see :func:`shift_interval_at`)."""


@dataclass(frozen=True)
class SDEWindow:
    """The SDE steps of one iteration: grid steps ``start, ..., start + size - 1``."""

    start: int
    """First SDE step (index into the sigma grid)."""
    size: int
    """Number of SDE steps."""

    @property
    def end(self) -> int:
        """One past the last SDE step: the first step of the ODE tail."""
        return self.start + self.size

    @property
    def steps(self) -> list[int]:
        """The SDE steps, in order."""
        return list(range(self.start, self.end))


def full_window(num_steps: int, timestep_fraction: float) -> SDEWindow:
    """Flow-GRPO's window: the first ``floor(num_steps * timestep_fraction)`` steps.

    The ``1e-9`` guards against ``100 * 0.29 = 28.999...`` (same rounding as ``FlowGRPOConfig.num_sde_steps``).
    """
    return SDEWindow(0, min(num_steps, math.floor(num_steps * timestep_fraction + 1e-9)))


def default_window_range(kind: str, num_steps: int) -> tuple[int, int]:
    """The range ``[start, end)`` a window moves in when none is given.

    * ``"random"``: ``(0, T // 2)``, the high-noise first half (Flow-GRPO-Fast).
    * ``"sliding"`` and ``"frozen"``: ``(0, T - 2)``, as MixGRPO (whose window never reaches the last two steps).
    * ``"full"``: ``(0, T)`` (unused).
    """
    if kind == "random":
        return 0, num_steps // 2
    if kind in ("sliding", "frozen"):
        return 0, max(num_steps - 2, 0)
    return 0, num_steps


def _check_fits(size: int, range_start: int, range_end: int, num_steps: int | None = None) -> None:
    """Raise unless a window of `size` steps fits in `[range_start, range_end)` (named as the config fields)."""
    if range_start + size > range_end:
        steps = f" (num_inference_steps={num_steps})" if num_steps is not None else ""
        widened = min(range_start + size, num_steps) if num_steps is not None else range_start + size
        raise ValueError(
            f"sde_window_size={size} does not fit in sde_window_range=[{range_start}, {range_end}){steps}: lower "
            f"sde_window_size to {range_end - range_start} or widen sde_window_range, e.g. to "
            f"[{range_start}, {widened}]."
        )


def random_window_start(iteration: int, seed: int, size: int, range_start: int, range_end: int) -> int:
    """Flow-GRPO-Fast: a start drawn uniformly from ``[range_start, range_end - size]`` (both ends included).

    The draw is a hash of ``(seed, iteration)``: identical for all members of a group and on every process.
    """
    _check_fits(size, range_start, range_end)
    choices = range_end - size - range_start + 1
    return range_start + stable_seed(seed, iteration, namespace="window:", bits=64) % choices


def sliding_window_positions(size: int, range_start: int, range_end: int, stride: int) -> list[int]:
    """Every start a sliding window visits, in order: ``range_start, range_start + stride, ...`` while it fits.

    The window always holds ``size`` steps: the last position is the last start with ``start + size <= range_end``
    (the reference code instead lets the window shrink, down to zero steps, near the end of its range).
    """
    _check_fits(size, range_start, range_end)
    last = range_end - size
    if stride < 1:
        raise ValueError(f"The stride of a sliding window must be >= 1, got {stride}.")
    return list(range(range_start, last + 1, stride))


def shift_interval_at(
    offset: int,
    span: int,
    shift_interval: int,
    schedule: str = "constant",
    min_shift_interval: int = 1,
    decay_rate: float = 0.1,
    decay_threshold: int = 13,
) -> int:
    """Iterations a sliding window stays at a start ``offset`` steps past the start of its range (MixGRPO).

    With ``tau_0 = shift_interval``, ``tau_min = min_shift_interval``, ``o = offset`` and ``span`` the length of the
    range (``range_end - range_start``):

    * ``"constant"``: ``tau_0``.
    * ``"linear_decay"``: ``max(tau_min, floor(tau_0 * (1 - o / span) + tau_min * o / span))``, from ``tau_0`` at
      the start of the range towards ``tau_min`` at its end (the reference code's ``"decay"`` strategy, whose
      ``max_iters_per_group`` is ``tau_0``).
    * ``"exp_decay"``: ``max(tau_min, ceil(tau_0 * exp(-decay_rate * max(0, o - decay_threshold))))``: constant for
      the first ``decay_threshold`` steps, then exponentially shorter (the reference's ``"exp_decay"``: ``k = 0.1``,
      threshold 13, for T = 25).

    Both decays spend more iterations on the early, high-noise steps, where most of an image is decided.
    """
    if schedule == "constant":
        return shift_interval
    if schedule == "linear_decay":
        fraction = offset / max(span, 1)
        return max(min_shift_interval, math.floor(shift_interval * (1 - fraction) + min_shift_interval * fraction))
    if schedule == "exp_decay":
        decayed = shift_interval * math.exp(-decay_rate * max(0, offset - decay_threshold))
        return max(min_shift_interval, math.ceil(decayed - 1e-9))
    raise ValueError(f"Unknown schedule {schedule!r}; expected one of {', '.join(map(repr, WINDOW_SCHEDULES))}.")


def sliding_window_start(
    iteration: int,
    *,
    size: int,
    range_start: int,
    range_end: int,
    stride: int = 1,
    shift_interval: int = 25,
    roll_back: bool = True,
    schedule: str = "constant",
    min_shift_interval: int = 1,
    decay_rate: float = 0.1,
    decay_threshold: int = 13,
) -> int:
    """MixGRPO's sliding window: the start at ``iteration`` (0-based).

    With the constant schedule this is ``range_start + stride * floor(iteration / shift_interval)``, rolled back to
    ``range_start`` once the window would pass ``range_end`` (or held at the last position without ``roll_back``).
    With a decaying schedule each start lasts :func:`shift_interval_at` iterations; one cycle over all starts lasts
    their sum, and with ``roll_back`` the cycle repeats.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}.")
    positions = sliding_window_positions(size, range_start, range_end, stride)
    span = range_end - range_start
    intervals = [
        shift_interval_at(
            start - range_start, span, shift_interval, schedule, min_shift_interval, decay_rate, decay_threshold
        )
        for start in positions
    ]
    cycle = sum(intervals)
    if iteration >= cycle:
        if not roll_back:
            return positions[-1]
        iteration %= cycle
    for position, interval in zip(positions, intervals):
        if iteration < interval:
            return position
        iteration -= interval
    return positions[-1]  # unreachable: iteration < cycle


@dataclass(frozen=True)
class WindowSchedule:
    """Which steps are SDE at each training iteration; ``for_iteration`` is all the trainer asks.

    Build it from a config with :meth:`from_config`. Every field has the meaning of the ``FlowGRPOConfig`` field of
    the same name with an ``sde_window_`` prefix (``kind`` is ``sde_window``); ``num_steps`` is ``T``.
    """

    kind: str
    num_steps: int
    size: int
    range_start: int = 0
    range_end: int | None = None
    shift_interval: int = 25
    stride: int = 1
    roll_back: bool = True
    schedule: str = "constant"
    min_shift_interval: int = 1
    decay_rate: float = 0.1
    decay_threshold: int = 13
    seed: int = 0

    def __post_init__(self):
        """The one place the window rules are checked; the messages name the `FlowGRPOConfig` fields."""
        if self.kind not in WINDOW_TYPES:
            raise ValueError(
                f"Unknown window {self.kind!r} (sde_window); expected one of {', '.join(map(repr, WINDOW_TYPES))}."
            )
        if self.schedule not in WINDOW_SCHEDULES:
            raise ValueError(
                f"Unknown schedule {self.schedule!r} (sde_window_schedule); expected one of "
                f"{', '.join(map(repr, WINDOW_SCHEDULES))}."
            )
        steps = self.num_steps
        if self.range_end is None:
            object.__setattr__(self, "range_end", default_window_range(self.kind, steps)[1])
        if self.kind == "full" and self.size < 1:
            raise ValueError(
                f"The full window has {self.size} SDE steps: floor(num_inference_steps * timestep_fraction) with "
                f"num_inference_steps={steps} rounds down to 0, so nothing would be trained. Raise either value."
            )
        if not 1 <= self.size <= steps:
            raise ValueError(
                f"sde_window_size={self.size} must be between 1 and num_inference_steps={steps}. Use e.g. "
                f"sde_window_size={min(4, steps)}."
            )
        if not 0 <= self.range_start < self.range_end <= steps:
            raise ValueError(
                f"sde_window_range=[{self.range_start}, {self.range_end}] must be [start, end) with 0 <= start < end "
                f"<= num_inference_steps ({steps}), e.g. sde_window_range=[0, {max(steps - 2, 1)}]."
            )
        if self.kind != "full":
            _check_fits(self.size, self.range_start, self.range_end, steps)
        for name in ("shift_interval", "stride", "min_shift_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"sde_window_{name} must be >= 1, got {getattr(self, name)}.")
        if self.decay_rate < 0 or self.decay_threshold < 0:
            raise ValueError(
                f"sde_window_decay_rate ({self.decay_rate}) and sde_window_decay_threshold ({self.decay_threshold}) "
                "must be >= 0."
            )

    @classmethod
    def from_config(cls, args) -> WindowSchedule:
        """The schedule a ``FlowGRPOConfig`` describes (``args.seed`` seeds the random window)."""
        num_steps = args.num_inference_steps
        if args.sde_window == "full":
            size = full_window(num_steps, args.timestep_fraction).size
            return cls("full", num_steps, size, 0, num_steps)
        range_start, range_end = args.sde_window_range or default_window_range(args.sde_window, num_steps)
        return cls(
            kind=args.sde_window,
            num_steps=num_steps,
            size=args.sde_window_size,
            range_start=range_start,
            range_end=range_end,
            shift_interval=args.sde_window_shift_interval,
            stride=args.sde_window_stride,
            roll_back=args.sde_window_roll_back,
            schedule=args.sde_window_schedule,
            min_shift_interval=args.sde_window_min_shift_interval,
            decay_rate=args.sde_window_decay_rate,
            decay_threshold=args.sde_window_decay_threshold,
            seed=args.seed,
        )

    def for_iteration(self, iteration: int) -> SDEWindow:
        """The window of training iteration ``iteration`` (0-based; the trainer passes its generation index)."""
        if self.kind == "full":
            return SDEWindow(0, self.size)
        if self.kind == "frozen":
            return SDEWindow(self.range_start, self.size)
        if self.kind == "random":
            start = random_window_start(iteration, self.seed, self.size, self.range_start, self.range_end)
            return SDEWindow(start, self.size)
        start = sliding_window_start(
            iteration,
            size=self.size,
            range_start=self.range_start,
            range_end=self.range_end,
            stride=self.stride,
            shift_interval=self.shift_interval,
            roll_back=self.roll_back,
            schedule=self.schedule,
            min_shift_interval=self.min_shift_interval,
            decay_rate=self.decay_rate,
            decay_threshold=self.decay_threshold,
        )
        return SDEWindow(start, self.size)
