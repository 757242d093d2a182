"""The consistency losses' JVP through real diffusers transformers (tiny, random): SD3, Flux, Wan
and Qwen-Image attention processors call F.scaled_dot_product_attention, which forward-mode AD
reaches through the math kernel; the forward-mode JVP agrees with finite differences and the sCM
loss compiles with fullgraph=True."""

from __future__ import annotations

import pytest
import torch
from families import build, samples

from fastgen.consistency import SCMConfig, SCMPipeline, jvp
from fastgen.plugins.qwen_image import QwenImageCall

pytest.importorskip("diffusers")
FAMILIES = ["sd3", "flux", "wan", "qwen"]
B = 3


def setup(family, dtype=torch.float32):
    net = build(family).to(dtype)
    data = samples(family, B)
    kwargs = {}
    if family in ("sd3", "flux"):
        kwargs["pooled_projections"] = data["pooled_projections"].to(dtype)
    if family == "flux":
        kwargs["img_ids"], kwargs["txt_ids"] = data["img_ids"][0], data["txt_ids"][0]
    if family == "qwen":
        kwargs["encoder_hidden_states_mask"] = data["encoder_hidden_states_mask"]
    call = QwenImageCall() if family == "qwen" else None
    cfg = SCMConfig(mode="training", num_train_timesteps=None if family == "qwen" else 1000)
    pipe = SCMPipeline(net, cfg, call=call)
    ehs = data["encoder_hidden_states"].to(dtype)
    return pipe, data["latents"].to(dtype), ehs, kwargs


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_jvp_agrees_with_finite_differences(family):
    pipe, x0, ehs, kwargs = setup(family, torch.float64)
    torch.manual_seed(1)
    eps = torch.randn_like(x0)
    a = torch.tensor([0.3, 0.8, 1.2], dtype=torch.float64)
    x_hat = (
        torch.cos(a).view(-1, *[1] * (x0.ndim - 1)) * x0
        + 0.5 * torch.sin(a).view(-1, *[1] * (x0.ndim - 1)) * eps
    )
    v = torch.randn_like(x0)

    def f(x, s):
        return pipe.trigflow(pipe.student, "student", x, s, ehs, kwargs, torch.float64)

    # The direction in x (the time embeddings compute in float32 inside diffusers).
    with torch.no_grad():
        fwd = jvp(f, (x_hat, a), (v, torch.zeros_like(a)))
        fd = jvp(f, (x_hat, a), (v, torch.zeros_like(a)), method="finite_difference", step=1e-3)
    rel = (fwd - fd).norm() / fwd.norm()
    # Some blocks compute in float32 inside (Flux's and Wan's norms, rotary embeddings): the
    # difference quotient carries their round-off (~1e-7 / step); a wrong JVP is off by O(1).
    assert rel < 1e-3, rel
    assert fwd.norm() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_scm_loss_compiles_into_one_graph(family):
    pipe, x0, ehs, kwargs = setup(family)
    torch.manual_seed(2)
    noise = torch.randn_like(x0)

    def fn(x0, noise, ehs):
        return pipe.compute_loss(x0, noise, ehs, **kwargs)

    compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=True)
    torch.manual_seed(3)
    out = compiled(x0, noise, ehs)
    out["total"].backward()
    assert torch.isfinite(out["total"])
    grads = [p.grad for p in pipe.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    torch.manual_seed(3)
    eager = fn(x0, noise, ehs)["total"]
    torch.testing.assert_close(out["total"], eager, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_meanflow_loss_of_a_meanflow_net_is_one_graph(family):
    from torch._dynamo.testing import CompileCounter

    from fastgen.consistency import MeanFlowConfig, MeanFlowPipeline
    from fastgen.consistency.networks import MeanFlowNet

    scm, x0, ehs, kwargs = setup(family)
    cfg = MeanFlowConfig(mode="training", r_sample_ratio=1.0,
                         num_train_timesteps=scm.config.num_train_timesteps)  # fmt: skip
    pipe = MeanFlowPipeline(MeanFlowNet(scm.student), cfg, call=scm.call)
    torch.manual_seed(2)
    noise = torch.randn_like(x0)

    def fn(x0, noise, ehs):
        return pipe.compute_loss(x0, noise, ehs, **kwargs)["total"]

    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    torch.manual_seed(3)
    got = compiled(x0, noise, ehs)
    assert counter.frame_count == 1
    got.backward()
    r_grads = [p.grad for p in pipe.student.r_embedder.parameters() if p.grad is not None]
    assert r_grads and any(g.abs().sum() > 0 for g in r_grads)  # the loss reaches r's embedding
    torch.manual_seed(3)
    torch.testing.assert_close(got, fn(x0, noise, ehs), rtol=1e-5, atol=1e-7)
