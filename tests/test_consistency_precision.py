"""The consistency losses under the float32 precision policy: no float64 tensor anywhere (the JVP
included), and the float64 policy's loss to float32 accuracy."""

from __future__ import annotations

import pytest
import torch
from test_precision import NoFloat64 as _NoFloat64
from toys import ToyDiT, toy_batch

import fastgen
from fastgen.consistency import (
    AdaptiveWeight,
    MeanFlowConfig,
    MeanFlowPipeline,
    SCMConfig,
    SCMPipeline,
)


class NoFloat64(_NoFloat64):
    """No float64 tensor, except 0-d ones made by forward mode for Python scalars (a float
    "wrapped number" is float64 and so is its zero tangent: torch makes them, not fastgen)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        wide = [x for x in leaves if isinstance(x, torch.Tensor) and x.dtype == torch.float64]
        if func is torch.ops.aten._efficientzerotensor.default or (
            wide and all(x.ndim == 0 for x in wide) and kwargs.get("dtype") != torch.float64
        ):
            out = func(*args, **kwargs)
            assert not (
                isinstance(out, torch.Tensor) and out.ndim > 0 and out.dtype == torch.float64
            )
            return out
        return super().__torch_dispatch__(func, types, args, kwargs)


def pipe(name, method):
    torch.manual_seed(0)
    if name.startswith("meanflow"):
        mode = "distillation" if name.endswith("cd") else "training"
        cfg = MeanFlowConfig(
            mode=mode,
            jvp=method,
            guidance_scale=2.0,
            cond_dropout_prob=0.3 if mode == "training" else 0.0,
        )
        return MeanFlowPipeline(
            ToyDiT(r_embedding=True), cfg, teacher=ToyDiT() if mode == "distillation" else None
        )
    mode = "distillation" if name.endswith("cd") else "training"
    scale = 2.0 if mode == "distillation" else None
    cfg = SCMConfig(mode=mode, jvp=method, guidance_scale=scale, tangent_warmup_steps=10)
    return SCMPipeline(
        ToyDiT(),
        cfg,
        teacher=ToyDiT() if mode == "distillation" else None,
        weight_net=AdaptiveWeight(),
    )


@pytest.mark.parametrize("method", ["forward", "finite_difference"])
@pytest.mark.parametrize("name", ["meanflow-ct", "meanflow-cd", "scm-ct", "scm-cd"])
def test_float32_policy_creates_no_float64_tensor_and_matches_float64(name, method):
    results = []
    for policy in ("float32", "float64"):
        p = pipe(name, method)
        torch.manual_seed(1)
        lat, noise, cond, neg = toy_batch(5)
        # given times: each policy draws its own (the uniforms' dtype differs)
        times = {"t": torch.linspace(0.1, 0.9, 5)}
        if name.startswith("meanflow"):
            times["r"] = torch.linspace(0.0, 0.5, 5).minimum(times["t"])
        with fastgen.use_precision(policy):
            if policy == "float32":
                with NoFloat64():
                    out = p.compute_loss(
                        lat, noise, cond, negative_encoder_hidden_states=neg,
                        iteration=torch.tensor(4.0), **times,
                    )["total"]  # fmt: skip
                    out.backward()
            else:
                out = p.compute_loss(
                    lat, noise, cond, negative_encoder_hidden_states=neg,
                    iteration=torch.tensor(4.0), **times,
                )["total"]  # fmt: skip
        results.append(out.detach())
    torch.testing.assert_close(results[0], results[1], rtol=2e-4, atol=1e-7)
