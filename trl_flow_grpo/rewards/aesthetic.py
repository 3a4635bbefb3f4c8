"""LAION aesthetic predictor v2 (the "improved aesthetic predictor"), DDPO's and Flow-GRPO's aesthetic reward.

An MLP rates the L2-normalised CLIP ViT-L/14 image embedding of an image on the 1-10 scale of the human ratings it
was fitted to (SAC, LAION-Logos and AVA); the prompt is not used:

    score = MLP(image_embedding / ||image_embedding||)

The MLP is the one of https://github.com/christophschuhmann/improved-aesthetic-predictor (`simple_inference.py`):
Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
Linear(16, 1), with no activations. Its weights (`sac+logos+ava1-l14-linearMSE.pth`, a plain state dict) are
fetched from the Hub repository TRL's DDPO example uses, `trl-lib/ddpo-aesthetic-predictor`, file
`aesthetic-model.pth`, and read with `torch.load(weights_only=True)` (or safetensors for a `.safetensors` file).

Models are loaded lazily, on the first call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ._models import BatchedRewardModel

__all__ = [
    "AESTHETIC_CLIP_MODEL_ID",
    "AESTHETIC_PREDICTOR_FILENAME",
    "AESTHETIC_PREDICTOR_REPO",
    "AestheticMLP",
    "AestheticReward",
    "aesthetic_reward",
    "load_aesthetic_mlp",
]

AESTHETIC_CLIP_MODEL_ID = "openai/clip-vit-large-patch14"
AESTHETIC_PREDICTOR_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_PREDICTOR_FILENAME = "aesthetic-model.pth"


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's MLP (layer names `layers.{0,2,4,6,7}` as in its state dict).

    Args:
        input_size: Size of the image embedding (768 for CLIP ViT-L/14).
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """`(N, input_size)` normalised embeddings -> `(N,)` scores."""
        return self.layers(embeds).squeeze(-1)


def load_aesthetic_mlp(path: str | Path) -> AestheticMLP:
    """Build an [`AestheticMLP`] and load the state dict at `path` into it (strictly).

    A `.safetensors` file is read with safetensors; anything else with `torch.load(weights_only=True)`, which reads
    a plain state dict of tensors (as the original `.pth` is) and refuses pickled code.

    Raises:
        ValueError: if the file is not a state dict of the MLP's tensors (missing or unexpected keys, wrong shapes).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or "layers.0.weight" not in state_dict:
        keys = sorted(state_dict)[:8] if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(
            f"{path} is not the aesthetic predictor's state dict (expected keys layers.0.weight ... layers.7.bias "
            f"of the improved-aesthetic-predictor MLP; got {keys})"
        )
    mlp = AestheticMLP(input_size=state_dict["layers.0.weight"].shape[1])
    try:
        mlp.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit the aesthetic predictor's MLP: {error}") from None
    return mlp


class AestheticReward(BatchedRewardModel):
    """The LAION aesthetic score of each image (1-10), as a reward function (`images` -> one float per image).

    On the first call the CLIP vision tower is loaded with `transformers.CLIPVisionModelWithProjection`
    (`use_safetensors=True`) and its image processor with `AutoImageProcessor`, both from `clip_model_id`; the MLP's
    weights are downloaded with `huggingface_hub.hf_hub_download(predictor_repo, predictor_filename)` and read by
    [`load_aesthetic_mlp`]. Everything runs in eval mode under `torch.no_grad()`, `batch_size` images per forward
    pass; the MLP runs in float32 whatever `dtype` the CLIP tower has.

    Args:
        clip_model_id: Hub id or local folder of the CLIP model whose image embeddings the MLP was fitted on.
        predictor_repo: Hub repository holding the MLP's weights.
        predictor_filename: File of the MLP's weights in `predictor_repo` (a `.pth` state dict or `.safetensors`).
        predictor_path: A local file of the MLP's weights, used instead of downloading from `predictor_repo`.
        device: Where to run the models. `None`: the current CUDA device if available, else the CPU; injected
            models then stay where they are.
        dtype: dtype of the CLIP weights when loading.
        batch_size: Images per forward pass.
        offload: Keep the models on the CPU between calls and move them to `device` only while scoring.
        revision: Hub revision of `clip_model_id`.
        clip_model: An already loaded `CLIPVisionModelWithProjection` (or a model whose output has `image_embeds`).
        processor: An already loaded CLIP image processor.
        mlp: An already loaded [`AestheticMLP`].
    """

    def __init__(
        self,
        clip_model_id: str = AESTHETIC_CLIP_MODEL_ID,
        predictor_repo: str = AESTHETIC_PREDICTOR_REPO,
        predictor_filename: str = AESTHETIC_PREDICTOR_FILENAME,
        *,
        predictor_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        offload: bool = False,
        revision: str | None = None,
        clip_model: torch.nn.Module | None = None,
        processor: Any = None,
        mlp: AestheticMLP | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, offload=offload)
        self.clip_model_id = clip_model_id
        self.predictor_repo = predictor_repo
        self.predictor_filename = predictor_filename
        self.predictor_path = predictor_path
        self.revision = revision
        self.clip_model = clip_model
        self.processor = processor
        self.mlp = mlp

    @property
    def is_loaded(self) -> bool:
        """Whether the CLIP tower, its processor and the MLP are in memory (loaded or injected)."""
        return self.clip_model is not None and self.processor is not None and self.mlp is not None

    def _models(self) -> list[torch.nn.Module]:
        return [self.clip_model, self.mlp]

    def _load_models(self) -> bool:
        if self.processor is None:
            from transformers import AutoImageProcessor

            self.processor = AutoImageProcessor.from_pretrained(self.clip_model_id, revision=self.revision)
        if self.mlp is None:
            path = self.predictor_path
            if path is None:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(self.predictor_repo, self.predictor_filename)
            self.mlp = load_aesthetic_mlp(path)
        loaded_here = self.clip_model is None
        if loaded_here:
            from transformers import CLIPVisionModelWithProjection

            self.clip_model = CLIPVisionModelWithProjection.from_pretrained(
                self.clip_model_id, revision=self.revision, dtype=self.dtype, use_safetensors=True
            )
        self.mlp.float()
        return loaded_here

    def _score_batch(self, prompts: None, images: list[Image.Image]) -> torch.Tensor:
        """The MLP's score of the normalised CLIP image embedding of each image of one batch."""
        parameter = next(self.clip_model.parameters())
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = self.clip_model(pixel_values=pixels.to(device=parameter.device, dtype=parameter.dtype))
        embeds = embeds.image_embeds.float()
        embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
        return self.mlp(embeds.to(next(self.mlp.parameters()).device))

    def score(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:  # type: ignore[override]
        """The aesthetic score of each image, a float32 CPU tensor of shape `(len(images),)`."""
        return self._scores(None, images)

    def __call__(self, images: Sequence[Image.Image | np.ndarray], **kwargs: Any) -> list[float]:  # type: ignore[override]
        """Reward-function entry point: one aesthetic score per image; prompts and other columns are ignored.

        Args:
            images: PIL images (any mode; converted to RGB) or `uint8` numpy arrays of shape `(H, W[, C])`.
            **kwargs: `prompts`, other dataset columns and `trainer_state`; ignored.
        """
        return self.score(images).tolist()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(clip_model_id={self.clip_model_id!r}, predictor_repo={self.predictor_repo!r}, "
            f"predictor_filename={self.predictor_filename!r}, loaded={self.is_loaded})"
        )


aesthetic_reward = AestheticReward()
"""The built-in `"aesthetic"` reward: the LAION aesthetic predictor v2 on CLIP ViT-L/14, loaded on first use."""
