"""Reference refresh (`ref_model_sync_steps`): the pure `ReferenceRefresh` and the trainer's KL reference with it."""

import pytest
import torch

from trl_flow_grpo.reference import ReferenceRefresh


def lora_like() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_lora_refresh_keeps_a_copy_and_swaps_it_in_exactly():
    layer = lora_like()
    refresh = ReferenceRefresh(layer.named_parameters(), sync_steps=2)
    assert not refresh.holds_lora_weights and refresh.last_refresh is None
    refresh.on_step_end(1)  # not a multiple of 2: nothing happens
    assert refresh.targets is None
    refresh.on_step_end(2)
    assert refresh.holds_lora_weights and refresh.last_refresh == 2
    kept = {name: p.detach().clone() for name, p in layer.named_parameters()}
    with torch.no_grad():
        layer.weight.add_(1.0)  # the policy moves on
    trained = layer.weight.detach().clone()
    with refresh.applied():
        assert torch.equal(layer.weight, kept["weight"]) and torch.equal(layer.bias, kept["bias"])
    assert torch.equal(layer.weight, trained)  # the trained weights are back, bit for bit
    refresh.on_step_end(4)
    assert torch.equal(refresh.targets["weight"], trained)


def test_full_fine_tuning_refresh_copies_into_the_reference_module():
    policy, reference = lora_like(), lora_like()
    with torch.no_grad():
        policy.weight.mul_(3.0)
    refresh = ReferenceRefresh(policy.named_parameters(), sync_steps=1, reference=reference)
    assert not refresh.holds_lora_weights  # the reference is its own module, nothing to swap in
    refresh.on_step_end(1)
    assert torch.equal(reference.weight, policy.weight) and reference.weight is not policy.weight
    with pytest.raises(RuntimeError, match="no"):
        with refresh.applied():
            pass


def test_state_dict_round_trip_before_and_after_a_refresh():
    layer = lora_like()
    refresh = ReferenceRefresh(layer.named_parameters(), sync_steps=1)
    fresh = ReferenceRefresh(lora_like().named_parameters(), sync_steps=1)
    fresh.load_state_dict(refresh.state_dict())  # before any refresh: still the initial reference
    assert fresh.last_refresh is None and not fresh.holds_lora_weights
    refresh.on_step_end(5)
    fresh.load_state_dict(refresh.state_dict())
    assert fresh.last_refresh == 5
    assert all(torch.equal(fresh.targets[name], refresh.targets[name]) for name in refresh.targets)


def test_mismatched_state_and_bad_arguments_raise():
    refresh = ReferenceRefresh(lora_like().named_parameters(), sync_steps=1)
    refresh.on_step_end(1)
    other = ReferenceRefresh(torch.nn.Linear(3, 2, bias=False).named_parameters(), sync_steps=1)
    with pytest.raises(ValueError, match="unexpected \\['bias'\\]"):
        other.load_state_dict(refresh.state_dict())
    with pytest.raises(ValueError, match="sync_steps must be a positive"):
        ReferenceRefresh(lora_like().named_parameters(), sync_steps=0)
    with pytest.raises(ValueError, match="no parameters named"):
        ReferenceRefresh(lora_like().named_parameters(), 1, reference=torch.nn.Linear(3, 2, bias=False))
