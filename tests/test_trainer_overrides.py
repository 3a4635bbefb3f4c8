"""The private `transformers.Trainer` methods FlowGRPOTrainer overrides or calls still exist, with the parameters it
expects: a transformers upgrade that renames or reshapes one fails here, not in a user's run."""

import inspect

import pytest
import transformers

from trl_flow_grpo import FlowGRPOTrainer
from trl_flow_grpo.checkpointing import PRIVATE_TRAINER_CALLS, PRIVATE_TRAINER_OVERRIDES, CheckpointingMixin
from trl_flow_grpo.flow_grpo_trainer import FlowGRPOTrainer as TrainerClass

PRIVATE = {**PRIVATE_TRAINER_OVERRIDES, **PRIVATE_TRAINER_CALLS}


def parameters(function) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(function).parameters)


@pytest.mark.parametrize("name", sorted(PRIVATE))
def test_transformers_still_has_the_private_methods_we_use(name):
    assert hasattr(transformers.Trainer, name), f"transformers.Trainer.{name} is gone ({transformers.__version__})"
    assert parameters(getattr(transformers.Trainer, name)) == PRIVATE[name]


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_OVERRIDES))
def test_our_overrides_match_the_expected_signatures(name):
    assert name in vars(CheckpointingMixin), f"{name} is overridden outside CheckpointingMixin"
    assert parameters(getattr(FlowGRPOTrainer, name)) == PRIVATE_TRAINER_OVERRIDES[name]


def test_every_private_override_lives_in_the_checkpointing_mixin():
    trainer_methods = {
        name for name in vars(transformers.Trainer) if name.startswith("_") and not name.startswith("__")
    }
    ours = {name for name in vars(TrainerClass) if name in trainer_methods}
    assert not ours, f"private Trainer methods overridden in flow_grpo_trainer.py: {sorted(ours)}"
    in_mixin = {name for name in vars(CheckpointingMixin) if name in trainer_methods}
    assert in_mixin == set(PRIVATE_TRAINER_OVERRIDES), "PRIVATE_TRAINER_OVERRIDES does not list every override"


@pytest.mark.parametrize(
    "name", ["get_batch_samples", "training_step", "floating_point_ops", "evaluate", "log", "save_model"]
)
def test_public_overrides_keep_the_parameters_of_transformers(name):
    assert parameters(getattr(FlowGRPOTrainer, name)) == parameters(getattr(transformers.Trainer, name))
