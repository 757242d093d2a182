"""A small DMD2 run shared by the checkpoint tests (in-process and on torchrun ranks).

``build`` makes the pipeline, optimizers and LR schedulers: the teacher always from seed 0 (the
pretrained weights, reloaded on resume), the student, fake score and discriminator from
``seed`` (a resumed run is rebuilt from other initial weights before it loads). ``train`` runs
steps ``[start, stop)`` of the loop: ``student_update_freq - 1`` fake-score (and
discriminator) updates, then one student update and one EMA update, every batch, noise and
timestep drawn from the global RNG.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from toys import ToyDiT, ToyTokenDiscriminator

import fastgen
from fastgen import DMDConfig, DMDPipeline, EMAConfig
from fastgen.dmd.state import network_state

FREQ = 3


def config(*, gan: bool, ema_mode: str = "full_tensor") -> DMDConfig:
    return DMDConfig(
        guidance_scale=2.0,
        student_sample_steps=4,
        backward_simulation=True,
        student_update_freq=FREQ,
        gan_loss_weight_gen=0.03 if gan else 0.0,
        gan_r1_reg_weight=1.0 if gan else 0.0,
        sample_t_cfg={"time_dist_type": "shifted", "t_list": fastgen.make_t_list(4, shift=3.0)},
        ema=EMAConfig(decay=0.9, mode=ema_mode),
    )


@dataclass
class Run:
    pipe: DMDPipeline
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, object]
    losses: dict[str, Callable] = field(default_factory=dict)


def build(
    seed: int,
    *,
    gan: bool = False,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    wrap_disc: Callable[[nn.Module], nn.Module] | None = None,
    shard: Callable[[nn.Module], None] | None = None,
    compile_backend: str | None = None,
    ema_mode: str = "full_tensor",
    dim: int = 16,
) -> Run:
    torch.manual_seed(0)
    teacher = ToyDiT(dim=dim, depth=2)
    torch.manual_seed(seed)
    if seed == 0:
        student, fake = copy.deepcopy(teacher), fastgen.create_fake_score(teacher)
    else:
        student, fake = ToyDiT(dim=dim, depth=2), ToyDiT(dim=dim, depth=2)
    disc = ToyTokenDiscriminator(dim=dim) if gan else None
    if gan:
        fastgen.attach_feature_capture(teacher, [0, 1], blocks="transformer_blocks")
    if shard is not None:
        for net in (student, fake, teacher):
            shard(net)
    student_w, fake_w = wrap(student), wrap(fake)
    disc_w = None if disc is None else (wrap_disc or wrap)(disc)
    pipe = DMDPipeline(student_w, teacher, fake_w, config(gan=gan, ema_mode=ema_mode),
                       discriminator=disc_w)  # fmt: skip
    opts = {
        "student": torch.optim.Adam(student.parameters(), lr=1e-3, betas=(0.0, 0.99)),
        "fake_score": torch.optim.AdamW(fake.parameters(), lr=2e-3, weight_decay=0.01),
    }
    scheds = {
        "student": torch.optim.lr_scheduler.LinearLR(opts["student"], 0.25, total_iters=3),
        "fake_score": torch.optim.lr_scheduler.CosineAnnealingLR(opts["fake_score"], 10),
    }
    if disc is not None:
        opts["discriminator"] = torch.optim.Adam(disc.parameters(), lr=1e-3)
    losses = {
        "student": pipe.compute_student_loss,
        "fake_score": pipe.compute_fake_score_loss,
        "discriminator": pipe.compute_discriminator_loss,
    }
    if compile_backend is not None:
        losses = {k: torch.compile(f, backend=compile_backend, fullgraph=True)
                  for k, f in losses.items()}  # fmt: skip
    return Run(pipe, opts, scheds, losses)


def _descend(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train(run: Run, start: int, stop: int, batch: int = 2) -> None:
    """Steps ``start .. stop - 1`` of the loop (step i updates the student when
    ``(i + 1) % FREQ == 0``)."""
    for i in range(start, stop):
        latents, noise = torch.randn(batch, 4, 8, 8), torch.randn(batch, 4, 8, 8)
        cond = torch.randn(batch, 3, 8)
        if (i + 1) % FREQ:
            _descend(
                run.optimizers["fake_score"],
                run.losses["fake_score"](latents, noise, cond)["total"],
            )
            run.schedulers["fake_score"].step()
            if "discriminator" in run.optimizers:
                _descend(run.optimizers["discriminator"],
                         run.losses["discriminator"](latents, noise, cond)["total"])  # fmt: skip
        else:
            neg = torch.zeros_like(cond)
            out = run.losses["student"](latents, noise, cond, negative_encoder_hidden_states=neg)
            _descend(run.optimizers["student"], out["total"])
            run.schedulers["student"].step()
            run.pipe.update_ema()


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def snapshot(run: Run) -> dict[str, Tensor]:
    """Every trained tensor of the run, full (gathered under FSDP2), by a flat name: the
    networks, EMA shadows, optimizer states; and the schedulers' last LRs."""
    out = {}
    for name, net in run.pipe.networks().items():
        for key, value in network_state(net).items():
            out[f"{name}.{key}"] = full(value).clone()
    if run.pipe.ema is not None:
        for key, value in run.pipe.ema.sharded_state_dict().items():
            out[f"ema.{key}"] = full(value).clone()
    for name, opt in run.optimizers.items():
        for i, state in opt.state_dict()["state"].items():
            for key, value in state.items():
                out[f"opt.{name}.{i}.{key}"] = full(value).clone()
    for name, sched in run.schedulers.items():
        out[f"lr.{name}"] = torch.tensor(sched.get_last_lr(), dtype=torch.float64)
    return out


def differences(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    """Names whose tensors are not bitwise equal (or present in one only)."""
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or not torch.equal(a[n], b[n])]
