"""fastgen.flow_matching against float64 reference formulas, at the edges, and on bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, correctly_rounded
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgen
from fastgen.flow_matching import (
    DENOM_MIN,
    add_noise,
    convert_prediction,
    expand_like,
    pred_noise_to_pred_x0,
    pred_x0_from_flow,
    rf_alpha,
    rf_sigma,
    x0_to_eps,
    x0_to_flow,
)

# --- float64 oracles, written from the formulas (t already shaped [B, 1, ...]) -------------


def ref_add_noise(x0, eps, t):
    return (1 - t) * x0 + t * eps


def ref_eps_to_x0(eps, x_t, t):
    return (x_t - t * eps) / torch.clamp(1 - t, min=DENOM_MIN)


def ref_flow_to_x0(v, x_t, t):
    return x_t - t * v


def ref_x0_to_eps(x0, x_t, t):
    return (x_t - (1 - t) * x0) / torch.clamp(t, min=DENOM_MIN)


def ref_x0_to_flow(x0, x_t, t):
    return (x_t - x0) / torch.clamp(t, min=DENOM_MIN)


CONVERSIONS = [
    (pred_noise_to_pred_x0, ref_eps_to_x0),
    (pred_x0_from_flow, ref_flow_to_x0),
    (x0_to_eps, ref_x0_to_eps),
    (x0_to_flow, ref_x0_to_flow),
]


def within_one_ulp(out: torch.Tensor, ref64: torch.Tensor) -> bool:
    """|out - ref| <= one unit in the last place of out's dtype, at ref's magnitude."""
    info = torch.finfo(out.dtype)
    exponent = torch.frexp(ref64.abs().clamp_min(info.tiny))[1]
    ulp = info.eps * torch.pow(2.0, (exponent - 1).to(torch.float64))
    return bool(((out.to(torch.float64) - ref64).abs() <= ulp).all())


def batch(dtype, shape=(16, 3, 8, 8)):
    x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
    eps = torch.randn(shape, dtype=torch.float64).to(dtype)
    t = torch.rand(shape[0], dtype=torch.float64).to(dtype)
    return x0, eps, t


def col(t, x):
    return t.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))


# --- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_is_float64_formula_rounded_once(dtype):
    x0, eps, t = batch(dtype)
    out = add_noise(x0, eps, t)
    ref = correctly_rounded(ref_add_noise(x0.double(), eps.double(), col(t, x0)), dtype)
    assert out.dtype == dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounds_once_where_float32_would_round_twice(dtype):
    # 1 + 2^-k + 2^-30 lies just above the midpoint between two bf16 (k=8) / fp16 (k=11) values;
    # float32 rounds it onto the midpoint, and ties-to-even then goes down: one ulp off.
    k = 8 if dtype == torch.bfloat16 else 11
    x0, eps = torch.ones(1, 1, dtype=dtype), torch.full((1, 1), 2.0, dtype=dtype)
    t = torch.tensor([2.0**-k + 2.0**-30], dtype=torch.float64)
    exact = 1.0 + 2.0 ** (1 - k)  # the next value up
    assert (1 + t.double()).to(dtype).item() == 1.0  # torch's own conversion rounds twice
    assert add_noise(x0, eps, t).item() == exact
    assert add_noise(x0, eps, t.float()).item() == exact  # t fits in float32 too


def test_rounding_keeps_gradients_and_signed_zero():
    x0 = torch.full((2, 1), -0.0, dtype=torch.bfloat16, requires_grad=True)
    out = add_noise(x0, torch.full((2, 1), -0.0, dtype=torch.bfloat16), torch.tensor([0.0, 1.0]))
    assert torch.equal(torch.signbit(out), torch.ones(2, 1, dtype=torch.bool))
    out.sum().backward()
    assert torch.equal(x0.grad, torch.tensor([[1.0], [0.0]], dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("fn", "ref"), CONVERSIONS, ids=lambda f: getattr(f, "__name__", ""))
def test_conversions_within_one_ulp_of_float64(fn, ref, dtype):
    pred, x_t, t = batch(dtype)
    out = fn(pred, x_t, t)
    assert out.dtype == x_t.dtype
    expected = ref(pred.double(), x_t.double(), col(t, x_t))
    assert within_one_ulp(out, expected)
    assert torch.equal(out, correctly_rounded(expected, dtype))


@pytest.mark.parametrize(("fn", "ref"), CONVERSIONS, ids=lambda f: getattr(f, "__name__", ""))
def test_conversions_ill_conditioned_fp32(fn, ref):
    # t near 0 or 1 makes the numerators cancel: float32 arithmetic would be off by many ulps.
    x_t = torch.randn(4096)
    pred = torch.where(torch.rand(4096) < 0.5, x_t + 1e-3 * torch.randn(4096), torch.randn(4096))
    near_end = 1e-5 * (1 + torch.rand(4096))
    t = torch.where(torch.rand(4096) < 0.5, 1 - near_end, near_end)
    expected = ref(pred.double(), x_t.double(), t.double())
    assert within_one_ulp(fn(pred, x_t, t), expected)
    # the same formula in float32 misses by more than an ulp: the test can tell the two apart
    assert not within_one_ulp(ref(pred, x_t, t), expected)


def test_output_dtype_follows_x_t_for_mixed_inputs():
    pred = torch.randn(4, 3, dtype=torch.float32)
    x_t = torch.randn(4, 3, dtype=torch.bfloat16)
    t = torch.rand(4, dtype=torch.float64)
    for fn, ref in CONVERSIONS:
        out = fn(pred, x_t, t)
        assert out.dtype == torch.bfloat16
        assert torch.equal(
            out, correctly_rounded(ref(pred.double(), x_t.double(), col(t, x_t)), torch.bfloat16)
        )
    assert add_noise(x_t, pred, t).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
def test_rf_alpha_sigma(dtype):
    t = torch.rand(1000, dtype=torch.float64).to(dtype)
    assert torch.equal(rf_alpha(t), correctly_rounded(1 - t.double(), dtype))
    sigma = rf_sigma(t)
    assert torch.equal(sigma, t) and sigma.dtype == dtype
    assert sigma.data_ptr() != t.data_ptr()
    a, s = rf_alpha(t).double(), rf_sigma(t).double()
    x0, eps = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    if dtype == torch.float64:
        assert torch.equal(add_noise(x0, eps, t), a * x0 + s * eps)


def test_round_trips_float64():
    x0, eps, _ = batch(torch.float64)
    t = torch.linspace(0.01, 0.99, x0.shape[0], dtype=torch.float64)
    x_t = add_noise(x0, eps, t)
    eps_hat = x0_to_eps(x0, x_t, t)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred_noise_to_pred_x0(eps_hat, x_t, t), x0, rtol=0, atol=1e-12)
    flow = x0_to_flow(x0, x_t, t)
    torch.testing.assert_close(flow, eps - x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred_x0_from_flow(flow, x_t, t), x0, rtol=0, atol=1e-12)


PAIRS = [(s, d) for s in ("x0", "eps", "flow") for d in ("x0", "eps", "flow")]


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_convert_prediction_all_pairs_float64(src, dst):
    x0, eps, _ = batch(torch.float64)
    t = torch.linspace(0.02, 0.98, x0.shape[0], dtype=torch.float64)
    x_t = add_noise(x0, eps, t)
    truth = {"x0": x0, "eps": eps, "flow": eps - x0}
    out = convert_prediction(truth[src], x_t, t, src=src, dst=dst)
    torch.testing.assert_close(out, truth[dst], rtol=0, atol=1e-12)
    if src == dst:
        assert out is truth[src]


@pytest.mark.parametrize("t_value", [0.0, 1.0])
def test_flow_conversions_exact_and_finite_at_endpoints(t_value):
    x0, eps, _ = batch(torch.float32)
    t = torch.full((x0.shape[0],), t_value)
    x_t = add_noise(x0, eps, t)
    flow = (eps.double() - x0.double()).float()
    # division-free forms: at t = 0 x0 = x_t, at t = 1 eps = x_t, whatever the flow
    if t_value == 0.0:
        assert torch.equal(convert_prediction(flow, x_t, t, src="flow", dst="x0"), x_t)
    else:
        assert torch.equal(convert_prediction(flow, x_t, t, src="flow", dst="eps"), x_t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t_value", [0.0, 1.0])
def test_all_outputs_finite_at_closed_interval_ends(dtype, t_value):
    x0, eps, _ = batch(dtype)
    x0, eps = x0 * 0.01, eps * 0.01  # keep (x_t - x0) / 1e-6 inside fp16's range
    t = torch.full((x0.shape[0],), t_value, dtype=dtype)
    x_t = add_noise(x0, eps, t)
    outs = [x_t, rf_alpha(t), rf_sigma(t)] + [fn(eps, x_t, t) for fn, _ in CONVERSIONS]
    outs += [convert_prediction(eps, x_t, t, src=s, dst=d) for s, d in PAIRS]
    assert all(bool(torch.isfinite(o).all()) for o in outs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_exact_endpoints(dtype):
    x0, eps, _ = batch(dtype)
    assert torch.equal(add_noise(x0, eps, torch.zeros(16, dtype=dtype)), x0)
    assert torch.equal(add_noise(x0, eps, torch.ones(16, dtype=dtype)), eps)
    assert torch.equal(add_noise(x0, eps, torch.tensor(0.0)), x0)


def test_per_frame_video_timesteps():
    x0, eps = torch.randn(2, 4, 5, 3, 3), torch.randn(2, 4, 5, 3, 3)
    t = torch.rand(2, 1, 5)
    out = add_noise(x0, eps, t)
    for b in range(2):
        for f in range(5):
            frame = add_noise(x0[b, :, f], eps[b, :, f], t[b, 0, f])
            assert torch.equal(out[b, :, f], frame)
    assert expand_like(t, x0).shape == (2, 1, 5, 1, 1)


def test_scalar_t_broadcasts_everywhere():
    x0, eps = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.equal(
        add_noise(x0, eps, torch.tensor(0.3)), add_noise(x0, eps, torch.full((3,), 0.3))
    )


@settings(max_examples=200, deadline=None)
@given(
    x0=st.floats(-1e4, 1e4, width=32),
    eps=st.floats(-1e4, 1e4, width=32),
    t=st.floats(0.0, 1.0, width=32),
)
def test_add_noise_stays_between_its_endpoints(x0, eps, t):
    # A correctly rounded convex combination never leaves [min(x0, eps), max(x0, eps)].
    out = add_noise(torch.tensor([x0]), torch.tensor([eps]), torch.tensor([t])).item()
    assert min(x0, eps) <= out <= max(x0, eps)


@settings(max_examples=200, deadline=None)
@given(t=st.floats(0.0, 1.0), value=st.floats(-100, 100), flow=st.floats(-100, 100))
def test_flow_eps_x0_consistency(t, value, flow):
    # eps - x0 recovered from a flow prediction is the flow itself (float64, any t).
    x_t, v, tt = (
        torch.tensor([value], dtype=torch.float64),
        torch.tensor([flow], dtype=torch.float64),
        torch.tensor([t], dtype=torch.float64),
    )
    x0 = convert_prediction(v, x_t, tt, src="flow", dst="x0")
    eps = convert_prediction(v, x_t, tt, src="flow", dst="eps")
    assert abs((eps - x0).item() - flow) <= 1e-12 * (1 + abs(flow) + abs(value))


# --- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [add_noise, *[c[0] for c in CONVERSIONS]], ids=lambda f: f.__name__)
def test_gradcheck_all_inputs(fn):
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = (0.1 + 0.8 * torch.rand(3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(fn, (a, b, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_reach_every_input(dtype):
    x0, eps, t = (x.requires_grad_() for x in batch(dtype, (4, 3)))
    add_noise(x0, eps, t).sum().backward()
    assert x0.grad.dtype == dtype
    torch.testing.assert_close(x0.grad, (1 - t.detach()).reshape(4, 1).expand(4, 3).to(dtype))
    torch.testing.assert_close(eps.grad, t.detach().reshape(4, 1).expand(4, 3).to(dtype))
    assert t.grad is not None and bool(torch.isfinite(t.grad).all())


def test_inputs_are_never_modified():
    x0, eps, t = batch(torch.float64)
    copies = [x.clone() for x in (x0, eps, t)]
    x_t = add_noise(x0, eps, t)
    for fn, _ in CONVERSIONS:
        fn(eps, x_t, t)
    for s, d in PAIRS:
        convert_prediction(eps, x_t, t, src=s, dst=d)
    rf_alpha(t)
    rf_sigma(t)
    assert all(torch.equal(a, b) for a, b in zip((x0, eps, t), copies))


# --- bad input -------------------------------------------------------------------------------

X = torch.linspace(-1, 1, 24).reshape(4, 3, 2)
T = torch.tensor([0.1, 0.4, 0.6, 0.9])

BAD = [
    (lambda: add_noise(X.long(), X, T), TypeError, "x0 must be a floating-point"),
    (lambda: add_noise(X, X.int(), T), TypeError, "eps must be a floating-point"),
    (lambda: add_noise(X, X, T > 0.5), TypeError, "t must be a floating-point"),
    (lambda: add_noise(X, X, 0.5), TypeError, "t must be a torch.Tensor"),
    (lambda: add_noise(X.numpy(), X, T), TypeError, "x0 must be a torch.Tensor"),
    (lambda: add_noise(X, X[:2], T), ValueError, "x0 and eps must have the same shape"),
    (lambda: x0_to_eps(X, X[..., :1], T), ValueError, "x0 and x_t must have the same shape"),
    (lambda: add_noise(X, X, torch.rand(4, 3, 2, 1)), ValueError, "t has 4 dims"),
    (lambda: add_noise(X, X, torch.rand(5)), ValueError, "t.shape[0] must be 1"),
    (lambda: add_noise(X, X, torch.rand(4, 2)), ValueError, "t.shape[1] must be 1"),
    (lambda: add_noise(X, X, T + 1.5), ValueError, "closed interval [0, 1]"),
    (lambda: add_noise(X, X, T - 1.0), ValueError, "closed interval [0, 1]"),
    (lambda: pred_noise_to_pred_x0(X, X, torch.full((4,), float("nan"))), ValueError, "NaN"),
    (lambda: pred_x0_from_flow(X, X, T * 2), ValueError, "t must lie"),
    (lambda: x0_to_flow(X, X, -T), ValueError, "t must lie"),
    (lambda: rf_alpha(torch.tensor([2.0])), ValueError, "t must lie"),
    (lambda: rf_sigma(torch.tensor([1])), TypeError, "t must be a floating-point"),
    (lambda: convert_prediction(X, X, T, src="v", dst="x0"), ValueError, "src must be one of"),
    (lambda: convert_prediction(X, X, T, src="x0", dst="score"), ValueError, "dst must be one of"),
    (lambda: convert_prediction(X, X[:1], T, src="x0", dst="x0"), ValueError, "same shape"),
    (lambda: expand_like([0.5], X), TypeError, "t must be a torch.Tensor"),
    (lambda: fastgen.set_value_checks("no"), TypeError, "enabled must be a bool"),
]


@pytest.mark.parametrize(("call", "error", "words"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(
        error, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        call()


def test_value_checks_switch():
    bad_t = T + 1.5
    previous = fastgen.set_value_checks(False)
    assert previous is True
    add_noise(X, X, bad_t)  # skipped: no error, no sync
    assert fastgen.set_value_checks(True) is False
    with pytest.raises(ValueError):
        add_noise(X, X, bad_t)


def test_eager_checks_are_the_only_sync(sync_counter):
    with sync_counter() as counter:
        add_noise(X, X, T)
    assert counter.syncs  # the value check reads t on the host
    fastgen.set_value_checks(False)
    with sync_counter() as counter:
        x_t = add_noise(X, X, T)
        for s, d in PAIRS:
            convert_prediction(X, x_t, T, src=s, dst=d)
        rf_alpha(T)
        rf_sigma(T)
        expand_like(T, X)
    assert counter.syncs == []


def test_ode_unroll_without_a_branch_is_exact_at_the_last_rung():
    # x_next = add_noise(x0_hat, x0_to_eps(x0_hat, x_t, t), t_next): at t_next = 0 it is x0_hat
    # exactly, whatever the implied eps, so a student loop needs no `if t_next == 0`.
    x0_hat, x_t = torch.randn(8, 4), torch.randn(8, 4)
    t, t_next = torch.full((8,), 0.625), torch.zeros(8)
    assert torch.equal(add_noise(x0_hat, x0_to_eps(x0_hat, x_t, t), t_next), x0_hat)
    # and at an intermediate rung it follows the straight line through x_t and x0_hat
    t_mid = torch.full((8,), 0.3)
    x_mid = add_noise(x0_hat, x0_to_eps(x0_hat, x_t, t), t_mid)
    expected = x0_hat.double() + (0.3 / 0.625) * (x_t.double() - x0_hat.double())
    torch.testing.assert_close(x_mid.double(), expected, rtol=1e-6, atol=1e-6)


# --- one rounding, everywhere: halfway cases built for each function ---------------------------

_V = 1.0 + 2.0**-8 + 2.0**-30  # float32 rounds it to 1 + 2^-8, a bf16 tie that goes to 1.0


def _halfway_cases(sign: float):
    """(name, call, exact float64 value) whose exact value is sign * ~_V for every function."""
    one = torch.full((1, 1), sign, dtype=torch.bfloat16)
    zero = torch.zeros(1, 1, dtype=torch.bfloat16)
    t_mul = torch.tensor([2.0**-8 + 2.0**-30], dtype=torch.float64)  # x_t - t v = s (1 + t)
    t_div = torch.tensor([1.0 / _V], dtype=torch.float64)  # s / t
    t_inv = torch.tensor([1.0 - 1.0 / _V], dtype=torch.float64)  # s / (1 - t)
    t_add = torch.tensor([1.0 - (2.0**-8 + 2.0**-30)], dtype=torch.float64)  # s + (1 - t) s
    return [
        ("pred_x0_from_flow", lambda g: pred_x0_from_flow(-one.requires_grad_(g), one, t_mul), sign * (1 + t_mul.item())),
        ("pred_noise_to_pred_x0", lambda g: pred_noise_to_pred_x0(zero.requires_grad_(g), one, t_inv), sign / (1 - t_inv.item())),
        ("x0_to_eps", lambda g: x0_to_eps(zero.requires_grad_(g), one, t_div), sign / t_div.item()),
        ("x0_to_flow", lambda g: x0_to_flow(zero.requires_grad_(g), one, t_div), sign / t_div.item()),
        ("flow->eps", lambda g: convert_prediction(one.requires_grad_(g), one, t_add, src="flow", dst="eps"), sign * (1 + (1 - t_add.item()))),
        ("eps->flow", lambda g: convert_prediction(one.requires_grad_(g), zero, t_inv, src="eps", dst="flow"), sign / (1 - t_inv.item())),
        ("eps->x0", lambda g: convert_prediction(zero.requires_grad_(g), one, t_inv, src="eps", dst="x0"), sign / (1 - t_inv.item())),
        ("x0->eps", lambda g: convert_prediction(zero.requires_grad_(g), one, t_div, src="x0", dst="eps"), sign / t_div.item()),
    ]  # fmt: skip


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_every_function_rounds_once_on_a_double_rounding_case(sign, grad):
    for name, call, exact in _halfway_cases(sign):
        exact64 = torch.tensor([[exact]], dtype=torch.float64)
        assert 2.0**-8 < abs(exact) - 1 < 2.0**-8 + 2.0**-24, (
            name
        )  # inside the double-rounding window
        correct = correctly_rounded(exact64, torch.bfloat16)
        assert not torch.equal(exact64.to(torch.bfloat16), correct), name  # torch rounds twice here
        out = call(grad)
        assert out.dtype == torch.bfloat16 and torch.equal(out.detach(), correct), (
            name,
            out,
            correct,
        )
        assert out.requires_grad == grad, name


def test_constants_by_value():
    from fastgen.losses import VSD_WEIGHT_EPS

    assert DENOM_MIN == 1e-6 and VSD_WEIGHT_EPS == 1e-6
    # the floor is what the divisions use: x0 -> eps at t = 0 divides by exactly 1e-6
    out = x0_to_eps(
        torch.zeros(1, 1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        torch.zeros(1),
    )
    assert out.item() == 1e6


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_one_rounding_just_above_a_tie_from_an_odd_float32(sign):
    # 1 + 2^-8 + 2^-23 - 2^-30 rounds (float32) up to an odd value one ulp above the bf16 tie;
    # truncating it by exactly one ulp lands on the tie, the sticky bit lifts it: rounds up.
    t = torch.tensor([2.0**-8 + 2.0**-23 - 2.0**-30], dtype=torch.float64)
    one = torch.full((1, 1), sign, dtype=torch.bfloat16)
    out = pred_x0_from_flow(-one, one, t)
    assert out.item() == sign * (1.0 + 2.0**-7)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_one_rounding_just_below_a_tie(sign):
    # 1 + 2^-8 - 2^-30: float32 rounds it up onto the bf16 tie; the exact value lies below the tie,
    # so the answer is 1.0. Truncating toward zero (not away) is what keeps it below.
    t = torch.tensor([2.0**-8 - 2.0**-30], dtype=torch.float64)
    one = torch.full((1, 1), sign, dtype=torch.bfloat16)
    out = pred_x0_from_flow(-one, one, t)
    assert out.item() == sign * 1.0
    assert torch.equal(
        out,
        correctly_rounded(
            torch.tensor([[sign * (1 + t.item())]], dtype=torch.float64), torch.bfloat16
        ),
    )


SIGNATURES = {  # function -> its tensor arguments' names, in order (the third is t)
    pred_noise_to_pred_x0: ("pred_noise", "noisy_latents"),
    pred_x0_from_flow: ("pred_flow", "noisy_latents"),
    x0_to_eps: ("x0", "x_t"),
    x0_to_flow: ("x0", "x_t"),
    add_noise: ("x0", "eps"),
}


@pytest.mark.parametrize("fn", list(SIGNATURES), ids=lambda f: f.__name__)
@pytest.mark.parametrize("position", [0, 1])
def test_type_errors_begin_with_the_argument_name(fn, position):
    args = [torch.zeros(2, 3), torch.zeros(2, 3), torch.rand(2)]
    args[position] = args[position].tolist()
    name = SIGNATURES[fn][position]
    with pytest.raises(TypeError, match=rf"^{name} must be a torch\.Tensor, got list"):
        fn(*args)


def test_rf_alpha_and_sigma_name_t_in_their_type_errors():
    for fn in (rf_alpha, rf_sigma):
        with pytest.raises(TypeError, match=r"^t must be a torch\.Tensor, got list"):
            fn([0.5])
