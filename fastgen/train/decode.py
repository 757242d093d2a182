"""Latents to RGB pictures with a pipeline folder's own VAE, as its pipeline decodes them.

Each family's last lines of ``__call__`` in diffusers, replayed on latents that fastgen
sampled: Flux and Qwen-Image unpack their 2x2-patch tokens (the pipeline class's own
``_unpack_latents``); SD3 and Flux undo ``(z - shift_factor) * scaling_factor``; Wan and
Qwen-Image undo the per-channel mean and standard deviation (Wan's video gives its first frame,
Qwen-Image's single frame is dropped); then the pipeline's image processor maps [-1, 1] to
[0, 1]. The test decodes with the pipeline's own modules and compares bitwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["DECODERS", "decode", "pixel_size"]

DECODERS = ("StableDiffusion3Pipeline", "FluxPipeline", "WanPipeline", "QwenImagePipeline")
"""Pipeline classes whose latents :func:`decode` turns into pictures."""

_PACKED = ("FluxPipeline", "QwenImagePipeline")
_STANDARDIZED = ("WanPipeline", "QwenImagePipeline")


def pixel_size(latents: Tensor, pipe: Any) -> tuple[int, int]:
    """The picture's ``(height, width)`` in pixels for a batch of (square, if packed) latents."""
    scale = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial  # Wan's name
    if type(pipe).__name__ in _PACKED:  # [B, (h/2)(w/2), 4C] tokens of a square latent
        side = math.isqrt(latents.shape[1])
        if side * side != latents.shape[1]:
            raise ValueError(
                f"packed latents of {latents.shape[1]} tokens are not a square grid: give the "
                "picture's height and width"
            )
        return 2 * side * scale, 2 * side * scale
    return latents.shape[-2] * scale, latents.shape[-1] * scale


@torch.no_grad()
def decode(
    pipe: Any, latents: Tensor, *, height: int | None = None, width: int | None = None
) -> Tensor:
    """Decode sampled latents into RGB pictures ``[N, 3, H, W]`` in [0, 1] (float32).

    Args:
        pipe: A loaded diffusers pipeline with its ``vae`` (one of :data:`DECODERS`).
        latents: What the transformer denoises: ``[N, C, h, w]`` (SD3), packed tokens
            ``[N, hw/4, 4C]`` (Flux, Qwen-Image) or ``[N, C, T, h, w]`` (Wan).
        height, width: The picture's size in pixels, for packed latents that are not square.

    Raises:
        ValueError: A pipeline class without a decoder here.
    """
    name = type(pipe).__name__
    if name not in DECODERS:
        raise ValueError(f"no decoder for {name}: one of {', '.join(DECODERS)}")
    vae = pipe.vae
    z = latents.to(vae.device, vae.dtype)
    if name in _PACKED:
        if height is None or width is None:
            height, width = pixel_size(latents, pipe)
        z = type(pipe)._unpack_latents(z, height, width, pipe.vae_scale_factor)
    if name in _STANDARDIZED:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        image = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]  # the first frame
    else:
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z, return_dict=False)[0]
    processor = getattr(pipe, "image_processor", None) or pipe.video_processor
    return processor.postprocess(image, output_type="pt").float()
