"""Tests for the `hpsv2` built-in reward (HPSv2.1). OpenCLIP is not installed here (it needs torchvision), so the
scoring path runs on a tiny model with OpenCLIP's interface, and the loading code against a stand-in `open_clip`
module and a tiny checkpoint written with `torch.save`."""

from __future__ import annotations

import datetime
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from trl_flow_grpo.rewards import REWARD_FUNCS, call_reward_funcs, resolve_reward_func, reward_func_name
from trl_flow_grpo.rewards.hpsv2 import (
    HPSV2_ARCHITECTURE,
    HPSV2_CHECKPOINT_FILENAME,
    HPSV2_CHECKPOINT_REPO,
    HPSv2Reward,
    load_hpsv2_state_dict,
)

PROMPTS = ["a red circle", "a photo of a cat", "two blue squares", "a house next to a tree", "a dog"]
CONTEXT_LENGTH = 8


class TinyOpenCLIP(torch.nn.Module):
    """OpenCLIP's interface (`encode_image` / `encode_text` with `normalize=`) on a few random layers."""

    def __init__(self, seed: int = 0, dim: int = 8):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, dim))
            self.token_embedding = torch.nn.Embedding(256, dim)
            self.text_projection = torch.nn.Parameter(torch.randn(dim, dim))
            self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

    def encode_image(self, image, normalize=False):
        features = self.visual(image)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text, normalize=False):
        features = self.token_embedding(text).mean(dim=1) @ self.text_projection
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def preprocess(image: Image.Image) -> torch.Tensor:
    """A stand-in for OpenCLIP's validation transform: resize to 4x4, scale to [0, 1], channels first."""
    return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32) / 255.0).permute(2, 0, 1)


def tokenizer(texts: list[str]) -> torch.Tensor:
    """A stand-in for OpenCLIP's tokenizer: bytes, padded/truncated to CONTEXT_LENGTH."""
    rows = [
        list(text.encode()[:CONTEXT_LENGTH]) + [0] * (CONTEXT_LENGTH - len(text.encode()[:CONTEXT_LENGTH]))
        for text in texts
    ]
    return torch.tensor(rows, dtype=torch.long)


def _images(n: int = len(PROMPTS), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)) for _ in range(n)]


def _reference(model, prompts, images) -> torch.Tensor:
    """HPSv2's `image_features @ text_features.T` diagonal, computed for one pair at a time."""
    with torch.no_grad():
        scores = []
        for prompt, image in zip(prompts, images):
            image_features = model.encode_image(preprocess(image.convert("RGB"))[None], normalize=True)
            text_features = model.encode_text(tokenizer([prompt]), normalize=True)
            scores.append((image_features @ text_features.T)[0, 0])
        return torch.stack(scores)


def _reward(model=None, **kwargs) -> HPSv2Reward:
    return HPSv2Reward(model=model or TinyOpenCLIP(), preprocess=preprocess, tokenizer=tokenizer, **kwargs)


def test_score_is_the_cosine_of_the_features():
    model = TinyOpenCLIP()
    images = _images()
    scores = _reward(model)(prompts=PROMPTS, images=images)
    assert all(type(score) is float for score in scores)
    torch.testing.assert_close(torch.tensor(scores), _reference(model, PROMPTS, images))
    assert all(-1.0 <= score <= 1.0 for score in scores)


def test_batching_matches_one_by_one_and_pairs_follow_the_prompts():
    model = TinyOpenCLIP()
    images = _images()
    full = _reward(model, batch_size=5).score(PROMPTS, images)
    chunked = _reward(model, batch_size=2).score(PROMPTS, images)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    order = [3, 0, 4, 1, 2]
    shuffled = _reward(model, batch_size=2).score([PROMPTS[i] for i in order], [images[i] for i in order])
    torch.testing.assert_close(shuffled, full[order], rtol=1e-5, atol=1e-6)


def _fake_open_clip(monkeypatch, model, calls):
    module = types.ModuleType("open_clip")

    def create_model_and_transforms(name, pretrained=None, **kwargs):
        calls.append(("create_model_and_transforms", name, pretrained))
        return model, "train-transform", preprocess

    def get_tokenizer(name, **kwargs):
        calls.append(("get_tokenizer", name))
        return tokenizer

    module.create_model_and_transforms = create_model_and_transforms
    module.get_tokenizer = get_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", module)


def test_loads_the_checkpoint_into_the_open_clip_architecture(tmp_path, monkeypatch):
    trained = TinyOpenCLIP(seed=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "hps.pt")
    calls, downloads, loads = [], [], []
    _fake_open_clip(monkeypatch, TinyOpenCLIP(seed=2), calls)  # the architecture, randomly initialised

    def fake_download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename))
        return str(tmp_path / "hps.pt")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    original_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    reward = HPSv2Reward(device="cpu")
    assert not reward.is_loaded and calls == []
    images = _images()
    scores = reward.score(PROMPTS, images)
    assert calls == [("create_model_and_transforms", "ViT-H-14", None), ("get_tokenizer", "ViT-H-14")]
    assert downloads == [("xswu/HPSv2", "HPS_v2.1_compressed.pt")] and loads == [True]
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())
    torch.testing.assert_close(scores, _reference(trained, PROMPTS, images))  # the checkpoint's weights are used
    reward.score(PROMPTS[:1], images[:1])
    assert len(downloads) == 1  # loaded once


def test_checkpoint_checks(tmp_path):
    model = TinyOpenCLIP()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert set(load_hpsv2_state_dict(tmp_path / "plain.pt")) == set(model.state_dict())
    torch.save({"state_dict": {"visual.weight": "not a tensor"}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an HPSv2 checkpoint"):
        load_hpsv2_state_dict(tmp_path / "bad.pt")
    torch.save({"state_dict": {"x": datetime.date(2020, 1, 1)}}, tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_hpsv2_state_dict(tmp_path / "pickled.pt")  # arbitrary pickled objects are refused


def test_a_missing_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "trl-flow-grpo\[hpsv2\]"') as info:
        HPSv2Reward(device="cpu")(prompts=["a cat"], images=_images(1))
    assert "open_clip_torch" in str(info.value)


def test_dtype_offload_and_builtin_registration():
    model = TinyOpenCLIP()
    images = _images(3)
    offloaded = _reward(TinyOpenCLIP(), device="cpu", offload=True)
    torch.testing.assert_close(offloaded.score(PROMPTS[:3], images), _reference(model, PROMPTS[:3], images))
    builtin = REWARD_FUNCS["hpsv2"]
    assert isinstance(builtin, HPSv2Reward) and not builtin.is_loaded
    assert (builtin.checkpoint_repo, builtin.checkpoint_filename, builtin.architecture) == (
        HPSV2_CHECKPOINT_REPO,
        HPSV2_CHECKPOINT_FILENAME,
        HPSV2_ARCHITECTURE,
    )
    assert resolve_reward_func("xswu/HPSv2") is builtin and reward_func_name("xswu/HPSv2") == "hpsv2"
    rewards = call_reward_funcs([_reward(model)], PROMPTS[:3], images)
    torch.testing.assert_close(rewards[:, 0], _reference(model, PROMPTS[:3], images))
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        _reward(model)(prompts=PROMPTS[:3], images=images[:2])
