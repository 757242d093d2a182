"""Training and sampling: an RF teacher, DMD2 students through :class:`fastgen.train.Trainer`,
and the samplers, written with the fastgen conversions. Every stage checkpoints into the run
folder and resumes from it, so a killed run rerun with the same ``--out`` ends exactly as the
straight run."""

from __future__ import annotations

import copy
import itertools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastgen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastgen.config import SampleTimestepConfig
from fastgen.dmd import (
    DMDConfig,
    EMAConfig,
    attach_feature_capture,
    classifier_free_guidance,
    create_fake_score,
)
from fastgen.flow_matching import add_noise, convert_prediction, pred_x0_from_flow, x0_to_eps
from fastgen.losses import dsm_loss
from fastgen.modules import RFForward, TimestepSampler
from fastgen.timesteps import make_t_list
from fastgen.train import Preempted, PreemptionNotice, RunConfig, Trainer

Batch = Callable[[], tuple[Tensor, Tensor | None]]  # () -> (x0 [B, ...], labels [B] or None)


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world: int
    compiled: bool
    out: Path = Path("fastgen-demo-out")
    checkpoint_every: int = 100  # updates of the stage being trained

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
    # The teacher stage checkpoints like the students' (fastgen.save_checkpoint, modules=).
    state = {"modules": {"teacher": net}, "optimizers": {"teacher": opt},
             "schedulers": {"teacher": sched}}  # fmt: skip

    def update(i: int) -> Tensor:
        x0, labels = batch()
        loss = step(model, sampler, noiser, x0, drop_labels(labels, label_dropout, null))
        descend(opt, loss, sched)
        return loss

    checkpointed_loop(rt, rt.out / "teacher", state, steps, "teacher", "teacher (RF)", update)
    return net.requires_grad_(False).eval()


def checkpointed_loop(
    rt: Runtime,
    folder: Path,
    state: dict,
    steps: int,
    name: str,
    desc: str,
    update: Callable[[int], Tensor],
) -> None:
    """Run ``update(i)`` (one optimizer step; returns the loss) for ``i`` in ``[start, steps)``.

    ``start`` is the step of the newest checkpoint under ``folder / "checkpoints"`` (0 if none);
    ``state`` (``modules=``, ``optimizers=``, ``schedulers=`` of :func:`fastgen.save_checkpoint`)
    is saved every ``rt.checkpoint_every`` steps and at the end, with the RNG states, so a
    resumed run ends exactly as the straight one. A preemption notice saves and stops.
    """
    root = folder / "checkpoints"
    last = latest_checkpoint(root)
    start = 0 if last is None else load_checkpoint(last, **state).step
    if start and rt.main:
        print(f"{name}: resumed from step {start} ({last})", flush=True)
    # A preemption notice saves and stops, as the trainer's stages do (one process: under DDP
    # the ranks would have to agree first, and the notice keeps its default action).
    signals = ("SIGTERM", "SIGUSR1") if rt.world == 1 else ()
    with progress(steps, desc, rt) as bar, PreemptionNotice(signals) as notice:
        bar.update(start)
        for i in range(start, steps):
            loss = update(i)
            bar.update()
            if i % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            stop = notice.received
            if (i + 1) % rt.checkpoint_every == 0 or i + 1 == steps or stop is not None:
                path = save_checkpoint(root / f"step_{i + 1:08d}", step=i + 1, **state)
                keep_newest(root, 2, rt)
                if stop is not None:
                    raise Preempted(stop, i + 1, path)


def keep_newest(root: Path, keep: int, rt: Runtime) -> None:
    """Delete all but the newest ``keep`` checkpoints under ``root`` (rank 0)."""
    if not rt.main:
        return
    done = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


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
    """DMD2 through :class:`fastgen.train.Trainer`: ``s.updates`` student updates, each after
    ``s.fake_updates`` fake-score updates; returns the EMA of the student. The stage's run
    folder is ``rt.out / "student_<name>"`` (checkpoints, TensorBoard events); it resumes from
    its newest checkpoint.

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
    # Adam with betas (0, 0.99) for every network (AdamW without weight decay); the generator's
    # learning rate decays (cosine to 1/20), which lets it settle instead of orbiting the fake score.
    optim = {
        "student": {"lr": s.gen_lr, "betas": (0.0, 0.99), "schedule": "cosine",
                    "min_lr_ratio": 0.05},
        "fake_score": {"lr": s.fake_lr, "betas": (0.0, 0.99)},
        "discriminator": {"lr": gan.lr if gan is not None else 1e-3, "betas": (0.0, 0.99)},
        "grad_clip": None,
    }  # fmt: skip
    run = RunConfig(
        out=str(rt.out / f"student_{name.replace('-', '')}"),
        steps=s.updates,
        seed=None,  # the demo seeds the RNG once, at the start
        compile=rt.compiled,
        parallel="ddp" if rt.world > 1 else "none",
        optim=optim,
        checkpoint={"every": rt.checkpoint_every, "keep": 2},
        log={"every": 50, "name": f"DMD2 {name}"},
    )

    def draw() -> dict:
        x0, labels = batch()
        out = {"latents": x0, "encoder_hidden_states": labels}
        if s.guidance_scale is not None:
            out["negative_encoder_hidden_states"] = torch.full_like(labels, s.null_label)
        return out

    trainer = Trainer(run, teacher=teacher, data=draw, student=student, fake_score=fake,
                      discriminator=disc, dmd=cfg, device=rt.device)  # fmt: skip
    trainer.fit()
    return copy.deepcopy(trainer.ema_student()).requires_grad_(False).eval()


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
