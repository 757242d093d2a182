"""Error-free float32 transformations for the float32 precision policy.

Each returns a value and its exact rounding error (Knuth's TwoSum, Dekker's TwoProduct with
Veltkamp's split), so a formula can carry the digits that plain float32 would drop, without
any wider dtype and without fused multiply-add (which eager PyTorch does not promise).
Valid for finite operands below about 2^100 in magnitude (the split multiplies by 2^12 + 1).
"""

from __future__ import annotations

from torch import Tensor

# Veltkamp's constant for float32: 2^ceil(24 / 2) + 1 splits a 24-bit significand into two
# 12-bit halves whose products are exact in float32.
_SPLIT = 4097.0


def two_sum(a: Tensor | float, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly."""
    s = a + b
    b_virtual = s - a
    a_virtual = s - b_virtual
    return s, (a - a_virtual) + (b - b_virtual)


def split(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` with ``hi + lo == a`` exactly and each half 12 significant bits."""
    c = a * _SPLIT
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(p, e)`` with ``p = fl(a * b)`` and ``p + e == a * b`` exactly."""
    p = a * b
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def one_minus(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` with ``hi + lo == 1 - t`` exactly (``lo`` is 0 for t >= 0.5)."""
    return two_sum(1.0, -t)


def add_prod(x: Tensor, a: Tensor, b: Tensor, x_err: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """``x + x_err + a * b`` as ``(hi, lo)``: ``hi`` the float32 result, ``lo`` what it misses.

    The product is exact and the sum's error carried; ``x_err`` is the exact low part of a
    difference that :func:`two_sum` made. ``lo`` lets :func:`fastgen._rounding.round_pair`
    round to bf16/fp16 as if from the exact value.
    """
    p, e = two_prod(a, b)
    s, q = two_sum(x, p)
    return _renormalize(s, q + (e + x_err))


def lerp(x0: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 - t) * x0 + t * eps = x0 - t * x0 + t * eps`` as ``(hi, lo)``, products exact.

    ``hi`` is exact at t = 0 (``x0``) and t = 1 (``eps``).
    """
    p1, e1 = two_prod(t, x0)
    p2, e2 = two_prod(t, eps)
    s1, q1 = two_sum(x0, -p1)
    s2, q2 = two_sum(s1, p2)
    return _renormalize(s2, q2 + (q1 + (e2 - e1)))


def _renormalize(s: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    # Fast TwoSum: |w| is below one ulp of s (or s is 0, and then lo is 0).
    hi = s + w
    return hi, w - (hi - s)


def div_one_minus(num: Tensor, t: Tensor, floor: float) -> Tensor:
    """``num / max(1 - t, floor)`` with ``1 - t`` taken exactly (``hi + lo``).

    ``q (1 - lo / hi)`` differs from ``num / (hi + lo)`` by ``(lo / hi)^2 < 2^-48`` relative.
    """
    hi, lo = one_minus(t)
    hi = hi.clamp_min(floor)  # only for t > 1 - floor, where lo is 0
    q = num / hi
    return q - q * (lo / hi)
