"""Sampling math: single steps, SDE windows and ODE tails (pure), the rollout that drives a pipeline adapter, and
`sample` (prompts + noise -> images + `RolloutBatch`), which training and evaluation share."""

from .dpm import ODE_SOLVERS, compressed_schedule, dpm_solver_pp_2m_step, num_tail_steps, solve_ode
from .hybrid import hybrid_rollout
from .rollout import Trajectory, rollout, step_log_prob, steps_log_prob
from .sampler import Samples, sample
from .steps import SDE_TYPES, ode_step, sde_step_with_logprob
from .windows import WINDOW_SCHEDULES, WINDOW_TYPES, SDEWindow, WindowSchedule

__all__ = [
    "ODE_SOLVERS",
    "SDE_TYPES",
    "WINDOW_SCHEDULES",
    "WINDOW_TYPES",
    "SDEWindow",
    "Samples",
    "Trajectory",
    "WindowSchedule",
    "compressed_schedule",
    "dpm_solver_pp_2m_step",
    "hybrid_rollout",
    "num_tail_steps",
    "ode_step",
    "rollout",
    "sample",
    "sde_step_with_logprob",
    "solve_ode",
    "step_log_prob",
    "steps_log_prob",
]
