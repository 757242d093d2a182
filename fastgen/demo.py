r"""DMD2 end to end on a 2-D mixture of 8 Gaussians: ``python -m fastgen.demo``.

1. Train a rectified-flow teacher (an MLP velocity model) with :class:`TimestepSampler`
   (logit-normal), :class:`RFForward` and the flow target.
2. Sample it with a multi-step Euler ODE written with the fastgen conversions.
3. Distill, with :class:`~fastgen.DMDPipeline`, a 1-step and a 4-step student (backward
   simulation): student and fake score initialised from the teacher, 5 fake-score updates per
   student update, an EMA of the student evaluated.
4. Report the sliced Wasserstein-2 distance (SWD) of each sampler to fresh data, and the modes
   covered; write ``metrics.json`` and ``samples.png``.

Runs on one process or under ``torchrun --nproc_per_node=2 -m fastgen.demo`` (DDP: gloo on
CPU, nccl on CUDA; each rank draws its own data and timesteps, rank 0 writes the files).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastgen.config import SampleTimestepConfig
from fastgen.dmd import DMDConfig, DMDPipeline, EMAConfig, create_fake_score
from fastgen.flow_matching import add_noise, convert_prediction, pred_x0_from_flow, x0_to_eps
from fastgen.losses import dsm_loss
from fastgen.modules import RFForward, TimestepSampler
from fastgen.timesteps import make_t_list

N_MODES = 8
RADIUS = 2.0
MODE_STD = 0.08


@dataclass(frozen=True)
class Budget:
    """How long each phase trains (the default run and ``--quick``)."""

    teacher_steps: int
    teacher_batch: int
    onestep_updates: int  # generator updates of the 1-step student; 5 fake-score updates each
    multistep_updates: int  # the same for the 4-step student
    batch: int
    teacher_ode_steps: int
    eval_samples: int


DEFAULT = Budget(
    teacher_steps=3000,
    teacher_batch=1024,
    onestep_updates=1000,
    multistep_updates=500,
    batch=1024,
    teacher_ode_steps=40,
    eval_samples=8192,
)
QUICK = Budget(
    teacher_steps=800,
    teacher_batch=512,
    onestep_updates=100,
    multistep_updates=100,
    batch=512,
    teacher_ode_steps=32,
    eval_samples=8192,
)
FAKE_UPDATES_PER_GEN = 5
GEN_LR, FAKE_LR = 5e-4, 1e-3
EMA_DECAY = 0.99  # the student that is evaluated is an EMA of the generator's weights


# --- data and metrics ------------------------------------------------------------------------


def mode_centers(device: torch.device) -> Tensor:
    angles = torch.arange(N_MODES, device=device, dtype=torch.float32) * (2 * math.pi / N_MODES)
    return RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def sample_data(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """n points from the ring of 8 Gaussians (std MODE_STD around radius RADIUS)."""
    which = torch.randint(0, N_MODES, (n,), device=device, generator=generator)
    noise = torch.randn(n, 2, device=device, generator=generator)
    return mode_centers(device)[which] + MODE_STD * noise


def sliced_wasserstein(a: Tensor, b: Tensor, projections: Tensor) -> float:
    """Sliced W2: sqrt of the mean over projections of W2^2 between the 1-D marginals."""
    pa = torch.sort(a.double() @ projections.double(), dim=0).values
    pb = torch.sort(b.double() @ projections.double(), dim=0).values
    return math.sqrt(float(((pa - pb) ** 2).mean()))


def modes_covered(samples: Tensor) -> int:
    """Modes with at least 1% of the samples within 3 standard deviations of their center."""
    dist_to_centers = torch.cdist(samples.float(), mode_centers(samples.device))
    near = (dist_to_centers < 3 * MODE_STD).float().mean(dim=0)
    return int((near >= 0.01).sum())


# --- networks --------------------------------------------------------------------------------


class VelocityMLP(nn.Module):
    """v(x_t, t): an MLP on the point and Fourier features of t."""

    def __init__(self, width: int = 128, n_freqs: int = 8) -> None:
        super().__init__()
        self.register_buffer(
            "freqs", 2.0 ** torch.arange(n_freqs, dtype=torch.float32) * math.pi, persistent=False
        )
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * n_freqs, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 2),
        )

    def forward(self, hidden_states: Tensor, timestep: Tensor) -> Tensor:
        angles = timestep[:, None] * self.freqs
        return self.net(torch.cat([hidden_states, angles.sin(), angles.cos()], dim=1))


# --- samplers (written with the fastgen conversions) ----------------------------------------


def euler_ode(
    model: Callable[[Tensor, Tensor], Tensor], eps: Tensor, t_list: list[float]
) -> Tensor:
    """Deterministic RF sampling: each step re-noises the x0 estimate with the implied noise.

    ``add_noise(x0_hat, eps_hat, t_next)`` with ``x0_hat = x_t - t v`` and
    ``eps_hat = x_t + (1 - t) v`` is exactly the Euler step ``x_t + (t_next - t) v``, with no
    division, and returns ``x0_hat`` at ``t_next = 0``.
    """
    x = eps
    for t_now, t_next in itertools.pairwise(t_list):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        flow = model(x, t)
        x0_hat = pred_x0_from_flow(flow, x, t)
        eps_hat = convert_prediction(flow, x, t, src="flow", dst="eps")
        x = add_noise(x0_hat, eps_hat, torch.full_like(t, t_next))
    return x


def student_sample(
    generator: Callable[[Tensor, Tensor], Tensor], eps: Tensor, t_list: list[float]
) -> Tensor:
    """Few-step student: x0 at each rung, then ODE re-noising to the next (exact at t = 0).

    It starts from ``t_list[0] * eps`` at ``t_list[0]``, the input DMDPipeline trains it on.
    """
    x = add_noise(
        torch.zeros_like(eps), eps, torch.full((eps.shape[0],), t_list[0], device=eps.device)
    )
    for t_now, t_next in itertools.pairwise(t_list):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        x0_hat = pred_x0_from_flow(generator(x, t), x, t)
        x = add_noise(x0_hat, x0_to_eps(x0_hat, x, t), torch.full_like(t, t_next))
    return x


# --- training steps (each compiled as one graph) --------------------------------------------


def denoising_loss(
    model: nn.Module, sampler: TimestepSampler, noiser: RFForward, x0: Tensor
) -> Tensor:
    """Flow-matching DSM of ``model`` on samples ``x0``.

    The teacher learns the data this way, and the fake score learns the (detached) generator
    samples: the student's law.
    """
    eps = torch.randn_like(x0)
    t = sampler(x0)
    return dsm_loss(model(noiser(x0, eps, t), t), x0=x0, eps=eps, t=t, pred_type="flow")


# --- the run ---------------------------------------------------------------------------------


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


def train_teacher(rt: Runtime, budget: Budget) -> nn.Module:
    teacher = VelocityMLP().to(rt.device)
    model = rt.wrap(teacher)
    sampler = TimestepSampler(
        SampleTimestepConfig(time_dist_type="logitnormal", min_t=0.0, max_t=1.0)
    )
    noiser = RFForward()
    opt = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, budget.teacher_steps, eta_min=1e-5)
    step = rt.compile(denoising_loss)
    with progress(budget.teacher_steps, "teacher (RF)", rt) as bar:
        for i in range(budget.teacher_steps):
            loss = step(model, sampler, noiser, sample_data(budget.teacher_batch, rt.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            if i % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return teacher.requires_grad_(False).eval()


def distill(
    rt: Runtime, budget: Budget, teacher: nn.Module, t_list: list[float], updates: int, name: str
) -> nn.Module:
    """DMD2 with :class:`~fastgen.DMDPipeline`: ``updates`` student updates, each after
    ``student_update_freq`` fake-score updates, and an EMA of the student (the one returned).

    A multi-step student (``len(t_list) > 2``) trains with backward simulation: each sample draws
    a rung and starts from the student's own unrolled sample there.
    """
    steps = len(t_list) - 1
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = create_fake_score(teacher)
    cfg = DMDConfig(
        pred_type="flow",
        fake_score_pred_type="flow",
        student_sample_steps=steps,
        backward_simulation=steps > 1,
        student_update_freq=FAKE_UPDATES_PER_GEN,
        sample_t_cfg=SampleTimestepConfig(
            time_dist_type="uniform",
            min_t=0.02,
            max_t=t_list[0],
            t_list=t_list if steps > 1 else None,
        ),
        ema=EMAConfig(decay=EMA_DECAY),
    )
    pipe = DMDPipeline(rt.wrap(student), teacher, rt.wrap(fake), cfg)
    gen_opt = torch.optim.Adam(student.parameters(), lr=GEN_LR, betas=(0.0, 0.99))
    fake_opt = torch.optim.Adam(fake.parameters(), lr=FAKE_LR, betas=(0.0, 0.99))
    # Decaying the generator's step lets it settle instead of orbiting the fake score.
    gen_sched = torch.optim.lr_scheduler.CosineAnnealingLR(gen_opt, updates, GEN_LR / 20)
    student_loss = rt.compile(pipe.compute_student_loss)
    fake_loss = rt.compile(pipe.compute_fake_score_loss)

    def batch() -> tuple[Tensor, Tensor]:
        return sample_data(budget.batch, rt.device), torch.randn(budget.batch, 2, device=rt.device)

    with progress(updates, f"DMD2 {name}", rt) as bar:
        for i in range(updates):
            for _ in range(cfg.student_update_freq):
                loss = fake_loss(*batch())["total"]
                fake_opt.zero_grad(set_to_none=True)
                loss.backward()
                fake_opt.step()
            loss = student_loss(*batch())["total"]
            gen_opt.zero_grad(set_to_none=True)
            loss.backward()
            gen_opt.step()
            gen_sched.step()
            pipe.update_ema()
            bar.update()
            if i % 50 == 0:
                bar.set_postfix(vsd=f"{loss.item():.3g}")
    ema = copy.deepcopy(student).requires_grad_(False)
    pipe.ema.copy_to(ema)
    return ema.eval()


def save_plot(path: Path, panels: dict[str, Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, pts) in zip(axes, panels.items()):
        pts = pts.detach().float().cpu()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3, rasterized=True)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rt = Runtime(device=device, rank=rank, world=world, compiled=not args.no_compile)
    budget = QUICK if args.quick else DEFAULT
    start = time.perf_counter()
    # Each rank its own data, noise and timesteps; DDP broadcasts rank 0's initial weights.
    torch.manual_seed(args.seed + 1000 * rank)
    teacher = train_teacher(rt, budget)
    one_step = make_t_list(1)
    four_step = make_t_list(4, shift=args.shift)
    student_1 = distill(rt, budget, teacher, one_step, budget.onestep_updates, "1-step")
    student_4 = distill(rt, budget, teacher, four_step, budget.multistep_updates, "4-step")

    result = None
    if rt.main:
        eval_gen = torch.Generator(device=device).manual_seed(args.seed + 7)
        data = sample_data(budget.eval_samples, device, eval_gen)
        noise = torch.randn(budget.eval_samples, 2, device=device, generator=eval_gen)
        projections = torch.randn(2, 256, device=device, generator=eval_gen)
        projections = projections / projections.norm(dim=0, keepdim=True)
        ode_ladder = [
            1.0 - i / budget.teacher_ode_steps for i in range(budget.teacher_ode_steps)
        ] + [0.0]
        with torch.no_grad():
            panels = {
                "data": sample_data(budget.eval_samples, device, eval_gen),
                f"teacher {budget.teacher_ode_steps}-step ODE": euler_ode(
                    teacher, noise, ode_ladder
                ),
                "teacher 1-step (x0 at t=1)": euler_ode(teacher, noise, [1.0, 0.0]),
                "DMD2 student 1-step": student_sample(student_1, noise, one_step),
                "DMD2 student 4-step": student_sample(student_4, noise, four_step),
            }
        swd = {k: sliced_wasserstein(v, data, projections) for k, v in panels.items()}
        names = list(panels)
        result = {
            "teacher_multistep_swd": swd[names[1]],
            "teacher_onestep_swd": swd[names[2]],
            "student_onestep_swd": swd[names[3]],
            "student_multistep_swd": swd[names[4]],
            "data_vs_data_swd": swd[names[0]],
            "student_modes_covered": modes_covered(panels[names[3]]),
            "student_multistep_modes_covered": modes_covered(panels[names[4]]),
            "teacher_modes_covered": modes_covered(panels[names[1]]),
            "n_modes": N_MODES,
            "seconds": round(time.perf_counter() - start, 1),
            "compiled": rt.compiled,
            "quick": bool(args.quick),
            "world_size": world,
            "device": str(device),
            "t_list_4step": four_step,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        save_plot(out / "samples.png", {f"{k}\nSWD {swd[k]:.3f}": v for k, v in panels.items()})
        print_summary(result, swd, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def print_summary(result: dict, swd: dict[str, float], out: Path) -> None:
    print("\nsliced W2 to fresh data (lower is better; data vs data is the noise floor)")
    for name, value in swd.items():
        print(f"  {name.replace(chr(10), ' '):34s} {value:.4f}")
    ratio_t = result["student_onestep_swd"] / result["teacher_multistep_swd"]
    ratio_b = result["student_onestep_swd"] / result["teacher_onestep_swd"]
    print(f"  1-step student / teacher multi-step   {ratio_t:.2f}x")
    print(f"  1-step student / teacher 1-step       {ratio_b:.2f}x")
    print(
        f"  modes covered by the 1-step student   {result['student_modes_covered']}/{result['n_modes']}"
    )
    print(
        f"  {result['seconds']} s, compiled={result['compiled']}; wrote {out}/metrics.json and samples.png"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastgen-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="./fastgen-demo-out", help="output folder")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument("--no-compile", action="store_true", help="run the training steps eagerly")
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute, for CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", type=float, default=1.0, help="shift of the 4-step ladder")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
