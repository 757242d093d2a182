"""One rounding from float64 to the output dtype."""

from __future__ import annotations

import torch
from torch import Tensor


def round_once(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 ``x`` to ``dtype`` once: to nearest, ties to even, as if from the exact value.

    PyTorch converts float64 to bfloat16/float16 through float32, which rounds twice and can be
    off by one ulp when the float32 value lands exactly halfway between two outputs (about one
    input in 2^29). Rounding to float32 *to odd* first (truncate, then set the last bit when
    inexact) keeps what the second rounding needs, so the result is correctly rounded. The
    extra integer ops fuse into the same kernel under ``torch.compile``. Gradients are those of
    the plain cast.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)  # float64 -> float32 and float64 -> float64 are single roundings
    with torch.no_grad():
        exact = x.detach()
        single = exact.to(torch.float32)
        bits = single.view(torch.int32)
        wide = single.to(torch.float64)
        bits = torch.where(wide.abs() > exact.abs(), bits - 1, bits)  # toward zero (sign-magnitude)
        bits = torch.where(wide != exact, bits | 1, bits)  # sticky bit
        once = bits.view(torch.float32).to(dtype)
    if not x.requires_grad:
        return once
    nearest = x.to(dtype)
    # Straight through: the value of `once` (exact: the two differ by at most one ulp), the
    # gradient of the cast. Written as a - (a - b) so that a -0.0 keeps its sign.
    return nearest - (nearest.detach() - once)
