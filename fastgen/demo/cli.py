"""``python -m fastgen.demo``: distill a class-conditional digits model (default) or a 2-D ring.

Runs on one process or under ``torchrun --nproc_per_node=2 -m fastgen.demo`` (DDP: gloo on CPU,
nccl on CUDA; each rank draws its own data and noise, rank 0 evaluates and writes the files).
Every stage checkpoints into ``--out``; the same command with the same ``--out`` resumes where a
killed run stopped and ends with the same results (``--fresh`` starts over). A SIGTERM or
SIGUSR1 (one process) saves after the update under way and exits with status 75.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastgen.demo import digits, ring
from fastgen.demo.consistency import METHODS
from fastgen.demo.train import Runtime
from fastgen.train import EXIT_PREEMPTED, Preempted, deterministic_kernels

JOBS = {"digits": digits, "ring": ring}


def run(args: argparse.Namespace) -> dict | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    stages = [out / "teacher", out / "student_1step", out / "student_4step"]
    stages += [out / f"student_{m}" for m in METHODS[1:]]
    if args.fresh and rank == 0:
        for stage in stages:
            shutil.rmtree(stage, ignore_errors=True)
    if world > 1:
        dist.barrier()
    rt = Runtime(device=device, rank=rank, world=world, compiled=not args.no_compile, out=out,
                 checkpoint_every=args.checkpoint_every)  # fmt: skip
    start = time.perf_counter()
    # Each rank its own data, noise and timesteps; DDP broadcasts rank 0's initial weights.
    torch.manual_seed(args.seed + 1000 * rank)
    job = JOBS[args.data]
    # Deterministic kernels for every stage (the teacher's own loop too): compiled scatters,
    # such as the label embedding's backward, would otherwise add in a varying order.
    with deterministic_kernels():
        result = job.run(args, rt, start)
    if result is not None:
        result["threads"] = torch.get_num_threads()
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        print("\n" + job.summary(result))
        print(
            f"{result['seconds']} s, compiled={rt.compiled}; wrote {out}/metrics.json, samples.png, samples.pt"
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m fastgen.demo`` command line."""
    parser = argparse.ArgumentParser(prog="fastgen-demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", choices=sorted(JOBS), default="digits", help="the job (default: digits)"
    )
    parser.add_argument(
        "--method", choices=METHODS, default="dmd2",
        help="digits: how the students are distilled (default: dmd2; meanflow, scm, rcm: a "
        "1-step and 2-step student through fastgen.consistency)",
    )  # fmt: skip
    parser.add_argument("--out", default="./fastgen-demo-out", help="output folder")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument("--no-compile", action="store_true", help="run the training steps eagerly")
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute, for CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guidance-scale", type=float, default=1.0, help="teacher CFG scale (digits; 1 = off)"
    )
    parser.add_argument("--shift", type=float, default=1.0, help="shift of the 4-step ladder")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=100, metavar="N",
        help="save every N updates of the stage being trained (and at its end); default 100",
    )  # fmt: skip
    parser.add_argument(
        "--fresh", action="store_true", help="start over instead of resuming from --out"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.method != "dmd2" and args.data != "digits":
        parser.error(f"--method {args.method} runs the digits job only")
    try:
        run(args)
    except Preempted as err:  # saved: the same command resumes
        print(f"fastgen-demo: {err}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
