"""TrigFlow <-> rectified flow: float64 references, round trips, the ends of both intervals, one
rounding per dtype, one compiled frame."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPES, correctly_rounded
from torch._dynamo.testing import CompileCounter

from fastgen.consistency import (
    HALF_PI,
    rf_flow_to_trigflow,
    rf_to_trigflow_input,
    rf_to_trigflow_time,
    trigflow_to_rf_flow,
    trigflow_to_rf_input,
    trigflow_to_rf_time,
)

SD = [0.5, 1.0, 2.3]


def grid(n=64):
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.cat([t, torch.tensor([1e-9, 1 - 1e-9], dtype=torch.float64)])


@pytest.mark.parametrize("sd", SD)
def test_times_match_the_snr_and_invert_each_other(sd):
    t = grid()
    a = rf_to_trigflow_time(t, sd)
    # equal signal-to-noise ratio: (1 - t) / t = cos / (sigma_d sin)
    inner = (t > 1e-6) & (t < 1 - 1e-6)  # (1 - t) / t is ill-conditioned at the very ends
    torch.testing.assert_close(
        ((1 - t) / t)[inner], (torch.cos(a) / (sd * torch.sin(a)))[inner], rtol=1e-12, atol=0
    )
    torch.testing.assert_close(trigflow_to_rf_time(a, sd), t, rtol=1e-14, atol=1e-15)
    assert a[0] == 0 and a[63] == HALF_PI  # the ends map to the ends exactly
    assert trigflow_to_rf_time(torch.tensor([0.0, HALF_PI], dtype=torch.float64), sd).tolist() == [
        0.0,
        1.0,
    ]


@pytest.mark.parametrize("sd", SD)
def test_inputs_are_the_same_sample_in_both_parameterizations(sd):
    torch.manual_seed(0)
    t = grid(16)
    x0 = torch.randn(t.numel(), 3, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    a = rf_to_trigflow_time(t, sd)
    x_hat = torch.cos(a)[:, None] * x0 + torch.sin(a)[:, None] * sd * eps
    torch.testing.assert_close(rf_to_trigflow_input(x_t, t, sd), x_hat, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(trigflow_to_rf_input(x_hat, a, sd), x_t, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("sd", SD)
def test_flows_are_the_same_velocity_and_invert_each_other(sd):
    torch.manual_seed(1)
    t = grid(16)
    x0 = torch.randn(t.numel(), 3, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    a = rf_to_trigflow_time(t, sd)
    x_hat = torch.cos(a)[:, None] * x0 + torch.sin(a)[:, None] * sd * eps
    # d x_hat / d t_hat = sigma_d F on the true pair (x0, eps): F = cos eps - sin x0 / sigma_d
    f = torch.cos(a)[:, None] * eps - torch.sin(a)[:, None] * x0 / sd
    f_ours = rf_flow_to_trigflow(eps - x0, x_t, t, sd)
    torch.testing.assert_close(f_ours, f, rtol=1e-13, atol=1e-14)
    assert torch.isfinite(f_ours).all()  # t = 0 and t = 1 included: no division by sin or cos
    torch.testing.assert_close(
        trigflow_to_rf_flow(f, x_hat, a, sd), eps - x0, rtol=1e-13, atol=1e-13
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_conversion_rounds_once(dtype):
    torch.manual_seed(2)
    t = torch.rand(257, dtype=torch.float64).clamp(0.01, 0.99).to(dtype).double()
    x = torch.randn(257, 2, dtype=torch.float64).to(dtype)
    v = torch.randn(257, 2, dtype=torch.float64).to(dtype)
    x64, v64 = x.double(), v.double()
    a64 = torch.atan2(t, (1 - t) * 0.5)
    assert torch.equal(rf_to_trigflow_time(t.to(dtype)), correctly_rounded(a64, dtype))
    rho = torch.sqrt(t**2 + ((1 - t) * 0.5) ** 2)[:, None]
    tt = t[:, None]
    f64 = ((1 - tt) * 0.5 * (x64 + (1 - tt) * v64) - (tt / 0.5) * (x64 - tt * v64)) / rho
    assert torch.equal(rf_flow_to_trigflow(v, x, t.to(dtype)), correctly_rounded(f64, dtype))


def test_float32_half_pi_reads_as_half_pi():
    a = torch.tensor([HALF_PI], dtype=torch.float32)  # rounded above pi / 2
    assert a.double().item() > HALF_PI
    assert trigflow_to_rf_time(a).item() == 1.0
    assert trigflow_to_rf_input(torch.ones(1, 1), a).item() == 2.0


def test_one_frame_across_batch_sizes():
    def fn(v, x, t):
        a = rf_to_trigflow_time(t)
        f = rf_flow_to_trigflow(v, x, t)
        return trigflow_to_rf_flow(f, rf_to_trigflow_input(x, t), a), trigflow_to_rf_time(a)

    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for i, b in enumerate((5, 7, 11)):
        if i == 1:
            torch.compiler.set_stance("fail_on_recompile")
        v, x, t = torch.randn(b, 3), torch.randn(b, 3), torch.rand(b)
        got = compiled(v, x, t)
        want = fn(v, x, t)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.compiler.set_stance("default")
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: rf_to_trigflow_time(torch.tensor([1.5])), ValueError, "t must lie"),
        (lambda: trigflow_to_rf_time(torch.tensor([-0.1])), ValueError, "t_hat must lie"),
        (lambda: trigflow_to_rf_time(torch.tensor([2.0])), ValueError, "t_hat"),
        (lambda: rf_to_trigflow_time(torch.tensor([0.5]), 0.0), ValueError, "sigma_data"),
        (lambda: rf_to_trigflow_time(torch.tensor([0.5]), "a"), TypeError, "sigma_data"),
        (lambda: rf_to_trigflow_time(torch.tensor([0.5]), math.nan), ValueError, "sigma_data"),
        (lambda: rf_to_trigflow_time([0.5]), TypeError, "t must be a torch.Tensor"),
        (
            lambda: rf_flow_to_trigflow(torch.zeros(2, 3), torch.zeros(2, 4), torch.rand(2)),
            ValueError,
            "flow and x_t",
        ),
        (
            lambda: trigflow_to_rf_flow(torch.zeros(2, 3), torch.zeros(2, 3), torch.rand(3)),
            ValueError,
            "t cannot broadcast",
        ),
        (
            lambda: trigflow_to_rf_input(torch.zeros(2, 3, dtype=torch.long), torch.rand(2)),
            TypeError,
            "x_hat",
        ),
    ],
)
def test_bad_input_is_a_clear_error(call, error, words):
    with pytest.raises(error, match=words):
        call()
