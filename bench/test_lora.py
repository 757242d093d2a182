"""LoRA against full fine-tuning: trainable parameters, training-state bytes, peak memory and
time per iteration, on the same diffusers SD3 transformer and batches.

Each variant runs in its own fresh process (``python bench/test_lora.py full|lora``), so its peak
resident memory (``ru_maxrss``) is its own: the interpreter, torch and diffusers, the teacher, the
student and fake score, the EMA, gradients and AdamW state. The model is an SD3 transformer of
width 512 and 6 joint blocks (55M parameters); LoRA rank 16 on the attention projections.
``extra_info`` holds both variants' figures and their ratios, measured in one run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SD3 = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
    attention_head_dim=64, num_attention_heads=8, joint_attention_dim=256,
    caption_projection_dim=512, pooled_projection_dim=64, pos_embed_max_size=16,
)  # fmt: skip
SMOKE = dict(SD3, num_layers=1, attention_head_dim=8, num_attention_heads=2,
             caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8)  # fmt: skip


def variant(mode: str, smoke: bool) -> dict:
    """One variant in this process: build, run the iterations, report."""
    import torch
    from diffusers import SD3Transformer2DModel

    from fastgen.train import RunConfig, Trainer

    config = SMOKE if smoke else SD3
    torch.manual_seed(0)
    teacher = SD3Transformer2DModel(**config)
    b, text, pooled = 2, config["joint_attention_dim"], config["pooled_projection_dim"]

    def data() -> dict:
        return {
            "latents": torch.randn(b, 16, 16, 16),
            "encoder_hidden_states": torch.randn(b, 8, text),
            "pooled_projections": torch.randn(b, pooled),
        }

    run = RunConfig(
        out=tempfile.mkdtemp(prefix="fastgen-bench-lora-"), steps=10**6,
        dmd={"num_train_timesteps": 1000, "student_update_freq": 1, "ema": {"decay": 0.99}},
        lora={"rank": 16} if mode == "lora" else None, optim={"grad_clip": None},
        checkpoint={"every": 10**6}, log={"progress": False, "tensorboard": False},
    )  # fmt: skip
    trainer = Trainer(run, teacher=teacher, data=data)
    iterations = 1 if smoke else 3
    trainer.begin()
    trainer.run_iteration(0)  # warm-up: AdamW creates its state here
    start = time.perf_counter()
    for it in range(1, 1 + iterations):
        trainer.run_iteration(it)
    seconds = (time.perf_counter() - start) / iterations
    params = {n: list(net.parameters()) for n, net in trainer.pipeline.networks().items()}
    trainable = sum(p.numel() for p in trainer._params["student"])
    state = 0
    for opt in trainer.optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                for v in opt.state.get(p, {}).values():
                    state += v.numel() * v.element_size() if torch.is_tensor(v) else 0
                state += p.grad.numel() * p.grad.element_size() if p.grad is not None else 0
    return {
        "mode": mode,
        "student_params": sum(p.numel() for p in params["student"]),
        "trainable_params": trainable,
        "grad_and_optimizer_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds_per_iteration": seconds,
    }


def measure(mode: str, smoke: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    args = [sys.executable, __file__, mode] + (["--smoke"] if smoke else [])
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lora_memory_against_full_fine_tuning(benchmark, is_smoke):
    results = {}

    def both():
        results["full"] = measure("full", is_smoke)
        results["lora"] = measure("lora", is_smoke)

    benchmark.pedantic(both, rounds=1, iterations=1)
    full, lora = results["full"], results["lora"]
    assert lora["trainable_params"] < full["trainable_params"]
    assert lora["grad_and_optimizer_bytes"] < full["grad_and_optimizer_bytes"]
    benchmark.extra_info.update(
        full=full,
        lora=lora,
        trainable_ratio=lora["trainable_params"] / full["trainable_params"],
        state_ratio=lora["grad_and_optimizer_bytes"] / full["grad_and_optimizer_bytes"],
        peak_rss_ratio=lora["peak_rss_bytes"] / full["peak_rss_bytes"],
        time_ratio=lora["seconds_per_iteration"] / full["seconds_per_iteration"],
    )


if __name__ == "__main__":
    print(json.dumps(variant(sys.argv[1], "--smoke" in sys.argv)))
