"""classifier_free_guidance and check_scale: the float64 formula rounded once, per-sample scales,
the float32 policy's compensated path, and the argument checks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import correctly_rounded

import fastgen
from fastgen.dmd.guidance import check_scale

LOW = [torch.float32, torch.bfloat16, torch.float16]


def reference(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """The formula in float64, written out: y_u + s (y_c - y_u) (exact for these inputs)."""
    c, u = cond.double(), uncond.double()
    s = scale.double()[:, None] if isinstance(scale, torch.Tensor) else scale
    return u + s * (c - u)


def inputs(dtype, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, 8, generator=g).to(dtype)
    uncond = (cond.float() + 0.3 * torch.randn(n, 8, generator=g)).to(dtype)
    return cond, uncond


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("scale", [3.0, 0.5, -1.25], ids=["s3", "s0.5", "s-1.25"])
def test_float_scale_is_the_formula_rounded_once(dtype, scale):
    cond, uncond = inputs(dtype)
    out = fastgen.classifier_free_guidance(cond, uncond, scale)
    assert out.dtype == dtype
    assert torch.equal(out, correctly_rounded(reference(cond, uncond, scale), dtype))


@pytest.mark.parametrize("dtype", LOW)
def test_per_sample_scales_equal_one_call_per_scale(dtype):
    cond, uncond = inputs(dtype, n=6)
    scales = torch.tensor([1.0, 2.0, 3.5, 0.0, -2.0, 7.25])
    out = fastgen.classifier_free_guidance(cond, uncond, scales)
    assert torch.equal(out, correctly_rounded(reference(cond, uncond, scales), dtype))
    for i, s in enumerate(scales.tolist()):
        assert torch.equal(out[i], fastgen.classifier_free_guidance(cond[i:i + 1], uncond[i:i + 1], s)[0])  # fmt: skip


@pytest.mark.parametrize("policy", ["float64", "float32"])
def test_scale_one_returns_cond_exactly(policy):
    cond, uncond = inputs(torch.bfloat16, n=64)
    with fastgen.use_precision(policy):
        assert torch.equal(fastgen.classifier_free_guidance(cond, uncond, 1.0), cond)
        assert torch.equal(fastgen.classifier_free_guidance(cond, uncond, torch.ones(64)), cond)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float", "tensor"])
def test_float32_policy_matches_float64_in_low_precision(dtype, per_sample):
    cond, uncond = inputs(dtype, n=20000, seed=1)
    scale = torch.full((20000,), 4.5) if per_sample else 4.5
    with fastgen.use_precision("float32"):
        out = fastgen.classifier_free_guidance(cond, uncond, scale)
    want = correctly_rounded(reference(cond, uncond, scale), dtype)
    equal = (out == want).float().mean().item()
    assert equal >= 0.999
    below = torch.nextafter(want, torch.full_like(want, -math.inf))
    above = torch.nextafter(want, torch.full_like(want, math.inf))
    assert bool(((out >= below) & (out <= above)).all())  # within one ulp everywhere


def test_float32_policy_keeps_the_digits_the_difference_loses():
    # cond and uncond of very different magnitude: cond - uncond is inexact in float32, and
    # plain float32 arithmetic is off; the compensated path rounds the exact value once.
    g = torch.Generator().manual_seed(2)
    cond = 1.0 + torch.rand(4096, 1, generator=g)
    uncond = 1e-6 * torch.randn(4096, 1, generator=g)
    scale = 7.0
    exact = [
        Fraction(u) + Fraction(scale) * (Fraction(c) - Fraction(u))
        for c, u in zip(cond.flatten().tolist(), uncond.flatten().tolist())
    ]
    exact32 = torch.tensor([float(x) for x in exact]).float().view(-1, 1)
    with fastgen.use_precision("float32"):
        out = fastgen.classifier_free_guidance(cond, uncond, scale)
    assert torch.equal(out, exact32)  # correctly rounded here
    naive = uncond + scale * (cond - uncond)
    assert not torch.equal(naive, exact32)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: fastgen.classifier_free_guidance(c.tolist(), c, 2.0), TypeError, "^cond"),
        (lambda c: fastgen.classifier_free_guidance(c, c.tolist(), 2.0), TypeError, "^uncond"),
        (lambda c: fastgen.classifier_free_guidance(c, c, True), TypeError, "^scale must be a finite float, got True$"),
        (lambda c: fastgen.classifier_free_guidance(c, c, "3"), TypeError, "^scale must be a finite float, got '3'$"),
        (lambda c: fastgen.classifier_free_guidance(c, c, math.inf), TypeError, "^scale must be a finite float, got inf$"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.ones(2, 3))


def test_check_scale_accepts_ints_and_floats():
    check_scale("guidance_scale", 3)
    check_scale("guidance_scale", 2.5)
    with pytest.raises(TypeError, match=r"^guidance_scale must be a finite float, got nan$"):
        check_scale("guidance_scale", math.nan)


def test_per_sample_scales_are_used_in_float64():
    # s - 1 for a float32 s below 1/2 is not a float32 value: it must be formed in float64
    g = torch.Generator().manual_seed(3)
    cond, uncond = inputs(torch.float32, n=4096, seed=4)
    scales = torch.rand(4096, generator=g) * 0.5
    out = fastgen.classifier_free_guidance(cond, uncond, scales)
    assert torch.equal(out, reference(cond, uncond, scales).float())
