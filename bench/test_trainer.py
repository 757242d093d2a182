"""The trainer's overhead per iteration against the bare compiled losses of the same step.

One iteration on the toy DiT of ``bench/test_dmd_step.py`` (width 64, 4 layers, batch 8,
latents 4x16x16, CFG 3, a 1-step student, fp32): 5 fake-score updates, 1 student update, EMA.
"Bare" is a hand-written loop over the same compiled losses, AdamW steps and EMA update;
"trainer" is :meth:`fastgen.train.Trainer.run_iteration` + ``after_iteration`` with TensorBoard
logging every 10 iterations (no checkpoint in the timed region). The two run interleaved, round
by round, on the same kind of networks and batches; ``extra_info`` holds every round and the
median of the per-round ratios.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import median
from test_dmd_step import ToyDiT

import fastgen
from fastgen.train import RunConfig, Trainer

DMD = {"guidance_scale": 3.0, "ema": {"decay": 0.99}}


def batches(b: int):
    def draw() -> dict:
        latents = torch.randn(b, 4, 16, 16)
        text = torch.randn(b, 8, 32)
        return {"latents": latents, "encoder_hidden_states": text,
                "negative_encoder_hidden_states": torch.zeros_like(text)}  # fmt: skip

    return draw


def test_trainer_overhead(benchmark, is_smoke):
    b, rounds, per_round = (2, 1, 1) if is_smoke else (8, 15, 4)
    # smoke mode runs the bodies once, eagerly (compiling is what the timed run measures)
    compiled = (lambda f: f) if is_smoke else (lambda f: torch.compile(f, fullgraph=True))
    torch.manual_seed(0)
    teacher = ToyDiT()
    out = tempfile.mkdtemp(prefix="fastgen-bench-trainer-")
    run = RunConfig(out=out, steps=10**6, compile=False, optim={"grad_clip": None},
                    dmd=DMD, checkpoint={"every": 10**6}, log={"every": 10, "progress": False})  # fmt: skip
    trainer = Trainer(run, teacher=copy.deepcopy(teacher), data=batches(b))
    torch._dynamo.reset()
    trainer.losses = {k: compiled(f) for k, f in trainer.losses.items()}

    # The bare loop: the same work, written by hand.
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    pipe = fastgen.DMDPipeline(student, copy.deepcopy(teacher), fake, fastgen.DMDConfig(**DMD))
    opts = {"student": torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.0, 0.999), weight_decay=0.0),
            "fake_score": torch.optim.AdamW(fake.parameters(), lr=1e-5, betas=(0.0, 0.999), weight_decay=0.0)}  # fmt: skip
    student_loss = compiled(pipe.compute_student_loss)
    fake_loss = compiled(pipe.compute_fake_score_loss)
    draw = batches(b)

    def descend(name, loss):
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    def bare():
        for _ in range(pipe.config.student_update_freq):
            x = draw()
            descend("fake_score", fake_loss(x["latents"], torch.randn_like(x["latents"]),
                                            x["encoder_hidden_states"])["total"])  # fmt: skip
        x = draw()
        loss = student_loss(x["latents"], torch.randn_like(x["latents"]), x["encoder_hidden_states"],
                            negative_encoder_hidden_states=x["negative_encoder_hidden_states"])  # fmt: skip
        descend("student", loss["total"])
        pipe.update_ema()

    done = trainer.begin(fresh=True)

    def with_trainer():
        nonlocal done
        trainer.run_iteration(done)
        done += 1
        trainer.after_iteration(done)

    for _ in range(2 if is_smoke else 4):  # compile and warm up outside the timed rounds
        with_trainer()
        bare()
    bare_ms, trainer_ms = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            with_trainer()
        middle = time.perf_counter()
        for _ in range(per_round):
            bare()
        end = time.perf_counter()
        trainer_ms.append((middle - start) / per_round * 1e3)
        bare_ms.append((end - middle) / per_round * 1e3)
    benchmark.group = "trainer overhead"
    benchmark.pedantic(with_trainer, rounds=1 if is_smoke else 5, warmup_rounds=0)
    trainer.end()
    logged = list((Path(out) / "tensorboard").glob("events.out.tfevents.*"))
    shutil.rmtree(out, ignore_errors=True)
    assert logged  # TensorBoard was on in the timed rounds
    ratios = [t / b_ for t, b_ in zip(trainer_ms, bare_ms)]
    benchmark.extra_info.update(
        trainer_rounds_ms=trainer_ms,
        bare_rounds_ms=bare_ms,
        overhead_median=statistics.median(ratios) - 1.0,
        bare_median_ms=statistics.median(bare_ms),
        trainer_median_ms=statistics.median(trainer_ms),
        trainer_pedantic_median_s=median(benchmark),
    )
