"""Per-call latency of timestep sampling: eager, compiled, and (CUDA) compiled in CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from common import median, run_timed

import fastgen

CFG = fastgen.SampleTimestepConfig(time_dist_type="logitnormal", stratified=True)


@pytest.mark.parametrize("mode", ["eager", "compiled", "cudagraphs"])
@pytest.mark.parametrize("n", [64, 4096])
def test_sample_timesteps(benchmark, medians, device, n, mode):
    if mode == "cudagraphs" and device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")

    def draw():
        return fastgen.sample_timesteps(n, CFG, device=device, dtype=torch.bfloat16)

    if mode == "compiled":
        fn = torch.compile(draw, fullgraph=True)
    elif mode == "cudagraphs":
        fn = torch.compile(draw, fullgraph=True, mode="reduce-overhead")
    else:
        fn = draw
    benchmark.group = f"sample_timesteps n={n}"
    benchmark.extra_info.update(n=n, mode=mode)
    out = run_timed(benchmark, fn, device, warmup=5)
    assert out.shape == (n,) and bool((out.double() >= CFG.min_t).all())
    m = median(benchmark)
    if m is not None:
        medians[("sample", n, mode)] = m
        benchmark.extra_info["us_per_call"] = m * 1e6
        if ("sample", n, "eager") in medians and mode != "eager":
            benchmark.extra_info["speedup_vs_eager"] = medians[("sample", n, "eager")] / m
