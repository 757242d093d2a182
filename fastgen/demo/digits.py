"""The digits job: a class-conditional RF teacher with CFG on scikit-learn's 8x8 digits, DMD2
1-step and 4-step students (or, with ``--method``, a MeanFlow, sCM or rCM student sampled in 1
and 2 steps), metrics in a classifier's feature space, and the exported 1-step student."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import fastgen.eval
from fastgen.demo import consistency
from fastgen.demo.data import N_CLASSES, Digits, batch_of, load_digits
from fastgen.demo.export import OneStepSampler, export_one_step, export_sampler
from fastgen.demo.metrics import frechet_distance, knn_precision_recall
from fastgen.demo.networks import DigitsClassifier, DigitsFlowNet
from fastgen.demo.plots import digits_grid
from fastgen.demo.train import (
    Runtime,
    distill_one_and_four_steps,
    euler_ode,
    student_sample,
    train_teacher,
)

NULL = N_CLASSES  # the "no label" index the teacher learns for classifier-free guidance
SAMPLERS = ("teacher", "teacher_1step", "student_1step", "student_4step", "data")
CONSISTENCY_SAMPLERS = ("teacher", "teacher_1step", "student_1step", "student_2step", "data")


@dataclass(frozen=True)
class Budget:
    teacher_steps: int
    onestep_updates: int
    multistep_updates: int
    batch: int
    teacher_ode_steps: int
    classifier_epochs: int
    ema_decay: float  # of the evaluated (and exported) students
    # student updates per --method meanflow / scm / rcm
    consistency_updates: Mapping[str, int]


DEFAULT = Budget(teacher_steps=4000, onestep_updates=400, multistep_updates=300, batch=128,
                 teacher_ode_steps=32, classifier_epochs=40, ema_decay=0.99,
                 consistency_updates={"meanflow": 800, "scm": 400, "rcm": 400})  # fmt: skip
QUICK = Budget(teacher_steps=800, onestep_updates=60, multistep_updates=40, batch=128,
               teacher_ode_steps=16, classifier_epochs=15, ema_decay=0.9,
               consistency_updates={"meanflow": 100, "scm": 100, "rcm": 100})  # fmt: skip
SETTINGS = {"gen_lr": 5e-4, "fake_lr": 1e-3}
# per --method: learning rate and the method's own knobs (consistency.ConsistencySettings),
# chosen on 400-update runs from this teacher (docs/main-job.md). MeanFlow: a finite-difference
# JVP over 0.05 in t (forward mode, through the teacher's high-frequency time features, left the
# 1-step student where it started), r drawn towards 0 for the 1-step jump (logit mean -3; at -2
# the 1-step student stayed near 3x the teacher's FD), on every row (no plain flow-matching
# rows), for 800 updates; sCM: lr 5e-4 diverged; rCM: sCM's settings, the DMD2 term weighted
# 10 (at 0.01 the sCM term dominates and the student degrades like sCM's). sCM and rCM take the
# same finite-difference JVP: through the teacher's time features (frequencies up to 2^7 pi)
# the exact dF/dt is mostly a fast wiggle at high t (at t = 0.8, twice the derivative smoothed
# over 0.01 in angle and at cosine 0.19 to it, and 4x the rest of the tangent), which the
# forward-mode tangent followed. Their sigma_d is the digits' std (0.75 in [-1, 1], not sCM's
# 0.5), which also puts the 2-step sampler's middle time (angle 1.1) at t = 0.596, not 0.496.
# sCM alone smooths its tangent over a wider step, 0.3, and draws more of its times at high
# noise (logit t ~ N(0.75, 1.4)): on seeds 0 and 1 its 1-step student went from 3.2x and 4.8x
# the teacher's FD to 1.5x (steps 0.01 and 0.05 leave a speckle of pixel noise; sCM's own
# proposal, N(-1, 1.4), trains the low-noise end and left 7x).
SCM_COMMON = {"lr": 2e-4, "tangent_warmup_steps": 100, "jvp": "finite_difference",
              "jvp_fd_step": 0.05, "sigma_data": 0.75}  # fmt: skip
CONSISTENCY = {
    "meanflow": {"lr": 4e-4, "time_dist": "uniform", "r_sample_ratio": 1.0, "r_logit_mean": -3.0,
                 "jvp": "finite_difference", "jvp_fd_step": 0.05},
    "scm": SCM_COMMON | {"jvp_fd_step": 0.3, "t_logit_mean": 0.75, "t_logit_std": 1.4},
    "rcm": SCM_COMMON | {"dmd_weight": 10.0, "fake_updates": 5},
}  # fmt: skip


def train_classifier(data: Digits, epochs: int) -> tuple[DigitsClassifier, float]:
    """A CNN on the training split (random 1-pixel shifts); returns it and its held-out accuracy."""
    clf = DigitsClassifier().to(data.train_x.device)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    n = len(data.train_y)
    for _ in range(epochs):
        for index in torch.randperm(n, device=data.train_y.device).split(128):
            x = F.pad(data.train_x[index], (1, 1, 1, 1), value=-1.0)
            dx, dy = torch.randint(0, 3, (2,)).tolist()
            x = x[:, :, dy : dy + 8, dx : dx + 8]
            loss = F.cross_entropy(clf(x), data.train_y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval().requires_grad_(False)
    accuracy = float((clf(data.eval_x).argmax(1) == data.eval_y).float().mean())
    return clf, accuracy


def evaluate(clf: DigitsClassifier, images: Tensor, labels: Tensor, real_features: Tensor) -> dict:
    with torch.no_grad():
        features = clf.features(images.float())
        accuracy = float((clf.head(features).argmax(1) == labels).float().mean())
    precision, recall = knn_precision_recall(real_features, features, k=3)
    return {
        "class_accuracy": accuracy,
        "fd": frechet_distance(features, real_features),
        "precision": precision,
        "recall": recall,
    }


def matched_training_images(data: Digits, labels: Tensor, generator: torch.Generator) -> Tensor:
    """For each label, a random training image of that class (the real-vs-real floor)."""
    out = torch.empty(len(labels), 1, 8, 8, device=labels.device)
    for c in range(N_CLASSES):
        pool = data.train_x[data.train_y == c]
        where = labels == c
        pick = torch.randint(
            0, len(pool), (int(where.sum()),), generator=generator, device=labels.device
        )
        out[where] = pool[pick]
    return out


def run(args, rt: Runtime, start: float) -> dict | None:
    budget = QUICK if args.quick else DEFAULT
    data = load_digits(rt.device)
    scale = None if args.guidance_scale == 1.0 else args.guidance_scale

    def batch():
        return batch_of(data.train_x, data.train_y, budget.batch)

    method = getattr(args, "method", "dmd2")
    teacher = train_teacher(
        rt, DigitsFlowNet(), batch, budget.teacher_steps, lr=1e-3, label_dropout=0.1, null=NULL
    )
    if method == "dmd2":
        settings = dict(SETTINGS, ema_decay=budget.ema_decay, guidance_scale=scale, null_label=NULL)
        one_step, four_step, student_1, student_4 = distill_one_and_four_steps(
            rt, teacher, batch, budget, settings, args.shift
        )
        samplers = SAMPLERS
    else:
        settings = consistency.ConsistencySettings(
            budget.consistency_updates[method], ema_decay=budget.ema_decay, guidance_scale=scale,
            null_label=NULL, **CONSISTENCY[method],
        )  # fmt: skip
        student = consistency.distill_consistency(rt, method, teacher, batch, settings)
        samplers = CONSISTENCY_SAMPLERS
    if not rt.main:
        return None

    clf, clf_accuracy = train_classifier(data, budget.classifier_epochs)
    gen = torch.Generator(device=rt.device).manual_seed(args.seed + 7)
    labels = data.eval_y
    noise = torch.randn(len(labels), 1, 8, 8, device=rt.device, generator=gen)
    ode = [1.0 - i / budget.teacher_ode_steps for i in range(budget.teacher_ode_steps)] + [0.0]

    def sample_all(noise: Tensor, labels: Tensor) -> dict[str, Tensor]:
        out = {
            "teacher": euler_ode(teacher, noise, ode, labels, guidance_scale=scale, null=NULL),
            "teacher_1step": euler_ode(
                teacher, noise, [1.0, 0.0], labels, guidance_scale=scale, null=NULL
            ),
        }
        if method != "dmd2":
            return out | consistency.sample_students(
                method, student, noise, labels, gen, settings.sigma_data
            )
        return out | {
            "student_1step": student_sample(student_1, noise, one_step, labels),
            # fresh noise between rungs, as backward simulation trains them (measured: FD 4.6
            # against 7.5 with the ODE step)
            "student_4step": student_sample(student_4, noise, four_step, labels, generator=gen),
        }

    samples = sample_all(noise, labels)
    samples["data"] = matched_training_images(data, labels, gen)
    with torch.no_grad():
        real_features = clf.features(data.eval_x)
    metrics = {name: evaluate(clf, samples[name], labels, real_features) for name in samplers}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # export: the EMA 1-step student, a dynamic batch, labels as an input
    if method == "dmd2":
        loaded = export_one_step(
            student_1, one_step[0], out / "student_1step.pt2", (noise[:5], labels[:5])
        )
        eager = OneStepSampler(student_1, one_step[0])
    else:
        # the consistency model's one step is the flow student's x0 at t = 1
        eager = consistency.MeanFlowOneStep(student) if method == "meanflow" else (
            OneStepSampler(student, 1.0))  # fmt: skip
        loaded = export_sampler(eager, out / "student_1step.pt2", (noise[:5], labels[:5]))
    with torch.no_grad():
        export_equal = bool(torch.equal(loaded(noise, labels), eager(noise, labels)))

    per_class = 6
    grid_labels = torch.arange(N_CLASSES, device=rt.device).repeat_interleave(per_class)
    grid_noise = torch.randn(len(grid_labels), 1, 8, 8, device=rt.device, generator=gen)
    grid = sample_all(grid_noise, grid_labels)
    grid["data"] = matched_training_images(data, grid_labels, gen)
    # diversity within a class (6 noises per digit) in the classifier's feature space, and its
    # ratio to the 32-step teacher's: the collapse alarm's figure (fastgen.eval)
    with torch.no_grad():
        groups = {
            n: clf.features(grid[n].float()).reshape(N_CLASSES, per_class, -1) for n in samplers
        }
    for name in samplers:
        metrics[name]["diversity"] = float(fastgen.eval.mean_pairwise_distance(groups[name]))
        metrics[name]["diversity_ratio"] = float(
            fastgen.eval.diversity_ratio(groups[name], groups["teacher"])
        )
    titles = {name: f"{name}\nFD {metrics[name]['fd']:.2f} acc {metrics[name]['class_accuracy']:.2f}\n"
              f"P {metrics[name]['precision']:.2f} R {metrics[name]['recall']:.2f}" for name in samplers}  # fmt: skip
    digits_grid(out / "samples.png", {titles[n]: grid[n] for n in samplers}, per_class)
    torch.save(
        {
            "labels": labels.cpu(),
            **{n: samples[n].float().cpu() for n in samplers[:-1]},
            "data": data.eval_x.cpu(),
        },
        out / "samples.pt",
    )
    result = {
        "job": "digits",
        "method": method,
        **metrics,
        "classifier_heldout_accuracy": clf_accuracy,
        "guidance_scale": args.guidance_scale,
        "export_equal": export_equal,
        "seconds": round(time.perf_counter() - start, 1),
        "compiled": rt.compiled,
        "quick": bool(args.quick),
        "world_size": rt.world,
        "device": str(rt.device),
        "seed": args.seed,
    }
    if method == "dmd2":
        result["t_list_4step"] = four_step
    else:
        result["t_list_2step"] = (
            consistency.MEANFLOW_2STEP if method == "meanflow"
            else consistency.scm_t_list(2, sigma_data=settings.sigma_data)
        )  # fmt: skip
        result["updates"] = budget.consistency_updates[method]
    return result


def summary(result: dict) -> str:
    lines = [f"{'sampler':15s} {'class acc':>9s} {'FD':>7s} {'precision':>9s} {'recall':>7s} "
             f"{'diversity/teacher':>17s}"]  # fmt: skip
    order = ("teacher", "teacher_1step", "student_1step", "student_2step", "student_4step", "data")
    for name in (n for n in order if n in result):
        m = result[name]
        lines.append(
            f"{name:15s} {m['class_accuracy']:9.3f} {m['fd']:7.3f} {m['precision']:9.3f} "
            f"{m['recall']:7.3f} {m['diversity_ratio']:17.3f}"
        )
    lines.append(f"classifier held-out accuracy {result['classifier_heldout_accuracy']:.3f}; "
                 f"exported 1-step student equals eager: {result['export_equal']}")  # fmt: skip
    return "\n".join(lines)
