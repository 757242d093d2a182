"""The precision policy: no float64 tensor under "float32", accuracy against the float64
policy (equal bf16/fp16 outputs nearly always, within one ulp everywhere tested), the
compensated steps in ill-conditioned cases, the policy switches, compile and export."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import correctly_rounded
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode
from toys import toy_batch

import fastgen
from fastgen import _compensated as comp
from fastgen import precision
from fastgen._rounding import round_pair, round_scalar
from fastgen.flow_matching import DENOM_MIN

N = 100_000


class NoFloat64(TorchDispatchMode):
    """Fails on any op that takes or makes a float64 tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [
            x
            for x in torch.utils._pytree.tree_leaves((args, kwargs, out))
            if isinstance(x, torch.Tensor)
        ]
        if any(x.dtype == torch.float64 for x in tensors) or kwargs.get("dtype") == torch.float64:
            raise AssertionError(f"float64 tensor in {func}")
        return out


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last place of a's dtype, via the ordered integer patterns."""
    as_int = torch.int32 if a.dtype == torch.float32 else torch.int16
    top = 2 ** (32 if a.dtype == torch.float32 else 16) // 2
    ia, ib = (x.view(as_int).to(torch.int64) for x in (a, b))
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return (ia - ib).abs()


def exact(f, *args) -> torch.Tensor:
    """``f(*args)`` under the float64 policy (the reference: float64 value, rounded once)."""
    with fastgen.use_precision("float64"):
        return f(*args)


def in_float32(f, *args) -> torch.Tensor:
    with fastgen.use_precision("float32"):
        return f(*args)


# (name, f(a, b, t)) — a plays x0/pred, b plays eps/x_t.
FUNCTIONS = {
    "add_noise": lambda a, b, t: fastgen.add_noise(a, b, t),
    "pred_noise_to_pred_x0": lambda a, b, t: fastgen.pred_noise_to_pred_x0(a, b, t),
    "pred_x0_from_flow": lambda a, b, t: fastgen.pred_x0_from_flow(a, b, t),
    "x0_to_eps": lambda a, b, t: fastgen.x0_to_eps(a, b, t),
    "x0_to_flow": lambda a, b, t: fastgen.x0_to_flow(a, b, t),
    "flow_to_eps": lambda a, b, t: fastgen.convert_prediction(a, b, t, src="flow", dst="eps"),
    "eps_to_flow": lambda a, b, t: fastgen.convert_prediction(a, b, t, src="eps", dst="flow"),
    "rf_alpha": lambda a, b, t: fastgen.rf_alpha(t.to(a.dtype)),
    "cfg": lambda a, b, t: fastgen.classifier_free_guidance(a, b, 1.0 + 4.0 * t[:1].item()),
}


def timesteps(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=g)
    return {"mid": u, "near0": u * 1e-5, "near1": 1.0 - u * 1e-5}[kind]


# --- the policy switch --------------------------------------------------------------------


def test_default_is_auto_float64_on_cpu_float32_on_mps():
    assert fastgen.get_precision() == "auto"
    assert precision.compute_dtype(torch.device("cpu")) == torch.float64
    assert precision.compute_dtype(torch.device("mps")) == torch.float32
    with fastgen.use_precision("float64"):
        assert precision.compute_dtype(torch.device("mps")) == torch.float64
    with fastgen.use_precision("float32"):
        assert precision.compute_dtype(torch.device("cpu")) == torch.float32


def test_use_precision_restores_on_error_and_set_returns_previous():
    with pytest.raises(RuntimeError), fastgen.use_precision("float32"):
        assert fastgen.get_precision() == "float32"
        raise RuntimeError
    assert fastgen.get_precision() == "auto"
    assert fastgen.set_precision("float32") == "auto"
    assert fastgen.set_precision("auto") == "float32"


@pytest.mark.parametrize(
    ("policy", "error", "match"),
    [
        ("float16", ValueError, "policy must be one of"),
        (32, TypeError, r"^policy must be a str, one of .*, got int$"),
    ],
)
def test_bad_policy_names_the_argument(policy, error, match):
    with pytest.raises(error, match=match):
        fastgen.set_precision(policy)
    assert fastgen.get_precision() == "auto"


# --- no float64 tensor ----------------------------------------------------------------------


def test_the_guard_sees_float64():
    # The dispatch mode must fail on the default policy, or the tests below prove nothing.
    x = torch.randn(4, 3)
    with pytest.raises(AssertionError, match="float64"), NoFloat64():
        fastgen.add_noise(x, x, torch.rand(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float32_policy_creates_no_float64_tensor_in_the_primitives(dtype):
    x0, eps = torch.randn(4, 3, 2, dtype=dtype), torch.randn(4, 3, 2, dtype=dtype)
    t = torch.rand(4)
    cfgs = [
        fastgen.SampleTimestepConfig(time_dist_type=kind, stratified=True)
        for kind in ("uniform", "logitnormal", "lognormal", "shifted", "mode", "cosmap")
    ] + [fastgen.SampleTimestepConfig(time_dist_type="polynomial")]
    gen = x0.float().requires_grad_()
    with fastgen.use_precision("float32"), NoFloat64():
        for f in FUNCTIONS.values():
            f(x0, eps, t)
        for src in ("x0", "eps", "flow"):
            for dst in ("x0", "eps", "flow"):
                fastgen.convert_prediction(x0, eps, t, src=src, dst=dst)
        for pred_type in ("x0", "eps", "flow"):
            fastgen.dsm_loss(x0, x0=x0, eps=eps, t=t, pred_type=pred_type)
        fastgen.vsd_loss(gen, eps.float(), x0.float(), additional_scale=t).backward()
        logits = torch.randn(4, 2, dtype=dtype)
        fastgen.gan_gen_loss(logits)
        fastgen.gan_disc_loss(logits, logits)
        fastgen.r1_loss(logits, logits)
        fastgen.classifier_free_guidance(x0, eps, t)
        for cfg in cfgs:
            fastgen.sample_timesteps(8, cfg, device="cpu", dtype=dtype)
        fastgen.sample_from_t_list(8, fastgen.make_t_list(4), device="cpu", dtype=dtype)
        sampler = fastgen.TimestepSampler(fastgen.SampleTimestepConfig(t_list=[0.9, 0.5, 0.0]))
        sampler.sample_t_list(x0)


@pytest.mark.parametrize("name", ["1step-cfg", "4step-backsim-ode", "gan-r1"])
def test_float32_policy_creates_no_float64_tensor_in_the_dmd2_step(name):
    from test_dmd_pipeline import CONFIGS, pipeline

    pipe = pipeline(CONFIGS[name](), gan=name.startswith("gan"))
    lat, noise, cond, neg = toy_batch(5)
    with fastgen.use_precision("float32"), NoFloat64():
        pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)[
            "total"
        ].backward()
        pipe.compute_fake_score_loss(lat, noise, cond)["total"].backward()
        if pipe.discriminator is not None:
            pipe.compute_discriminator_loss(lat, noise, cond)["total"].backward()


# --- accuracy against the float64 policy ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_half_precision_outputs_equal_the_float64_policy_nearly_always(name, dtype):
    f = FUNCTIONS[name]
    g = torch.Generator().manual_seed(1)
    for kind in ("mid", "near0", "near1"):
        a = torch.randn(N, generator=g).to(dtype)
        b = torch.randn(N, generator=g).to(dtype)
        t = timesteps(kind, N, g)
        ref, got = exact(f, a, b, t), in_float32(f, a, b, t)
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(got))
        d = ulps(got[finite], ref[finite])
        assert int(d.max()) <= 1, (kind, int(d.max()))
        assert float((d == 0).double().mean()) >= 0.999, kind


M = 3000  # elements checked against exact rational arithmetic

EXACT = {  # the formulas in exact arithmetic: (a, b, t) -> value
    "add_noise": lambda a, b, t: (1 - t) * a + t * b,
    "pred_noise_to_pred_x0": lambda a, b, t: (b - t * a) / max(1 - t, Fraction(DENOM_MIN)),
    "pred_x0_from_flow": lambda a, b, t: b - t * a,
    "x0_to_eps": lambda a, b, t: (b - (1 - t) * a) / max(t, Fraction(DENOM_MIN)),
    "x0_to_flow": lambda a, b, t: (b - a) / max(t, Fraction(DENOM_MIN)),
    "flow_to_eps": lambda a, b, t: b + (1 - t) * a,
    "eps_to_flow": lambda a, b, t: (a - b) / max(1 - t, Fraction(DENOM_MIN)),
}

PLAIN = {  # the same formulas in plain float32
    "add_noise": lambda a, b, t: (1 - t) * a + t * b,
    "pred_noise_to_pred_x0": lambda a, b, t: (b - t * a) / (1 - t).clamp_min(DENOM_MIN),
    "pred_x0_from_flow": lambda a, b, t: b - t * a,
    "x0_to_eps": lambda a, b, t: (b - (1 - t) * a) / t.clamp_min(DENOM_MIN),
    "x0_to_flow": lambda a, b, t: (b - a) / t.clamp_min(DENOM_MIN),
    "flow_to_eps": lambda a, b, t: b + (1 - t) * a,
    "eps_to_flow": lambda a, b, t: (a - b) / (1 - t).clamp_min(DENOM_MIN),
}


def _near_the_ends(name: str, g: torch.Generator):
    """Consistent inputs (x_t made from x0 and eps) with t within 1e-5 of the end where the
    formula divides by a small number or subtracts nearly equal terms."""
    t = timesteps("near0" if name in ("x0_to_eps", "x0_to_flow") else "near1", M, g)
    x0, eps = torch.randn(M, generator=g), torch.randn(M, generator=g)
    x_t = exact(fastgen.add_noise, x0, eps, t)
    return {
        "add_noise": (x0, eps, t),
        "pred_noise_to_pred_x0": (eps, x_t, t),
        "pred_x0_from_flow": (eps - x0, x_t, t),
        "x0_to_eps": (x0, x_t, t),
        "x0_to_flow": (x0, x_t, t),
        "flow_to_eps": (eps - x0, x_t, t),
        "eps_to_flow": (eps, x_t, t),
    }[name]


def _exactly(name: str, a, b, t) -> torch.Tensor:
    f = EXACT[name]
    values = [
        float(f(Fraction(x), Fraction(y), Fraction(s)))
        for x, y, s in zip(a.tolist(), b.tolist(), t.tolist())
    ]
    return torch.tensor(values, dtype=torch.float64).float()  # float64 -> float32: one rounding


@pytest.mark.parametrize("name", list(EXACT))
def test_float32_outputs_stay_within_two_ulps_of_exact_near_the_ends(name):
    a, b, t = _near_the_ends(name, torch.Generator().manual_seed(2))
    want = _exactly(name, a, b, t)
    got = in_float32(FUNCTIONS[name], a, b, t)
    assert int(ulps(got, want).max()) <= 2
    if name in ("pred_noise_to_pred_x0", "x0_to_eps"):  # plain float32 loses digits here
        assert int(ulps(PLAIN[name](a, b, t), want).max()) > 8


def test_float32_add_noise_is_exact_at_both_ends():
    x0, eps = torch.randn(64), torch.randn(64)
    with fastgen.use_precision("float32"):
        assert torch.equal(fastgen.add_noise(x0, eps, torch.zeros(64)), x0)
        assert torch.equal(fastgen.add_noise(x0, eps, torch.ones(64)), eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_policy_gradients_match_the_float64_policy(dtype):
    x0 = torch.randn(8, 5, dtype=dtype, requires_grad=True)
    eps, t = torch.randn(8, 5, dtype=dtype), torch.rand(8)
    grads = []
    for policy in ("float64", "float32"):
        x0.grad = None
        with fastgen.use_precision(policy):
            (fastgen.add_noise(x0, eps, t) * eps).sum().backward()
        grads.append(x0.grad.clone())
    # The float32 gradient is that of the float32 formula: a few float32 ulps from float64's.
    torch.testing.assert_close(grads[1].float(), grads[0].float(), rtol=2.0**-21, atol=2.0**-24)
    torch.testing.assert_close(grads[0].float(), ((1 - t)[:, None] * eps.float()).to(dtype).float())


# --- the compensated steps and roundings --------------------------------------------------------


def test_two_sum_and_two_prod_are_error_free():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(N, generator=g) * 2.0 ** torch.randint(-20, 20, (N,), generator=g)
    b = torch.randn(N, generator=g)
    s, e = comp.two_sum(a, b)
    assert torch.equal(s, a + b)
    # Sums of two float32 fit a float64 exactly at these exponents, products always.
    assert torch.equal(s.double() + e.double(), a.double() + b.double())
    p, e = comp.two_prod(a, b)
    assert torch.equal(p, a * b)
    assert torch.equal(p.double() + e.double(), a.double() * b.double())


def test_add_prod_and_lerp_pairs_carry_the_exact_value():
    g = torch.Generator().manual_seed(6)
    x, a, b = (torch.randn(2000, generator=g) for _ in range(3))
    t = torch.rand(2000, generator=g)
    cases = [
        (comp.add_prod(x, a, b), [(Fraction(u), Fraction(v) * Fraction(w)) for u, v, w in zip(x.tolist(), a.tolist(), b.tolist())]),
        (comp.lerp(x, a, t), [((1 - Fraction(s)) * Fraction(u), Fraction(s) * Fraction(v)) for u, v, s in zip(x.tolist(), a.tolist(), t.tolist())]),
    ]  # fmt: skip
    for (hi, lo), terms in cases:
        assert torch.equal(hi + lo, hi)  # |lo| below half an ulp of hi
        for h, low, (p, q) in zip(hi.tolist(), lo.tolist(), terms):
            # the pair holds ~48 bits of the terms' scale (hi alone: 24)
            error = abs(Fraction(h) + Fraction(low) - (p + q))
            assert error <= (abs(p) + abs(q)) * Fraction(1, 2**44)


def test_div_one_minus_is_within_one_ulp_of_the_exact_quotient():
    g = torch.Generator().manual_seed(7)
    num = torch.randn(4000, generator=g)
    t = torch.rand(4000, generator=g) * torch.rand(4000, generator=g) * 0.5  # 1 - t inexact
    out = comp.div_one_minus(num, t, 1e-6)
    exact = [Fraction(n) / (1 - Fraction(s)) for n, s in zip(num.tolist(), t.tolist())]
    nearest = torch.tensor([float(q) for q in exact], dtype=torch.float64).float()
    hi, _ = comp.one_minus(t)
    # the low part of 1 - t moves results to the nearest float32 that num / hi misses
    assert (out == nearest).float().mean() > (num / hi == nearest).float().mean()
    assert bool((ulps(out, nearest) <= 1).all())


def test_one_minus_is_exact():
    g = torch.Generator().manual_seed(4)
    t = torch.rand(N, generator=g) * torch.rand(N, generator=g)  # finer than rand's 2^-24 grid
    hi, lo = comp.one_minus(t)
    assert torch.equal(hi.double() + lo.double(), 1.0 - t.double())
    assert bool((lo[t >= 0.5] == 0).all()) and bool((lo[t < 0.5] != 0).any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_pair_rounds_the_exact_sum_once(dtype):
    g = torch.Generator().manual_seed(5)
    # hi on or next to a tie of dtype, lo a small nudge either way (or none).
    base = torch.randn(N, generator=g).to(dtype)
    up = torch.nextafter(base, torch.full_like(base, math.inf))
    hi = ((base.double() + up.double()) / 2).float()  # the tie, exact in float32
    hi = torch.where(torch.rand(N, generator=g) < 0.3, torch.randn(N, generator=g), hi)
    lo = hi * 2.0**-30 * torch.randn(N, generator=g)
    lo = torch.where(torch.rand(N, generator=g) < 0.2, torch.zeros_like(lo), lo)
    want = correctly_rounded(hi.double() + lo.double(), dtype)
    assert torch.equal(round_pair(hi, lo, dtype), want)
    assert not torch.equal(hi.to(dtype), want)  # plain rounding of hi alone is off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_scalar_rounds_once_in_every_mode(dtype):
    values = np.random.default_rng(6).standard_normal(2000) * 10.0 ** np.random.default_rng(
        7
    ).integers(-9, 5, 2000)
    for x in [*values.tolist(), 1e-7, 3e-8, 0.999, 65519.0, 70000.0, 1e-45]:
        near = round_scalar(x, dtype)
        down, up = round_scalar(x, dtype, "down"), round_scalar(x, dtype, "up")
        if dtype != torch.bfloat16 or abs(x) > 2.0**-126:  # the oracle's bf16 range
            want = correctly_rounded(torch.tensor([x], dtype=torch.float64), dtype).item()
            assert near == want
        assert down <= x <= up
        for r in (down, up):
            assert torch.tensor(r, dtype=dtype).item() == r  # on dtype's grid
        if down != up and math.isfinite(up) and math.isfinite(down):
            # adjacent grid points: nothing of dtype lies strictly between
            between = torch.nextafter(
                torch.tensor(down, dtype=dtype), torch.tensor(math.inf, dtype=dtype)
            )
            assert between.item() == up


# --- compile and export -----------------------------------------------------------------------


def test_float32_policy_compiles_in_one_frame_and_recompiles_once_on_switch():
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(fastgen.add_noise, backend=counter, fullgraph=True, dynamic=True)
    for b in (3, 5, 9):
        x0, eps, t = torch.randn(b, 4, dtype=torch.bfloat16), torch.randn(b, 4), torch.rand(b)
        eps = eps.bfloat16()
        with fastgen.use_precision("float32"):
            got = f(x0, eps, t)
            assert torch.equal(got, fastgen.add_noise(x0, eps, t))
    assert counter.frame_count == 1
    assert torch.equal(f(x0, eps, t), fastgen.add_noise(x0, eps, t))  # float64 again
    assert counter.frame_count == 2


def test_float32_policy_exports_with_a_dynamic_batch():
    class Noiser(torch.nn.Module):
        def forward(self, x0, eps, t):
            return fastgen.pred_noise_to_pred_x0(eps, fastgen.add_noise(x0, eps, t), t)

    batch = torch.export.Dim("batch", min=2)
    args = (torch.randn(4, 3), torch.randn(4, 3), torch.rand(4))
    with fastgen.use_precision("float32"):
        program = torch.export.export(
            Noiser(), args, dynamic_shapes=({0: batch}, {0: batch}, {0: batch})
        )
        assert all(
            node.meta["val"].dtype != torch.float64
            for node in program.graph.nodes
            if isinstance(node.meta.get("val"), torch.Tensor)
        )
        new = (torch.randn(7, 3), torch.randn(7, 3), torch.rand(7))
        assert torch.equal(program.module()(*new), Noiser()(*new))


@pytest.mark.slow
def test_float32_policy_under_inductor_equals_eager_with_precision_casts_emulated():
    # Inductor computes a fused bf16 intermediate in float32 and, by default, lets the next op
    # read it unrounded; emulate_precision_casts makes it round as eager does.
    torch._dynamo.reset()
    x0, eps, flow = (torch.randn(8, 4, 4, dtype=torch.bfloat16) for _ in range(3))
    t = torch.rand(8)

    def step(x0, eps, flow, t):
        x_t = fastgen.add_noise(x0, eps, t)
        outs = [x_t, fastgen.rf_alpha(t)]
        for src in ("x0", "eps", "flow"):
            outs += [
                fastgen.convert_prediction(flow, x_t, t, src=src, dst=d)
                for d in ("x0", "eps", "flow")
            ]
        return outs

    with (
        fastgen.use_precision("float32"),
        torch._inductor.config.patch(emulate_precision_casts=True),
    ):
        compiled = torch.compile(step, fullgraph=True)(x0, eps, flow, t)
        eager = step(x0, eps, flow, t)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


def test_float32_policy_traces_every_public_callable_in_one_frame():
    cfgs = [
        fastgen.SampleTimestepConfig(time_dist_type=kind)
        for kind in (
            "uniform",
            "logitnormal",
            "lognormal",
            "shifted",
            "mode",
            "cosmap",
            "polynomial",
        )
    ]
    ladder = fastgen.make_t_list(4)

    def everything(x0, eps, t, logits):
        outs = [fastgen.add_noise(x0, eps, t), fastgen.rf_alpha(t), fastgen.rf_sigma(t)]
        outs.append(fastgen.classifier_free_guidance(x0, eps, 3.0))
        for src in ("x0", "eps", "flow"):
            for dst in ("x0", "eps", "flow"):
                outs.append(fastgen.convert_prediction(x0, eps, t, src=src, dst=dst))
        outs += [fastgen.dsm_loss(x0, x0=x0, eps=eps, t=t, pred_type="flow")]
        outs += [fastgen.vsd_loss(x0, eps, x0 * 0.5), fastgen.gan_gen_loss(logits)]
        outs += [fastgen.gan_disc_loss(logits, logits), fastgen.r1_loss(logits, logits * 0.5)]
        outs += [fastgen.sample_timesteps(x0.shape[0], c, device=x0.device) for c in cfgs]
        outs.append(fastgen.sample_from_t_list(x0.shape[0], ladder, device=x0.device))
        return outs

    counter = CompileCounter()
    compiled = torch.compile(everything, backend=counter, fullgraph=True, dynamic=True)
    with fastgen.use_precision("float32"):
        for b in (3, 5, 9):
            x0, eps = (
                torch.randn(b, 4, dtype=torch.bfloat16),
                torch.randn(b, 4, dtype=torch.bfloat16),
            )
            outs = compiled(x0, eps, torch.rand(b), torch.randn(b, 2, dtype=torch.bfloat16))
            assert all(o.dtype != torch.float64 for o in outs)
    assert counter.frame_count == 1
