"""One denoising step of a flow-matching sampler, with the log-probability of the step (pure tensor math).

Notation follows ``docs/ALGORITHMS.md`` section 1. A flow-matching model predicts a velocity ``v(x, sigma)``
(after classifier-free guidance); the noise level runs from ``sigma = 1`` (pure noise) to ``sigma = 0`` (data) and
one step goes from ``sigma`` to the next grid point ``sigma' < sigma``, so ``dt = sigma' - sigma < 0``.

* :func:`ode_step` is the deterministic Euler step ``x' = x + v * dt``.
* :func:`sde_step_with_logprob` is a stochastic step (Flow-GRPO's SDE, or coefficients-preserving sampling) that
  also returns ``log p(x' | x)``, averaged over every non-batch dimension.

All math runs in float32 whatever the input dtype. Nothing here imports diffusers or touches a model.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SDE_TYPES", "ode_step", "sde_step_with_logprob"]

SDE_TYPES: tuple[str, ...] = ("sde", "cps")
"""The allowed values of ``sde_type``."""

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _as_sigma(
    value: float | torch.Tensor, batch_size: int, ndim: int, device: torch.device, name: str
) -> torch.Tensor:
    """Return ``value`` as a float32 tensor of shape ``(B, 1, ..., 1)`` (``ndim`` dims) that broadcasts to the sample.

    ``value`` may be a python number, a tensor with one element (one sigma for the whole batch) or a tensor with
    ``B`` elements (one sigma per sample, e.g. shape ``(B,)``).
    """
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    view = (batch_size,) + (1,) * (ndim - 1)
    if t.numel() == 1:
        return t.reshape(()).expand(view)
    if t.numel() == batch_size:
        return t.reshape(view)
    raise ValueError(
        f"`{name}` must be a python number, a one-element tensor or a tensor with one value per sample "
        f"({batch_size} values); got a tensor of shape {tuple(t.shape)}."
    )


def _mean_non_batch(t: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first (a ``(B,)`` tensor is returned unchanged)."""
    if t.ndim <= 1:
        return t
    return t.mean(dim=tuple(range(1, t.ndim)))


def _randn(
    shape: torch.Size,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise, drawn the way ``diffusers.utils.torch_utils.randn_tensor`` draws it.

    A single generator draws the whole batch on the generator's device; a list of generators (one per batch element)
    draws each element with its own generator, so that a sample does not depend on the rest of its batch. The noise is
    then moved to ``device``.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(
                f"A list of generators must have one generator per batch element: got {len(generator)} generators "
                f"for a batch of {shape[0]}."
            )
    if isinstance(generator, (list, tuple)):
        per_sample = (1,) + tuple(shape[1:])
        noise = [torch.randn(per_sample, generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
        return torch.cat(noise, dim=0)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _sde_log_prob(prev_sample: torch.Tensor, mean: torch.Tensor, step_std: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density of ``prev_sample`` under ``N(mean, step_std^2)``, averaged over non-batch dimensions.

    ``log p = -(x' - mu)^2 / (2 * step_std^2) - log(step_std) - 0.5 * log(2 * pi)`` per element. Where ``step_std`` is
    0 (a deterministic step, ``noise_level == 0``) the density does not exist and 0 is returned instead (finite, with
    finite gradients), so that a PPO ratio of two such values is exactly 1.
    """
    deterministic = step_std == 0
    safe_std = torch.where(deterministic, torch.ones_like(step_std), step_std)
    log_prob = -((prev_sample - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    log_prob = torch.where(deterministic, torch.zeros_like(log_prob), log_prob)
    return _mean_non_batch(log_prob)


def _cps_log_prob(prev_sample: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """CPS pseudo log-probability ``-mean((x' - mu)^2)`` over non-batch dimensions (no variance, no constant)."""
    return _mean_non_batch(-((prev_sample - mean) ** 2))


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    sde_type: str = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sigma_1: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One stochastic step from ``sigma`` to ``sigma_next`` and the log-probability of its result.

    With ``dt = sigma' - sigma < 0`` and noise level ``a``:

    **Flow-GRPO SDE** (``sde_type="sde"``), one Euler-Maruyama step of the reverse SDE
    ``dx = [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt + s dw`` (same marginals as the ODE)::

        s   = a * sqrt(sigma / (1 - sigma_tilde))        sigma_tilde = sigma, or sigma_1 where sigma == 1
        mu  = x * (1 + s^2 * dt / (2 sigma)) + v * (1 + s^2 * (1 - sigma) / (2 sigma)) * dt
        x'  = mu + s * sqrt(-dt) * eps,                  eps ~ N(0, I)
        log p(x' | x) = mean[ -(x' - mu)^2 / (2 s^2 (-dt)) - log(s sqrt(-dt)) - 0.5 log(2 pi) ]

    With ``a = 0`` the step is exactly Euler (``x' = x + v * dt``, bit for bit the same as :func:`ode_step`); its
    log-prob, which does not exist, is returned as 0.

    **CPS, coefficients-preserving sampling** (``sde_type="cps"``)::

        s   = sigma' * sin(a * pi / 2)
        x0  = x - sigma * v,   x1 = x + (1 - sigma) * v
        mu  = (1 - sigma') * x0 + sqrt(sigma'^2 - s^2) * x1
        x'  = mu + s * eps
        log p = -mean[ (x' - mu)^2 ]                     (no variance normalisation, no constant)

    The last CPS step (``sigma' = 0``) is deterministic: ``s = 0``, ``x' = mu`` and ``log p = 0``.

    Every ``mean`` is over all non-batch dimensions (a per-element mean, not a sum), so ``log_prob`` has shape
    ``(B,)``.

    The log-probability is always computed from ``prev_sample`` by one code path: when ``prev_sample`` is not given,
    the step samples ``x'``, casts it to ``sample.dtype`` (the value returned and stored), and computes the
    log-prob of that stored value exactly as if it had been passed in. Recomputing the log-prob of a stored sample
    later with the same inputs is therefore bit-identical, which makes the PPO ratio exactly 1 on the first pass.
    ``prev_sample`` is treated as data (detached); gradients flow to ``model_output`` through ``mu``.

    Args:
        model_output: velocity ``v`` after classifier-free guidance, shape ``(B, ...)``.
        sample: ``x`` at ``sigma``, same shape.
        sigma: current noise level; a python number, a one-element tensor, or one value per sample (shape ``(B,)``).
        sigma_next: next noise level ``sigma' < sigma``, same forms.
        noise_level: ``a >= 0`` (Flow-GRPO default 0.7; 0.8 suggested for CPS).
        sde_type: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving).
        prev_sample: if given, the step does not sample; it returns the log-prob of this ``x'`` instead.
        generator: a ``torch.Generator``, or a list with one generator per batch element (diffusers-style), used to
            draw ``eps`` when ``prev_sample`` is None.
        sigma_1: the first grid point below 1. Used in place of ``sigma`` in the denominator of ``s`` where
            ``sigma == 1`` (SDE only; per sample if ``sigma`` is per sample). Required for an SDE step from
            ``sigma == 1``; ignored otherwise.

    Returns:
        ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)``:

        * ``prev_sample``: ``x'`` in ``sample.dtype``, same shape as ``sample``.
        * ``log_prob``: float32, shape ``(B,)``.
        * ``prev_sample_mean``: ``mu``, float32, same shape as ``sample``.
        * ``std_dev_t``: ``s`` as defined above, float32, shape ``(B, 1, ..., 1)`` (broadcasts to the sample). For
          ``"sde"`` this is the diffusion coefficient, **not** the step std: the std of ``x'`` is
          ``s * sqrt(-dt)``. For ``"cps"`` it is the std of ``x'``. The KL to a reference policy with the same
          std, as used in the loss, is ``mean((mu - mu_ref)^2) / (2 * s^2)`` with this ``s`` (the closed-form KL of
          two equal-variance Gaussians without the ``1 / (-dt)`` factor, as in the reference implementation).

    Raises:
        ValueError: for an unknown ``sde_type``, a negative ``noise_level``, an SDE step from ``sigma == 1`` without
            ``sigma_1``, sigmas or generators that do not match the batch, or python-number sigmas with
            ``sigma_next >= sigma``.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"Unknown sde_type {sde_type!r}; expected one of {', '.join(repr(t) for t in SDE_TYPES)}.")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}.")
    if isinstance(sigma, (int, float)) and isinstance(sigma_next, (int, float)) and not sigma_next < sigma:
        raise ValueError(f"sigma_next must be smaller than sigma, got sigma={sigma}, sigma_next={sigma_next}.")

    out_dtype = sample.dtype
    batch_size, ndim, device = sample.shape[0], sample.ndim, sample.device
    model_output = model_output.float()
    sample = sample.float()
    sigma_t = _as_sigma(sigma, batch_size, ndim, device, "sigma")
    sigma_next_t = _as_sigma(sigma_next, batch_size, ndim, device, "sigma_next")
    dt = sigma_next_t - sigma_t

    if sde_type == "sde":
        if sigma_1 is None:
            if bool((sigma_t == 1).any()):
                raise ValueError(
                    "sigma == 1 in an SDE step: s = a * sqrt(sigma / (1 - sigma)) would divide by zero. Pass "
                    "`sigma_1`, the first grid point below 1 (e.g. `scheduler.sigmas[1]`), to use in its place."
                )
            sigma_tilde = sigma_t
        else:
            sigma_1_t = _as_sigma(sigma_1, batch_size, ndim, device, "sigma_1")
            sigma_tilde = torch.where(sigma_t == 1, sigma_1_t, sigma_t)
        std_dev_t = noise_level * torch.sqrt(sigma_t / (1 - sigma_tilde))
        prev_sample_mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma_t) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma_t) / (2 * sigma_t)) * dt
        )
        step_std = std_dev_t * torch.sqrt(-dt)
    else:  # "cps"
        std_dev_t = sigma_next_t * math.sin(noise_level * math.pi / 2)
        pred_original_sample = sample - sigma_t * model_output
        noise_estimate = sample + (1 - sigma_t) * model_output
        # sigma'^2 - s^2 = sigma'^2 cos^2(a pi / 2) >= 0; the clamp only guards against rounding below zero.
        noise_coeff = torch.sqrt((sigma_next_t**2 - std_dev_t**2).clamp_min(0))
        prev_sample_mean = (1 - sigma_next_t) * pred_original_sample + noise_coeff * noise_estimate
        step_std = std_dev_t

    if prev_sample is None:
        eps = _randn(sample.shape, generator, device)
        prev_sample = (prev_sample_mean + step_std * eps).to(out_dtype)
    else:
        prev_sample = prev_sample.to(out_dtype)

    # The one code path for the log-prob: from the stored (output-dtype) sample, up-cast to float32.
    observed = prev_sample.detach().float()
    if sde_type == "sde":
        log_prob = _sde_log_prob(observed, prev_sample_mean, step_std)
    else:
        log_prob = _cps_log_prob(observed, prev_sample_mean)
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def ode_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> torch.Tensor:
    """Deterministic Euler step ``x' = x + v * (sigma_next - sigma)``.

    Computed in float32 and returned in ``sample.dtype``. ``sigma`` and ``sigma_next`` may be python numbers,
    one-element tensors, or one value per sample (shape ``(B,)``). Bit for bit the same as
    :func:`sde_step_with_logprob` with ``sde_type="sde"`` and ``noise_level=0``.
    """
    batch_size, ndim, device = sample.shape[0], sample.ndim, sample.device
    sigma_t = _as_sigma(sigma, batch_size, ndim, device, "sigma")
    sigma_next_t = _as_sigma(sigma_next, batch_size, ndim, device, "sigma_next")
    dt = sigma_next_t - sigma_t
    return (sample.float() + model_output.float() * dt).to(sample.dtype)
