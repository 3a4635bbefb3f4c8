"""How many CPU threads torch should use for a run on the CPU.

torch's default (one thread per core) is fastest on an idle machine, but on a small machine that is doing anything
else it oversubscribes the cores: on 2 cores shared with one other job, the shapes demo ran 5-8x slower with torch's
default 2 threads than with 1 (docs/toy_world.md). So, unless the user chose (`--num_threads` or `OMP_NUM_THREADS`),
a run uses the cores that are not busy: the core count minus the 1-minute load average, at least 1 and at most
torch's default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

__all__ = ["choose_cpu_threads", "load_average"]


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_cpu_threads(
    requested: int | None,
    cpu_count: int,
    load: float | None,
    default_threads: int,
    env: Mapping[str, str] | None = None,
) -> tuple[int | None, str]:
    """`(threads, reason)`: the thread count to set (None: leave torch's as it is) and why, for a one-line message.

    Args:
        requested: The user's explicit choice (`--num_threads`), or None.
        cpu_count: Cores of the machine (`os.cpu_count()`).
        load: The 1-minute load average (`load_average()`), or None if unknown.
        default_threads: torch's current thread count (`torch.get_num_threads()`).
        env: The environment (default: `os.environ`); `OMP_NUM_THREADS` there is respected.
    """
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_threads must be >= 1, got {requested}")
        return requested, f"--num_threads {requested}"
    if env.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    if load is None:
        return None, "no load average on this platform: torch's default"
    idle = math.floor(cpu_count - load + 0.5)  # a core at least half free counts as free
    threads = max(1, min(default_threads, idle))
    return threads, f"{cpu_count} cores, load average {load:.1f}: {threads} free"
