"""One rounding from the compute dtype (float64, or float32 under that policy) to the output."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def round_once(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 ``x`` to ``dtype`` once: to nearest, ties to even, as if from the exact value.

    PyTorch converts float64 to bfloat16/float16 through float32, which rounds twice and can be
    off by one ulp when the float32 value lands exactly halfway between two outputs (about one
    input in 2^29). Rounding to float32 *to odd* first (truncate, then set the last bit when
    inexact) keeps what the second rounding needs, so the result is correctly rounded. Eager
    mode does that with a float32 round trip; under ``torch.compile`` it works on float64's bits
    (the same result, the faster form there, fused into the producer's kernel; the benchmarks
    page has the measurements). Gradients are those of the plain cast. A float32
    ``x`` (the float32 policy) is cast directly: one rounding already.
    """
    if x.dtype != torch.float64 or dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)  # float64 -> float32, float32 -> anything: single roundings
    with torch.no_grad():
        exact = x.detach()
        odd = _odd_from_bits(exact) if torch.compiler.is_compiling() else _odd_round_trip(exact)
        once = odd.to(dtype)
    if not x.requires_grad:
        return once
    nearest = x.to(dtype)
    # Straight through: the value of `once` (exact: the two differ by at most one ulp), the
    # gradient of the cast. Written as a - (a - b) so that a -0.0 keeps its sign.
    return nearest - (nearest.detach() - once)


def _odd_round_trip(exact: Tensor) -> Tensor:
    """float64 -> float32 rounded to odd: the nearest float32, stepped toward zero when it lies
    beyond ``exact``, with the last bit set when inexact."""
    single = exact.to(torch.float32)
    bits = single.view(torch.int32)
    wide = single.to(torch.float64)
    bits = torch.where(wide.abs() > exact.abs(), bits - 1, bits)  # toward zero (sign-magnitude)
    bits = torch.where(wide != exact, bits | 1, bits)  # sticky bit
    return bits.view(torch.float32)


def _odd_from_bits(exact: Tensor) -> Tensor:
    """The same float32 as :func:`_odd_round_trip`, from float64's bits: clear the fraction bits
    float32 drops and set the lowest kept bit when any was set. float32 keeps 24 significant bits
    down to 2^-126 and a fixed grid of 2^-149 below, so under 2^-126 one more bit drops per
    binade (at most 51: anything smaller rounds to zero in bfloat16 and float16 either way)."""
    bits = exact.view(torch.int64)
    biased = (bits >> 52) & 0x7FF  # float64's biased exponent; 897 is 2^-126's
    drop = 29 + (897 - biased).clamp(0, 22)
    mask = (torch.ones_like(bits) << drop) - 1
    odd = (bits & ~mask) | (((bits & mask) != 0).to(torch.int64) << drop)
    return odd.view(torch.float64).to(torch.float32)  # exact: the value fits float32


def round_pair(hi: Tensor, lo: Tensor, dtype: torch.dtype) -> Tensor:
    """Round the float32 pair ``hi + lo`` (``|lo|`` below half an ulp of ``hi``) to ``dtype`` once.

    The float32 policy's compensated formulas end in such a pair. ``hi`` alone would round
    twice when it lands on a bf16/fp16 tie that ``lo`` breaks; rounding ``hi`` to odd in the
    direction of ``lo`` first (as :func:`round_once` does from float64) makes the final
    rounding that of ``hi + lo``. Gradients are those of ``hi``.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return hi.to(dtype)
    with torch.no_grad():
        bits = hi.detach().view(torch.int32)
        inexact = lo != 0
        # hi + lo is nearer zero than hi: step hi's magnitude down (sign-magnitude bits).
        bits = torch.where(inexact & ((lo > 0) != (hi > 0)), bits - 1, bits)
        once = torch.where(inexact, bits | 1, bits).view(torch.float32).to(dtype)
    if not hi.requires_grad:
        return once
    nearest = hi.to(dtype)
    return nearest - (nearest.detach() - once)


def round_scalar(x: float, dtype: torch.dtype, mode: str = "nearest") -> float:
    """A Python float rounded once to ``dtype``'s grid: ``"nearest"`` (ties to even), ``"down"``
    or ``"up"``. Host arithmetic on constants (bounds, ladder rungs), exact: the result is a
    Python float that ``dtype`` represents, so putting it in a tensor rounds nothing.
    """
    if dtype == torch.float64 or x == 0.0 or not abs(x) < math.inf:  # 0, inf, NaN: as they are
        return x
    digits, min_exponent, largest = _GRIDS[dtype]
    # The spacing of dtype's grid around x (2^exponent), subnormals included.
    exponent = max(math.frexp(x)[1] - digits, min_exponent)
    scaled = math.ldexp(x, -exponent)  # exact: a power-of-two scaling
    whole = {"nearest": round, "down": math.floor, "up": math.ceil}[mode](scaled)
    out = math.ldexp(whole, exponent)
    if out > largest:  # past the largest finite value: overflow, unless rounding down
        return largest if mode == "down" else math.inf
    if out < -largest:
        return -largest if mode == "up" else -math.inf
    return out


def _grid(dtype: torch.dtype) -> tuple[int, int, float]:
    info = torch.finfo(dtype)
    digits = 2 - math.frexp(info.eps)[1]  # significant bits: eps = 2^(1 - digits)
    return digits, math.frexp(info.smallest_normal)[1] - digits, info.max


# Python constants per dtype (torch.finfo cannot be traced by Dynamo).
_GRIDS = {dtype: _grid(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
