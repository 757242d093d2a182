"""Pinned randomness for side-by-side runs of fastgen and modelopt, and their comparison."""

from __future__ import annotations

import torch


def pinned(monkeypatch, pipe, t, draws, rung=None):
    """Make ``pipe`` draw ``t``, the tensors in ``draws`` (in order) and rung ``rung``."""
    queue = list(draws)
    monkeypatch.setattr(pipe, "sample_timesteps", lambda n, device=None, dtype=torch.float32: t)

    def randn_like(x, *, dtype=None, **kwargs):
        assert queue, "drew more noise than pinned"
        return queue.pop(0).to(dtype or x.dtype)

    monkeypatch.setattr(torch, "randn_like", randn_like)
    if rung is not None:
        monkeypatch.setattr(
            torch, "randint", lambda low, high, size, **kw: torch.full(size, rung, dtype=torch.long)
        )
    return queue


def close(ours: dict, theirs: dict, rtol: float = 1e-6):
    assert set(ours) == set(theirs)
    for key in ours:
        a, b = ours[key].double(), theirs[key].double()
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-9, msg=f"{key}: {a} vs {b}")
