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


@pytest.mark.parametrize(("method", "parallel"), [("rcm", "fsdp2"), ("meanflow", "ddp")])
def test_a_consistency_run_on_two_ranks_resumes_bitwise(tmp_path, method, parallel):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), "--parallel", parallel, "--method", method, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["world"] == 2 and result["resumed_from"] == 2 and result["method"] == method
    want = {"rcm": ["fake_score", "student", "weight_net"], "meanflow": ["student"]}[method]
    assert result["networks"] == want and result["tensors"] > 30
    # FSDP2 shards the student and the fake score; the adaptive weight (tiny) stays replicated
    assert result["sharded"] == (["fake_score", "student"] if parallel == "fsdp2" else [])
    assert result["differences"] == [[], []]


RESHARD = Path(__file__).resolve().parent / "train_reshard_worker.py"


def _torchrun(n: int, *args: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
         str(RESHARD), *args], capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{"))), proc.stdout


def test_a_run_saved_on_two_ranks_resumes_on_one_and_on_four(tmp_path):
    """DCP reshards: the FSDP2 run saved on 2 ranks loads on 1 and on 4 with every weight,
    EMA shadow and optimizer state equal to the saved ones, and trains on."""
    saved, _ = _torchrun(2, "--phase", "save", "--out", str(tmp_path))
    assert saved["world"] == 2
    for n in (1, 4):
        out = tmp_path / f"on{n}"
        out.mkdir()
        for item in tmp_path.iterdir():  # a copy of the saved run for each world size
            if item.name in ("run", "saved.pt"):
                subprocess.run(["cp", "-r", str(item), str(out)], check=True)
        result, stdout = _torchrun(n, "--phase", "load", "--out", str(out))
        assert "resumed from step 2" in stdout
        assert result["world"] == n and result["resumed_from"] == 2 and result["tensors"] > 50
        assert result["differences"] == [[]] * n
        assert (out / "run" / "checkpoints" / "step_00000004" / "manifest.json").is_file()
