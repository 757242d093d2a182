"""The DMD2 step where users feel it: one student update and one fake-score update of a toy DiT
(4 transformer layers, width 64, batch 8, latents 4x16x16, CFG 3), timed for fastgen eager,
fastgen compiled and modelopt.torch.fastgen eager on the same modules and inputs, in float32 and
bf16, for a 1-step student and a 4-step student with backward simulation. Peak memory of one
update is in ``extra_info`` (CPU: the profiler's allocation events; CUDA: the allocator's peak).
"""

from __future__ import annotations

import copy

import pytest
import torch
from common import median, peak_extra_bytes, run_timed
from einops import rearrange
from torch import nn

import fastgen


class ToyDiT(nn.Module):
    """Patchify 2x2, 4 ``TransformerEncoderLayer``s with time and text conditioning, unpatchify."""

    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.text = nn.Linear(32, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, 16)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        x = rearrange(hidden_states, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)
        x = self.inp(x) + self.time(timestep.to(x.dtype)[:, None])[:, None]
        x = torch.cat([self.text(encoder_hidden_states), x], dim=1)
        x = self.out(self.blocks(x)[:, encoder_hidden_states.shape[1] :])
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=8, p=2, q=2)


CASES = {
    "1step": {},
    "4step-backsim": {
        "student_sample_steps": 4,
        "backward_simulation": True,
        "sample_t_cfg": {"time_dist_type": "shifted", "t_list": [0.999, 0.937, 0.833, 0.624, 0.0]},
    },
}
# modelopt first: ratios in one run. "+batched-cfg": guidance_batching="batched" (one teacher
# call of batch 2B); "+float32": the float32 precision policy; "+stratified":
# rung_sampling="stratified" (multi-step only: the unroll runs each call on the rows that need it).
IMPLS = [
    "modelopt-eager",
    "fastgen-eager",
    "fastgen-compiled",
    "fastgen-compiled+batched-cfg",
    "fastgen-compiled+float32",
    "fastgen-compiled+stratified",
]
# Smoke mode checks that the benchmark's code runs: the compiled 1-step update and the
# compiled 4-step one (with the most options), once each in bf16 (every variant's graphs and
# numerics are tested in tests/test_dmd_pipeline.py); the eager ones in full.
SMOKE_COMPILED = {
    ("fastgen-compiled", "1step"),
    ("fastgen-compiled+stratified", "4step-backsim"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_dmd2_update(benchmark, device, is_smoke, medians, impl, case, dtype):
    if impl.startswith("modelopt"):
        mtf = pytest.importorskip("modelopt.torch.fastgen")
    if impl.endswith("+stratified") and case == "1step":
        pytest.skip("a 1-step student draws no rung")
    compiled = impl.startswith("fastgen-compiled")
    if is_smoke and compiled and ((impl, case) not in SMOKE_COMPILED or dtype != torch.bfloat16):
        pytest.skip("not in smoke mode's subset")
    torch.manual_seed(0)
    teacher = ToyDiT().to(device, dtype)
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher).requires_grad_(True)
    kwargs = {"guidance_scale": 3.0, **CASES[case]}
    if impl.startswith("modelopt"):
        pipe = mtf.DMDPipeline(student, teacher, fake, mtf.DMDConfig(**kwargs))
    else:
        if impl.endswith("+batched-cfg"):
            kwargs["guidance_batching"] = "batched"
        if impl.endswith("+stratified"):
            kwargs["rung_sampling"] = "stratified"
        pipe = fastgen.DMDPipeline(student, teacher, fake, fastgen.DMDConfig(**kwargs))
    student_loss, fake_loss = pipe.compute_student_loss, pipe.compute_fake_score_loss
    if compiled:
        # A fresh cache per case: every case compiles the same methods of a new pipeline, and
        # Dynamo's per-code-object recompile limit would otherwise cut the later ones off.
        torch._dynamo.reset()
        # Smoke mode checks that each case runs, not inductor's code: the cheap backend.
        backend = "aot_eager" if is_smoke else "inductor"
        student_loss = torch.compile(student_loss, fullgraph=True, backend=backend)
        fake_loss = torch.compile(fake_loss, fullgraph=True, backend=backend)
    b = 2 if is_smoke else 8
    latents = torch.randn(b, 4, 16, 16, device=device, dtype=dtype)
    noise = torch.randn_like(latents)
    text, empty = (
        torch.randn(b, 8, 32, device=device, dtype=dtype),
        torch.zeros(b, 8, 32, device=device, dtype=dtype),
    )
    params = list(student.parameters()) + list(fake.parameters())

    precision = "float32" if impl.endswith("+float32") else "auto"

    def update():
        with fastgen.use_precision(precision):
            loss = student_loss(latents, noise, text, negative_encoder_hidden_states=empty)
            loss = loss["total"] + fake_loss(latents, noise, text)["total"]
        loss.backward()
        for p in params:
            p.grad = None

    benchmark.group = f"DMD2 update {case} {str(dtype).replace('torch.', '')}"
    run_timed(benchmark, update, device)
    peak = peak_extra_bytes(update, device)
    key = (case, dtype)
    medians[(impl, *key)] = median(benchmark)
    benchmark.extra_info.update(impl=impl, case=case, dtype=str(dtype), peak_mib=peak / 2**20)
    theirs = medians.get(("modelopt-eager", *key))
    mine = medians.get((impl, *key))
    if theirs and mine and impl != "modelopt-eager":
        benchmark.extra_info["speedup_vs_modelopt_eager"] = theirs / mine
