"""Shared fixtures: float dtypes, seeded RNG, the value-check switch, and a host-sync counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgen

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
