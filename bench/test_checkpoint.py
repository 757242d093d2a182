"""Checkpoint save and load of a ~100M-parameter DMD2 pipeline state (student and fake score,
50M parameters each, float32, EMA off) against a plain ``torch.save``/``torch.load`` of the same
tensors to one file, timed in one run (torch first, so the ratios come from one run), and the
peak extra resident memory of one save (it must not hold a second copy of the state).

Both sides write to the same folder; ``torch.save`` here is followed by an ``fsync`` (what an
atomic save needs), and a second torch figure without it is in ``extra_info``. fastgen's save also
hashes every file (SHA-256) and its load verifies them: that is in its figures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from common import median
from torch import nn

import fastgen


def mlp(width: int, depth: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


class Net(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.body = mlp(width, depth)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        return self.body(hidden_states)


@pytest.fixture(scope="module")
def setup(is_smoke):
    # 2 networks x 12 layers x 2048^2 = 100.7M parameters (smoke: 2 x 2 x 64^2)
    width, depth = (64, 2) if is_smoke else (2048, 12)
    teacher = Net(width, 1)
    pipe = fastgen.DMDPipeline(Net(width, depth), teacher, Net(width, depth), fastgen.DMDConfig())
    params = sum(p.numel() for net in pipe.networks().values() for p in net.parameters())
    flat = {f"{name}.{k}": v for name, net in pipe.networks().items()
            for k, v in net.state_dict().items()}  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="fastgen-bench-ckpt-", dir=os.environ.get("TMPDIR")))
    yield pipe, flat, params, root
    shutil.rmtree(root, ignore_errors=True)


def _torch_save(flat, path: Path, fsync: bool) -> None:
    with open(path, "wb") as f:
        torch.save(flat, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_extra_rss(fn) -> int | None:
    """Peak resident memory during ``fn()`` beyond the resident memory before it (Linux:
    the high-water mark, reset through /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _vm_kib("VmRSS")
    fn()
    return (_vm_kib("VmHWM") - before) * 1024


def test_checkpoint_save(benchmark, setup, medians, is_smoke):
    _, flat, params, root = setup
    state_bytes = sum(v.numel() * v.element_size() for v in flat.values())
    rounds = 1 if is_smoke else 3
    benchmark.group = "checkpoint save, ~100M parameters"
    _torch_save(flat, root / "plain.pt", fsync=False)  # warm up the page cache and allocator
    import time

    start = time.perf_counter()
    for _ in range(rounds):
        _torch_save(flat, root / "plain.pt", fsync=False)
    no_fsync = (time.perf_counter() - start) / rounds
    benchmark.pedantic(_torch_save, args=(flat, root / "plain.pt", True), rounds=rounds,
                       warmup_rounds=0 if is_smoke else 1)  # fmt: skip
    benchmark.extra_info.update(params=params, state_bytes=state_bytes,
                                torch_save_no_fsync_s=no_fsync)  # fmt: skip
    medians["torch.save"] = median(benchmark)


def test_checkpoint_save_fastgen(benchmark, setup, medians, is_smoke):
    pipe, flat, params, root = setup
    state_bytes = sum(v.numel() * v.element_size() for v in flat.values())
    rounds = 1 if is_smoke else 3
    benchmark.group = "checkpoint save, ~100M parameters"
    path = root / "ckpt"

    def save():
        fastgen.save_checkpoint(path, pipeline=pipe, step=1)

    extra = peak_extra_rss(save)
    benchmark.pedantic(save, rounds=rounds, warmup_rounds=0 if is_smoke else 1)
    reference = medians.get("torch.save")
    m = median(benchmark)
    benchmark.extra_info.update(params=params, state_bytes=state_bytes,
                                peak_extra_rss_bytes=extra,
                                peak_extra_over_state=None if extra is None else extra / state_bytes)  # fmt: skip
    if reference and m:
        benchmark.extra_info["time_over_torch_save"] = m / reference
    if extra is not None and not is_smoke:
        # no second full copy of the state while saving
        assert extra < 0.5 * state_bytes, (extra, state_bytes)


def test_checkpoint_load(benchmark, setup, medians, is_smoke):
    pipe, flat, _, root = setup
    rounds = 1 if is_smoke else 3
    benchmark.group = "checkpoint load, ~100M parameters"
    _torch_save(flat, root / "plain.pt", fsync=True)

    def load():
        state = torch.load(root / "plain.pt", weights_only=True, mmap=False)
        for name, net in pipe.networks().items():
            net.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items()
                                 if k.startswith(name + ".")})  # fmt: skip

    benchmark.pedantic(load, rounds=rounds, warmup_rounds=0 if is_smoke else 1)
    medians["torch.load"] = median(benchmark)


def test_checkpoint_load_fastgen(benchmark, setup, medians, is_smoke):
    pipe, flat, params, root = setup
    rounds = 1 if is_smoke else 3
    benchmark.group = "checkpoint load, ~100M parameters"
    path = root / "ckpt"
    fastgen.save_checkpoint(path, pipeline=pipe, step=1)

    def load():
        fastgen.load_checkpoint(path, pipeline=pipe)

    extra = peak_extra_rss(load)
    benchmark.pedantic(load, rounds=rounds, warmup_rounds=0 if is_smoke else 1)
    reference = medians.get("torch.load")
    m = median(benchmark)
    state_bytes = sum(v.numel() * v.element_size() for v in flat.values())
    benchmark.extra_info.update(params=params, peak_extra_rss_bytes=extra,
                                peak_extra_over_state=None if extra is None else extra / state_bytes)  # fmt: skip
    if reference and m:
        benchmark.extra_info["time_over_torch_load"] = m / reference
