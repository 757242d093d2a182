"""Elementwise primitives: eager vs compiled vs the copy roofline vs the FastGen algorithm.

Each (dtype, size) group holds: a ``clone()`` of the same bytes (the copy bandwidth reference),
the FastGen-style eager anchor, and every primitive eager and compiled. Ratios in
``extra_info`` come from medians measured earlier in the same run.
"""

from __future__ import annotations

import pytest
import torch
from common import median, peak_extra_bytes, run_timed

import fastgen

DTYPES = [torch.bfloat16, torch.float32]
ROWS = 8  # batch size: t has one value per row


def fastgen_style_forward_process(x0, eps, t):
    """FastGen ``RFNoiseSchedule.forward_process``'s algorithm, eager, from its description.

    A validity assert that syncs with the device, every input cast to float64, t expanded,
    multiply and add, cast back.
    """
    assert bool((t >= 0).all()) and bool((t <= 1).all()), "t must lie in [0, 1]"
    dtype = x0.dtype
    x0, eps, t = x0.to(torch.float64), eps.to(torch.float64), t.to(torch.float64)
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return ((1 - t) * x0 + t * eps).to(dtype)


OPS = {
    "add_noise": fastgen.add_noise,
    "pred_x0_from_flow": fastgen.pred_x0_from_flow,
    "pred_noise_to_pred_x0": fastgen.pred_noise_to_pred_x0,
    "x0_to_eps": fastgen.x0_to_eps,
    "x0_to_flow": fastgen.x0_to_flow,
    "RFForward": fastgen.RFForward(),
    "ParamConverter(flow->eps)": fastgen.ParamConverter("flow", "eps"),
}


def inputs(numel, dtype, device):
    a = torch.randn(ROWS, numel // ROWS, device=device, dtype=dtype)
    b = torch.randn(ROWS, numel // ROWS, device=device, dtype=dtype)
    return a, b, torch.rand(ROWS, device=device)


def moved_bytes(a: torch.Tensor, t: torch.Tensor) -> int:
    """Two tensors read, one written, t read."""
    return 3 * a.numel() * a.element_size() + t.numel() * t.element_size()


def record(benchmark, medians, key, nbytes, copy_key=None, eager_key=None, anchor_key=None):
    m = median(benchmark)
    benchmark.extra_info["bytes_moved"] = nbytes
    if m is None:  # smoke mode: nothing was timed
        return
    medians[key] = m
    benchmark.extra_info["gb_per_s"] = nbytes / m / 1e9
    if copy_key in medians:
        copy_bw = medians[copy_key]
        benchmark.extra_info["fraction_of_copy_bw"] = (nbytes / m) / copy_bw
    if eager_key in medians:
        benchmark.extra_info["speedup_vs_eager"] = medians[eager_key] / m
    if anchor_key in medians:
        benchmark.extra_info["speedup_vs_fastgen_anchor"] = medians[anchor_key] / m


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy(benchmark, medians, device, dtype, numel):
    a = torch.randn(numel, device=device, dtype=dtype)
    benchmark.group = f"{dtype} n={numel}"
    benchmark.extra_info.update(
        op="clone() (copy reference)", mode="eager", dtype=str(dtype), numel=numel
    )
    run_timed(benchmark, a.clone, device)
    nbytes = 2 * a.numel() * a.element_size()
    record(benchmark, medians, ("copy", dtype, numel), nbytes)
    if ("copy", dtype, numel) in medians:  # bytes per second, for the fractions below
        medians[("copy_bw", dtype, numel)] = nbytes / medians[("copy", dtype, numel)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fastgen_anchor(benchmark, medians, device, dtype, numel):
    a, b, t = inputs(numel, dtype, device)
    benchmark.group = f"{dtype} n={numel}"
    benchmark.extra_info.update(
        op="FastGen-style eager (anchor)", mode="eager", dtype=str(dtype), numel=numel
    )
    out = run_timed(benchmark, fastgen_style_forward_process, device, (a, b, t))
    # The same numbers, except where torch's float64 -> bf16 conversion rounds twice: there
    # fastgen's value is the nearer one to the exact float64 result.
    mine = fastgen.add_noise(a, b, t)
    differ = out != mine
    t64 = t.double().view(-1, *([1] * (a.ndim - 1))).expand_as(a)[differ]
    exact = (1 - t64) * a[differ].double() + t64 * b[differ].double()
    err_anchor, err_mine = (
        (out[differ].double() - exact).abs(),
        (mine[differ].double() - exact).abs(),
    )
    assert bool((err_mine < err_anchor).all())
    record(
        benchmark, medians, ("anchor", dtype, numel), moved_bytes(a, t), ("copy_bw", dtype, numel)
    )
    benchmark.extra_info["peak_extra_over_output"] = peak_extra_bytes(
        fastgen_style_forward_process, device, (a, b, t)
    ) / (out.numel() * out.element_size())


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_primitive(benchmark, medians, device, dtype, numel, op, mode):
    a, b, t = inputs(numel, dtype, device)
    fn = OPS[op] if mode == "eager" else torch.compile(OPS[op], fullgraph=True)
    benchmark.group = f"{dtype} n={numel}"
    benchmark.extra_info.update(op=op, mode=mode, dtype=str(dtype), numel=numel)
    out = run_timed(benchmark, fn, device, (a, b, t))
    assert torch.equal(out, OPS[op](a, b, t))  # compiled is bitwise equal to eager
    benchmark.extra_info["peak_extra_over_output"] = peak_extra_bytes(fn, device, (a, b, t)) / (
        out.numel() * out.element_size()
    )
    record(
        benchmark,
        medians,
        (op, mode, dtype, numel),
        moved_bytes(a, t),
        copy_key=("copy_bw", dtype, numel),
        eager_key=(op, "eager", dtype, numel) if mode == "compiled" else None,
        anchor_key=("anchor", dtype, numel) if op == "add_noise" else None,
    )


def under_float32(fn):
    """``fn`` called under the float32 precision policy (compiled code guards on it)."""

    def run(*args):
        with fastgen.use_precision("float32"):
            return fn(*args)

    return run


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_primitive_float32_policy(benchmark, medians, device, dtype, numel, op, mode):
    a, b, t = inputs(numel, dtype, device)
    base = OPS[op] if mode == "eager" else torch.compile(OPS[op], fullgraph=True)
    fn = under_float32(base)
    benchmark.group = f"{dtype} n={numel}"
    benchmark.extra_info.update(
        op=f"{op} [float32 policy]", mode=mode, dtype=str(dtype), numel=numel
    )
    out = run_timed(benchmark, fn, device, (a, b, t))
    assert torch.equal(out, under_float32(OPS[op])(a, b, t))  # compiled equals eager
    record(
        benchmark,
        medians,
        (op, "float32", mode, dtype, numel),
        moved_bytes(a, t),
        copy_key=("copy_bw", dtype, numel),
        eager_key=(op, "float32", "eager", dtype, numel) if mode == "compiled" else None,
    )
    if (op, mode, dtype, numel) in medians and (op, "float32", mode, dtype, numel) in medians:
        benchmark.extra_info["speedup_vs_float64_policy"] = (
            medians[(op, mode, dtype, numel)] / medians[(op, "float32", mode, dtype, numel)]
        )
