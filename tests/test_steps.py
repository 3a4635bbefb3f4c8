"""Tests for trl_flow_grpo.sampling.steps (check values from docs/ALGORITHMS.md section 1)."""

import math

import pytest
import torch

from trl_flow_grpo.sampling.steps import ode_step, sde_step_with_logprob

SIGMA, SIGMA_NEXT, X, V, EPS = 0.8, 0.7, 1.0, 0.5, 0.3


def _scalar(value: float, shape=(1, 1)) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Check values
# ---------------------------------------------------------------------------------------------------------------------


def test_sde_check_values():
    x, v = _scalar(X), _scalar(V)
    # Independent computation of x' = mu + s * sqrt(-dt) * eps, in float64.
    s = 0.7 * math.sqrt(SIGMA / (1 - SIGMA))
    dt = SIGMA_NEXT - SIGMA
    mu = X * (1 + s**2 * dt / (2 * SIGMA)) + V * (1 + s**2 * (1 - SIGMA) / (2 * SIGMA)) * dt
    x_prev = _scalar(mu + s * math.sqrt(-dt) * EPS)

    prev, log_prob, mean, std = sde_step_with_logprob(v, x, SIGMA, SIGMA_NEXT, 0.7, "sde", prev_sample=x_prev)
    assert std.item() == pytest.approx(1.4, abs=1e-5)
    assert mean.item() == pytest.approx(0.815250, abs=1e-5)
    assert (std * math.sqrt(-dt)).item() == pytest.approx(0.442719, abs=1e-5)
    assert prev.item() == pytest.approx(0.948066, abs=1e-5)
    assert log_prob.item() == pytest.approx(-0.149118, abs=1e-5)
    assert log_prob.shape == (1,)


def test_cps_check_values():
    x, v = _scalar(X), _scalar(V)
    s = SIGMA_NEXT * math.sin(0.8 * math.pi / 2)
    mu = (1 - SIGMA_NEXT) * (X - SIGMA * V) + math.sqrt(SIGMA_NEXT**2 - s**2) * (X + (1 - SIGMA) * V)
    x_prev = _scalar(mu + s * EPS)

    prev, log_prob, mean, std = sde_step_with_logprob(v, x, SIGMA, SIGMA_NEXT, 0.8, "cps", prev_sample=x_prev)
    assert std.item() == pytest.approx(0.665740, abs=1e-5)
    assert mean.item() == pytest.approx(0.417943, abs=1e-5)
    assert prev.item() == pytest.approx(0.617665, abs=1e-5)
    assert log_prob.item() == pytest.approx(-0.039889, abs=1e-5)


def test_euler_check_value():
    assert ode_step(_scalar(V), _scalar(X), SIGMA, SIGMA_NEXT).item() == pytest.approx(0.95, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Log-probability
# ---------------------------------------------------------------------------------------------------------------------


def test_sde_log_prob_matches_brute_force_gaussian():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    x_prev = torch.randn(3, 4, 5, 6, generator=g)
    sigma, sigma_next = 0.6, 0.45
    _, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=x_prev)
    step_std = std * math.sqrt(sigma - sigma_next)
    expected = torch.distributions.Normal(mean, step_std.expand_as(mean)).log_prob(x_prev).mean(dim=(1, 2, 3))
    assert log_prob.shape == (3,) and log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)


def test_cps_log_prob_is_negative_mse():
    g = torch.Generator().manual_seed(1)
    x, v, x_prev = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    _, log_prob, mean, _ = sde_step_with_logprob(v, x, 0.5, 0.4, 0.8, "cps", prev_sample=x_prev)
    torch.testing.assert_close(log_prob, -((x_prev - mean) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_log_prob_is_bit_identical(sde_type, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
    v = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
    prev, log_prob, mean, std = sde_step_with_logprob(v, x, 0.9, 0.8, 0.7, sde_type, generator=g)
    prev2, log_prob2, mean2, std2 = sde_step_with_logprob(v, x, 0.9, 0.8, 0.7, sde_type, prev_sample=prev)
    assert torch.equal(prev, prev2)
    assert torch.equal(log_prob, log_prob2)
    assert torch.equal(mean, mean2)
    assert torch.equal(std, std2)
    assert torch.equal(torch.exp(log_prob2 - log_prob), torch.ones(4))


def test_gradient_flows_through_mean_only():
    x = torch.randn(2, 3, 4)
    v = torch.randn(2, 3, 4, requires_grad=True)
    prev, log_prob, _, _ = sde_step_with_logprob(v, x, 0.7, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    _, log_prob2, _, _ = sde_step_with_logprob(v, x, 0.7, 0.6, 0.7, prev_sample=prev)
    log_prob2.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# Sigmas
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_per_sample_sigmas_match_scalar_calls(sde_type):
    g = torch.Generator().manual_seed(3)
    x, v, x_prev = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    sigmas = torch.tensor([1.0, 0.8, 0.5])
    sigmas_next = torch.tensor([0.9, 0.6, 0.0])
    sigma_1 = 0.95
    prev, log_prob, mean, std = sde_step_with_logprob(
        v, x, sigmas, sigmas_next, 0.7, sde_type, prev_sample=x_prev, sigma_1=sigma_1
    )
    assert std.shape == (3, 1, 1, 1)
    for i in range(3):
        p_i, lp_i, m_i, s_i = sde_step_with_logprob(
            v[i : i + 1],
            x[i : i + 1],
            sigmas[i].item(),
            sigmas_next[i].item(),
            0.7,
            sde_type,
            prev_sample=x_prev[i : i + 1],
            sigma_1=sigma_1,
        )
        torch.testing.assert_close(prev[i : i + 1], p_i, rtol=0, atol=0)
        torch.testing.assert_close(log_prob[i : i + 1], lp_i, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mean[i : i + 1], m_i, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(std[i : i + 1], s_i, rtol=1e-6, atol=1e-7)


def test_zero_dim_tensor_sigma_matches_float():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    a = sde_step_with_logprob(v, x, 0.8, 0.7, 0.7, prev_sample=x)
    b = sde_step_with_logprob(v, x, torch.tensor(0.8), torch.tensor(0.7), 0.7, prev_sample=x)
    for t_a, t_b in zip(a, b):
        assert torch.equal(t_a, t_b)


def test_sigma_one_uses_sigma_1():
    x, v = _scalar(X), _scalar(V)
    sigma_1 = 0.9
    _, _, mean, std = sde_step_with_logprob(v, x, 1.0, sigma_1, 0.7, prev_sample=x, sigma_1=sigma_1)
    s = 0.7 * math.sqrt(1.0 / (1 - sigma_1))
    dt = sigma_1 - 1.0
    assert std.item() == pytest.approx(s, rel=1e-6)
    # At sigma = 1 the velocity coefficient's (1 - sigma) term vanishes.
    assert mean.item() == pytest.approx(X * (1 + s**2 * dt / 2) + V * dt, rel=1e-6)


def test_sigma_one_uses_sigma_1_per_sample():
    x, v = torch.ones(2, 3), torch.ones(2, 3)
    sigmas, sigmas_next = torch.tensor([1.0, 0.9]), torch.tensor([0.9, 0.8])
    _, _, _, std = sde_step_with_logprob(v, x, sigmas, sigmas_next, 0.7, prev_sample=x, sigma_1=0.9)
    expected = torch.tensor([0.7 * math.sqrt(1 / 0.1), 0.7 * math.sqrt(0.9 / 0.1)]).reshape(2, 1)
    torch.testing.assert_close(std, expected)


def test_sigma_one_without_sigma_1_raises():
    x, v = _scalar(X), _scalar(V)
    with pytest.raises(ValueError, match="sigma_1"):
        sde_step_with_logprob(v, x, 1.0, 0.9, 0.7)
    with pytest.raises(ValueError, match="sigma_1"):
        sde_step_with_logprob(torch.ones(2, 1), torch.ones(2, 1), torch.tensor([0.9, 1.0]), 0.8, 0.7)
    # CPS does not divide by 1 - sigma: no sigma_1 needed.
    _, log_prob, _, _ = sde_step_with_logprob(v, x, 1.0, 0.9, 0.8, "cps")
    assert torch.isfinite(log_prob).all()


def test_bad_arguments_raise():
    x, v = _scalar(X), _scalar(V)
    with pytest.raises(ValueError, match=r"'ode'.*'sde'.*'cps'"):
        sde_step_with_logprob(v, x, SIGMA, SIGMA_NEXT, 0.7, "ode")
    with pytest.raises(ValueError, match="sigma_next"):
        sde_step_with_logprob(v, x, 0.7, 0.8, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step_with_logprob(v, x, SIGMA, SIGMA_NEXT, -0.1)
    with pytest.raises(ValueError, match="per sample"):
        sde_step_with_logprob(v, x, torch.tensor([0.8, 0.7]), SIGMA_NEXT, 0.7)
    with pytest.raises(ValueError, match="one generator per batch element"):
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        sde_step_with_logprob(torch.ones(2, 1), torch.ones(2, 1), SIGMA, SIGMA_NEXT, 0.7, generator=gens)


# ---------------------------------------------------------------------------------------------------------------------
# Special cases
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [(0.8, 0.7), (1.0, 0.9), (0.3, 0.0)])
def test_noise_level_zero_is_euler(sigmas):
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    prev, log_prob, mean, std = sde_step_with_logprob(v, x, *sigmas, 0.0, generator=g, sigma_1=0.9)
    assert torch.equal(prev, ode_step(v, x, *sigmas))
    assert torch.equal(mean, prev)
    assert torch.equal(std, torch.zeros_like(std))
    assert torch.equal(log_prob, torch.zeros(2))


def test_cps_last_step_is_deterministic_and_finite():
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    prev_a, log_prob, mean, std = sde_step_with_logprob(v, x, 0.2, 0.0, 0.8, "cps", generator=g)
    prev_b, _, _, _ = sde_step_with_logprob(v, x, 0.2, 0.0, 0.8, "cps", generator=g)
    assert torch.equal(prev_a, prev_b)
    assert torch.equal(prev_a, mean)
    assert torch.equal(std, torch.zeros_like(std))
    assert torch.isfinite(log_prob).all() and torch.equal(log_prob, torch.zeros(2))
    torch.testing.assert_close(prev_a, x - 0.2 * v)  # x0 prediction


def test_sde_last_step_is_finite():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    prev, log_prob, _, _ = sde_step_with_logprob(v, x, 0.1, 0.0, 0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all()


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_bf16_inputs(sde_type):
    x = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    v = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    prev, log_prob, mean, std = sde_step_with_logprob(v, x, 0.8, 0.7, 0.7, sde_type)
    assert prev.dtype == torch.bfloat16 and prev.shape == x.shape
    assert log_prob.dtype == torch.float32 and log_prob.shape == (2,)
    assert mean.dtype == torch.float32 and mean.shape == x.shape
    assert std.dtype == torch.float32 and std.shape == (2, 1, 1, 1)
    assert torch.isfinite(log_prob).all()
    assert ode_step(v, x, 0.8, 0.7).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_generator_makes_sampling_reproducible(sde_type):
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)

    def step(seed):
        return sde_step_with_logprob(v, x, 0.8, 0.7, 0.7, sde_type, generator=torch.Generator().manual_seed(seed))

    prev_a, lp_a, _, _ = step(7)
    prev_b, lp_b, _, _ = step(7)
    prev_c, _, _, _ = step(8)
    assert torch.equal(prev_a, prev_b) and torch.equal(lp_a, lp_b)
    assert not torch.equal(prev_a, prev_c)


def test_generator_list_is_per_sample():
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    prev, _, _, _ = sde_step_with_logprob(v, x, 0.8, 0.7, 0.7, generator=gens)
    for i in range(3):
        p_i, _, _, _ = sde_step_with_logprob(
            v[i : i + 1], x[i : i + 1], 0.8, 0.7, 0.7, generator=torch.Generator().manual_seed(10 + i)
        )
        assert torch.equal(prev[i : i + 1], p_i)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_empirical_moments_match(sde_type):
    n = 200_000
    x, v = torch.full((n, 1), X), torch.full((n, 1), V)
    g = torch.Generator().manual_seed(11)
    prev, log_prob, mean, std = sde_step_with_logprob(v, x, SIGMA, SIGMA_NEXT, 0.7, sde_type, generator=g)
    step_std = std[0].item() * (math.sqrt(SIGMA - SIGMA_NEXT) if sde_type == "sde" else 1.0)
    assert prev.mean().item() == pytest.approx(mean[0].item(), abs=5 * step_std / math.sqrt(n))
    assert prev.std().item() == pytest.approx(step_std, rel=1e-2)
    if sde_type == "sde":
        # E[log p] under the model = -0.5 - log(step_std) - 0.5 log(2 pi) (the negative entropy).
        expected = -0.5 - math.log(step_std) - 0.5 * math.log(2 * math.pi)
        assert log_prob.mean().item() == pytest.approx(expected, abs=1e-2)
