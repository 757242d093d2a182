"""`round_once` and `round_pair` against an exact-rational oracle, over the whole range of the
output dtype: the double-rounding ties, subnormals, the overflow tie, zeros, inf and NaN."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from fastgen._rounding import round_once, round_pair

# (significant bits, exponent of the smallest normal, largest finite) written out, not looked up.
GRID = {
    torch.bfloat16: (8, -126, (2 - 2.0**-7) * 2.0**127),
    torch.float16: (11, -14, 65504.0),
}


def exact_round(v: float | Fraction, dtype: torch.dtype) -> float:
    """The IEEE round-to-nearest-even of the rational ``v`` to ``dtype``, from the definition."""
    if isinstance(v, float) and (v == 0 or not math.isfinite(v)):
        return v  # signed zeros and infinities are on every grid
    v = Fraction(v)
    if v == 0:
        return 0.0
    digits, e_min, largest = GRID[dtype]
    mag = abs(v)
    e = max(math.floor(math.log2(mag)), e_min)
    while Fraction(2) ** e > mag and e > e_min:  # log2 of a rational can be off by one
        e -= 1
    while Fraction(2) ** (e + 1) <= mag:
        e += 1
    q = Fraction(2) ** (e - digits + 1)  # the grid's spacing around v
    n, rest = divmod(mag, q)
    if rest > q / 2 or (rest == q / 2 and n % 2 == 1):
        n += 1
    out = n * q
    if out > Fraction(largest):
        out = math.inf  # IEEE: past the largest finite value after rounding
    return math.copysign(float(out), float(v))


def _ties(dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    """float32 values that are exact ties of dtype's grid: normal, subnormal and the overflow tie."""
    digits, e_min, largest = GRID[dtype]
    k = torch.randint(0, 2 ** (digits - 1), (n,), generator=gen).double()
    normal_e = torch.randint(e_min, 15 if dtype == torch.float16 else 120, (n,), generator=gen)
    # significands 2^(digits-1) + k + 1/2 in [2^(digits-1), 2^digits): halfway between two
    spacing = 2.0 ** (normal_e - digits + 1).double()
    normal = (2.0 ** (digits - 1) + k + 0.5) * spacing
    sub = (k + 0.5) * 2.0 ** (e_min - digits + 1)  # between subnormals (and 0)
    top = largest + 2.0 ** (math.frexp(largest)[1] - digits - 1)  # halfway to the next power of 2
    ties = torch.cat([normal, sub, torch.tensor([top])])
    return ties * torch.where(torch.rand(ties.shape, generator=gen) < 0.5, -1.0, 1.0)


def _traced(fn):
    """``fn`` as Dynamo captures it (run op by op): round_once's compiled-mode formula."""
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)


@pytest.mark.parametrize("mode", ["eager", "traced"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_once_matches_the_exact_rounding_everywhere(dtype, mode):
    gen = torch.Generator().manual_seed(11)
    ties = _ties(dtype, 300, gen)
    assert torch.equal(ties.float().double(), ties)  # ties are float32 values
    # Nudged by less than float32 keeps: float32 rounds them back onto the tie.
    nudge = ties.abs() * 2.0**-40 * torch.randn(ties.shape, generator=gen, dtype=torch.float64)
    _, _, largest = GRID[dtype]
    specials = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, largest, -largest, 2.0**-200, -(2.0**-200), 1e300]
    )
    wide = torch.randn(400, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -8, 5, (400,), generator=gen
    )
    x = torch.cat([ties, ties + nudge, specials, wide])
    assert bool(((ties + nudge).float().double() == ties).all())
    fn = (lambda x: round_once(x, dtype)) if mode == "eager" else _traced(round_once)
    out = fn(x) if mode == "eager" else fn(x, dtype)
    want = torch.tensor([exact_round(v, dtype) for v in x.tolist()], dtype=torch.float64)
    assert out.dtype == dtype
    assert torch.equal(out.double(), want)
    assert torch.equal(torch.signbit(out), torch.signbit(want))
    # torch's own conversion rounds twice on these: the test sees the difference
    assert not torch.equal(x.to(dtype).double(), want)
    nan = torch.tensor([math.nan, -math.nan], dtype=torch.float64)
    assert torch.isnan(fn(nan) if mode == "eager" else fn(nan, dtype)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_pair_matches_the_exact_rounding_of_the_sum(dtype):
    gen = torch.Generator().manual_seed(12)
    hi = _ties(dtype, 300, gen).float()
    lo = hi * 2.0**-30 * torch.randn(hi.shape, generator=gen)
    lo = torch.where(torch.rand(hi.shape, generator=gen) < 0.2, torch.zeros_like(lo), lo)
    out = round_pair(hi, lo, dtype)
    want = [
        exact_round(Fraction(h) + Fraction(lw), dtype) for h, lw in zip(hi.tolist(), lo.tolist())
    ]
    assert torch.equal(out.double(), torch.tensor(want, dtype=torch.float64))
    assert not torch.equal(hi.to(dtype), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_once_traces_in_one_frame(dtype):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(lambda x: round_once(x, dtype), backend=counter, fullgraph=True)
    x = _ties(dtype, 50, torch.Generator().manual_seed(13))
    assert torch.equal(fn(x), round_once(x, dtype))
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_pair_under_grad_keeps_the_value_and_passes_the_gradient_of_hi(dtype):
    hi = _ties(dtype, 50, torch.Generator().manual_seed(14)).float()[:-1]  # finite ones
    lo = hi * 2.0**-30
    want = round_pair(hi, lo, dtype)
    hi_grad = hi.clone().requires_grad_(True)
    out = round_pair(hi_grad, lo, dtype)
    assert out.requires_grad and torch.equal(out.detach(), want)
    (out.float() * torch.arange(len(hi))).sum().backward()
    assert torch.equal(hi_grad.grad, torch.arange(len(hi), dtype=torch.float32))


def _grid_neighbours(x: float, dtype: torch.dtype) -> tuple[float, float]:
    """The largest grid value <= x and the smallest >= x (inf past the largest finite)."""
    digits, e_min, largest = GRID[dtype]
    if abs(x) > largest:
        return (largest, math.inf) if x > 0 else (-math.inf, -largest)
    v = Fraction(x)
    e = max(math.frexp(abs(x))[1] - 1, e_min) if x else e_min
    q = Fraction(2) ** (e - digits + 1)
    return float(math.floor(v / q) * q), float(math.ceil(v / q) * q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_scalar_up_and_down_against_the_grid(dtype):
    from fastgen._rounding import round_scalar

    _, _, largest = GRID[dtype]
    values = [1.0 / 3, -1.0 / 3, 2.0**-140, -(2.0**-140), 7e4, -7e4, 1e39, -1e39, largest, -largest]
    for x in values:
        down, up = _grid_neighbours(x, dtype)
        assert round_scalar(x, dtype, "down") == down, (x, "down")
        assert round_scalar(x, dtype, "up") == up, (x, "up")
        assert round_scalar(x, dtype) == exact_round(x, dtype), (x, "nearest, the default")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["nearest", "down", "up"])
def test_round_scalar_keeps_zeros_infinities_and_nan(dtype, mode):
    from fastgen._rounding import round_scalar

    for x in (0.0, -0.0, math.inf, -math.inf):
        out = round_scalar(x, dtype, mode)
        assert out == x and math.copysign(1.0, out) == math.copysign(1.0, x)
    assert math.isnan(round_scalar(math.nan, dtype, mode))
