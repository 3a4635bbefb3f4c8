"""`RolloutBatch`: `to(device)` and the safetensors round trip that resuming relies on (bit for bit)."""

import pytest
import torch

from trl_flow_grpo.rollout_batch import RolloutBatch, load_rollout_batches, save_rollout_batches


def make_batch(seed: int, advantages: bool = True, means: bool = False) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    trajectory = torch.randn(3, 3, 4, 2, 2, generator=g)  # K + 1 states: latents and next_latents are views of it
    return RolloutBatch(
        cond={"prompt_embeds": torch.randn(3, 5, 8, generator=g), "pooled": torch.randn(3, 8, generator=g)},
        latents=trajectory[:, :2],
        next_latents=trajectory[:, 1:],
        log_probs=torch.randn(3, 2, generator=g),
        step_indices=[1, 2],
        advantages=torch.randn(3, generator=g) if advantages else None,
        means=torch.randn(3, 2, 4, 2, 2, generator=g) if means else None,
    )


def assert_equal(a: RolloutBatch, b: RolloutBatch) -> None:
    assert a.cond.keys() == b.cond.keys()
    assert all(torch.equal(a.cond[k], b.cond[k]) for k in a.cond)
    for name in ("latents", "next_latents", "log_probs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.step_indices == b.step_indices and isinstance(b.step_indices, list)
    assert (a.advantages is None) == (b.advantages is None)
    if a.advantages is not None:
        assert torch.equal(a.advantages, b.advantages)
    assert (a.means is None) == (b.means is None)
    if a.means is not None:
        assert torch.equal(a.means, b.means)


def test_safetensors_round_trip_is_bit_identical(tmp_path):
    batches = [make_batch(0), make_batch(1, means=True), make_batch(2, advantages=False)]
    path = str(tmp_path / "buffer.safetensors")
    save_rollout_batches(batches, path, metadata={"steps_on_buffer": "1"})
    loaded, metadata = load_rollout_batches(path)
    assert metadata == {"steps_on_buffer": "1"}
    assert len(loaded) == len(batches)
    for a, b in zip(batches, loaded):
        assert_equal(a, b)
        assert len(b) == 3


def test_state_dict_keys_keep_the_checkpoint_format():
    # The keys of the rollout buffer files checkpoints already hold: "<micro-batch>.<field>", "<i>.cond.<name>".
    state = make_batch(0).state_dict(prefix="0.")
    assert sorted(state) == sorted(
        ["0.cond.prompt_embeds", "0.cond.pooled", "0.latents", "0.next_latents", "0.log_probs", "0.step_indices"]
        + ["0.advantages"]
    )
    assert state["0.step_indices"].dtype == torch.int64
    # GRPO-Guard's batches add the sampling policy's step means.
    assert set(make_batch(0, means=True).state_dict(prefix="0.")) - set(state) == {"0.means"}


def test_to_moves_every_tensor():
    batch = make_batch(0, means=True)
    moved = batch.to("meta")
    tensors = [*moved.cond.values(), moved.latents, moved.next_latents, moved.log_probs, moved.advantages, moved.means]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.step_indices == batch.step_indices
    assert batch.latents.device.type == "cpu"  # the original is unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_cuda_and_back_is_bit_identical():
    batch = make_batch(0)
    assert_equal(batch, batch.to("cuda").to("cpu"))
