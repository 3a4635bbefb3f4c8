"""Families whose sizes are multiples of twice the VAE factor: FLUX.1 and Qwen-Image (latents packed 2x2 here, and
the shifted grid); Z-Image, FLUX.2 and Qwen-Image 2.1 build on it for the sizes and override what differs."""

import numpy as np
import torch

from .base import PipelineAdapter


class PackedLatentAdapter(PipelineAdapter):
    """Shared by FLUX and Qwen-Image: latents (B, C, H/f, W/f) are packed into (B, H/2f * W/2f, 4C) tokens for the
    transformer, sizes are multiples of 2f (f = the VAE's scale factor), and the grid is their pipelines':
    `linspace(1, 1/T, T)` shifted by `mu`, which grows with the number of packed tokens.

    The trajectory keeps latents unpacked: packing only permutes elements, so Gaussian noise and the per-element
    log-probabilities are the same either way, and the sampling code needs no family-specific branch.
    """

    @property
    def _factor(self) -> int:
        """Pixels per packed latent token along one side: the VAE's factor times the 2x2 packing."""
        return self.pipeline.vae_scale_factor * 2

    def check_inputs(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value % self._factor:
                raise ValueError(
                    f"{name}={value} is not divisible by {self._factor} (VAE scale factor "
                    f"{self.pipeline.vae_scale_factor} x 2x2 latent packing); use "
                    f"{name}={max(self._factor, value - value % self._factor)}."
                )

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.transformer.config.in_channels // 4, 2 * (height // self._factor), 2 * (width // self._factor))

    def sigmas(self, num_inference_steps: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if self._scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = self._shift_mu((height // self._factor) * (width // self._factor), default_max_shift=1.15)
        self._scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        return self._scheduler.sigmas.to(device=device, dtype=torch.float32)

    def _timestep(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The transformer's timestep: the pipelines pass (sigma * num_train_timesteps) / 1000; the same here, to the
        last bit."""
        return (sigma * self._scheduler.config.num_train_timesteps).to(dtype) / 1000

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C), as the pipelines' `_pack_latents`."""
        batch, channels, height, width = latents.shape
        packed = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return packed.reshape(batch, (height // 2) * (width // 2), channels * 4)

    @staticmethod
    def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h/2 * w/2, 4C) -> (B, C, h, w) for latent sizes h, w."""
        batch, _, features = packed.shape
        latents = packed.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(batch, features // 4, height, width)
