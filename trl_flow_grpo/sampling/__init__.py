"""Sampling math: single steps (pure), and the rollout that drives a pipeline adapter over them."""

from .rollout import Trajectory, first_steps, rollout, step_log_prob
from .steps import SDE_TYPES, ode_step, sde_step_with_logprob

__all__ = ["SDE_TYPES", "Trajectory", "first_steps", "ode_step", "rollout", "sde_step_with_logprob", "step_log_prob"]
