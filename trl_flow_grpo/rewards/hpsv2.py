"""HPSv2.1 reward (Human Preference Score v2, Wu et al., 2023): an OpenCLIP ViT-H/14 fine-tuned on human choices.

The score of an image for its prompt is the cosine similarity of the fine-tuned model's L2-normalised image and
text features, as the reference `hpsv2.score` computes it (`image_features @ text_features.T`, diagonal):

    score = cosine(text_features, image_features)

Scores of text-to-image models are around 0.24-0.32 (papers often print them x100).

Loading needs OpenCLIP (`pip install "trl-flow-grpo[hpsv2]"`, which installs `open_clip_torch`): the architecture
is built with `open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)` (no base weights are downloaded:
the checkpoint replaces all of them), the checkpoint `HPS_v2.1_compressed.pt` is fetched from the Hub repository
`xswu/HPSv2` and read with `torch.load(weights_only=True)`, and its `state_dict` entry is loaded strictly. The text
goes through `open_clip.get_tokenizer("ViT-H-14")` and the image through OpenCLIP's validation transform.

What is tested offline: the scoring path (preprocessing calls, batching, the cosine) with a tiny model object of the
same interface, and the loading code against a stand-in `open_clip` module and a tiny checkpoint; the real ViT-H/14
checkpoint is not loaded in the test suite (no network, and OpenCLIP needs torchvision).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from ._models import BatchedRewardModel, import_extra

__all__ = [
    "HPSV2_ARCHITECTURE",
    "HPSV2_CHECKPOINT_FILENAME",
    "HPSV2_CHECKPOINT_REPO",
    "HPSv2Reward",
    "hpsv2_reward",
    "load_hpsv2_state_dict",
]

HPSV2_CHECKPOINT_REPO = "xswu/HPSv2"
HPSV2_CHECKPOINT_FILENAME = "HPS_v2.1_compressed.pt"
HPSV2_ARCHITECTURE = "ViT-H-14"


def load_hpsv2_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of an HPSv2 checkpoint: its `state_dict` entry (or the file itself if it is a plain state
    dict), read with `torch.load(weights_only=True)`, or with safetensors for a `.safetensors` file.

    Raises:
        ValueError: if the file holds no state dict of tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(
            f"{path} is not an HPSv2 checkpoint: expected a dict with a 'state_dict' of tensors (as "
            f"{HPSV2_CHECKPOINT_FILENAME}) or a plain state dict"
        )
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


class HPSv2Reward(BatchedRewardModel):
    """HPSv2.1 score of each image for its prompt, as a reward function (`prompts`, `images` -> one float per image).

    Loaded on the first call (see the module docstring), moved to `device`, put in eval mode, run under
    `torch.no_grad()` in batches of `batch_size`; features are compared in float32.

    Args:
        checkpoint_repo: Hub repository of the checkpoint.
        checkpoint_filename: The checkpoint file in `checkpoint_repo` (`HPS_v2_compressed.pt` for HPSv2.0).
        checkpoint_path: A local checkpoint file, used instead of downloading from `checkpoint_repo`.
        architecture: The OpenCLIP architecture of the checkpoint.
        device: Where to run the model. `None`: the current CUDA device if available, else the CPU; an injected
            `model` then stays where it is.
        dtype: dtype of the model weights (applied to a loaded model; ignored for an injected one).
        batch_size: Images per forward pass.
        offload: Keep the model on the CPU between calls and move it to `device` only while scoring.
        model: An already loaded model with OpenCLIP's `encode_image(pixels, normalize=)` and
            `encode_text(tokens, normalize=)`.
        preprocess: An image transform (PIL image -> `(3, H, W)` tensor), e.g. OpenCLIP's validation transform.
        tokenizer: A tokenizer (list of strings -> `(N, context_length)` token ids), e.g. OpenCLIP's.
    """

    reward_name = "HPSv2"

    def __init__(
        self,
        checkpoint_repo: str = HPSV2_CHECKPOINT_REPO,
        checkpoint_filename: str = HPSV2_CHECKPOINT_FILENAME,
        *,
        checkpoint_path: str | Path | None = None,
        architecture: str = HPSV2_ARCHITECTURE,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        offload: bool = False,
        model: torch.nn.Module | None = None,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, offload=offload)
        self.checkpoint_repo = checkpoint_repo
        self.checkpoint_filename = checkpoint_filename
        self.checkpoint_path = checkpoint_path
        self.architecture = architecture
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @property
    def is_loaded(self) -> bool:
        """Whether the model, its image transform and its tokenizer are in memory (loaded or injected)."""
        return self.model is not None and self.preprocess is not None and self.tokenizer is not None

    def _models(self) -> list[torch.nn.Module]:
        return [self.model]

    def _load_models(self) -> bool:
        loaded_here = self.model is None
        if not self.is_loaded:
            open_clip = import_extra("open_clip", "open_clip_torch", "hpsv2", "hpsv2")
            if self.model is None or self.preprocess is None:
                model, _, preprocess_val = open_clip.create_model_and_transforms(self.architecture, pretrained=None)
                if self.model is None:
                    path = self.checkpoint_path
                    if path is None:
                        from huggingface_hub import hf_hub_download

                        path = hf_hub_download(self.checkpoint_repo, self.checkpoint_filename)
                    model.load_state_dict(load_hpsv2_state_dict(path), strict=True)
                    self.model = model.to(self.dtype)
                if self.preprocess is None:
                    self.preprocess = preprocess_val
            if self.tokenizer is None:
                self.tokenizer = open_clip.get_tokenizer(self.architecture)
        return loaded_here

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """HPSv2 score (cosine) of each image of one batch for its prompt."""
        parameter = next(self.model.parameters())
        pixels = torch.stack([self.preprocess(image) for image in images])
        tokens = self.tokenizer(prompts)
        image_features = self.model.encode_image(
            pixels.to(device=parameter.device, dtype=parameter.dtype), normalize=True
        )
        text_features = self.model.encode_text(tokens.to(parameter.device), normalize=True)
        image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
        text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
        return (image_features * text_features).sum(dim=-1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(checkpoint_repo={self.checkpoint_repo!r}, "
            f"checkpoint_filename={self.checkpoint_filename!r}, architecture={self.architecture!r}, "
            f"loaded={self.is_loaded})"
        )


hpsv2_reward = HPSv2Reward()
"""The built-in `"hpsv2"` reward: HPSv2.1 (`xswu/HPSv2`, `HPS_v2.1_compressed.pt`), loaded on first use."""
