"""Checkpoints on 2 gloo ranks with DDP and FSDP2 (tests/checkpoint_distributed_worker.py), and
DCP's resharding: a 2-rank checkpoint loads on 1 rank, a 1-rank checkpoint on 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import FREQ, build, differences, snapshot, train

import fastgen

WORKER = Path(__file__).resolve().parent / "checkpoint_distributed_worker.py"


def torchrun(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), *args],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def io(run):
    return dict(pipeline=run.pipe, optimizers=run.optimizers, schedulers=run.schedulers)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_two_ranks_resume_bitwise_and_reshard(tmp_path, wrap):
    # A 1-rank checkpoint for the 2-rank run to load (FSDP2 reshards it).
    one = tmp_path / "one"
    torch.manual_seed(5)
    run = build(0, gan=True)
    train(run, 0, FREQ + 1)
    fastgen.save_checkpoint(one / "ckpt", step=FREQ + 1, **io(run))
    torch.save(snapshot(run), one / "expected.pt")

    result = torchrun("--wrap", wrap, "--out", str(tmp_path / "out"), "--one-rank", str(one))
    print(
        {m: r["differences"] for m, r in result["modes"].items()}, result["one_rank"]["differences"]
    )
    assert result["world"] == 2
    modes = ["full_tensor"] if wrap == "ddp" else ["full_tensor", "local_shard"]
    assert sorted(result["modes"]) == sorted(modes)
    for mode, r in result["modes"].items():
        assert r["tensors"] > 50
        assert r["differences"] == [[], []], mode  # bitwise on both ranks
        assert r["latest"] == r["final"]
    assert result["one_rank"]["differences"] == [[], []]
    assert result["one_rank"]["world_size"] == 1

    # The 2-rank checkpoints on 1 rank, plain modules.
    for mode in modes:
        final = Path(result["modes"][mode]["final"])
        run = build(7, gan=True, ema_mode=mode)
        info = fastgen.load_checkpoint(final, **io(run))
        assert info.world_size == 2 and info.rng_restored  # rank 0's RNG states
        want = torch.load(final.parent / "expected.pt")
        assert differences(want, snapshot(run)) == [], mode
