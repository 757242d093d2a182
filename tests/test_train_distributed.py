"""The trainer under torchrun on 2 gloo ranks, DDP and FSDP2: it runs, checkpoints, and resumes
to the straight run's weights bitwise (tests/train_distributed_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "train_distributed_worker.py"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_trainer_on_two_ranks_resumes_bitwise(tmp_path, parallel):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), "--parallel", parallel, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    print(result)
    assert result["world"] == 2 and result["resumed_from"] == 2
    assert result["tensors"] > 50
    assert result["differences"] == [[], []]
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000006" / "manifest.json").is_file()
