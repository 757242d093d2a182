"""sCM: the loss against a float64 reference written independently (FastGen's route through x0
and TrigFlow's division by sin), forward-mode vs finite-difference JVPs, CFG, warmup and the
adaptive weighting, one compiled graph, the samplers."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from torch import nn
from toys import ToyDiT, assert_consistency_loss_is_one_frame, toy_batch

import fastgen
from fastgen.consistency import (
    AdaptiveWeight,
    SCMConfig,
    SCMPipeline,
    consistency_sample,
    scm_loss,
    scm_t_list,
)

BATCHES = (5, 7, 11)  # not 2, 3 or 4: toy sizes (see test_consistency_meanflow)


class Flow64(nn.Module):
    """A smooth float64 rectified-flow network: v = tanh(W x + b t) (1 + t^2) (+ conditioning)."""

    def __init__(self, dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Linear(dim, dim, dtype=torch.float64)
        self.b = nn.Parameter(torch.randn(dim, dtype=torch.float64))

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        x = hidden_states.to(torch.float64)
        t = timestep.view(-1, *([1] * (x.ndim - 1))).to(torch.float64)
        h = self.w(x) + self.b * t
        if encoder_hidden_states is not None:
            h = h + encoder_hidden_states
        return (torch.tanh(h) * (1 + t**2)).to(hidden_states.dtype)


def reference(student, teacher, weight, x0, eps, t, cond, neg, *, scale, warm, mode, sd=0.5):
    """sCM's loss in float64 along FastGen's route (x0 prediction, then (cos x - x0) / sin)."""
    b = (-1,) + (1,) * (x0.ndim - 1)
    t_hat = torch.atan2(t, (1 - t) * sd)
    z = eps * sd

    def trig(net, x_hat, a, c):
        a = a.view(b)
        tt = 1 / ((torch.cos(a) / torch.sin(a)) / sd + 1)  # the RF time of equal SNR
        x_t = x_hat * torch.sqrt((1 - tt) ** 2 + (tt / sd) ** 2)
        x0_pred = x_t - tt * net(x_t, tt.view(-1), c)
        return (torch.cos(a) * x_hat - x0_pred) / torch.sin(a) / sd

    a = t_hat.view(b)
    x_hat = torch.cos(a) * x0 + torch.sin(a) * z
    with torch.no_grad():
        if mode == "training":
            vel = -torch.sin(a) * x0 + torch.cos(a) * z
        else:
            vel = sd * trig(teacher, x_hat, t_hat, cond)
            if scale is not None:
                vel = vel + (scale - 1) * (vel - sd * trig(teacher, x_hat, t_hat, neg))
        cs = torch.cos(t_hat) * torch.sin(t_hat)
        f_jvp = torch.func.jvp(
            lambda x, s: trig(student, x, s, cond), (x_hat, t_hat), (cs.view(b) * vel, cs)
        )[1]
    f = trig(student, x_hat, t_hat, cond)
    f_ = f.detach()
    g = -(torch.cos(a) ** 2) * (sd * f_ - vel) - warm * (cs.view(b) * x_hat + sd * f_jvp)
    d = x0[0].numel()
    g = g / (g.flatten(1).norm(dim=1).view(b) / math.sqrt(d) + 0.1)
    unweighted = ((f - f_ - g) ** 2).flatten(1).mean(1)
    lv = weight(t) if weight is not None else torch.zeros_like(t)
    return ((1 / t) / (torch.exp(lv) * d) * unweighted + lv).mean()


def data(n=6, seed=1):
    torch.manual_seed(seed)
    x0 = torch.randn(n, 3, 4, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, dtype=torch.float64)
    cond = 0.3 * torch.randn(n, 3, 4, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    return x0, eps, cond, torch.zeros_like(cond), t


def weight_net():
    w = AdaptiveWeight(16).double()
    with torch.no_grad():
        w.linear.weight.normal_(0, 0.3)  # a non-trivial weighting
    return w


CASES = {
    "scd-cfg": dict(mode="distillation", guidance_scale=2.5),
    "scd": dict(mode="distillation"),
    "sct": dict(mode="training"),
}


@pytest.mark.parametrize("method", ["forward", "finite_difference"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_the_float64_reference(case, method):
    x0, eps, cond, neg, t = data()
    student, teacher, weight = Flow64(seed=0), Flow64(seed=1), weight_net()
    kw = CASES[case]
    cfg = SCMConfig(
        **kw, jvp=method, jvp_fd_step=1e-6, tangent_warmup_steps=10, timestep_dtype="latents"
    )
    pipe = SCMPipeline(
        student,
        cfg,
        teacher=teacher if kw["mode"] == "distillation" else None,
        weight_net=weight,
    )
    out = pipe.compute_loss(x0, eps, cond, t=t, negative_encoder_hidden_states=neg, iteration=4)
    out["total"].backward()
    ours = [p.grad.clone() for p in (*student.parameters(), *weight.parameters())]
    student.zero_grad()
    weight.zero_grad()
    ref = reference(
        student, teacher, weight, x0, eps, t, cond, neg,
        scale=kw.get("guidance_scale"), warm=0.4, mode=kw["mode"],
    )  # fmt: skip
    ref.backward()
    refs = [p.grad for p in (*student.parameters(), *weight.parameters())]
    tol = 1e-11 if method == "forward" else 1e-7
    torch.testing.assert_close(out["total"], ref, rtol=tol, atol=0)
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert all(p.grad is None for p in teacher.parameters())


def test_cfg_and_warmup_change_the_loss():
    x0, eps, cond, neg, t = data()
    student, teacher = Flow64(seed=0), Flow64(seed=1)

    def loss(**kw):
        pipe = SCMPipeline(student, SCMConfig(timestep_dtype="latents", **kw), teacher=teacher)
        return pipe.compute_loss(x0, eps, cond, t=t, negative_encoder_hidden_states=neg)["total"]

    base = float(loss(tangent_warmup_steps=0).detach())
    assert abs(float(loss(tangent_warmup_steps=0, guidance_scale=3.0).detach()) - base) > 1e-6
    assert abs(float(loss(tangent_warmup_steps=100).detach()) - base) > 1e-6  # iteration 0: w = 0


def test_scm_loss_is_zero_at_the_consistency_fixed_point():
    # g = 0 when sigma_d F = velocity and the JVP cancels the x_hat term: no step to take.
    x_hat = torch.randn(2, 3, dtype=torch.float64)
    a = torch.tensor([0.4, 1.1], dtype=torch.float64)
    f = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    cs = (torch.cos(a) * torch.sin(a))[:, None]
    f_jvp = -cs * x_hat / 0.5
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    loss = scm_loss(f, f_jvp, 0.5 * f.detach(), x_hat, a, t)
    assert loss == 0
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


def toy_pipeline(mode="distillation", **kw):
    torch.manual_seed(0)
    teacher = ToyDiT()
    student = ToyDiT()
    student.load_state_dict(teacher.state_dict())
    return SCMPipeline(
        student,
        SCMConfig(mode=mode, **kw),
        teacher=teacher if mode == "distillation" else None,
        weight_net=AdaptiveWeight(),
    )


COMPILE = {
    "scd-cfg": dict(guidance_scale=2.0, tangent_warmup_steps=100),
    "sct": dict(mode="training"),
    "scd-fd": dict(jvp="finite_difference"),
}


@pytest.mark.parametrize("name", list(COMPILE))
def test_loss_is_one_graph_with_the_jvp_inside(name):
    pipe = toy_pipeline(**COMPILE[name])
    assert_consistency_loss_is_one_frame(pipe, pipe.config.jvp, BATCHES)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.student.parameters())
    assert pipe.weight_net.linear.weight.grad is not None
    if pipe.teacher is not None:
        assert all(p.grad is None for p in pipe.teacher.parameters())


def test_aot_eager_equals_eager():
    outs = []
    for backend in (None, "aot_eager"):
        pipe = toy_pipeline(guidance_scale=2.0)

        def fn(lat, noise, cond, neg, pipe=pipe):
            return pipe.compute_loss(lat, noise, cond, negative_encoder_hidden_states=neg)

        if backend:
            fn = torch.compile(fn, backend=backend, fullgraph=True)
        torch.manual_seed(11)
        batch = toy_batch(5)
        torch.manual_seed(12)
        out = fn(*batch)
        out["total"].backward()
        outs.append((out["total"].detach(), [p.grad for p in pipe.student.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(outs[0][1], outs[1][1]):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_no_host_sync(sync_counter):
    fastgen.set_value_checks(False)
    pipe = toy_pipeline(guidance_scale=2.0)
    lat, noise, cond, neg = toy_batch(5)
    with sync_counter() as counter:
        pipe.compute_loss(lat, noise, cond, negative_encoder_hidden_states=neg)["total"].backward()
    assert counter.syncs == []


def test_bf16_latents_keep_the_time_tangent():
    # The network's input and timestep are rounded to bf16 inside the JVP: the rounding must
    # keep the tangent (a plain round-to-nearest under no_grad would drop it).
    from fastgen.consistency import jvp

    x0, eps, _, _, t = data()
    pipe = SCMPipeline(Flow64(seed=0), SCMConfig(mode="training", timestep_dtype="latents"))
    a = torch.atan2(t, (1 - t) * 0.5)
    x_hat = torch.cos(a)[:, None, None] * x0 + torch.sin(a)[:, None, None] * 0.5 * eps
    dt = torch.ones_like(a)
    jvps = {}
    for dtype in (torch.bfloat16, torch.float64):
        fn = lambda x, s, dtype=dtype: pipe.trigflow(pipe.student, "s", x, s, None, {}, dtype)  # noqa: E731
        with torch.no_grad():
            jvps[dtype] = jvp(fn, (x_hat, a), (torch.zeros_like(x_hat), dt))  # the time direction
    rel = (jvps[torch.bfloat16] - jvps[torch.float64]).norm() / jvps[torch.float64].norm()
    assert rel < 3e-2, rel


def test_consistency_sampler_one_and_two_steps():
    torch.manual_seed(3)
    net = Flow64()
    noise = torch.randn(3, 3, 4, dtype=torch.float64)
    one = consistency_sample(net, noise)
    ones = torch.ones(3, dtype=torch.float32)
    torch.testing.assert_close(one, noise - net(noise, ones), rtol=0, atol=1e-15)
    torch.manual_seed(4)
    two = consistency_sample(net, noise, scm_t_list(2))
    torch.manual_seed(4)
    fresh = torch.randn_like(noise)
    tm = scm_t_list(2)[1]
    t32 = float(torch.tensor(tm, dtype=torch.float32))  # the sampler's times are float32
    x = (1 - t32) * one + t32 * fresh
    expected = x - t32 * net(x, torch.full((3,), tm, dtype=torch.float32))
    torch.testing.assert_close(two, expected, rtol=1e-12, atol=1e-12)
    sd = 0.5
    assert math.isclose(math.atan2(tm, (1 - tm) * sd), 1.1, rel_tol=1e-12)


def _bad():
    pipe = toy_pipeline(guidance_scale=2.0)
    lat, noise, cond, neg = toy_batch(5)
    z = torch.zeros(2, 3)
    return [
        (lambda: SCMConfig(sigma_data=0.0), pydantic.ValidationError, "sigma_data"),
        (lambda: SCMConfig(tangent_norm_const=-1.0), pydantic.ValidationError, "tangent_norm"),
        (lambda: SCMConfig(jvp="reverse"), pydantic.ValidationError, "jvp"),
        (
            lambda: SCMConfig(mode="training", guidance_scale=2.0),
            pydantic.ValidationError,
            "no teacher",
        ),
        (lambda: SCMPipeline(ToyDiT(), SCMConfig()), ValueError, "teacher"),
        (
            lambda: SCMPipeline(ToyDiT(), SCMConfig(mode="training"), weight_net=3),
            TypeError,
            "weight_net",
        ),
        (lambda: pipe.compute_loss(lat, noise, cond), ValueError, "negative_encoder_hidden_states"),
        (lambda: pipe.compute_loss(lat, noise[:2], cond), ValueError, "latents and noise"),
        (
            lambda: pipe.compute_loss(
                lat, noise, cond, t=torch.full((5,), 1.5), negative_encoder_hidden_states=neg
            ),
            ValueError,
            "t must lie",
        ),
        (
            lambda: scm_loss(z, z, z, z, torch.tensor([2.0, 0.1]), torch.rand(2)),
            ValueError,
            "t_hat",
        ),
        (
            lambda: scm_loss(z, z[:1], z, z, torch.rand(2), torch.rand(2)),
            ValueError,
            "trigflow and trigflow_jvp",
        ),
        (
            lambda: scm_loss(z, z, z, z, torch.rand(2), torch.rand(2), torch.zeros(3)),
            ValueError,
            "logvar",
        ),
        (lambda: scm_t_list(3), ValueError, "steps"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_input_is_a_clear_error(case):
    call, error, words = _bad()[case]
    with pytest.raises(error, match=words):
        call()
