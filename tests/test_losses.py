"""The per-step policy losses (`trl_flow_grpo.losses`): Flow-GRPO's clipped ratio and GRPO-Guard's regulated clipping,
checked against hand-computed values and against the direct Gaussian formulas (docs/algorithms.md, section 3)."""

import math

import pytest
import torch

from trl_flow_grpo.losses import clipped_surrogate, flow_grpo_loss, grpo_guard_log_ratio, grpo_guard_loss
from trl_flow_grpo.sampling.steps import sde_step_with_logprob


def test_clipped_surrogate_hand_values():
    # A = 1, r = 1.5: max(-1.5, -1.2) = -1.2 (clipped); A = -1, r = 0.5: max(0.5, 0.8) = 0.8 (clipped);
    # A = 2, r = 1: -2. Mean: (-1.2 + 0.8 - 2) / 3 = -0.8.
    ratio = torch.tensor([1.5, 0.5, 1.0])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    assert clipped_surrogate(ratio, advantages, 0.2, 0.2).item() == pytest.approx(-0.8)
    # The pessimistic side is not clipped: A = 1 with r = 0.5 keeps -0.5; A = -1 with r = 1.5 keeps 1.5.
    assert clipped_surrogate(torch.tensor([0.5, 1.5]), torch.tensor([1.0, -1.0]), 0.2, 0.2).item() == pytest.approx(
        0.5
    )
    # Asymmetric range: 1 + eps_high = 1.3 caps r = 1.5 at 1.3.
    assert clipped_surrogate(torch.tensor([1.5]), torch.tensor([1.0]), 0.2, 0.3).item() == pytest.approx(-1.3)


def test_flow_grpo_loss_is_the_plain_ratio():
    log_prob = torch.tensor([0.1, -0.2])
    old = torch.tensor([0.0, 0.0])
    advantages = torch.tensor([1.0, 1.0])
    out = flow_grpo_loss(log_prob, old, advantages, 1.0, 1.0)  # range wide enough not to clip
    assert torch.allclose(out.ratio, torch.exp(log_prob))
    assert out.loss.item() == pytest.approx(-(math.exp(0.1) + math.exp(-0.2)) / 2)


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, step_std: float) -> torch.Tensor:
    """The per-element-mean log-density of N(mean, step_std^2), written out directly."""
    per_element = -((x_next - mean) ** 2) / (2 * step_std**2) - math.log(step_std) - 0.5 * math.log(2 * math.pi)
    return per_element.flatten(1).mean(dim=1)


def test_ratio_norm_hand_value():
    # One element: step std 0.5, mu_old = 0, mu = 0.1, eps = 0.3, so x' = 0.15.
    # log p - log p_old = (-(0.05)^2 + 0.15^2) / (2 * 0.25) = 0.04; b = 0.1^2 / (2 * 0.25) = 0.02;
    # (0.04 + 0.02) * 0.5 = 0.03 = eps * (mu - mu_old).
    x_next, mean, old_mean = torch.tensor([[0.15]]), torch.tensor([[0.1]]), torch.tensor([[0.0]])
    log_prob, old = gaussian_log_prob(x_next, mean, 0.5), gaussian_log_prob(x_next, old_mean, 0.5)
    assert (log_prob - old).item() == pytest.approx(0.04)
    value = grpo_guard_log_ratio(log_prob, old, mean, old_mean, torch.tensor(0.5))
    assert value.item() == pytest.approx(0.03)


def test_ratio_norm_removes_the_noise_level_dependence():
    """With x' = mu_old + step_std * eps, the normalised log-ratio is exactly mean(eps * (mu - mu_old)) at every step
    std, while the plain log-ratio is negative on average and scales with 1 / step_std."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(64, 3, 4, 4, generator=gen)
    old_mean = torch.randn(64, 3, 4, 4, generator=gen)
    delta = 0.05 * torch.randn(64, 3, 4, 4, generator=gen)
    expected = (eps * delta).flatten(1).mean(dim=1)
    plain_means = []
    for step_std in (0.05, 0.2, 0.6):
        x_next = old_mean + step_std * eps
        log_prob = gaussian_log_prob(x_next, old_mean + delta, step_std)
        old = gaussian_log_prob(x_next, old_mean, step_std)
        normalised = grpo_guard_log_ratio(log_prob, old, old_mean + delta, old_mean, torch.tensor(step_std))
        assert torch.allclose(normalised, expected, atol=1e-6), step_std
        plain_means.append((log_prob - old).mean().item())
    assert all(m < 0 for m in plain_means)
    assert plain_means[0] < 10 * plain_means[2]  # the bias -mean(d^2) / (2 step_std^2): 144x at 12x less noise


def test_grpo_guard_on_policy_ratio_is_one_and_the_loss_is_reweighted():
    mean = torch.randn(3, 2, 2, 2)
    log_prob = torch.tensor([-1.0, -0.5, 0.2])
    advantages = torch.tensor([1.0, -2.0, 0.5])
    out = grpo_guard_loss(
        log_prob, log_prob.clone(), advantages, 1e-4, 1e-4, mean=mean, old_mean=mean.clone(),
        std_dev_t=torch.full((3, 1, 1, 1), 0.7), dt=-0.25,
    )  # fmt: skip
    assert torch.equal(out.ratio, torch.ones(3))
    assert out.loss.item() == pytest.approx(-advantages.mean().item() / 0.25)


def test_grpo_guard_clips_the_normalised_ratio():
    # One element, s = 1, dt = -0.25: step std 0.5, normalised log-ratio eps * d = 0.3 * 0.1 = 0.03 (see above),
    # so r~ = exp(0.03) = 1.0305 > 1 + 0.01: the positive advantage's term is clipped at 1.01, then divided by 0.25.
    x_next, mean, old_mean = torch.tensor([[0.15]]), torch.tensor([[0.1]]), torch.tensor([[0.0]])
    log_prob, old = gaussian_log_prob(x_next, mean, 0.5), gaussian_log_prob(x_next, old_mean, 0.5)
    out = grpo_guard_loss(
        log_prob, old, torch.tensor([1.0]), 0.01, 0.01, mean=mean, old_mean=old_mean,
        std_dev_t=torch.tensor([1.0]), dt=-0.25,
    )  # fmt: skip
    assert out.ratio.item() == pytest.approx(math.exp(0.03))
    assert out.loss.item() == pytest.approx(-1.01 / 0.25)


def test_grpo_guard_rejects_a_non_denoising_step():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dt = sigma' - sigma < 0"):
        grpo_guard_loss(
            torch.zeros(1), torch.zeros(1), torch.ones(1), 0.1, 0.1, mean=x, old_mean=x,
            std_dev_t=torch.ones(1), dt=0.0,
        )  # fmt: skip


def velocity_gradients(sigma: float, sigma_next: float, noise_level: float, loss_type: str) -> tuple:
    """The gradient of one step's loss with respect to the velocity on the first on-policy pass, through the real SDE
    step (`sde_step_with_logprob`), and the recorded noise eps of the transition."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    v_old = torch.randn(2, 3, 4, 4, generator=gen)
    advantages = torch.tensor([1.5, -0.5])
    x_next, old_log_prob, old_mean, s = sde_step_with_logprob(
        v_old, x, sigma, sigma_next, noise_level, "sde", generator=torch.Generator().manual_seed(2)
    )
    eps = (x_next - old_mean) / (s * math.sqrt(sigma - sigma_next))
    v = v_old.clone().requires_grad_(True)
    _, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level, "sde", prev_sample=x_next)
    if loss_type == "grpo_guard":
        out = grpo_guard_loss(
            log_prob, old_log_prob, advantages, 1e-4, 1e-4, mean=mean, old_mean=old_mean, std_dev_t=std,
            dt=sigma_next - sigma,
        )  # fmt: skip
    else:
        out = flow_grpo_loss(log_prob, old_log_prob, advantages, 1e-4, 1e-4)
    assert torch.equal(out.ratio, torch.ones(2))
    out.loss.backward()
    return v.grad, eps, advantages, s


@pytest.mark.parametrize("sigma, sigma_next", [(0.9, 0.8), (0.5, 0.45), (0.2, 0.1)])
def test_grpo_guard_gradient_is_the_same_at_every_noise_level(sigma, sigma_next):
    """On-policy, dL/dv = A (1 + a^2 / 2) eps / (B D): no dependence on sigma or dt (Flow-GRPO's is
    A (1 + a^2 / 2) eps sqrt(-dt) / (s B D), which does depend on them)."""
    a, batch, elements = 0.7, 2, 3 * 4 * 4
    grad, eps, advantages, _ = velocity_gradients(sigma, sigma_next, a, "grpo_guard")
    expected = advantages.view(-1, 1, 1, 1) * (1 + a**2 / 2) * eps / (batch * elements)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-9)

    plain, same_eps, _, s = velocity_gradients(sigma, sigma_next, a, "flow_grpo")
    assert torch.equal(same_eps, eps)
    scale = math.sqrt(sigma - sigma_next) / s.flatten()[0].item()
    assert torch.allclose(plain, expected * scale, rtol=1e-4, atol=1e-9)


def test_grpo_guard_check_values_of_the_algorithms_page():
    # docs/algorithms.md, section 3: the SDE check point (sigma 0.8 -> 0.7, x = 1, a = 0.7, eps = 0.3), the sampling
    # policy predicting v = 0.5 and the current one v = 0.6. By hand: dmu/dv = (1 + s^2 (1 - sigma) / (2 sigma)) dt
    # = 1.245 * -0.1, so d = -0.01245 and log r~ = eps * d = -0.003735.
    x, step_std = torch.tensor([[1.0]]), 1.4 * math.sqrt(0.1)
    _, _, old_mean, _ = sde_step_with_logprob(torch.tensor([[0.5]]), x, 0.8, 0.7, 0.7, "sde", prev_sample=x)
    x_next = old_mean + step_std * 0.3
    assert x_next.item() == pytest.approx(0.948066, abs=1e-6)
    _, old_log_prob, old_mean, s = sde_step_with_logprob(torch.tensor([[0.5]]), x, 0.8, 0.7, 0.7, prev_sample=x_next)
    _, log_prob, mean, _ = sde_step_with_logprob(torch.tensor([[0.6]]), x, 0.8, 0.7, 0.7, prev_sample=x_next)
    assert (mean - old_mean).item() == pytest.approx(-0.01245, abs=1e-6)
    assert (log_prob - old_log_prob).item() == pytest.approx(-0.008832, abs=1e-6)
    advantages = torch.tensor([1.0])
    plain = flow_grpo_loss(log_prob, old_log_prob, advantages, 1e-4, 1e-4)
    assert plain.loss.item() == pytest.approx(-0.991207, abs=1e-6)
    guard = grpo_guard_loss(
        log_prob, old_log_prob, advantages, 1e-4, 1e-4, mean=mean, old_mean=old_mean, std_dev_t=s, dt=-0.1
    )
    assert guard.ratio.item() == pytest.approx(math.exp(0.3 * -0.01245), abs=1e-6)
    assert guard.loss.item() == pytest.approx(-9.962720, abs=1e-5)
