r"""Classifier-free guidance, DMD2's convention."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastgen import _compensated as comp
from fastgen.checks import check_pair, expand_like
from fastgen.precision import compute_once

__all__ = ["check_scale", "classifier_free_guidance"]


def check_scale(name: str, scale: object) -> None:
    """Raise ``TypeError`` unless ``scale`` is a finite real number.

    The finiteness check runs in eager mode only: under ``torch.compile`` a float argument
    may be a symbol whose value is not known while tracing.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a finite float, got {scale!r}")
    if not torch.compiler.is_compiling() and not math.isfinite(scale):
        raise TypeError(f"{name} must be a finite float, got {scale!r}")


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float | Tensor) -> Tensor:
    r"""Guide a conditional prediction away from the unconditional one.

    .. math::

        \hat y = y_c + (s - 1)\,(y_c - y_u)

    (equal to the usual :math:`y_u + s (y_c - y_u)`; ``s = 1`` returns :math:`y_c`).

    Args:
        cond: Conditional prediction, shape ``[B, ...]``.
        uncond: Unconditional prediction, same shape.
        scale: The guidance scale: a finite float, or a tensor ``[B]`` (one per sample).

    Returns:
        The guided prediction in ``cond``'s dtype: the float64 value rounded once (compensated
        float32 under the float32 policy).

    Example:
        >>> import torch
        >>> classifier_free_guidance(torch.tensor([[2.0]]), torch.tensor([[1.0]]), 3.0)
        tensor([[4.]])
    """
    check_pair("cond", cond, "uncond", uncond)
    if isinstance(scale, Tensor):
        scale = expand_like(scale, cond)
    else:
        check_scale("scale", scale)

    def guided_f32(cond: Tensor, uncond: Tensor, s: Tensor | float) -> tuple[Tensor, Tensor]:
        # The difference and the product carried exactly (s - 1 rounded to float32 once).
        s_minus_1 = s - 1.0 if isinstance(s, Tensor) else torch.full_like(cond[:0].sum(), s - 1.0)
        d, d_err = comp.two_sum(cond, -uncond)
        return comp.add_prod(cond, s_minus_1, d, s_minus_1 * d_err)

    return compute_once(
        lambda cond, uncond, s: cond + (s - 1.0) * (cond - uncond),
        *(cond, uncond, scale),
        dtype=cond.dtype,
        float32=guided_f32,
    )
