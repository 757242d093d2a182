"""W&B logging for real, offline: the run's scalars, evaluation figures and validation grid
reach the run file wandb writes (no server: WANDB_MODE=offline), read back record by record."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")


def history(run_file: Path) -> list[dict]:
    """The ``history`` records of a ``.wandb`` file: wandb's LevelDB-style log (32 KiB blocks
    of chunks with a 7-byte header: CRC, length, type) after a 7-byte file header, each record
    a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos = run_file.read_bytes(), 32768, 7
    assert raw[:4] == b":W&B"
    chunks, pending = [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # a whole record
            chunks.append(data)
        elif kind in (2, 3):  # its first and middle parts
            pending += data
        else:  # its last part
            chunks.append(pending + data)
            pending = b""
    out = []
    for data in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item})  # fmt: skip
    return out


def test_offline_wandb_run_holds_scalars_figures_and_images(tmp_path, monkeypatch):
    from test_train import Data, run_config, trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = run_config(tmp_path / "run", steps=2, log={"every": 1, "progress": False,
                                                    "tensorboard": False, "wandb": True},
                     validation={"every": 2, "samples": 2},
                     eval={"every": 2, "samples": 2, "seeds": 2, "teacher_steps": 2})  # fmt: skip
    t = trainer(run, Data())
    t.fit()
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + 60  # wandb's own process may still be flushing its file
    while True:
        rows = history(next(offline.glob("run-*.wandb")))
        if any("samples/_type" in r for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    logged = {k: v for row in rows for k, v in row.items()}
    assert [r["_step"] for r in rows if "loss/student/total" in r] == [1, 2], rows
    assert logged["eval/diversity_ratio"] == pytest.approx(
        t._monitor.history[-1]["diversity_ratio"]
    )
    assert logged["samples/_type"] == "image-file" and logged["samples/height"] > 0
    assert (offline / "files" / logged["samples/path"]).is_file()
