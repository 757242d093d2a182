"""Checkpoints on 2 gloo ranks: ``torchrun --nproc_per_node=2
tests/checkpoint_distributed_worker.py --wrap {ddp,fsdp2} --out DIR [--one-rank DIR]``.
Run by tests/test_checkpoint_distributed.py; rank 0 prints one JSON line.

For each EMA mode (FSDP2: ``full_tensor`` and ``local_shard``), the run of tests/runs.py
(CFG, 4-step backward simulation, GAN with R1, EMA, Adam/AdamW with LR schedulers, each rank its
own data) goes straight through, and again stopped after a student update, saved, rebuilt from
other weights and another RNG state, loaded and continued; every gathered tensor is compared
bitwise. The last checkpoint and the full tensors it holds are left in ``--out`` for a 1-rank
load; ``--one-rank`` names a checkpoint saved by one process, loaded here into the sharded run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import FREQ, build, differences, snapshot, train
from workers import finish

import fastgen

STEPS, STOP = 2 * FREQ + 1, FREQ


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wrap", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--one-rank", default=None)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args.out)
    ddp = nn.parallel.DistributedDataParallel
    if args.wrap == "ddp":
        kw = {"wrap": ddp}
        modes = ["full_tensor"]
    else:
        from torch.distributed.fsdp import fully_shard

        def shard(net):
            for block in net.transformer_blocks:
                fully_shard(block)
            fully_shard(net)

        kw = {"shard": shard, "wrap_disc": ddp}
        modes = ["full_tensor", "local_shard"]

    def io(run, step, path=None):
        kwargs = dict(pipeline=run.pipe, optimizers=run.optimizers, schedulers=run.schedulers)
        if path is None:
            return kwargs
        return fastgen.save_checkpoint(path, step=step, **kwargs)

    result = {"wrap": args.wrap, "world": dist.get_world_size(), "modes": {}}
    for mode in modes:
        torch.manual_seed(100 + rank)
        straight = build(0, gan=True, ema_mode=mode, **kw)
        train(straight, 0, STEPS)
        expected = snapshot(straight)
        torch.manual_seed(100 + rank)
        first = build(0, gan=True, ema_mode=mode, **kw)
        train(first, 0, STOP)
        path = io(first, STOP, out / mode / f"step_{STOP}")
        torch.manual_seed(999 + rank)
        resumed = build(7, gan=True, ema_mode=mode, **kw)
        info = fastgen.load_checkpoint(path, **io(resumed, 0))
        train(resumed, info.step, STEPS)
        got = snapshot(resumed)  # collective under FSDP2: every rank
        diffs = differences(expected, got)
        final = io(resumed, STEPS, out / mode / f"step_{STEPS}")
        if rank == 0:
            torch.save(got, out / mode / "expected.pt")
        gathered = [None, None]
        dist.all_gather_object(gathered, diffs)
        result["modes"][mode] = {"differences": gathered, "tensors": len(expected),
                                 "latest": str(fastgen.latest_checkpoint(out / mode)),
                                 "final": str(final)}  # fmt: skip
    if args.one_rank:
        run = build(7, gan=True, **kw)
        info = fastgen.load_checkpoint(Path(args.one_rank) / "ckpt", **io(run, 0))
        want = torch.load(Path(args.one_rank) / "expected.pt")
        gathered = [None, None]
        dist.all_gather_object(gathered, differences(want, snapshot(run)))
        result["one_rank"] = {"differences": gathered, "world_size": info.world_size,
                              "tensors": len(want)}  # fmt: skip
    finish(result)


if __name__ == "__main__":
    main()
