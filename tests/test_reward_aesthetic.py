"""Tests for the `aesthetic` built-in reward (LAION aesthetic predictor v2), with a tiny random CLIP vision tower and
MLP built in code (offline)."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from trl_flow_grpo.rewards import REWARD_FUNCS, call_reward_funcs, reward_func_name
from trl_flow_grpo.rewards.aesthetic import (
    AESTHETIC_CLIP_MODEL_ID,
    AESTHETIC_PREDICTOR_FILENAME,
    AESTHETIC_PREDICTOR_REPO,
    AestheticMLP,
    AestheticReward,
    load_aesthetic_mlp,
)

IMAGE_SIZE = 32
EMBED_DIM = 16


def _tiny_parts(seed: int = 0) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor, AestheticMLP]:
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    config = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=EMBED_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPVisionModelWithProjection(config).eval()
        mlp = AestheticMLP(input_size=EMBED_DIM).eval()
    return clip, processor, mlp


def _images(n: int = 5, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_parts():
    return _tiny_parts()


def _reference(clip, processor, mlp, images) -> torch.Tensor:
    """MLP(e / ||e||) with the original predictor's layers applied one by one (no activations)."""
    pixels = processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = clip.visual_projection(clip.vision_model(pixels).pooler_output)
        x = embeds / embeds.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # the Linear layers; the Dropouts are identities in eval mode
            x = mlp.layers[index](x)
        return x[:, 0]


def test_mlp_matches_the_original_architecture():
    mlp = AestheticMLP()
    assert [type(layer).__name__ for layer in mlp.layers] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]
    linear_shapes = [tuple(layer.weight.shape) for layer in mlp.layers if isinstance(layer, torch.nn.Linear)]
    assert linear_shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    assert [layer.p for layer in mlp.layers if isinstance(layer, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    assert sorted(mlp.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


def test_score_is_the_mlp_of_the_normalised_embedding(tiny_parts):
    clip, processor, mlp = tiny_parts
    reward = AestheticReward(clip_model=clip, processor=processor, mlp=mlp)
    images = _images()
    scores = reward(images=images, prompts=["ignored"] * len(images))
    assert all(type(score) is float for score in scores)
    torch.testing.assert_close(torch.tensor(scores), _reference(clip, processor, mlp, images))
    assert len({round(score, 5) for score in scores}) == len(images)


def test_batching_matches_one_by_one(tiny_parts):
    clip, processor, mlp = tiny_parts
    images = _images()
    full = AestheticReward(clip_model=clip, processor=processor, mlp=mlp, batch_size=5).score(images)
    chunked = AestheticReward(clip_model=clip, processor=processor, mlp=mlp, batch_size=2).score(images)
    singles = torch.cat([AestheticReward(clip_model=clip, processor=processor, mlp=mlp).score([i]) for i in images])
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(singles, full, rtol=1e-5, atol=1e-5)


def test_weights_load_with_weights_only_from_the_hub_file(tmp_path, tiny_parts, monkeypatch):
    clip, processor, mlp = tiny_parts
    clip_dir = tmp_path / "clip"
    clip.save_pretrained(clip_dir)
    processor.save_pretrained(clip_dir)
    torch.save(mlp.state_dict(), tmp_path / "aesthetic-model.pth")  # a plain state dict, as the original .pth
    downloads = []

    def fake_download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    loads = []
    original_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    reward = AestheticReward(str(clip_dir), "someone/predictor", "aesthetic-model.pth", device="cpu")
    assert not reward.is_loaded and downloads == []
    images = _images()
    scores = reward.score(images)
    assert downloads == [("someone/predictor", "aesthetic-model.pth")] and loads == [True]
    assert isinstance(reward.clip_model, CLIPVisionModelWithProjection)
    assert not reward.clip_model.training and not reward.mlp.training
    torch.testing.assert_close(scores, _reference(clip, processor, mlp, images))
    reward.score(images[:1])
    assert len(downloads) == 1  # loaded once


def test_safetensors_weights_and_bad_files(tmp_path, tiny_parts):
    _, _, mlp = tiny_parts
    save_file(mlp.state_dict(), str(tmp_path / "mlp.safetensors"))
    loaded = load_aesthetic_mlp(tmp_path / "mlp.safetensors")
    embeds = torch.nn.functional.normalize(torch.randn(3, EMBED_DIM), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(embeds), mlp(embeds))
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the aesthetic predictor's state dict"):
        load_aesthetic_mlp(tmp_path / "other.pth")
    truncated = {key: value for key, value in mlp.state_dict().items() if not key.startswith("layers.7")}
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_aesthetic_mlp(tmp_path / "truncated.pth")

    torch.save({"layers.0.weight": datetime.date(2020, 1, 1)}, tmp_path / "pickled.pth")  # not a tensor
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_aesthetic_mlp(tmp_path / "pickled.pth")  # arbitrary pickled objects are refused


def test_dtype_keeps_the_mlp_in_float32(tmp_path, tiny_parts):
    clip, processor, mlp = tiny_parts
    clip.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reward = AestheticReward(str(tmp_path), mlp=mlp, device="cpu", dtype=torch.bfloat16)
    images = _images()
    scores = reward.score(images)
    assert next(reward.clip_model.parameters()).dtype == torch.bfloat16
    assert next(reward.mlp.parameters()).dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, _reference(clip, processor, mlp, images), atol=0.05, rtol=0)


def test_offload_gives_the_same_scores(tiny_parts):
    clip, processor, mlp = tiny_parts
    images = _images(3)
    offloaded = AestheticReward(clip_model=clip, processor=processor, mlp=mlp, device="cpu", offload=True)
    torch.testing.assert_close(offloaded.score(images), _reference(clip, processor, mlp, images))
    assert next(clip.parameters()).device.type == "cpu"


def test_builtin_registration_and_call_convention(tiny_parts):
    builtin = REWARD_FUNCS["aesthetic"]
    assert isinstance(builtin, AestheticReward) and not builtin.is_loaded
    assert builtin.clip_model_id == AESTHETIC_CLIP_MODEL_ID == "openai/clip-vit-large-patch14"
    assert (builtin.predictor_repo, builtin.predictor_filename) == (
        AESTHETIC_PREDICTOR_REPO,
        AESTHETIC_PREDICTOR_FILENAME,
    )
    assert reward_func_name("aesthetic") == "aesthetic"
    clip, processor, mlp = tiny_parts
    reward = AestheticReward(clip_model=clip, processor=processor, mlp=mlp)
    images = _images(3)
    rewards = call_reward_funcs([reward], ["a", "b", "c"], images)
    torch.testing.assert_close(rewards[:, 0], reward.score(images))
    assert reward(images=[]) == []
    with pytest.raises(ValueError, match="batch_size"):
        AestheticReward(batch_size=0)
