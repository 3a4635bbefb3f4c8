"""Tests for the `clip_score` built-in reward, with a tiny random CLIP model and processor built in code (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from trl_flow_grpo.rewards import REWARD_FUNCS, call_reward_funcs, reward_func_name
from trl_flow_grpo.rewards.clip_score import CLIP_SCORE_MODEL_ID, CLIPScoreReward
from trl_flow_grpo.testing import make_tiny_clip_tokenizer

IMAGE_SIZE = 32
PROMPTS = ["a red circle", "a photo of a cat", "two blue squares", "a house next to a tree", "a dog"]


def _tiny_clip(seed: int = 4) -> tuple[CLIPModel, CLIPProcessor]:
    tokenizer = make_tiny_clip_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    return model, processor


def _images(n: int = len(PROMPTS), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_clip() -> tuple[CLIPModel, CLIPProcessor]:
    return _tiny_clip()  # seed 4: cosines of both signs on these images


def _reference_cosine(model: CLIPModel, processor: CLIPProcessor, prompts, images) -> torch.Tensor:
    """cosine(text embedding, image embedding), computed from the CLIP towers by hand."""
    text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")
    with torch.no_grad():
        text_embeds = model.text_projection(model.text_model(**text).pooler_output)
        image_embeds = model.visual_projection(model.vision_model(pixels["pixel_values"]).pooler_output)
        return torch.nn.functional.cosine_similarity(text_embeds, image_embeds, dim=-1)


def test_score_is_the_clipscore_paper_formula(tiny_clip):
    model, processor = tiny_clip
    images = _images()
    cosine = _reference_cosine(model, processor, PROMPTS, images)
    assert (cosine < 0).any() and (cosine > 0).any()  # the random model gives both signs: clipping is exercised
    scores = CLIPScoreReward(model=model, processor=processor)(prompts=PROMPTS, images=images)
    assert all(type(score) is float for score in scores)
    torch.testing.assert_close(torch.tensor(scores), 2.5 * cosine.clamp(min=0))


def test_weight_and_clip_at_zero(tiny_clip):
    model, processor = tiny_clip
    images = _images()
    cosine = _reference_cosine(model, processor, PROMPTS, images)
    torchmetrics_style = CLIPScoreReward(model=model, processor=processor, weight=100.0).score(PROMPTS, images)
    torch.testing.assert_close(torchmetrics_style, 100 * cosine.clamp(min=0), rtol=1e-5, atol=1e-4)
    raw = CLIPScoreReward(model=model, processor=processor, weight=1.0, clip_at_zero=False).score(PROMPTS, images)
    torch.testing.assert_close(raw, cosine)
    with pytest.raises(ValueError, match="weight must be > 0"):
        CLIPScoreReward(weight=0)


def test_batching_matches_one_by_one(tiny_clip):
    model, processor = tiny_clip
    images = _images()
    full = CLIPScoreReward(model=model, processor=processor, batch_size=len(images)).score(PROMPTS, images)
    chunked = CLIPScoreReward(model=model, processor=processor, batch_size=2).score(PROMPTS, images)
    singles = torch.cat(
        [CLIPScoreReward(model=model, processor=processor).score([p], [i]) for p, i in zip(PROMPTS, images)]
    )
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(singles, full, rtol=1e-5, atol=1e-5)


def test_each_image_is_scored_against_its_own_prompt(tiny_clip):
    model, processor = tiny_clip
    reward = CLIPScoreReward(model=model, processor=processor, clip_at_zero=False)
    images = _images()
    scores = reward.score(PROMPTS, images)
    order = [3, 0, 4, 1, 2]
    shuffled = reward.score([PROMPTS[i] for i in order], [images[i] for i in order])
    torch.testing.assert_close(shuffled, scores[order], rtol=1e-5, atol=1e-5)
    same_image = reward.score(PROMPTS, [images[0]] * len(PROMPTS))
    assert len({round(score, 4) for score in same_image.tolist()}) == len(PROMPTS)


def test_loads_lazily_once_with_safetensors_and_dtype(tmp_path, tiny_clip, monkeypatch):
    model, processor = tiny_clip
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    calls = []
    for auto_class in (transformers.AutoModel, transformers.AutoProcessor):
        original = auto_class.from_pretrained

        def spy(*args, _original=original, _name=auto_class.__name__, **kwargs):
            calls.append((_name, args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", spy)

    reward = CLIPScoreReward(str(tmp_path), device="cpu")
    assert not reward.is_loaded and calls == []
    images = _images()
    scores = reward.score(PROMPTS, images)
    assert isinstance(reward.model, CLIPModel) and not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    by_class = {name: (args, kwargs) for name, args, kwargs in calls}
    assert by_class["AutoModel"][0] == (str(tmp_path),) and by_class["AutoModel"][1]["use_safetensors"] is True
    torch.testing.assert_close(scores, 2.5 * _reference_cosine(model, processor, PROMPTS, images).clamp(min=0))
    reward.score(PROMPTS[:1], images[:1])
    assert len(calls) == 2  # loaded once

    bf16 = CLIPScoreReward(str(tmp_path), device="cpu", dtype=torch.bfloat16, clip_at_zero=False, weight=1.0)
    bf16_scores = bf16.score(PROMPTS, images)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16_scores.dtype == torch.float32
    torch.testing.assert_close(bf16_scores, _reference_cosine(model, processor, PROMPTS, images), atol=0.05, rtol=0)


class _MoveRecorder(torch.nn.Module):
    """A module that records where it is sent (`.to(device)`) without moving anything."""

    def __init__(self):
        super().__init__()
        self.moves: list[str] = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]))
        return self


def test_offloaded_moves_to_the_device_for_the_call_and_back_to_the_cpu():
    from trl_flow_grpo.rewards._models import offloaded

    first, second = _MoveRecorder(), _MoveRecorder()
    with offloaded([first, second], torch.device("cuda", 3), offload=True):
        assert first.moves == second.moves == ["cuda:3"]
    assert first.moves == second.moves == ["cuda:3", "cpu"]
    kept = _MoveRecorder()
    with pytest.raises(RuntimeError), offloaded([kept], torch.device("cuda", 3), offload=True):
        raise RuntimeError("the forward pass failed")
    assert kept.moves == ["cuda:3", "cpu"]  # offloaded even when scoring fails
    resident = _MoveRecorder()
    with offloaded([resident], torch.device("cuda", 3), offload=False):
        pass
    assert resident.moves == []


def test_offload_gives_the_same_scores_and_moves_the_model_per_call(monkeypatch):
    model, processor = _tiny_clip()
    moves = []
    original_to = model.to

    def tracking_to(*args, **kwargs):
        moves.append(str(args[0]))
        return original_to(*args, **kwargs)

    monkeypatch.setattr(model, "to", tracking_to)
    reward = CLIPScoreReward(model=model, processor=processor, device="cpu", offload=True)
    plain = CLIPScoreReward(model=_tiny_clip()[0], processor=processor)
    images = _images(3)
    torch.testing.assert_close(reward.score(PROMPTS[:3], images), plain.score(PROMPTS[:3], images))
    reward.score(PROMPTS[:3], images)
    assert len(moves) == 1 + 2 * 2  # parked on the CPU at load, then to the device and back in each of 2 calls


def test_builtin_registration_and_call_convention(tiny_clip):
    builtin = REWARD_FUNCS["clip_score"]
    assert isinstance(builtin, CLIPScoreReward) and not builtin.is_loaded
    assert builtin.model_id == CLIP_SCORE_MODEL_ID == "openai/clip-vit-large-patch14"
    assert (builtin.weight, builtin.clip_at_zero) == (2.5, True)
    assert reward_func_name("clip_score") == "clip_score"
    model, processor = tiny_clip
    reward = CLIPScoreReward(model=model, processor=processor)
    images = _images(3)
    rewards = call_reward_funcs([reward], PROMPTS[:3], images)
    torch.testing.assert_close(rewards[:, 0], reward.score(PROMPTS[:3], images))
    assert reward(prompts=[], images=[]) == []
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        reward(prompts=PROMPTS[:3], images=images[:2])
    with pytest.raises(ValueError, match="batch_size"):
        CLIPScoreReward(batch_size=0)
