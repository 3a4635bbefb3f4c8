"""Tests for the `pickscore` built-in reward, with a tiny random CLIP model and processor built in code (offline)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from trl_flow_grpo.rewards import REWARD_FUNCS, call_reward_funcs, reward_func_name
from trl_flow_grpo.rewards.pickscore import (
    PICKSCORE_MODEL_ID,
    PICKSCORE_NORMALIZER,
    PICKSCORE_PROCESSOR_ID,
    PickScoreReward,
)
from trl_flow_grpo.testing import make_tiny_clip_tokenizer, record_device_moves

IMAGE_SIZE = 32
PROMPTS = ["a red circle", "a photo of a cat", "two blue squares", "a house next to a tree", "a dog"]


def _tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
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
        logit_scale_init_value=math.log(100.0),  # PickScore's trained value: logit_scale.exp() == 100
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
    return _tiny_clip()


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory, tiny_clip) -> tuple[Path, Path]:
    """The tiny model and processor saved to disk (safetensors), as `from_pretrained` folders."""
    model, processor = tiny_clip
    model_dir = tmp_path_factory.mktemp("pickscore_model")
    processor_dir = tmp_path_factory.mktemp("pickscore_processor")
    model.save_pretrained(model_dir)
    processor.save_pretrained(processor_dir)
    return model_dir, processor_dir


def _reference_scores(model: CLIPModel, processor: CLIPProcessor, prompts, images) -> torch.Tensor:
    """logit_scale.exp() * cosine(text embedding, image embedding), computed from the CLIP towers by hand."""
    text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")
    with torch.no_grad():
        text_embeds = model.text_projection(model.text_model(**text).pooler_output)
        image_embeds = model.visual_projection(model.vision_model(pixels["pixel_values"]).pooler_output)
        cosine = torch.nn.functional.cosine_similarity(text_embeds, image_embeds, dim=-1)
        return model.logit_scale.exp() * cosine


def test_score_is_logit_scale_times_cosine(tiny_clip):
    model, processor = tiny_clip
    reward = PickScoreReward(model=model, processor=processor)
    images = _images()
    scores = reward(prompts=PROMPTS, images=images)
    assert isinstance(scores, list) and len(scores) == len(images)
    assert all(type(score) is float for score in scores)
    torch.testing.assert_close(torch.tensor(scores), _reference_scores(model, processor, PROMPTS, images))
    assert all(abs(score) <= 100.0 + 1e-4 for score in scores)  # |cosine| <= 1, logit_scale.exp() == 100


def test_normalize_divides_by_26(tiny_clip):
    model, processor = tiny_clip
    images = _images()
    raw = PickScoreReward(model=model, processor=processor)(prompts=PROMPTS, images=images)
    normalized = PickScoreReward(model=model, processor=processor, normalize=True)(prompts=PROMPTS, images=images)
    assert PICKSCORE_NORMALIZER == 26.0
    np.testing.assert_allclose(normalized, np.array(raw) / 26.0, rtol=1e-6)


def test_batching_matches_unbatched(tiny_clip):
    model, processor = tiny_clip
    images = _images()
    full = PickScoreReward(model=model, processor=processor, batch_size=len(images)).score(PROMPTS, images)
    chunked = PickScoreReward(model=model, processor=processor, batch_size=2).score(PROMPTS, images)
    singles = torch.cat(
        [PickScoreReward(model=model, processor=processor).score([p], [i]) for p, i in zip(PROMPTS, images)]
    )
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(singles, full, rtol=1e-5, atol=1e-5)


def test_each_image_is_scored_against_its_own_prompt(tiny_clip):
    model, processor = tiny_clip
    reward = PickScoreReward(model=model, processor=processor)
    images = _images()
    scores = torch.tensor(reward(prompts=PROMPTS, images=images))
    # Shuffling the (prompt, image) pairs shuffles the scores the same way.
    order = [3, 0, 4, 1, 2]
    shuffled = torch.tensor(reward(prompts=[PROMPTS[i] for i in order], images=[images[i] for i in order]))
    torch.testing.assert_close(shuffled, scores[order], rtol=1e-5, atol=1e-5)
    # The same image scored against other prompts gets other scores: the text side follows the pairing.
    same_image = reward(prompts=PROMPTS, images=[images[0]] * len(PROMPTS))
    assert same_image[0] == pytest.approx(scores[0].item(), abs=1e-5)
    assert len({round(score, 4) for score in same_image}) == len(PROMPTS)
    # Deterministic.
    assert reward(prompts=PROMPTS, images=images) == pytest.approx(scores.tolist(), abs=1e-6)


def test_accepts_numpy_and_non_rgb_images(tiny_clip):
    model, processor = tiny_clip
    reward = PickScoreReward(model=model, processor=processor)
    image = _images(1)[0]
    from_pil = reward(prompts=["a cat"], images=[image])
    from_numpy = reward(prompts=["a cat"], images=[np.asarray(image)])
    from_rgba = reward(prompts=["a cat"], images=[image.convert("RGBA")])
    assert from_numpy == pytest.approx(from_pil, abs=1e-6)
    assert from_rgba == pytest.approx(from_pil, abs=1e-6)


def test_loads_lazily_from_pretrained_with_safetensors(saved_clip, tiny_clip, monkeypatch):
    model_dir, processor_dir = saved_clip
    calls = []
    for auto_class in (transformers.AutoModel, transformers.AutoProcessor):
        original = auto_class.from_pretrained

        def spy(*args, _original=original, _name=auto_class.__name__, **kwargs):
            calls.append((_name, args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", spy)

    reward = PickScoreReward(model_id=str(model_dir), processor_id=str(processor_dir), device="cpu")
    assert not reward.is_loaded and calls == []  # nothing is loaded at construction

    images = _images()
    scores = reward(prompts=PROMPTS, images=images)

    assert reward.is_loaded
    assert isinstance(reward.model, CLIPModel) and not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    by_class = {name: (args, kwargs) for name, args, kwargs in calls}
    assert by_class["AutoModel"][0] == (str(model_dir),)
    assert by_class["AutoModel"][1]["use_safetensors"] is True
    assert by_class["AutoProcessor"][0] == (str(processor_dir),)
    # The loaded model and processor reproduce the in-memory model's scores.
    torch.testing.assert_close(torch.tensor(scores), _reference_scores(*tiny_clip, PROMPTS, images))
    reward(prompts=PROMPTS[:1], images=images[:1])
    assert len(calls) == 2  # loaded once


def test_refuses_pickle_weights(saved_clip, tiny_clip, tmp_path):
    model, _ = tiny_clip
    _, processor_dir = saved_clip
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a checkpoint without model.safetensors
    reward = PickScoreReward(model_id=str(tmp_path), processor_id=str(processor_dir), device="cpu")
    with pytest.raises(OSError, match="safetensors"):
        reward(prompts=["a cat"], images=_images(1))


def test_dtype_is_applied_and_scores_stay_float(saved_clip):
    model_dir, processor_dir = saved_clip
    images = _images()
    fp32 = PickScoreReward(model_id=str(model_dir), processor_id=str(processor_dir), device="cpu")
    bf16 = PickScoreReward(
        model_id=str(model_dir), processor_id=str(processor_dir), device="cpu", dtype=torch.bfloat16
    )
    bf16_scores = bf16.score(PROMPTS, images)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16_scores.dtype == torch.float32
    torch.testing.assert_close(bf16_scores, fp32.score(PROMPTS, images), atol=1.5, rtol=0.0)


def test_builtin_registration_is_lazy_and_uses_pickscore_ids():
    builtin = REWARD_FUNCS["pickscore"]
    assert isinstance(builtin, PickScoreReward)
    assert (builtin.model_id, builtin.processor_id) == (PICKSCORE_MODEL_ID, PICKSCORE_PROCESSOR_ID)
    assert PICKSCORE_MODEL_ID == "yuvalkirstain/PickScore_v1"
    assert PICKSCORE_PROCESSOR_ID == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert not builtin.normalize  # raw PickScore, as papers report it
    assert not builtin.is_loaded  # importing the registry loads nothing
    assert reward_func_name("pickscore") == "pickscore"
    assert reward_func_name(builtin) == "pickscore"


def test_through_call_reward_funcs_and_input_checks(tiny_clip):
    model, processor = tiny_clip
    reward = PickScoreReward(model=model, processor=processor)
    images = _images(3)
    rewards = call_reward_funcs([reward], PROMPTS[:3], images)
    assert rewards.shape == (3, 1)
    torch.testing.assert_close(rewards[:, 0], torch.tensor(reward(prompts=PROMPTS[:3], images=images)))
    assert reward(prompts=[], images=[]) == []
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        reward(prompts=PROMPTS[:3], images=images[:2])
    with pytest.raises(ValueError, match="batch_size"):
        PickScoreReward(batch_size=0)


def test_offload_keeps_the_model_on_the_cpu_between_calls(tiny_clip):
    # "cuda:3" is recorded, not moved to (`record_device_moves`), so the check runs without a GPU.
    model, processor = _tiny_clip()
    moves, runs = record_device_moves(model, "forward")
    reward = PickScoreReward(model=model, processor=processor, device="cuda:3", batch_size=2, offload=True)
    images = _images(3)
    scores = reward.score(PROMPTS[:3], images)
    assert moves == ["cpu", "cuda:3", "cpu"]  # parked at load, on the device for the call, back after it
    assert runs == ["cuda:3", "cuda:3"]  # both batches ran with the model on the device
    reward.score(PROMPTS[:1], images[:1])
    assert moves == ["cpu", "cuda:3", "cpu", "cuda:3", "cpu"]
    plain = PickScoreReward(model=tiny_clip[0], processor=processor)
    torch.testing.assert_close(scores, plain.score(PROMPTS[:3], images))  # the same model: the same scores

    assert PickScoreReward().offload is False  # the default keeps the model on its device
    resident = _tiny_clip()[0]
    resident_moves, _ = record_device_moves(resident)
    PickScoreReward(model=resident, processor=processor, device="cuda:3").score(PROMPTS[:1], images[:1])
    assert resident_moves == ["cuda:3"]  # without offload: moved once, at load
