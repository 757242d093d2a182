"""Sample grids: a batch of images (or latents) as one picture, for PNG files and TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["image_grid", "write_png"]


def image_grid(x: Tensor, columns: int | None = None) -> Tensor:
    """``[B, C, H, W]`` samples as one ``[3, rows * H, columns * W]`` float grid in [0, 1].

    One or three channels are images in [-1, 1]; other channel counts (latents) show their
    first three channels (or the first), each sample scaled to its own range. Video latents
    ``[B, C, T, H, W]`` show their first frame.

    Example:
        >>> image_grid(torch.zeros(6, 1, 4, 4), columns=3).shape
        torch.Size([3, 8, 12])
    """
    if x.ndim == 5:
        x = x[:, :, 0]
    if x.ndim != 4:
        raise ValueError(f"image_grid takes [B, C, H, W] samples, got shape {tuple(x.shape)}")
    x = x.detach().float().cpu()
    b, c, h, w = x.shape
    if c in (1, 3):
        x = (x.clamp(-1, 1) + 1) / 2
    else:
        x = x[:, :3] if c >= 3 else x[:, :1]
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (high - low).clamp_min(1e-12)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = torch.zeros(3, rows * h, columns * w)
    for i in range(b):
        r, col = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = x[i]
    return grid


def write_png(path: str | Path, grid: Tensor) -> None:
    """Write a ``[3, H, W]`` grid in [0, 1] as an 8-bit PNG (needs Pillow)."""
    from PIL import Image

    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(array).save(path)
