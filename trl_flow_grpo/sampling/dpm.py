"""Deterministic tails of a rollout: a compressed sigma schedule and DPM-Solver++(2M) for flow matching (pure math).

MixGRPO-Flash replaces the ODE steps after the SDE window by fewer steps of a second-order solver
(``docs/ALGORITHMS.md`` section 1). In flow matching ``x_sigma = (1 - sigma) * x_0 + sigma * noise``, so with
``alpha = 1 - sigma`` and the data prediction ``D = x - sigma * v`` DPM-Solver++ (Lu et al., 2022) reads, from
``sigma_s`` to ``sigma_t`` with ``lambda = log(alpha / sigma)`` and ``h = lambda_t - lambda_s``::

    first order (DDIM):  x_t = (sigma_t / sigma_s) * x_s + (alpha_t - alpha_s * sigma_t / sigma_s) * D_s
    2M (midpoint):       x_t = <first order> + 0.5 * (alpha_t - alpha_s * sigma_t / sigma_s) * (D_s - D_prev) / r
                         r = h_prev / h,   h_prev = lambda_s - lambda_prev

The first-order step is exactly the Euler step ``x + v * (sigma_t - sigma_s)``: all of the gain is the correction,
which uses the data prediction of the previous step. The step to ``sigma = 0`` (``lambda = inf``) and a step whose
previous point is ``sigma = 1`` (``lambda = -inf``) are first order, as in diffusers' ``DPMSolverMultistepScheduler``
(``final_sigmas_type="zero"``, ``solver_type="midpoint"``), which this module reproduces on grids that scheduler can
build (tested).

Why not use that scheduler directly: its ``set_timesteps`` (diffusers 0.42) builds a flow grid that always starts
near ``sigma = 1``; custom ``timesteps`` are ignored by the ``use_flow_sigmas`` branch (which then fails on
``num_inference_steps=None``) and there is no ``sigmas`` argument. A tail that starts at the end of the SDE window
(``sigma_e < 1``) could only be set by overwriting its private ``sigmas``/``timesteps``/``_step_index`` state. The
update itself is two lines, so it lives here, with the scheduler as a test oracle.

All math runs in float32 on the sample; the sigma coefficients are python floats (float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .steps import ode_step

__all__ = ["ODE_SOLVERS", "compressed_schedule", "dpm_solver_pp_2m_step", "num_tail_steps", "solve_ode"]

ODE_SOLVERS: tuple[str, ...] = ("euler", "dpm_solver++_2m")
"""The allowed values of ``ode_solver``."""


def num_tail_steps(num_remaining: int, compression: float) -> int:
    """Steps of a tail that replaces ``num_remaining`` grid steps: ``max(floor(compression * num_remaining), 1)``.

    ``0`` when nothing remains. ``compression = 1`` keeps every step. (The reference implementation builds
    ``int(max(c * (remaining + 1), 1))`` grid *points*, i.e. one step fewer, counting the window's last step.)
    """
    if num_remaining <= 0:
        return 0
    return max(math.floor(compression * num_remaining + 1e-9), 1)


def compressed_schedule(sigmas: torch.Tensor, start: int, compression: float) -> torch.Tensor:
    """The sigmas of a compressed tail from grid point ``start`` to the end of the grid.

    ``sigmas`` is the rollout grid (``T + 1`` points, ``sigma_T = 0``). The tail replaces the ``R = T - start`` steps
    after ``start`` by ``n = num_tail_steps(R, compression)`` steps whose points sit at the evenly spaced fractional
    grid positions ``start + k * R / n`` (``k = 0..n``), linearly interpolated between grid points. Its end points
    are exactly ``sigmas[start]`` and ``sigmas[T]``; with ``n = R`` it is ``sigmas[start:]`` itself. Interpolating the
    grid (instead of re-deriving a shifted linear schedule, as the reference does) keeps whatever shift, dynamic
    shift or terminal stretch the pipeline's scheduler applied; for SD3's shift 3 at T = 25 the interpolation differs
    from the exact shifted curve by at most 0.003 in sigma.

    Returns:
        ``(n + 1,)`` tensor, same dtype and device as ``sigmas``.
    """
    num_steps = sigmas.numel() - 1
    if not 0 <= start <= num_steps:
        raise ValueError(f"start must be in [0, {num_steps}], got {start}.")
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression}.")
    remaining = num_steps - start
    n = num_tail_steps(remaining, compression)
    if n == remaining:
        return sigmas[start:]
    grid = sigmas.detach().to("cpu", torch.float64)
    points = []
    for k in range(n + 1):
        position = start + k * remaining / n
        left = min(math.floor(position), num_steps - 1)
        frac = position - left
        points.append(float(grid[left] + frac * (grid[left + 1] - grid[left])))
    points[0], points[-1] = float(grid[start]), float(grid[num_steps])
    return torch.tensor(points, dtype=sigmas.dtype, device=sigmas.device)


def _log_snr(sigma: float) -> float:
    """``lambda = log((1 - sigma) / sigma)``, with ``-inf`` at ``sigma = 1`` and ``inf`` at ``sigma = 0``."""
    if sigma >= 1:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log((1 - sigma) / sigma)


def dpm_solver_pp_2m_step(
    sample: torch.Tensor,
    denoised: torch.Tensor,
    sigma: float,
    sigma_next: float,
    denoised_prev: torch.Tensor | None = None,
    sigma_prev: float | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step (data prediction, midpoint form) from ``sigma`` to ``sigma_next`` (module docstring).

    Args:
        sample: ``x`` at ``sigma``, shape ``(B, ...)``.
        denoised: ``D = x - sigma * v`` at ``sigma``.
        sigma: current noise level, ``0 < sigma <= 1``.
        sigma_next: next noise level, ``0 <= sigma_next < sigma``.
        denoised_prev: ``D`` of the previous step, at ``sigma_prev``; without it the step is first order.
        sigma_prev: the previous noise level (``> sigma``).

    Returns:
        ``x`` at ``sigma_next``, in ``sample.dtype`` (computed in float32). The step is first order (exactly Euler)
        without a previous point, when ``sigma_next == 0``, or when ``sigma_prev == 1``.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not 0 <= sigma_next < sigma <= 1:
        raise ValueError(f"Expected 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}.")
    x, d = sample.float(), denoised.float()
    ratio = sigma_next / sigma
    coeff = (1 - sigma_next) - (1 - sigma) * ratio  # alpha_t - alpha_s * sigma_t / sigma_s = alpha_t * (1 - e^-h)
    out = ratio * x + coeff * d
    if denoised_prev is not None and sigma_prev is not None and sigma_next > 0 and sigma_prev < 1:
        if not sigma_prev > sigma:
            raise ValueError(f"sigma_prev must be larger than sigma, got sigma_prev={sigma_prev}, sigma={sigma}.")
        h = _log_snr(sigma_next) - _log_snr(sigma)
        h_prev = _log_snr(sigma) - _log_snr(sigma_prev)
        r = h_prev / h
        out = out + (0.5 * coeff / r) * (d - denoised_prev.float())
    return out.to(sample.dtype)


def solve_ode(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "euler",
) -> torch.Tensor:
    """Integrate ``dx/dsigma = v(x, sigma)`` from ``sigmas[0]`` to ``sigmas[-1]`` with one velocity call per step.

    Args:
        velocity: ``v(x, sigma)`` with ``sigma`` a 0-d tensor of the grid (a model call, in a rollout).
        sample: ``x`` at ``sigmas[0]``.
        sigmas: the decreasing grid of the integration, ``(n + 1,)``.
        solver: ``"euler"`` (:func:`~trl_flow_grpo.sampling.steps.ode_step`, bit for bit the rollout's ODE step) or
            ``"dpm_solver++_2m"`` (:func:`dpm_solver_pp_2m_step`; its first step is first order, i.e. Euler).

    Returns:
        ``x`` at ``sigmas[-1]``, in ``sample.dtype``.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; expected one of {', '.join(map(repr, ODE_SOLVERS))}.")
    x = sample
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    denoised_prev, sigma_prev = None, None
    for i in range(sigmas.numel() - 1):
        v = velocity(x, sigmas[i])
        if solver == "euler":
            x = ode_step(v, x, sigmas[i], sigmas[i + 1])
            continue
        denoised = x.float() - values[i] * v.float()
        x = dpm_solver_pp_2m_step(x, denoised, values[i], values[i + 1], denoised_prev, sigma_prev)
        denoised_prev, sigma_prev = denoised, values[i]
    return x
