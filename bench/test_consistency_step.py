"""The consistency updates where users feel them: one sCM distillation update (with sCM's adaptive
weighting) and one MeanFlow distillation update (loss, backward, AdamW step) of a student
distilled from a frozen teacher, for two networks: the toy DiT of ``test_dmd_step.py`` (4 layers,
width 64, batch 8, latents 4x16x16) and a small diffusers ``SD3Transformer2DModel`` (2 joint
blocks, width 64, batch 8, latents 4x16x16). The JVP is taken four ways:

- ``forward-eager``: forward-mode AD (``torch.func.jvp``) in an eager loss;
- ``forward-compiled``: the same loss compiled with ``fullgraph=True``, the JVP inside the graph;
- ``fd-eager`` and ``fd-compiled``: the central finite difference (two plain student calls in
  place of the forward-mode pass).

The optimizer step runs eagerly in every variant. Time per update and the peak memory of one
update (CPU: the profiler's allocation events; CUDA: the allocator's peak) are in ``extra_info``,
with the compiled / eager and finite-difference / forward time ratios of the same run.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from common import median, peak_extra_bytes, run_timed
from test_dmd_step import ToyDiT
from torch import nn

from fastgen.consistency import (
    AdaptiveWeight,
    MeanFlowConfig,
    MeanFlowPipeline,
    SCMConfig,
    SCMPipeline,
)

# A small SD3 transformer: 64 image tokens of width 64 (2 heads of 32), 8 text tokens.
SD3 = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
    attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
    caption_projection_dim=64, pooled_projection_dim=16, pos_embed_max_size=16,
)  # fmt: skip
TEXT_DIM = {"dit": 32, "sd3": SD3["joint_attention_dim"]}


class SD3Call(nn.Module):
    """An SD3 transformer called with the keywords the pipelines pass, returning its tensor."""

    def __init__(self, transformer: nn.Module, pooled: torch.Tensor) -> None:
        super().__init__()
        self.transformer = transformer
        self.register_buffer("pooled", pooled, persistent=False)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        return self.transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=self.pooled,
            return_dict=False,
        )[0]


class WithGap(nn.Module):
    """A MeanFlow student from a flow network: an embedding of the gap ``timestep - r`` (Fourier
    features, an MLP whose last layer starts at zero) added to every conditioning token, so the
    student starts as the teacher."""

    def __init__(self, flow: nn.Module, text_dim: int, n_freqs: int = 8) -> None:
        super().__init__()
        self.flow = flow
        self.register_buffer(
            "freqs", torch.exp(torch.arange(n_freqs) * -math.log(1e4) / n_freqs), persistent=False
        )
        self.gap = nn.Sequential(
            nn.Linear(2 * n_freqs, text_dim), nn.SiLU(), nn.Linear(text_dim, text_dim)
        )
        nn.init.zeros_(self.gap[2].weight)
        nn.init.zeros_(self.gap[2].bias)

    def forward(self, hidden_states, timestep, r, encoder_hidden_states):
        angles = (timestep - r).float()[:, None] * self.freqs
        gap = self.gap(torch.cat([angles.sin(), angles.cos()], dim=1))
        ehs = encoder_hidden_states + gap.to(encoder_hidden_states.dtype)[:, None]
        return self.flow(hidden_states, timestep, encoder_hidden_states=ehs)


def teacher_of(model: str, smoke: bool) -> tuple[nn.Module, int | None]:
    """The frozen flow network and its ``num_train_timesteps`` (SD3 takes t in [0, 1000])."""
    torch.manual_seed(0)
    if model == "dit":
        return ToyDiT(depth=1 if smoke else 4), None
    from diffusers import SD3Transformer2DModel

    config = dict(SD3, num_layers=1) if smoke else SD3
    pooled = torch.randn(2 if smoke else 8, SD3["pooled_projection_dim"])
    return SD3Call(SD3Transformer2DModel(**config), pooled), 1000


# Eager forward mode first: every ratio is measured in one run against an earlier case.
IMPLS = ["forward-eager", "forward-compiled", "fd-eager", "fd-compiled"]


METHODS, MODELS = ["scm", "meanflow"], ["dit", "sd3"]
# Smoke mode (CI time): eager forward mode everywhere, the finite difference on the toy DiT, one
# compiled case (Dynamo and AOTAutograd take ~10 s a case on a CPU; the tests compile both losses
# with both JVP methods).
SMOKE = {
    *(("forward-eager", method, model) for method in METHODS for model in MODELS),
    *(("fd-eager", method, "dit") for method in METHODS),
    ("forward-compiled", "scm", "dit"),
}
BASELINE = {
    "forward-compiled": "forward-eager",
    "fd-eager": "forward-eager",
    "fd-compiled": "forward-compiled",
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("impl", IMPLS)
def test_consistency_update(benchmark, device, is_smoke, medians, impl, method, model):
    if is_smoke and (impl, method, model) not in SMOKE:
        pytest.skip("not in smoke mode's subset")
    if model == "sd3":
        pytest.importorskip("diffusers")
    teacher, scale = teacher_of(model, is_smoke)
    teacher = teacher.to(device)
    jvp = "forward" if impl.startswith("forward") else "finite_difference"
    common = dict(num_train_timesteps=scale, jvp=jvp)
    if method == "scm":
        student = copy.deepcopy(teacher).requires_grad_(True)
        weight_net = AdaptiveWeight().to(device)
        config = SCMConfig(tangent_warmup_steps=0, **common)
        pipe = SCMPipeline(student, config, teacher=teacher, weight_net=weight_net)
        params = [*student.parameters(), *weight_net.parameters()]
    else:
        student = WithGap(copy.deepcopy(teacher), TEXT_DIM[model]).to(device).requires_grad_(True)
        config = MeanFlowConfig(mode="distillation", **common)
        pipe = MeanFlowPipeline(student, config, teacher=teacher)
        params = list(student.parameters())
    loss_fn = pipe.compute_loss
    if impl.endswith("compiled"):
        # A fresh cache per case: every case compiles compute_loss of a new pipeline, and
        # Dynamo's per-code-object recompile limit would otherwise cut the later ones off.
        torch._dynamo.reset()
        # Smoke mode checks that each case runs, not inductor's code: the cheap backend.
        loss_fn = torch.compile(
            loss_fn, fullgraph=True, backend="aot_eager" if is_smoke else "inductor"
        )
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    b = 2 if is_smoke else 8
    latents = torch.randn(b, 4, 16, 16, device=device)
    noise = torch.randn_like(latents)
    text = torch.randn(b, 8, TEXT_DIM[model], device=device)

    def update():
        loss_fn(latents, noise, text)["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    benchmark.group = f"{method} update, {model}"
    run_timed(
        benchmark, update, device, warmup=1 if is_smoke else 3
    )  # the warm-up compiles and creates AdamW's state
    peak = peak_extra_bytes(update, device)
    key = (method, model)
    medians[(impl, *key)] = median(benchmark)
    benchmark.extra_info.update(
        impl=impl, method=method, model=model, batch=b, peak_mib=peak / 2**20,
        student_params=sum(p.numel() for p in params),
        load_avg_1min=os.getloadavg()[0],  # the box is shared: what else ran shows here
    )  # fmt: skip
    base = BASELINE.get(impl)
    mine, theirs = medians.get((impl, *key)), medians.get((base, *key))
    if mine and theirs:
        ratio = "fd_over_forward" if impl.startswith("fd") else "compiled_over_eager"
        benchmark.extra_info[ratio] = mine / theirs
    if impl == "fd-compiled" and mine and medians.get(("fd-eager", *key)):
        benchmark.extra_info["compiled_over_eager"] = mine / medians[("fd-eager", *key)]
