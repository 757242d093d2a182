"""A compiled training step with the fastgen helpers vs the same step on precomputed inputs.

The difference is what sampling t, drawing noise, the forward process and the conversion cost
inside a fused, compiled step.
"""

from __future__ import annotations

import pytest
import torch
from common import sync
from torch import nn

import fastgen

TOKENS, WIDTH = 64, 256


class Block(nn.Module):
    """A DiT-style MLP block with adaLN-like time modulation."""

    def __init__(self) -> None:
        super().__init__()
        self.t_embed = nn.Sequential(nn.Linear(1, WIDTH), nn.SiLU(), nn.Linear(WIDTH, 2 * WIDTH))
        self.norm = nn.LayerNorm(WIDTH, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale, shift = self.t_embed(t[:, None]).unsqueeze(1).chunk(2, dim=-1)
        return self.mlp(self.norm(x_t) * (1 + scale) + shift)


class WithHelpers(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block
        self.sampler = fastgen.TimestepSampler(
            fastgen.SampleTimestepConfig(time_dist_type="logitnormal")
        )
        self.noise = fastgen.RFForward()
        self.to_x0 = fastgen.ParamConverter("flow", "x0")

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        t = self.sampler(x0)
        eps = torch.randn_like(x0)
        x_t = self.noise(x0, eps, t)
        x0_hat = self.to_x0(self.block(x_t, t), x_t, t)
        return torch.mean((x0_hat.float() - x0.float()) ** 2)


class WithHelpersGivenNoise(WithHelpers):
    """The helpers without the noise draw (a CPU randn costs as much as the rest together)."""

    def forward(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t = self.sampler(x0)
        x_t = self.noise(x0, eps, t)
        x0_hat = self.to_x0(self.block(x_t, t), x_t, t)
        return torch.mean((x0_hat.float() - x0.float()) ** 2)


class Precomputed(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.mean((self.block(x_t, t).float() - target.float()) ** 2)


@pytest.mark.parametrize("variant", ["precomputed", "with_helpers", "with_helpers_given_noise"])
def test_training_step(benchmark, medians, device, is_smoke, variant):
    batch = 4 if is_smoke else 32
    block = Block().to(device)
    x0 = torch.randn(batch, TOKENS, WIDTH, device=device)
    if variant == "with_helpers":
        step = torch.compile(WithHelpers(block), fullgraph=True)
        args = (x0,)
    elif variant == "with_helpers_given_noise":
        step = torch.compile(WithHelpersGivenNoise(block), fullgraph=True)
        args = (x0, torch.randn_like(x0))
    else:
        step = torch.compile(Precomputed(block), fullgraph=True)
        t = torch.rand(batch, device=device)
        eps = torch.randn_like(x0)
        args = (fastgen.add_noise(x0, eps, t), t, eps - x0)

    def train_step(*inputs):
        loss = step(*inputs)
        loss.backward()
        return loss

    benchmark.group = "training step"
    benchmark.extra_info.update(variant=variant, batch=batch, tokens=TOKENS, width=WIDTH)
    for _ in range(3):  # compile forward and backward outside the timed region
        train_step(*args)
    sync(device)

    def timed():
        train_step(*args)
        sync(device)

    # Fixed, generous rounds: the step is tens of ms on CPU, and 2 shared cores are noisy.
    benchmark.pedantic(timed, rounds=5 if is_smoke else 60, warmup_rounds=2)
    if benchmark.stats is not None and not is_smoke:
        stats = benchmark.stats.stats
        medians[("step", variant)] = (stats.median, stats.min)
        if variant != "precomputed" and ("step", "precomputed") in medians:
            base_median, base_min = medians[("step", "precomputed")]
            benchmark.extra_info["helpers_overhead_percent"] = (
                100 * (stats.median - base_median) / base_median
            )
            benchmark.extra_info["helpers_overhead_percent_min"] = (
                100 * (stats.min - base_min) / base_min
            )


def test_training_step_overhead_interleaved(benchmark, device, is_smoke):
    """The helpers' overhead from alternating rounds, so machine drift hits both variants alike.

    Each round times one precomputed step and one step with the helpers (noise drawn inside);
    the overhead is the median over rounds of the per-round ratio.
    """
    import statistics
    import time

    batch = 4 if is_smoke else 32
    block = Block().to(device)
    x0 = torch.randn(batch, TOKENS, WIDTH, device=device)
    with_helpers = torch.compile(WithHelpers(block), fullgraph=True)
    given_noise = torch.compile(WithHelpersGivenNoise(block), fullgraph=True)
    precomputed = torch.compile(Precomputed(block), fullgraph=True)
    t = torch.rand(batch, device=device)
    eps = torch.randn_like(x0)
    pre_args = (fastgen.add_noise(x0, eps, t), t, eps - x0)

    def timed(step, *args):
        sync(device)
        start = time.perf_counter()
        step(*args).backward()
        sync(device)
        return time.perf_counter() - start

    for _ in range(3):
        timed(precomputed, *pre_args), timed(with_helpers, x0), timed(given_noise, x0, eps)
    rounds = 3 if is_smoke else 60
    base, full, no_rng = [], [], []
    for _ in range(rounds):
        base.append(timed(precomputed, *pre_args))
        full.append(timed(with_helpers, x0))
        no_rng.append(timed(given_noise, x0, eps))
    benchmark.group = "training step (interleaved)"
    benchmark.extra_info.update(
        batch=batch,
        rounds=rounds,
        precomputed_ms=1e3 * statistics.median(base),
        with_helpers_ms=1e3 * statistics.median(full),
        given_noise_ms=1e3 * statistics.median(no_rng),
        helpers_overhead_percent=100 * (statistics.median(f / b for f, b in zip(full, base)) - 1),
        helpers_overhead_percent_given_noise=100
        * (statistics.median(g / b for g, b in zip(no_rng, base)) - 1),
        # the rounds themselves, so the medians above can be recomputed from the JSON
        precomputed_rounds_ms=[round(1e3 * x, 4) for x in base],
        with_helpers_rounds_ms=[round(1e3 * x, 4) for x in full],
        given_noise_rounds_ms=[round(1e3 * x, 4) for x in no_rng],
    )
    benchmark.pedantic(lambda: None, rounds=1)  # the figures above are the result
