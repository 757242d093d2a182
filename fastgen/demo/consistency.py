"""The consistency family's students for the digits job: MeanFlow, sCM and rCM distillation of
the teacher through :mod:`fastgen.consistency`, in a loop that checkpoints and resumes like the
teacher's (:func:`~fastgen.demo.train.checkpointed_loop`), with an EMA of each student."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fastgen.config import SampleTimestepConfig
from fastgen.consistency import (
    SIGMA_DATA,
    AdaptiveWeight,
    MeanFlowConfig,
    MeanFlowPipeline,
    RCMConfig,
    RCMPipeline,
    SCMConfig,
    SCMPipeline,
    consistency_sample,
    meanflow_sample,
    scm_t_list,
)
from fastgen.demo.networks import DigitsFlowNet, DigitsMeanFlowNet
from fastgen.demo.train import Batch, Runtime, checkpointed_loop
from fastgen.dmd import DMDConfig, create_fake_score

METHODS = ("dmd2", "meanflow", "scm", "rcm")
MEANFLOW_2STEP = [1.0, 0.5, 0.0]


@dataclass(frozen=True)
class ConsistencySettings:
    """One consistency student: ``updates`` Adam steps at ``lr`` (cosine decay to ``lr / 20``),
    an EMA of ``ema_decay``; the teacher's guidance (``guidance_scale``, ``null_label``); the
    times t drawn from ``time_dist`` on [0, 1] (logit-normal: ``logit t ~ N(t_logit_mean,
    t_logit_std)``); MeanFlow's r drawn like t, or with
    ``r_logit_mean`` from a logit-normal of that mean (then ``t, r = max, min``: a negative mean
    trains the long jumps to r near 0 that the 1-step sampler takes), ``r_sample_ratio`` and
    the adaptive-weight power; the tangent warmup; sCM's and rCM's TrigFlow ``sigma_data`` (the
    2-step sampler's middle time follows it); how the JVP is taken (``jvp``, ``jvp_fd_step``:
    the configs' fields of the same names); rCM's DMD2 term: its weight ``dmd_weight``, its
    noise times drawn uniformly on ``[dmd_min_t, 1]``, and the fake score, trained with Adam at
    ``fake_lr`` ``fake_updates`` times before each student update (as DMD2's stages do)."""

    updates: int
    lr: float
    ema_decay: float
    guidance_scale: float | None = None
    null_label: int | None = None
    time_dist: Literal["uniform", "logitnormal"] = "logitnormal"
    t_logit_mean: float = 0.0
    t_logit_std: float = 1.0
    r_sample_ratio: float = 0.25
    r_logit_mean: float | None = None
    adaptive_weight_power: float = 1.0
    tangent_warmup_steps: int = 0
    sigma_data: float = SIGMA_DATA
    jvp: Literal["forward", "finite_difference"] = "forward"
    jvp_fd_step: float = 1e-3
    dmd_weight: float = 0.01
    dmd_min_t: float = 0.02
    fake_lr: float = 1e-3
    fake_updates: int = 5


@dataclass(frozen=True)
class Student:
    """A consistency student being trained: the network, the extra modules trained with it, and
    ``loss(x0, labels, iteration)``; rCM adds its fake score and ``fake_loss(x0, labels)``."""

    net: nn.Module
    extra: list[nn.Module]
    loss: Callable[[Tensor, Tensor, Tensor], Tensor]
    fake: nn.Module | None = None
    fake_loss: Callable[[Tensor, Tensor], Tensor] | None = None


def _negative(labels: Tensor, s: ConsistencySettings) -> dict:
    if s.guidance_scale is None:
        return {}
    return {"negative_encoder_hidden_states": torch.full_like(labels, s.null_label)}


def _times(s: ConsistencySettings, lo: float = 0.0, hi: float = 1.0) -> SampleTimestepConfig:
    return SampleTimestepConfig(time_dist_type=s.time_dist, train_p_mean=s.t_logit_mean,
                                train_p_std=s.t_logit_std, min_t=lo, max_t=hi)  # fmt: skip


def meanflow_student(teacher: DigitsFlowNet, s: ConsistencySettings) -> Student:
    """MeanFlow distillation: the student starts as the teacher (plus a zero ``t - r``
    embedding) and trains alone."""
    student = DigitsMeanFlowNet(copy.deepcopy(teacher)).requires_grad_(True).train()
    cfg = MeanFlowConfig(
        mode="distillation", pred_type="flow", guidance_scale=s.guidance_scale,
        r_sample_ratio=s.r_sample_ratio, adaptive_weight_power=s.adaptive_weight_power,
        tangent_warmup_steps=s.tangent_warmup_steps, sample_t_cfg=_times(s), jvp=s.jvp,
        jvp_fd_step=s.jvp_fd_step, sample_r_cfg=None if s.r_logit_mean is None else
        SampleTimestepConfig(time_dist_type="logitnormal", train_p_mean=s.r_logit_mean,
                             min_t=0.0, max_t=1.0),
    )  # fmt: skip
    pipe = MeanFlowPipeline(student, cfg, teacher=teacher)

    def loss(x0: Tensor, labels: Tensor, iteration: Tensor) -> Tensor:
        eps = torch.randn_like(x0)
        out = pipe.compute_loss(x0, eps, labels, iteration=iteration, **_negative(labels, s))
        return out["total"]

    return Student(student, [], loss)


def _scm_config(s: ConsistencySettings) -> dict:
    """The fields sCM and rCM share."""
    return dict(
        mode="distillation", pred_type="flow", guidance_scale=s.guidance_scale,
        tangent_warmup_steps=s.tangent_warmup_steps, jvp=s.jvp, jvp_fd_step=s.jvp_fd_step,
        sigma_data=s.sigma_data,
        sample_t_cfg=_times(s, 1e-3, 0.999),  # the config's default bounds
    )  # fmt: skip


def scm_student(teacher: DigitsFlowNet, s: ConsistencySettings) -> Student:
    """sCM distillation (sCD): the student (a copy of the teacher) trains with sCM's adaptive
    weighting network."""
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    weight = AdaptiveWeight().to(next(teacher.parameters()).device)
    pipe = SCMPipeline(student, SCMConfig(**_scm_config(s)), teacher=teacher, weight_net=weight)

    def loss(x0: Tensor, labels: Tensor, iteration: Tensor) -> Tensor:
        eps = torch.randn_like(x0)
        out = pipe.compute_loss(x0, eps, labels, iteration=iteration, **_negative(labels, s))
        return out["total"]

    return Student(student, [weight], loss)


def rcm_student(teacher: DigitsFlowNet, s: ConsistencySettings) -> Student:
    """rCM: sCM distillation plus ``s.dmd_weight`` times DMD2's score term on the student's
    one-step sample, with a fake score (a copy of the teacher) trained on those samples."""
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    weight = AdaptiveWeight().to(next(teacher.parameters()).device)
    fake = create_fake_score(teacher)
    dmd = DMDConfig(
        pred_type="flow", fake_score_pred_type="flow", guidance_scale=s.guidance_scale,
        student_update_freq=s.fake_updates, sample_t_cfg=SampleTimestepConfig(
            time_dist_type="uniform", min_t=s.dmd_min_t, max_t=1.0),
    )  # fmt: skip
    cfg = RCMConfig(**_scm_config(s), dmd_weight=s.dmd_weight, dmd=dmd)
    pipe = RCMPipeline(student, teacher, fake, cfg, weight_net=weight)

    def loss(x0: Tensor, labels: Tensor, iteration: Tensor) -> Tensor:
        eps = torch.randn_like(x0)
        out = pipe.compute_student_loss(
            x0, eps, labels, iteration=iteration, **_negative(labels, s)
        )
        return out["total"]

    def fake_loss(x0: Tensor, labels: Tensor) -> Tensor:
        return pipe.compute_fake_score_loss(x0, torch.randn_like(x0), labels)["total"]

    return Student(student, [weight], loss, fake, fake_loss)


def distill_consistency(
    rt: Runtime, method: str, teacher: DigitsFlowNet, batch: Batch, s: ConsistencySettings
) -> nn.Module:
    """Train the ``method`` (``meanflow``, ``scm``, ``rcm``) student of ``teacher`` for
    ``s.updates`` steps in ``rt.out / "student_<method>"``; returns its EMA (frozen, eval mode).

    rCM's fake score takes ``s.fake_updates`` steps, each on a fresh batch, before every
    student step."""
    if rt.world > 1:
        raise ValueError(f"--method {method} runs on one process (DDP: --method dmd2)")
    build = {"meanflow": meanflow_student, "scm": scm_student, "rcm": rcm_student}[method]
    built = build(teacher, s)
    student = built.net
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    # one optimizer and schedule per trained network (a checkpoint maps each to its network)
    trained = {"student": student, **{f"extra_{i}": m for i, m in enumerate(built.extra)}}
    opts = {
        n: torch.optim.Adam(m.parameters(), lr=s.lr, betas=(0.9, 0.99)) for n, m in trained.items()
    }
    scheds = {n: torch.optim.lr_scheduler.CosineAnnealingLR(o, s.updates, eta_min=s.lr / 20)
              for n, o in opts.items()}  # fmt: skip
    modules, all_opts = {**trained, "ema": ema}, dict(opts)
    step, fake_step = rt.compile(built.loss), None
    if built.fake is not None:
        # the fake score follows the student at a constant rate, with DMD2's betas (0, 0.99)
        fake_opt = torch.optim.Adam(built.fake.parameters(), lr=s.fake_lr, betas=(0.0, 0.99))
        modules["fake_score"], all_opts["fake_score"] = built.fake, fake_opt
        fake_step = rt.compile(built.fake_loss)
    state = {"modules": modules, "optimizers": all_opts, "schedulers": scheds}
    ema_params, live = list(ema.parameters()), list(student.parameters())

    def update(i: int) -> Tensor:
        if fake_step is not None:
            for _ in range(s.fake_updates):
                fake_loss = fake_step(*batch())
                fake_opt.zero_grad(set_to_none=True)
                fake_loss.backward()
                fake_opt.step()
        x0, labels = batch()
        # a 0-d tensor: under compile, a Python int would specialize and recompile
        loss = step(x0, labels, torch.tensor(i, device=x0.device))
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, opt in opts.items():
            opt.step()
            scheds[name].step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live, 1.0 - s.ema_decay)
        return loss

    checkpointed_loop(rt, rt.out / f"student_{method}", state, s.updates, method,
                      f"{method} student", update)  # fmt: skip
    return ema


def sample_students(
    method: str, student: nn.Module, noise: Tensor, labels: Tensor, generator: torch.Generator,
    sigma_data: float = SIGMA_DATA,
) -> dict[str, Tensor]:  # fmt: skip
    """The ``method`` student's 1-step and 2-step samples: MeanFlow jumps along its average
    velocity (``x0 = x1 - u(x1, 0, 1)``; 2 steps through t = 0.5), the consistency models (sCM,
    rCM) map to x0 and re-noise with fresh noise at sCM's middle time (:func:`scm_t_list`) in
    the TrigFlow of ``sigma_data``, the one the student was trained in."""
    with torch.no_grad():
        if method == "meanflow":
            return {
                "student_1step": meanflow_sample(student, noise, encoder_hidden_states=labels),
                "student_2step": meanflow_sample(
                    student, noise, MEANFLOW_2STEP, encoder_hidden_states=labels
                ),
            }
        return {
            f"student_{n}step": consistency_sample(
                student,
                noise,
                scm_t_list(n, sigma_data=sigma_data),
                encoder_hidden_states=labels,
                generator=generator,
            )
            for n in (1, 2)
        }


class MeanFlowOneStep(nn.Module):
    """``forward(noise, labels)``: MeanFlow's one step ``noise - u(noise, r=0, t=1)``."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        t = torch.ones(noise.shape[0], device=noise.device)
        u = self.student(
            hidden_states=noise, timestep=t, r=torch.zeros_like(t), encoder_hidden_states=labels
        )
        return noise - u
