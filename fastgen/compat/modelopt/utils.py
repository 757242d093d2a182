"""``modelopt.torch.fastgen.utils``: classifier-free guidance and ``expand_like``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen.checks import expand_like as _expand_like
from fastgen.dmd.guidance import classifier_free_guidance as _cfg

__all__ = ["classifier_free_guidance", "expand_like"]


def expand_like(x: Tensor, target: Tensor) -> Tensor:
    """``x`` with trailing singleton dims up to ``target.ndim`` (a 0-d ``x`` becomes ``[1, ...]``,
    as modelopt's ``atleast_1d`` makes it)."""
    return _expand_like(torch.atleast_1d(x), target)


def classifier_free_guidance(
    cond_pred: Tensor, uncond_pred: Tensor, guidance_scale: float
) -> Tensor:
    """``cond + (scale - 1) * (cond - uncond)`` (:func:`fastgen.classifier_free_guidance`:
    float64 inside, rounded once, where modelopt rounds each float32 step)."""
    return _cfg(cond_pred, uncond_pred, guidance_scale)
