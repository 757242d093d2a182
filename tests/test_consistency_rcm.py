"""rCM: the student's loss is sCM's plus the weighted DMD2 term of the same networks; the fake
score trains on the student's one-step samples; one compiled graph; the config's cross-checks."""

from __future__ import annotations

import copy

import pydantic
import pytest
import torch
from torch._dynamo.testing import CompileCounter
from toys import ToyDiT, toy_batch

import fastgen
from fastgen import DMDConfig, DMDPipeline
from fastgen.consistency import AdaptiveWeight, RCMConfig, RCMPipeline, SCMPipeline


def networks():
    torch.manual_seed(0)
    teacher = ToyDiT()
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():
        for net in (student, fake):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return student, teacher, fastgen.create_fake_score(fake)


def config(**kw):
    return RCMConfig(dmd_weight=0.5, guidance_scale=2.0, dmd={"guidance_scale": 2.0}, **kw)


def test_student_loss_is_scm_plus_weighted_vsd_of_the_same_networks():
    student, teacher, fake = networks()
    cfg = config()
    rcm = RCMPipeline(student, teacher, fake, cfg, weight_net=AdaptiveWeight())
    lat, noise, cond, neg = toy_batch(5)
    t = torch.linspace(0.1, 0.9, 5)
    torch.manual_seed(3)
    out = rcm.compute_student_loss(lat, noise, cond, t=t, negative_encoder_hidden_states=neg)
    scm = SCMPipeline(student, cfg, teacher=teacher, weight_net=rcm.scm.weight_net)
    dmd = DMDPipeline(student, teacher, fake, cfg.dmd)
    torch.manual_seed(3)
    ref_scm = scm.compute_loss(lat, noise, cond, t=t, negative_encoder_hidden_states=neg)["scm"]
    ref_vsd = dmd.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)["vsd"]
    assert torch.equal(out["scm"], ref_scm) and torch.equal(out["vsd"], ref_vsd)
    expected = (ref_scm.double() + 0.5 * ref_vsd.double()).float()
    assert torch.equal(out["total"], expected)
    assert out["vsd"] > 0


def test_gradients_reach_the_student_and_the_weighting_only():
    student, teacher, fake = networks()
    weight = AdaptiveWeight()
    rcm = RCMPipeline(student, teacher, fake, config(), weight_net=weight)
    lat, noise, cond, neg = toy_batch(5)
    rcm.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)[
        "total"
    ].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert weight.linear.bias.grad is not None
    assert all(p.grad is None for p in (*teacher.parameters(), *fake.parameters()))
    fake_loss = rcm.compute_fake_score_loss(lat, noise, cond)["total"]
    student.zero_grad()
    fake_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.parameters())


def test_student_loss_is_one_graph():
    student, teacher, fake = networks()
    rcm = RCMPipeline(student, teacher, fake, config(jvp="finite_difference"))

    def fn(lat, noise, cond, neg):
        return rcm.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)

    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for i, b in enumerate((5, 7)):
        if i == 1:
            torch.compiler.set_stance("fail_on_recompile")
        compiled(*toy_batch(b))["total"].backward()
    torch.compiler.set_stance("default")
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"mode": "training"}, "mode must be 'distillation'"),
        ({"pred_type": "x0"}, "dmd.pred_type"),
        ({"num_train_timesteps": 1000}, "dmd.num_train_timesteps"),
        (
            {"dmd": DMDConfig(student_sample_steps=2, sample_t_cfg={"t_list": [0.9, 0.5, 0.0]})},
            "student_sample_steps",
        ),
        ({"dmd_weight": -1.0}, "dmd_weight"),
    ],
)
def test_config_errors_name_the_field(kw, words):
    with pytest.raises(pydantic.ValidationError, match=words):
        RCMConfig(**kw)


def test_constructor_rejects_other_configs():
    student, teacher, fake = networks()
    with pytest.raises(TypeError, match="RCMConfig"):
        RCMPipeline(student, teacher, fake, DMDConfig())
