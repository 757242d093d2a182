"""Helpers for the benchmarks: timing with device sync, derived figures, peak memory."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timed(benchmark, fn, device: torch.device, args=(), warmup: int = 3):
    """Warm up (compiles happen here, outside the timed region), then time with device sync."""
    for _ in range(warmup):
        fn(*args)
    sync(device)

    def call():
        out = fn(*args)
        sync(device)
        return out

    return benchmark(call)


def median(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def peak_extra_bytes(fn, device: torch.device, args=()) -> int:
    """Peak memory allocated during one call beyond what was live before it.

    CUDA: the caching allocator's peak counter. CPU: replay the profiler's allocation and free
    events (leaf ops only, since parents repeat their children's bytes) in time order.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(*args)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = [
        e
        for e in prof.events()
        if e.cpu_memory_usage and (e.name == "[memory]" or not e.cpu_children)
    ]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak
