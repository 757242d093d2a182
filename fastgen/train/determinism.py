"""Deterministic kernels, so that a resumed run computes the same bits as the run that never
stopped.

Why: inductor lowers accumulating scatters (``index_put_(..., accumulate=True)``,
``scatter_add``, ``index_add``; among them the backward of every ``nn.Embedding``, such as a
label or timestep embedding) to a parallel loop of atomic adds. Several threads add into the
same row in an order that changes from call to call, so the same compiled step on the same data
gives gradients that differ in the last bits from one call to the next, and a run, killed or
not, is not reproducible. Under ``torch.use_deterministic_algorithms(True)`` inductor lowers
these ops to ATen's deterministic kernels instead (the ones eager mode runs on CPU). The flag is
read when a graph is compiled and is part of inductor's cache key, so it must be on while the
compiled functions are first called.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["deterministic_kernels"]


@contextmanager
def deterministic_kernels(enabled: bool = True) -> Iterator[None]:
    """Run the block under ``torch.use_deterministic_algorithms(True, warn_only=True)``, then
    restore the caller's setting.

    ``warn_only``: an op without a deterministic kernel (some CUDA backward kernels; cuBLAS
    without ``CUBLAS_WORKSPACE_CONFIG=:4096:8``) warns once instead of raising. A caller that
    already turned deterministic algorithms on keeps its own setting.

    Args:
        enabled: ``False`` makes this a no-op (the caller's setting stays).

    Example:
        >>> with deterministic_kernels():
        ...     torch.are_deterministic_algorithms_enabled()
        True
    """
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled and not before:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
