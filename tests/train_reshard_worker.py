"""Resume on another number of ranks: ``torchrun --nproc_per_node=N
tests/train_reshard_worker.py --phase {save,load} --out DIR``. Run by
tests/test_train_distributed.py; rank 0 prints one JSON line.

``save`` (2 ranks, FSDP2) trains 2 iterations, checkpoints, and writes the gathered state to
``DIR/saved.pt``. ``load`` (1 or 4 ranks, FSDP2) builds the same run with other initial weights
and 4 steps, resumes (DCP reshards), compares every gathered weight, EMA shadow and optimizer
state with the saved ones bitwise, then trains on to step 4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import differences
from test_train import run_config, state_of, trainer
from train_toys import Data
from workers import finish


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["save", "load"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    run = run_config(out / "run", parallel="fsdp2", steps=2 if args.phase == "save" else 4)
    if args.phase == "save":
        t = trainer(run, Data())
        t.fit()
        state = state_of(t)  # gathered on every rank (collectives)
        if dist.get_rank() == 0:
            torch.save(state, out / "saved.pt")
        finish({"phase": "save", "world": dist.get_world_size()})
    t = trainer(run, Data(), seed=5)  # other initial weights: the load must overwrite them
    start = t.begin()
    diffs = differences(torch.load(out / "saved.pt"), state_of(t))
    for it in range(start, run.steps):
        t.run_iteration(it)
        t.after_iteration(it + 1)
    t.end()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, diffs)
    finish({"phase": "load", "world": dist.get_world_size(), "resumed_from": start,
            "differences": gathered, "tensors": len(state_of(t))})  # fmt: skip


if __name__ == "__main__":
    main()
