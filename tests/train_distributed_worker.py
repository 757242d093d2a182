"""The trainer on 2 gloo ranks: ``torchrun --nproc_per_node=2 tests/train_distributed_worker.py
--parallel {ddp,fsdp2} --out DIR``. Run by tests/test_train_distributed.py; rank 0 prints one
JSON line.

A straight run, and a run that dies mid-iteration (both ranks' data raise at the same call),
rebuilt from other initial weights and resumed from its newest checkpoint: every gathered
weight, EMA shadow and optimizer state is compared bitwise on each rank.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import differences
from test_train import run_config, state_of, trainer
from train_toys import Data, Interrupted
from workers import finish


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parallel", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)

    def config(name):
        return run_config(out / name, parallel=args.parallel)

    straight = trainer(config("straight"), Data())
    straight.fit()
    first = trainer(config("resumed"), Data(stop_at=8))
    try:
        first.fit()
    except Interrupted:
        pass
    resumed = trainer(config("resumed"), Data(), seed=5)
    result = resumed.fit()
    want, got = state_of(straight), state_of(resumed)  # collectives under FSDP2: every rank
    diffs = differences(want, got)
    gathered = [None, None]
    dist.all_gather_object(gathered, diffs)
    finish({"parallel": args.parallel, "world": dist.get_world_size(),
            "resumed_from": result["resumed_from"], "differences": gathered, "tensors": len(got)})  # fmt: skip


if __name__ == "__main__":
    main()
