"""Shared fixtures: float dtypes, seeded RNG, the value-check switch, and a host-sync counter."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgen

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One CPU thread per xdist worker, for the worker and the runs it starts (they read
    # OMP_NUM_THREADS): two workers of torch's default pool each would share the 2 cores 4 ways.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    # The slow tests first, in their order: xdist's workers take the rest as they free up, so
    # the longest (the quick demo runs, minutes each on one core) do not end the run alone.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# aten ops that copy a device value to the host (a sync on CUDA) or need one to size outputs.
SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.is_nonzero.default,
}


def correctly_rounded(ref64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values to dtype once, independently of torch's conversions.

    float16: numpy rounds float64 -> float16 directly. bfloat16 (8 exponent bits, 7 mantissa
    bits): round the float64 bit pattern at mantissa bit 45, ties to even (normal range only).
    """
    if dtype in (torch.float64, torch.float32):
        return ref64.to(dtype)  # a single IEEE rounding
    values = ref64.detach().numpy()
    if dtype == torch.float16:
        return torch.from_numpy(values.astype(np.float16).astype(np.float64)).to(dtype)
    assert np.all((np.abs(values) > 2.0**-126) | (values == 0)), "bf16 oracle covers normal values"
    bits = values.view(np.uint64)
    lsb = (bits >> np.uint64(45)) & np.uint64(1)
    rounded = ((bits + np.uint64((1 << 44) - 1) + lsb) >> np.uint64(45)) << np.uint64(45)
    return torch.from_numpy(rounded.view(np.float64)).to(dtype)  # exact: fits in bf16


class SyncCounter(TorchDispatchMode):
    """Counts dispatched aten ops that need a device -> host transfer."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    previous = fastgen.set_value_checks(True)
    yield
    fastgen.set_value_checks(previous)
    torch.compiler.set_stance("default")
    # Compiled lambdas defined in shared helpers share code objects across tests: start clean.
    torch._dynamo.reset()


@pytest.fixture
def sync_counter():
    return SyncCounter


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-rank gloo process group for the test's duration: enough to build DDP and FSDP2
    modules in-process (the two-rank runs are the torchrun tests)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
