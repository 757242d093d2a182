"""fastgen.train.monitor: the guided teacher call, the evaluation's figures against float64
recomputations, the alarm on a collapsed student, best steps, the RNG left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from toys import ToyDiT, toy_batch

from fastgen.dmd.calls import NetworkCall
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.guidance import classifier_free_guidance
from fastgen.eval import diversity_ratio, frechet_distance, mean_pairwise_distance
from fastgen.train.config import EvalConfig, RunConfig
from fastgen.train.monitor import GuidedCall, Monitor, student_ladders

DMD = DMDConfig(guidance_scale=3.0, student_sample_steps=2, student_sample_type="ode",
                sample_t_cfg={"t_list": [0.999, 0.5, 0.0]})  # fmt: skip


class Collapsed(nn.Module):
    """A student that predicts the flow to one fixed picture whatever its input."""

    def __init__(self, picture: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("picture", picture)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=True):
        t = timestep.view(-1, 1, 1, 1)  # the RF time itself (num_train_timesteps None)
        # x_t = x0 + t v  =>  v = (x_t - x0) / t
        return ((hidden_states - self.picture) / t.clamp_min(1e-3),)


def _batch():
    torch.manual_seed(0)
    latents, _, cond, neg = toy_batch(4)
    return {"latents": latents, "encoder_hidden_states": cond,
            "negative_encoder_hidden_states": neg[:1]}  # fmt: skip


def test_guided_call_is_cfg_of_the_two_calls():
    torch.manual_seed(0)
    net, call = ToyDiT(), NetworkCall(num_train_timesteps=1000)
    b = _batch()
    x, t = b["latents"], torch.full((4,), 0.5)
    guided = GuidedCall(call, 3.0, b["negative_encoder_hidden_states"])
    cond = call(net, "teacher", x, t, b["encoder_hidden_states"], {})
    uncond = call(net, "teacher", x, t, b["negative_encoder_hidden_states"].expand(4, -1, -1), {})
    with torch.no_grad():
        got = guided(net, "teacher", x, t, b["encoder_hidden_states"], {})
    assert torch.equal(got, classifier_free_guidance(cond, uncond, 3.0).detach())
    assert torch.equal(GuidedCall(call, None)(net, "t", x, t, b["encoder_hidden_states"], {}), cond)


def test_student_ladders_are_one_step_and_k_steps():
    assert student_ladders(DMD) == {1: [0.999, 0.0], 2: [0.999, 0.5, 0.0]}


def test_figures_against_recomputation_and_the_rng_left_alone():
    torch.manual_seed(1)
    teacher = ToyDiT()
    student = copy.deepcopy(teacher)
    monitor = Monitor(EvalConfig(every=1, samples=2, seeds=3), DMD, _batch())
    state = torch.get_rng_state()
    report = monitor.evaluate(5, student, teacher)
    assert torch.equal(torch.get_rng_state(), state)  # evaluations draw from their own generator
    t, s = report["teacher"], report["student"][2]
    assert s["x"].shape == (6, 4, 8, 8) and set(report["student"]) == {1, 2}
    fs, ft = s["features"].reshape(2, 3, -1), t["features"].reshape(2, 3, -1)
    figures = report["figures"]
    assert figures["diversity"] == float(mean_pairwise_distance(fs))
    assert figures["diversity_ratio"] == float(diversity_ratio(fs, ft))
    assert figures["fd_to_teacher"] == float(frechet_distance(s["features"], t["features"]))
    assert "psnr_to_teacher" not in figures  # latents, no pictures: no PSNR
    assert monitor.history == [{"step": 5, **figures}]
    # the teacher's samples are computed once
    assert monitor.teacher_samples(teacher) is t


def test_alarm_fires_on_a_collapsed_student_and_not_on_the_teacher_itself():
    torch.manual_seed(2)
    teacher = ToyDiT()
    config = EvalConfig(every=1, samples=2, seeds=4, collapse={"threshold": 0.5, "patience": 2})
    healthy, collapsed = Monitor(config, DMD, _batch()), Monitor(config, DMD, _batch())
    student = Collapsed(torch.randn(1, 4, 8, 8))
    for step in (1, 2):
        ok = healthy.evaluate(step, teacher, teacher)  # the teacher as its own student
        bad = collapsed.evaluate(step, student, teacher)
    assert bad["figures"]["diversity_ratio"] < 1e-3 and bad["alarm"]["collapsed"]
    assert not ok["alarm"]["collapsed"] and ok["figures"]["diversity_ratio"] > 0.5
    assert collapsed.last_healthy_step() is None and healthy.last_healthy_step() == 2


def test_best_steps_and_state_round_trip():
    monitor = Monitor(EvalConfig(every=1, samples=2, seeds=2), DMD, _batch())
    monitor.history = [
        {"step": 10, "diversity_ratio": 0.9, "fd_to_teacher": 3.0},
        {"step": 20, "diversity_ratio": 0.95, "fd_to_teacher": 1.0},
        {"step": 30, "diversity_ratio": 0.9, "fd_to_teacher": 2.0},
    ]
    assert monitor.best("diversity_ratio", 1) == [20]
    assert monitor.best("diversity_ratio", 2) == [10, 20]  # ties: the earlier
    assert monitor.best("fd_to_teacher", 2) == [20, 30]  # lower is better
    other = Monitor(EvalConfig(every=1, samples=2, seeds=2), DMD, _batch())
    other.load_state_dict(monitor.state_dict())
    assert other.history == monitor.history and other.last_healthy_step() == 30


def test_checkpoint_best_needs_aligned_evaluations():
    with pytest.raises(ValueError, match=r"multiple of checkpoint\.every"):
        RunConfig(out="x", steps=4, checkpoint={"every": 2, "best": "diversity_ratio"},
                  eval={"every": 3})  # fmt: skip
    run = RunConfig(out="x", steps=4, checkpoint={"every": 2, "best": "fd_to_teacher"},
                    eval={"every": 4})  # fmt: skip
    assert run.checkpoint.best == "fd_to_teacher"
