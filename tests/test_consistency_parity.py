"""Side by side with NVlabs/FastGen's consistency methods: on the same networks, x0, noise, t, r and
condition, fastgen's sCM and MeanFlow losses equal FastGen's ``SCMModel._compute_scm_loss`` and
``MeanFlowModel._compute_mf_loss`` (their batch means).

FastGen's files are read from a checkout named by ``FASTGEN_NVLABS_ROOT`` (nothing of FastGen is
in this repository): ``fastgen/methods/consistency_model/sCM.py``, ``.../mean_flow.py`` and
``fastgen/networks/noise_schedule.py``, executed with their imports of FastGen's own package
(whose name is also ``fastgen``) replaced by small stand-ins defined here; the model objects are
made without their trainer (``object.__new__``) and given the attributes their loss methods
read. Without the checkout, the float64 cases compare against the values FastGen's code gave
(pinned below, from commit 34f30e8 of NVlabs/FastGen).

Convention mapping: both libraries use rectified flow with t = 0 data, t = 1 noise and
``v = eps - x0``; FastGen's ``fwd_pred_type="flow"`` is our ``"flow"``. FastGen's networks are
called ``net(x_t, t, condition=..., r=..., fwd_pred_type=..., return_logvar=...)``; the adapter
``FastGenNet`` below calls the same diffusers-style network fastgen calls. sCM's logvar comes
from FastGen's network (``return_logvar=True``); here from the same ``AdaptiveWeight``.
FastGen draws its noise with ``torch.randn_like`` (sCM: scaled by sigma_d), pinned to ours.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from toys import ToyDiT, toy_batch

from fastgen.consistency import (
    AdaptiveWeight,
    MeanFlowConfig,
    MeanFlowPipeline,
    SCMConfig,
    SCMPipeline,
)

ROOT = os.environ.get("FASTGEN_NVLABS_ROOT")
needs_fastgen = pytest.mark.skipif(
    not ROOT, reason="set FASTGEN_NVLABS_ROOT to a checkout of NVlabs/FastGen"
)


# --- loading FastGen's files ----------------------------------------------------------------


def _expand_like(x, target):
    return x.reshape(*x.shape, *([1] * (target.ndim - x.ndim)))


class _Logger:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


PRECISION_MAP = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _exec(rel: str, names: dict) -> dict:
    path = Path(ROOT) / rel
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("from fastgen", "import fastgen")):
            line = line[: len(line) - len(stripped)] + "pass"  # given in `names` instead
        lines.append(line)
    namespace = {"__name__": "nvlabs_" + path.stem, **names}
    exec(compile("\n".join(lines), str(path), "exec"), namespace)
    return namespace


def nvlabs() -> SimpleNamespace:
    common = {"expand_like": _expand_like, "logger": _Logger(), "PRECISION_MAP": PRECISION_MAP}
    sched = _exec("fastgen/networks/noise_schedule.py", common)

    class FastGenNetwork(nn.Module):
        def __init__(self, net_pred_type: str, schedule_type: str) -> None:
            super().__init__()
            assert schedule_type == "trig"
            self.noise_scheduler = sched["TrigNoiseSchedule"]()

    extra = {
        "CMModel": object,
        "FastGenNetwork": FastGenNetwork,
        "convert_cfg_to_dict": dict,
        "basic_utils": SimpleNamespace(PRECISION_MAP=PRECISION_MAP),
    }
    scm = _exec("fastgen/methods/consistency_model/sCM.py", {**common, **extra})
    mf = _exec("fastgen/methods/consistency_model/mean_flow.py", {**common, **extra})
    return SimpleNamespace(
        RF=sched["RFNoiseSchedule"],
        TrigFlowPrecond=scm["TrigFlowPrecond"],
        SCMModel=scm["SCMModel"],
        MeanFlowModel=mf["MeanFlowModel"],
    )


class FastGenNet(nn.Module):
    """A diffusers-style flow network behind FastGen's network interface."""

    def __init__(self, net: nn.Module, schedule, weight: nn.Module | None = None) -> None:
        super().__init__()
        self.net, self.weight, self.noise_scheduler = net, weight, schedule

    def forward(self, x_t, t, condition=None, return_logvar=False, fwd_pred_type="flow", r=None):
        kwargs = {} if r is None else {"r": r}
        out = self.net(hidden_states=x_t, timestep=t, encoder_hidden_states=condition, **kwargs)
        v = getattr(out, "sample", out)
        pred = v if fwd_pred_type == "flow" else self.noise_scheduler.flow_to_x0(x_t, v, t)
        return (pred, self.weight(t)[:, None]) if return_logvar else pred


def fastgen_scm(fg, student, teacher, weight, *, mode, scale, warmup_steps, sd=0.5):
    m = object.__new__(fg.SCMModel)  # the loss methods only read these attributes
    rf = fg.RF()
    m.net = FastGenNet(student, rf, weight)
    m.teacher = None if teacher is None else FastGenNet(teacher, rf)
    m.config = SimpleNamespace(guidance_scale=scale, skip_layers=None)
    m.sample_t_cfg = SimpleNamespace(quantize=False, sigma_data=sd)
    m.loss_config = SimpleNamespace(
        use_cd=mode == "distillation",
        tangent_warmup_steps=warmup_steps,
        tangent_warmup_const=0.1,
        prior_weighting_enabled=True,
        g_norm_spatial_invariance=True,
        divide_x_0_spatial_dim=True,
        use_jvp_finite_diff=False,
        jvp_finite_diff_eps=1e-3,
    )
    m.sigma_data, m.precision_amp_jvp, m.device = sd, None, torch.device("cpu")
    m.net_trigflow = fg.TrigFlowPrecond(m.net, sigma_data=sd)
    m.teacher_trigflow = None if teacher is None else fg.TrigFlowPrecond(m.teacher, sigma_data=sd)
    return m


def fastgen_meanflow(fg, student, teacher, cfg: MeanFlowConfig):
    m = object.__new__(fg.MeanFlowModel)
    rf = fg.RF()
    m.net = FastGenNet(student, rf)
    m.teacher = None if teacher is None else FastGenNet(teacher, rf)
    m.loss_config = SimpleNamespace(
        use_cd=cfg.mode == "distillation",
        use_jvp_finite_diff=cfg.jvp == "finite_difference",
        jvp_finite_diff_eps=cfg.jvp_fd_step,
        loss_type=cfg.loss_type,
        norm_method=f"poly_{cfg.adaptive_weight_power}",
        norm_const=cfg.adaptive_weight_const,
        tangent_warmup_steps=cfg.tangent_warmup_steps,
        tangent_spatial_invariance=cfg.tangent_spatial_invariance,
    )
    m.config = SimpleNamespace(
        guidance_scale=cfg.guidance_scale,
        guidance_t_start=cfg.guidance_t_start,
        guidance_t_end=cfg.guidance_t_end,
        guidance_mixture_ratio=cfg.guidance_mixture_ratio,
        cond_dropout_prob=cfg.cond_dropout_prob,
        cond_keys_no_dropout=[],
        loss_config=m.loss_config,
    )
    m.precision_amp_jvp, m.device = None, torch.device("cpu")
    return m


def pinned_noise(monkeypatch, noise):
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: noise.to(x.dtype))


# --- networks and inputs ----------------------------------------------------------------------


class Det(nn.Module):
    """A float64 flow network with closed-form weights (no RNG: its losses can be pinned)."""

    def __init__(self, phase: float, with_r: bool = False) -> None:
        super().__init__()
        k = torch.arange(16, dtype=torch.float64)
        self.w = nn.Parameter(0.5 * torch.sin(k * 1.3 + phase).view(4, 4))
        self.b = nn.Parameter(torch.cos(torch.arange(4, dtype=torch.float64) + phase))
        self.with_r = with_r

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, r=None):
        t = timestep.to(torch.float64).view(-1, 1, 1)
        h = hidden_states @ self.w + self.b * t
        if encoder_hidden_states is not None:
            h = h + encoder_hidden_states
        if self.with_r:
            h = h + 0.7 * r.to(torch.float64).view(-1, 1, 1) * self.b
        return torch.tanh(h) * (1 + t**2)


def det_inputs(n=5):
    k = torch.arange(n * 12, dtype=torch.float64).view(n, 3, 4)
    x0, eps = torch.sin(0.37 * k), torch.cos(0.71 * k + 0.2)
    cond, neg = 0.3 * torch.sin(0.13 * k), torch.zeros(n, 3, 4, dtype=torch.float64)
    t = torch.linspace(0.15, 0.9, n, dtype=torch.float64)
    return x0, eps, cond, neg, t


def det_weight():
    w = AdaptiveWeight(8).double()
    with torch.no_grad():
        w.linear.weight.copy_(0.2 * torch.cos(torch.arange(8, dtype=torch.float64)).view(1, 8))
    return w


SCM_CASES = {
    "scd-cfg": dict(mode="distillation", scale=2.5),
    "scd": dict(mode="distillation", scale=None),
    "sct": dict(mode="training", scale=None),
}
# FastGen's SCMModel._compute_scm_loss(...)[0].mean() on det_inputs() with Det networks at
# iteration 3 of 10 warmup steps (NVlabs/FastGen 34f30e8, float64, torch 2.13 CPU).
SCM_PINNED = {
    "scd-cfg": 0.011780262447428563,
    "scd": 0.007052704586456937,
    "sct": 0.04991678993513244,
}


def ours_scm(case, x0, eps, cond, neg, t, student, teacher, weight, warmup_steps=10, it=3):
    kw = SCM_CASES[case]
    cfg = SCMConfig(
        mode=kw["mode"],
        guidance_scale=kw["scale"],
        tangent_warmup_steps=warmup_steps,
        timestep_dtype="latents",  # FastGen hands its networks t in t's own dtype
    )
    pipe = SCMPipeline(
        student, cfg, teacher=teacher if kw["mode"] == "distillation" else None, weight_net=weight
    )
    return pipe.compute_loss(x0, eps, cond, t=t, negative_encoder_hidden_states=neg, iteration=it)[
        "scm"
    ]


def theirs_scm(monkeypatch, fg, case, x0, eps, cond, neg, t, student, teacher, weight):
    kw = SCM_CASES[case]
    m = fastgen_scm(
        fg, student, teacher if kw["mode"] == "distillation" else None, weight,
        mode=kw["mode"], scale=kw["scale"], warmup_steps=10,
    )  # fmt: skip
    pinned_noise(monkeypatch, eps)  # FastGen: z = randn_like(x0) * sigma_d, as ours
    with sdpa_kernel([SDPBackend.MATH]):  # eager forward-mode AD needs the math kernel on CPU
        loss = m._compute_scm_loss(x0, t, condition=cond, neg_condition=neg, iteration=3)[0]
    monkeypatch.undo()
    return loss.mean()


@pytest.mark.parametrize("case", list(SCM_CASES))
def test_scm_equals_fastgens_pinned_float64_values(case):
    x0, eps, cond, neg, t = det_inputs()
    ours = ours_scm(case, x0, eps, cond, neg, t, Det(0.0), Det(1.0), det_weight())
    assert math.isclose(ours.detach().item(), SCM_PINNED[case], rel_tol=1e-12)


@needs_fastgen
@pytest.mark.parametrize("case", list(SCM_CASES))
def test_scm_equals_fastgens_float64(monkeypatch, case):
    fg = nvlabs()
    x0, eps, cond, neg, t = det_inputs()
    nets = Det(0.0), Det(1.0), det_weight()
    ours = ours_scm(case, x0, eps, cond, neg, t, *nets)
    ours.backward()
    params = [*nets[0].parameters(), *nets[2].parameters()]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    theirs = theirs_scm(monkeypatch, fg, case, x0, eps, cond, neg, t, *nets)
    theirs.backward()
    print(
        f"sCM {case} float64: fastgen {ours.detach().item()!r} FastGen {theirs.detach().item()!r}"
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for ours_grad, p in zip(grads, params):
        torch.testing.assert_close(ours_grad, p.grad, rtol=1e-10, atol=1e-12)


@needs_fastgen
@pytest.mark.parametrize("case", list(SCM_CASES))
def test_scm_equals_fastgens_on_a_float32_transformer(monkeypatch, case):
    fg = nvlabs()
    torch.manual_seed(0)
    teacher = ToyDiT()
    student = ToyDiT()
    weight = AdaptiveWeight(16)
    with torch.no_grad():
        weight.linear.weight.normal_(0, 0.3)
    x0, eps, cond, neg = toy_batch(5)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    ours = ours_scm(case, x0, eps, cond, neg, t, student, teacher, weight)
    theirs = theirs_scm(monkeypatch, fg, case, x0, eps, cond, neg, t, student, teacher, weight)
    print(
        f"sCM {case} float32 ToyDiT: fastgen {ours.detach().item()!r} FastGen {theirs.detach().item()!r}"
    )
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-6, atol=0)


MF_CASES = {
    "ct-opt_grad": dict(mode="training"),
    "ct-l2-warmup": dict(mode="training", loss_type="l2", tangent_warmup_steps=10),
    "ct-cfg-dropout": dict(mode="training", guidance_scale=2.0, cond_dropout_prob=0.4),
    "ct-mixture": dict(
        mode="training", guidance_scale=2.0, guidance_mixture_ratio=0.3, cond_dropout_prob=0.4
    ),
    "cd-cfg-window": dict(mode="distillation", guidance_scale=3.0, guidance_t_end=0.6),
    "ct-fd": dict(mode="training", jvp="finite_difference", jvp_fd_step=1e-4),
}
# FastGen's MeanFlowModel._compute_mf_loss(...)[0].mean(), same inputs, t and r of mf_times.
MF_PINNED = {
    "ct-opt_grad": 0.9637561733379844,
    "ct-l2-warmup": 0.9955126350437389,
    "ct-cfg-dropout": 0.9750942807346329,
    "ct-mixture": 0.9750523548262736,
    "cd-cfg-window": 0.9331819274948137,
    "ct-fd": 0.9637561733358615,
}


def mf_times(n, dtype):
    t = torch.linspace(0.2, 0.95, n, dtype=dtype)
    r = torch.linspace(0.0, 0.5, n, dtype=dtype).minimum(t)
    r[0] = t[0]  # one flow-matching row
    return t, r


def ours_mf(case, x0, eps, cond, neg, t, r, student, teacher, it=3):
    cfg = MeanFlowConfig(**MF_CASES[case], timestep_dtype="latents")
    pipe = MeanFlowPipeline(student, cfg, teacher=teacher if cfg.mode == "distillation" else None)
    torch.manual_seed(5)  # the dropout draw
    out = pipe.compute_loss(
        x0, eps, cond, t=t, r=r, negative_encoder_hidden_states=neg, iteration=it
    )
    return out["meanflow"]


def theirs_mf(monkeypatch, fg, case, x0, eps, cond, neg, t, r, student, teacher, it=3):
    cfg = MeanFlowConfig(**MF_CASES[case])
    m = fastgen_meanflow(fg, student, teacher if cfg.mode == "distillation" else None, cfg)
    pinned_noise(monkeypatch, eps)
    torch.manual_seed(5)
    with sdpa_kernel([SDPBackend.MATH]):
        loss = m._compute_mf_loss(x0, t, r, it, condition=cond, neg_condition=neg)[0]
    monkeypatch.undo()
    return loss.mean()


@pytest.mark.parametrize("case", list(MF_CASES))
def test_meanflow_equals_fastgens_pinned_float64_values(case):
    x0, eps, cond, neg, _ = det_inputs()
    t, r = mf_times(5, torch.float64)
    ours = ours_mf(case, x0, eps, cond, neg, t, r, Det(0.0, True), Det(1.0))
    assert math.isclose(ours.detach().item(), MF_PINNED[case], rel_tol=1e-12)


@needs_fastgen
@pytest.mark.parametrize("case", list(MF_CASES))
def test_meanflow_equals_fastgens_float64(monkeypatch, case):
    fg = nvlabs()
    x0, eps, cond, neg, _ = det_inputs()
    t, r = mf_times(5, torch.float64)
    nets = Det(0.0, True), Det(1.0)
    ours = ours_mf(case, x0, eps, cond, neg, t, r, *nets)
    ours.backward()
    grads = [p.grad.clone() for p in nets[0].parameters()]
    nets[0].zero_grad()
    theirs = theirs_mf(monkeypatch, fg, case, x0, eps, cond, neg, t, r, *nets)
    theirs.backward()
    print(
        f"MeanFlow {case} float64: fastgen {ours.detach().item()!r} FastGen {theirs.detach().item()!r}"
    )
    tol = 1e-12 if "fd" not in case else 1e-9
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=0)
    for ours_grad, p in zip(grads, nets[0].parameters()):
        torch.testing.assert_close(ours_grad, p.grad, rtol=tol * 100, atol=1e-12)


@needs_fastgen
@pytest.mark.parametrize("case", list(MF_CASES))
def test_meanflow_equals_fastgens_on_a_float32_transformer(monkeypatch, case):
    fg = nvlabs()
    torch.manual_seed(0)
    teacher = ToyDiT()
    student = ToyDiT(r_embedding=True)
    x0, eps, cond, neg = toy_batch(5)
    t, r = mf_times(5, torch.float32)
    ours = ours_mf(case, x0, eps, cond, neg, t, r, student, teacher)
    theirs = theirs_mf(monkeypatch, fg, case, x0, eps, cond, neg, t, r, student, teacher)
    print(
        f"MeanFlow {case} float32 ToyDiT: fastgen {ours.detach().item()!r} FastGen {theirs.detach().item()!r}"
    )
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-6, atol=0)
