"""Tests for the `image_reward` built-in (ImageReward on transformers' BLIP modules), with tiny random BLIP modules
and a BERT tokenizer built in code (offline). The checkpoint conversion is checked against BLIP's own parameter
names (vit.py / med.py), written out here by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, CLIPImageProcessor

from trl_flow_grpo.rewards import REWARD_FUNCS, call_reward_funcs, resolve_reward_func, reward_func_name
from trl_flow_grpo.rewards.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    ImageRewardModel,
    ImageRewardReward,
    convert_image_reward_state_dict,
    image_reward_configs,
    load_image_reward_model,
)

IMAGE_SIZE = 32
VISION_LAYERS, TEXT_LAYERS = 2, 2
PROMPTS = ["a red circle", "a photo of a cat", "two blue squares", "a house next to a tree", "a dog"]
WORDS = ["a", "red", "circle", "photo", "of", "cat", "two", "blue", "squares", "house", "next", "to", "tree", "dog"]


def _tokenizer(tmp_path_factory) -> BertTokenizer:
    """A word-level BERT tokenizer over the test prompts, with BLIP's extra [DEC] and [ENC] tokens."""
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _configs(vocab_size: int) -> tuple[BlipVisionConfig, BlipTextConfig]:
    vision = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    text = BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=24,
        encoder_hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=40,
        is_decoder=True,
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    return vision, text


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer = _tokenizer(tmp_path_factory)
    vision, text = _configs(len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ImageRewardModel(vision, text).eval()
        for layer in model.mlp.layers:  # larger weights than the default init, so that scores differ visibly
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=0.5)
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return model, tokenizer, processor


def _images(n: int = len(PROMPTS), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


def _reference(model, tokenizer, processor, prompts, images) -> torch.Tensor:
    """ImageReward.score of the reference package, one pair at a time: the [CLS] state of the text encoder
    cross-attending to the ViT features, through the MLP, standardised."""
    scores = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images):
            pixels = processor([image.convert("RGB")], return_tensors="pt")["pixel_values"]
            text = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = model.vision_model(pixel_values=pixels)[0]
            output = model.text_encoder(
                text.input_ids,
                attention_mask=text.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                is_decoder=False,
            )
            reward = model.mlp.layers(output.last_hidden_state[:, 0, :])[0, 0]
            scores.append((reward - 0.16717362830052426) / 1.0333394966054072)
    return torch.stack(scores)


def _reward(parts, **kwargs) -> ImageRewardReward:
    model, tokenizer, processor = parts
    return ImageRewardReward(model=model, tokenizer=tokenizer, image_processor=processor, **kwargs)


def test_score_is_the_standardised_mlp_of_the_cls_state(parts):
    images = _images()
    scores = _reward(parts)(prompts=PROMPTS, images=images)
    assert all(type(score) is float for score in scores)
    torch.testing.assert_close(torch.tensor(scores), _reference(*parts, PROMPTS, images))
    assert (IMAGE_REWARD_MEAN, IMAGE_REWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    assert len({round(score, 4) for score in scores}) == len(images)


def test_batching_matches_one_by_one_and_pairs_follow_the_prompts(parts):
    images = _images()
    full = _reward(parts, batch_size=5).score(PROMPTS, images)
    chunked = _reward(parts, batch_size=2).score(PROMPTS, images)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    same_image = _reward(parts).score(PROMPTS, [images[0]] * len(PROMPTS))
    assert len({round(score, 4) for score in same_image.tolist()}) == len(PROMPTS)  # the prompt matters


def _original_checkpoint(model: ImageRewardModel) -> dict[str, torch.Tensor]:
    """`model`'s weights under the names of the original ImageReward.pt (BLIP's vit.py and med.py)."""
    vision = model.vision_model.state_dict()
    state = {
        "blip.visual_encoder.cls_token": vision["embeddings.class_embedding"],
        "blip.visual_encoder.pos_embed": vision["embeddings.position_embedding"],
        "blip.visual_encoder.patch_embed.proj.weight": vision["embeddings.patch_embedding.weight"],
        "blip.visual_encoder.patch_embed.proj.bias": vision["embeddings.patch_embedding.bias"],
        "blip.visual_encoder.norm.weight": vision["post_layernorm.weight"],
        "blip.visual_encoder.norm.bias": vision["post_layernorm.bias"],
    }
    for i in range(VISION_LAYERS):
        for blip, hf in [
            ("norm1", "layer_norm1"),
            ("attn.qkv", "self_attn.qkv"),
            ("attn.proj", "self_attn.projection"),
            ("norm2", "layer_norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]:
            for p in ("weight", "bias"):
                state[f"blip.visual_encoder.blocks.{i}.{blip}.{p}"] = vision[f"encoder.layers.{i}.{hf}.{p}"]
    for key, value in model.text_encoder.state_dict().items():  # med.py's BertModel uses the same names
        state[f"blip.text_encoder.{key}"] = value
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    for key, value in model.mlp.state_dict().items():
        state[f"mlp.{key}"] = value
    state["blip.vision_proj.weight"] = torch.zeros(8, 32)  # contrastive heads: unused by the score
    state["blip.text_proj.weight"] = torch.zeros(8, 24)
    return state


def test_the_original_checkpoint_loads_into_the_transformers_modules(parts, tmp_path, monkeypatch):
    model, tokenizer, processor = parts
    torch.save(_original_checkpoint(model), tmp_path / "ImageReward.pt")
    vision, text = model.vision_model.config, model.text_encoder.config
    downloads, loads = [], []

    def fake_download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    original_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    reward = ImageRewardReward(
        device="cpu", vision_config=vision, text_config=text, tokenizer=tokenizer, image_processor=processor
    )
    assert not reward.is_loaded
    images = _images()
    scores = reward.score(PROMPTS, images)
    assert downloads == [("THUDM/ImageReward", "ImageReward.pt")] and loads == [True]
    assert reward.model is not model and not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    torch.testing.assert_close(scores, _reference(model, tokenizer, processor, PROMPTS, images))
    reward.score(PROMPTS[:1], images[:1])
    assert len(downloads) == 1  # loaded once


def test_conversion_refuses_unknown_missing_and_misshapen_weights(parts, tmp_path):
    model = parts[0]
    vision, text = model.vision_model.config, model.text_encoder.config
    with pytest.raises(ValueError, match="Unexpected parameters.*itm_head"):
        convert_image_reward_state_dict({"blip.itm_head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Unexpected parameters.*visual_encoder.head"):
        convert_image_reward_state_dict({"blip.visual_encoder.head.weight": torch.zeros(1)})
    state = _original_checkpoint(model)
    del state["mlp.layers.7.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing \['mlp.layers.7.bias'\]"):
        load_image_reward_model(tmp_path / "missing.pt", vision, text)
    state = _original_checkpoint(model)
    state["mlp.layers.7.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_image_reward_model(tmp_path / "shape.pt", vision, text)


def test_released_configs_are_blip_vit_large_and_bert_base():
    vision, text = image_reward_configs()
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (1024, 24, 16, 224)
    assert (text.hidden_size, text.num_hidden_layers, text.encoder_hidden_size, text.vocab_size) == (
        768,
        12,
        1024,
        30524,
    )


def test_builtin_registration_and_call_convention(parts):
    builtin = REWARD_FUNCS["image_reward"]
    assert isinstance(builtin, ImageRewardReward) and not builtin.is_loaded
    assert (builtin.checkpoint_repo, builtin.checkpoint_filename) == ("THUDM/ImageReward", "ImageReward.pt")
    assert (
        resolve_reward_func("THUDM/ImageReward") is builtin and reward_func_name("thudm/imagereward") == "image_reward"
    )
    reward = _reward(parts)
    images = _images(3)
    rewards = call_reward_funcs([reward], PROMPTS[:3], images)
    torch.testing.assert_close(rewards[:, 0], reward.score(PROMPTS[:3], images))
    assert reward(prompts=[], images=[]) == []
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        reward(prompts=PROMPTS[:3], images=images[:2])
