"""The trainer on 2 gloo ranks: ``torchrun --nproc_per_node=2 tests/train_distributed_worker.py
--parallel {ddp,fsdp2} --out DIR``. Run by tests/test_train_distributed.py; rank 0 prints one
JSON line.

A straight run, and a run that dies mid-iteration (both ranks' data raise at the same call),
rebuilt from other initial weights and resumed from its newest checkpoint: every gathered
weight, EMA shadow and optimizer state is compared bitwise on each rank. With ``--method
scm|rcm|meanflow`` the run is that method's (tests/test_train_methods.py's toys): a run of 2
steps, then resumed to 4, against the straight 4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import differences
from test_train import run_config, state_of, trainer
from test_train_methods import toy_trainer
from train_toys import Data, Interrupted
from workers import finish


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parallel", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", choices=["dmd2", "scm", "rcm", "meanflow"], default="dmd2")
    args = parser.parse_args()
    out = Path(args.out)
    if args.method != "dmd2":
        return consistency(args.method, args.parallel, out)

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


def consistency(method: str, parallel: str, out: Path) -> None:
    straight = toy_trainer(method, out / "straight", 4, parallel=parallel)
    straight.fit()
    toy_trainer(method, out / "resumed", 2, parallel=parallel).fit()
    resumed = toy_trainer(method, out / "resumed", 4, parallel=parallel)
    result = resumed.fit()
    diffs = differences(state_of(straight), got := state_of(resumed))
    gathered = [None, None]
    dist.all_gather_object(gathered, diffs)
    finish({"parallel": parallel, "world": dist.get_world_size(), "method": method,
            "networks": sorted(resumed.pipeline.networks()),
            "sharded": sorted(name for name, net in resumed.pipeline.networks().items()
                              if any(isinstance(p, DTensor) for p in net.parameters())),
            "resumed_from": result["resumed_from"], "differences": gathered, "tensors": len(got)})  # fmt: skip


if __name__ == "__main__":
    main()
