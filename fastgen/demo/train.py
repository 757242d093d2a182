"""Training and sampling: an RF teacher, DMD2 students on :class:`~fastgen.DMDPipeline`, and the
samplers, written with the fastgen conversions."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastgen.config import SampleTimestepConfig
from fastgen.dmd import (
    DMDConfig,
    DMDPipeline,
    EMAConfig,
    attach_feature_capture,
    classifier_free_guidance,
    create_fake_score,
)
from fastgen.flow_matching import add_noise, convert_prediction, pred_x0_from_flow, x0_to_eps
from fastgen.losses import dsm_loss
from fastgen.modules import RFForward, TimestepSampler
from fastgen.timesteps import make_t_list

Batch = Callable[[], tuple[Tensor, Tensor | None]]  # () -> (x0 [B, ...], labels [B] or None)


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world: int
    compiled: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def compile(self, fn):
        # DDP's own forward (bucketing, logging) cannot be traced: under DDP the step compiles
        # with graph breaks around it, and the fastgen helpers still fuse on either side.
        return torch.compile(fn, fullgraph=self.world == 1) if self.compiled else fn


def progress(total: int, desc: str, rt: Runtime):
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal, silent in logs; only rank 0 reports.
    return tqdm(
        total=total, desc=desc, disable=None if rt.main else True, leave=True, dynamic_ncols=True
    )


def denoising_loss(
    model: nn.Module, sampler: TimestepSampler, noiser: RFForward, x0: Tensor, labels: Tensor | None
) -> Tensor:
    """Flow-matching DSM of ``model`` on samples ``x0`` (the teacher's loss)."""
    eps = torch.randn_like(x0)
    t = sampler(x0)
    x_t = noiser(x0, eps, t)
    flow = model(hidden_states=x_t, timestep=t, encoder_hidden_states=labels)
    return dsm_loss(flow, x0=x0, eps=eps, t=t, pred_type="flow")


def descend(opt: torch.optim.Optimizer, loss: Tensor, sched=None) -> None:
    """One optimizer step on ``loss`` (and one scheduler step, if given)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()


def drop_labels(labels: Tensor | None, p: float, null: int) -> Tensor | None:
    """Replace each label by ``null`` with probability ``p`` (CFG training), on device."""
    if labels is None or p == 0:
        return labels
    return torch.where(torch.rand(labels.shape, device=labels.device) < p, null, labels)


def train_teacher(
    rt: Runtime,
    net: nn.Module,
    batch: Batch,
    steps: int,
    lr: float,
    label_dropout: float = 0.0,
    null: int = 0,
) -> nn.Module:
    """Rectified-flow training of ``net`` (logit-normal t on [0, 1], Adam, cosine decay)."""
    net = net.to(rt.device)
    model = rt.wrap(net)
    sampler = TimestepSampler(
        SampleTimestepConfig(time_dist_type="logitnormal", min_t=0.0, max_t=1.0)
    )
    noiser = RFForward()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 100)
    step = rt.compile(denoising_loss)
    with progress(steps, "teacher (RF)", rt) as bar:
        for i in range(steps):
            x0, labels = batch()
            loss = step(model, sampler, noiser, x0, drop_labels(labels, label_dropout, null))
            descend(opt, loss, sched)
            bar.update()
            if i % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.requires_grad_(False).eval()


@dataclass(frozen=True)
class GANSettings:
    """DMD2's GAN branch: ``discriminator()`` builds the heads on the teacher's ``taps``; they
    train with ``lr`` after each fake-score update, and the student loss adds ``weight`` times
    the generator term."""

    weight: float
    taps: tuple[str, ...]
    discriminator: Callable[[], nn.Module]
    lr: float = 1e-3


@dataclass(frozen=True)
class DistillSettings:
    updates: int
    gen_lr: float
    fake_lr: float
    ema_decay: float
    guidance_scale: float | None = None
    null_label: int | None = None  # the unconditional label, for guidance
    fake_updates: int = 5
    gan: GANSettings | None = None


def distill(
    rt: Runtime,
    teacher: nn.Module,
    t_list: list[float],
    batch: Batch,
    s: DistillSettings,
    name: str,
) -> nn.Module:
    """DMD2 with :class:`~fastgen.DMDPipeline`: ``s.updates`` student updates, each after
    ``s.fake_updates`` fake-score updates; returns the EMA of the student.

    A multi-step student (``len(t_list) > 2``) trains with backward simulation: each sample
    draws a rung and starts from the student's own unrolled sample there. With ``s.gan``, a
    discriminator on the teacher's tapped features trains alongside the fake score (on a
    tapped copy of the teacher: the caller's teacher keeps no hooks).
    """
    steps = len(t_list) - 1
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = create_fake_score(teacher)
    gan, disc = s.gan, None
    if gan is not None:
        teacher = copy.deepcopy(teacher)
        attach_feature_capture(teacher, taps=list(gan.taps))
        disc = gan.discriminator().to(rt.device)
    cfg = DMDConfig(
        pred_type="flow",
        fake_score_pred_type="flow",
        guidance_scale=s.guidance_scale,
        student_sample_steps=steps,
        backward_simulation=steps > 1,
        student_update_freq=s.fake_updates,
        sample_t_cfg=SampleTimestepConfig(
            time_dist_type="uniform",
            min_t=0.02,
            max_t=t_list[0],
            t_list=t_list if steps > 1 else None,
        ),
        ema=EMAConfig(decay=s.ema_decay),
        gan_loss_weight_gen=0.0 if gan is None else gan.weight,
    )
    pipe = DMDPipeline(
        rt.wrap(student),
        teacher,
        rt.wrap(fake),
        cfg,
        discriminator=None if disc is None else rt.wrap(disc),
    )
    gen_opt = torch.optim.Adam(student.parameters(), lr=s.gen_lr, betas=(0.0, 0.99))
    fake_opt = torch.optim.Adam(fake.parameters(), lr=s.fake_lr, betas=(0.0, 0.99))
    if disc is not None:
        disc_opt = torch.optim.Adam(disc.parameters(), lr=gan.lr, betas=(0.0, 0.99))
        disc_loss = rt.compile(pipe.compute_discriminator_loss)
    # Decaying the generator's step lets it settle instead of orbiting the fake score.
    gen_sched = torch.optim.lr_scheduler.CosineAnnealingLR(gen_opt, s.updates, s.gen_lr / 20)
    student_loss = rt.compile(pipe.compute_student_loss)
    fake_loss = rt.compile(pipe.compute_fake_score_loss)

    def draw():
        x0, labels = batch()
        return x0, torch.randn_like(x0), labels

    with progress(s.updates, f"DMD2 {name}", rt) as bar:
        for i in range(s.updates):
            for _ in range(cfg.student_update_freq):
                descend(fake_opt, fake_loss(*draw())["total"])
                if disc is not None:
                    descend(disc_opt, disc_loss(*draw())["total"])
            x0, noise, labels = draw()
            if s.guidance_scale is None:
                loss = student_loss(x0, noise, labels)["total"]
            else:
                uncond = torch.full_like(labels, s.null_label)
                loss = student_loss(x0, noise, labels, negative_encoder_hidden_states=uncond)[
                    "total"
                ]
            descend(gen_opt, loss, gen_sched)
            pipe.update_ema()
            bar.update()
            if i % 50 == 0:
                bar.set_postfix(vsd=f"{loss.item():.3g}")
    ema = copy.deepcopy(student).requires_grad_(False)
    pipe.ema.copy_to(ema)
    return ema.eval()


def distill_one_and_four_steps(
    rt: Runtime,
    teacher: nn.Module,
    batch: Batch,
    budget,
    settings: dict,
    shift: float,
    onestep_gan: GANSettings | None = None,
) -> tuple[list[float], list[float], nn.Module, nn.Module]:
    """The 1-step and the 4-step (``make_t_list(4, shift)``) students of ``teacher``.

    ``budget`` gives ``onestep_updates`` and ``multistep_updates``; ``settings`` the rest of
    :class:`DistillSettings`; ``onestep_gan`` the 1-step student's GAN branch, if any. Returns
    both ladders and both EMA students.
    """
    one_step, four_step = make_t_list(1), make_t_list(4, shift=shift)
    onestep = DistillSettings(budget.onestep_updates, **settings, gan=onestep_gan)
    student_1 = distill(rt, teacher, one_step, batch, onestep, "1-step")
    student_4 = distill(
        rt,
        teacher,
        four_step,
        batch,
        DistillSettings(budget.multistep_updates, **settings),
        "4-step",
    )
    return one_step, four_step, student_1, student_4


def _flow(model, x: Tensor, t: Tensor, labels, null, scale):
    flow = model(hidden_states=x, timestep=t, encoder_hidden_states=labels)
    if scale is None or scale == 1.0:
        return flow
    uncond = model(hidden_states=x, timestep=t, encoder_hidden_states=torch.full_like(labels, null))
    return classifier_free_guidance(flow, uncond, scale)


@torch.no_grad()
def euler_ode(
    model: nn.Module, eps: Tensor, t_list: list[float], labels: Tensor | None = None,
    *, guidance_scale: float | None = None, null: int | None = None,
) -> Tensor:  # fmt: skip
    """Deterministic RF sampling (with CFG on the flow when ``guidance_scale`` is set).

    ``add_noise(x0_hat, eps_hat, t_next)`` with ``x0_hat = x_t - t v`` and
    ``eps_hat = x_t + (1 - t) v`` is exactly the Euler step ``x_t + (t_next - t) v``, with no
    division, and returns ``x0_hat`` at ``t_next = 0``.
    """
    x = eps
    for t_now, t_next in itertools.pairwise(t_list):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        flow = _flow(model, x, t, labels, null, guidance_scale)
        x0_hat = pred_x0_from_flow(flow, x, t)
        eps_hat = convert_prediction(flow, x, t, src="flow", dst="eps")
        x = add_noise(x0_hat, eps_hat, torch.full_like(t, t_next))
    return x


@torch.no_grad()
def student_sample(
    model: nn.Module, eps: Tensor, t_list: list[float], labels: Tensor | None = None,
    *, generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """Few-step student: x0 at each rung, then re-noised to the next rung (exact at t = 0).

    It starts from ``t_list[0] * eps`` at ``t_list[0]``, the input DMDPipeline trains it on.
    Between rungs it re-noises with fresh noise drawn from ``generator`` (as backward simulation
    trains each rung: the unrolled x0, re-noised with independent noise), or, with no generator,
    with the implied noise ``x0_to_eps`` (the ODE step).
    """
    t0 = torch.full((eps.shape[0],), t_list[0], device=eps.device)
    x = add_noise(torch.zeros_like(eps), eps, t0)
    for t_now, t_next in itertools.pairwise(t_list):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        x0_hat = pred_x0_from_flow(
            model(hidden_states=x, timestep=t, encoder_hidden_states=labels), x, t
        )
        if generator is None or t_next == 0.0:
            noise = x0_to_eps(x0_hat, x, t)
        else:
            noise = torch.randn(x.shape, device=x.device, generator=generator)
        x = add_noise(x0_hat, noise, torch.full_like(t, t_next))
    return x
