"""DMD2 under torchrun on 2 gloo ranks, with DDP and with FSDP2 (tests/dmd_distributed_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "dmd_distributed_worker.py"


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_dmd2_loop_on_two_ranks(wrap):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), "--wrap", wrap],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    print(result)
    assert result["world"] == 2 and result["wrap"] == wrap
    # the same network calls on every rank (FSDP's collectives line up), no broadcast needed
    assert result["calls"][0] == result["calls"][1] > 0
    # each rank its own data, the same weights after the updates, and the weights moved
    assert result["losses"][0] != result["losses"][1]
    assert result["checksums"][0] == result["checksums"][1]
    assert result["max_weight_change"] > 1e-4
    # EMA equals an EMA of the gathered weights, in both FSDP2 modes
    assert result["ema_full_tensor_max_err"] < 1e-6
    assert result["ema_local_shard_max_err"] < 1e-6
