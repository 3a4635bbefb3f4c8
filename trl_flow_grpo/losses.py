"""The policy loss of one recorded SDE step: Flow-GRPO's clipped ratio, or GRPO-Guard's regulated clipping (pure).

Both take the per-sample log-probabilities of the step's recorded transition `x -> x'` under the current policy and
under the sampling ("old") policy, and the per-sample advantages; GRPO-Guard also takes the two policies' step means
and the step's noise scale. See `docs/algorithms.md`, section 3, for the formulas and check values.
"""

from dataclasses import dataclass

import torch

LOSS_TYPES = ("flow_grpo", "grpo_guard")


@dataclass
class PolicyLoss:
    """The policy loss of one step and the ratio it clipped (per sample, shape (B,))."""

    loss: torch.Tensor
    """Scalar loss (to minimise)."""
    ratio: torch.Tensor
    """The importance ratio the clip acts on: the plain ratio, or GRPO-Guard's normalised one."""


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> torch.Tensor:
    """PPO's pessimistic clipped objective, as a loss: `mean(max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)))`."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return torch.maximum(-advantages * ratio, -advantages * clipped).mean()


def flow_grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> PolicyLoss:
    """Flow-GRPO: `r = exp(log p_theta - log p_old)` in the clipped objective (the official code, bit for bit)."""
    ratio = torch.exp(log_prob - old_log_prob)
    return PolicyLoss(clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high), ratio)


def grpo_guard_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    step_std: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard's RatioNorm: `(log p_theta - log p_old + b) * step_std` with `b = mean((mu_theta - mu_old)^2) /
    (2 step_std^2)`.

    With `x' = mu_old + step_std * eps` (the recorded sample), the plain log-ratio of the per-element-mean Gaussian
    log-densities is `mean(eps * d) / step_std - mean(d^2) / (2 step_std^2)` (`d = mu_theta - mu_old`): its mean is
    negative and its spread scales with `1 / step_std`, i.e. with the step's noise level. Adding `b` removes the
    negative mean and multiplying by `step_std` leaves `mean(eps * d)`, whose distribution no longer depends on the
    noise level.

    Args:
        log_prob, old_log_prob: (B,) per-element-mean log-probabilities of `x'` under the current and old policy.
        mean, old_mean: (B, ...) the two policies' step means `mu`.
        step_std: (B,) or a scalar, the std of the step's Gaussian, `s * sqrt(-dt)` for the Flow-GRPO SDE.
    """
    dims = tuple(range(1, mean.dim()))
    bias = (mean - old_mean).pow(2).mean(dim=dims) / (2 * step_std**2)
    return (log_prob - old_log_prob + bias) * step_std


def grpo_guard_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    *,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std_dev_t: torch.Tensor,
    dt: torch.Tensor | float,
) -> PolicyLoss:
    """GRPO-Guard (Wang et al. 2025): the clipped objective on the RatioNorm ratio, reweighted by `1 / (-dt)`.

    `r~ = exp(grpo_guard_log_ratio(...))` with `step_std = s * sqrt(-dt)`, and `L = clipped_surrogate(r~) / (-dt)`.
    The gradient of `log r~` with respect to the step mean is `eps / D` per element (`D` elements, `eps` the recorded
    noise `(x' - mu_old) / step_std`), whatever the noise level, and the mean moves with the velocity by
    `(1 + s^2 (1 - sigma) / (2 sigma)) dt = (1 + a^2 / 2) dt` (with `s = a sqrt(sigma / (1 - sigma))`): the
    `1 / (-dt)` weight cancels the `dt`, so every step contributes a gradient of the same scale. On the first
    on-policy pass (`r~ = 1`, unclipped) `dL / dv = A (1 + a^2 / 2) eps / (B D)` per velocity element.

    Args:
        log_prob, old_log_prob, advantages: (B,).
        epsilon_low, epsilon_high: the clip range of `r~`.
        mean, old_mean: (B, ...) the step means under the current policy and as recorded at sampling time.
        std_dev_t: the SDE's diffusion coefficient `s` of the step, shape (B, 1, ..., 1), (B,) or scalar.
        dt: `sigma' - sigma` (negative) of the step.
    """
    dt = torch.as_tensor(dt, dtype=log_prob.dtype, device=log_prob.device)
    if not bool((dt < 0).all()):
        raise ValueError(f"grpo_guard_loss needs a denoising step with dt = sigma' - sigma < 0, got dt={dt.tolist()}.")
    s = std_dev_t.reshape(std_dev_t.shape[0], -1)[:, 0] if std_dev_t.dim() else std_dev_t
    step_std = s * torch.sqrt(-dt)
    ratio = torch.exp(grpo_guard_log_ratio(log_prob, old_log_prob, mean, old_mean, step_std))
    return PolicyLoss(clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high) / (-dt), ratio)
