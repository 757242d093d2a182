"""Memory per rank of ``fastgen distill``, in bytes per teacher parameter, for each way to run it.

Every mode runs the real CLI on a diffusers SD3 transformer folder (``save_pretrained``; 55M
parameters at full size, width 512, 6 joint blocks) for 2 DMD2 iterations with an EMA, through
``bench/memory_worker.py``: in its own process (or ``torchrun`` processes on gloo), each rank's
peak resident memory (``ru_maxrss``) minus its resident memory once torch, diffusers, peft and
the model class are imported. The modes: 1 process; FSDP2 on 1, 2 and 4 ranks (fitted as
``replicated + sharded / N``), with float32 networks and with a bfloat16 teacher gathered in
bfloat16 (``precision: bf16``); FSDP2 on 2 ranks with activation checkpointing; LoRA (rank 16)
on 1 process with a float32 and a bfloat16 teacher (saved in bfloat16, ``precision: bf16``),
and on 2 FSDP2 ranks with each. And FSDP2 on 1, 2 and 4 ranks of a teacher of the same size in
24 blocks (:data:`DEEP`), where what stays replicated is a smaller share of the model.

Each mode is measured twice: with glibc's default allocator, whose heap keeps freed blocks
(what a CPU process shows), and with ``MALLOC_MMAP_THRESHOLD_=65536``, which returns every
large block to the system when it is freed, so the peak is that of the live tensors (what
``max_memory_allocated`` reports on CUDA).

Full run: ``python -m pytest bench/test_memory.py --benchmark-json
bench/results/cpu_memory.json`` (about 10 minutes on 2 cores). Smoke mode (CI,
``--benchmark-disable``): a tiny folder, 1 process and FSDP2 on 2 ranks, with the default allocator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
WORKER = HERE / "memory_worker.py"
sys.path.insert(0, str(HERE))
from test_lora import SD3  # the same 55M-parameter SD3 transformer  # noqa: E402

SMOKE = dict(SD3, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8)  # fmt: skip

#: name: (ranks, run config fields)
MODES = {
    "1 process": (1, {}),
    "FSDP2 x1": (1, {"parallel": "fsdp2"}),
    "FSDP2 x2": (2, {"parallel": "fsdp2"}),
    "FSDP2 x4": (4, {"parallel": "fsdp2"}),
    # the mode the large teachers train in: a bf16 teacher, FSDP2 gathering bf16 blocks
    **{
        f"FSDP2 x{n}, bf16": (
            n,
            {"parallel": "fsdp2", "teacher_dtype": "bfloat16", "precision": "bf16"},
        )
        for n in (1, 2, 4)
    },
    "FSDP2 x2, activation checkpointing": (
        2,
        {"parallel": "fsdp2", "activation_checkpointing": True},
    ),
    "LoRA, 1 process": (1, {"lora": {"rank": 16}}),
    "LoRA, 1 process, bf16 teacher": (
        1,
        {"lora": {"rank": 16}, "teacher_dtype": "bfloat16", "precision": "bf16"},
    ),
    "LoRA, FSDP2 x2": (2, {"parallel": "fsdp2", "lora": {"rank": 16}}),
    "LoRA, FSDP2 x2, bf16 teacher": (
        2,
        {
            "parallel": "fsdp2",
            "lora": {"rank": 16},
            "teacher_dtype": "bfloat16",
            "precision": "bf16",
        },
    ),
}
SMOKE_MODES = ["1 process", "FSDP2 x2"]
# The same size in 24 blocks of width 256 (56M parameters): what FSDP2 keeps gathered is a
# number of blocks, and the teachers it is for have 38-60 of them, not 6.
DEEP = dict(SD3, num_layers=24, num_attention_heads=4, caption_projection_dim=256)
#: :data:`DEEP`'s 24 blocks at the smoke folder's widths: its structure without its parameters
NARROW = dict(SMOKE, num_layers=DEEP["num_layers"])
ALLOCATORS = {"glibc default": {}, "mmap threshold 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def teacher_folder(root: Path, config: dict) -> tuple[Path, int]:
    """The teacher saved in float32 (``root/teacher``) and in bfloat16 (``root/teacher-bf16``,
    what a bf16 teacher's release holds); its parameter count."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    net = SD3Transformer2DModel(**config)
    net.save_pretrained(str(root / "teacher"))
    net.to(torch.bfloat16).save_pretrained(str(root / "teacher-bf16"))
    return root / "teacher", sum(p.numel() for p in net.parameters())


def measure(root: Path, teacher: Path, mode: str, allocator: str) -> list[dict]:
    """Every rank's report of one mode (a fresh run folder each time)."""
    ranks, fields = MODES[mode]
    fields = dict(fields)
    tag = f"{mode}-{allocator}".replace(" ", "_").replace(",", "")
    dtype = fields.pop("teacher_dtype", "float32")
    if dtype == "bfloat16":  # a bf16 teacher comes as a bf16 file
        teacher = teacher.with_name(teacher.name + "-bf16")
    run = {
        "out": str(root / tag / "run"),
        "steps": 2,
        "teacher": {"path": str(teacher), "dtype": dtype},
        "data": "memory_worker:batches",
        "dmd": {"num_train_timesteps": 1000, "student_update_freq": 1,
                "ema": {"decay": 0.99, "mode": "local_shard"}},
        "checkpoint": {"every": 10**6},
        "log": {"progress": False, "tensorboard": False},
        **fields,
    }  # fmt: skip
    config = root / f"{tag}.yaml"
    config.write_text(yaml.safe_dump(run))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", **ALLOCATORS[allocator]}
    reports = root / tag / "reports"
    if ranks == 1 and "parallel" not in fields:
        cmd = [sys.executable, str(WORKER), str(config), str(reports)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", str(WORKER), str(config), str(reports)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(ranks)]
    shutil.rmtree(root / tag)  # its checkpoint and export: over 1 GB at full size
    return out


def fit(points: dict[int, float]) -> tuple[float, float]:
    """Least squares ``y = replicated + sharded / N`` through ``{N: y}``."""
    xs, ys = [1 / n for n in points], list(points.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sharded = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - sharded * mx, sharded


def fit_series(by_mode: dict[str, dict], suffix: str = "") -> dict[str, float]:
    """The fit through the modes ``FSDP2 x1{suffix}``, ``x2`` and ``x4`` (their largest rank)."""
    replicated, sharded = fit({n: by_mode[f"FSDP2 x{n}{suffix}"]["bytes_per_param_max"]
                               for n in (1, 2, 4)})  # fmt: skip
    return {"replicated": replicated, "sharded": sharded}


def test_memory_per_teacher_parameter(benchmark, is_smoke):
    results: dict[str, dict[str, dict]] = {}
    root = Path(tempfile.mkdtemp(prefix="fastgen-bench-memory-"))
    teacher, params = teacher_folder(root, SMOKE if is_smoke else SD3)
    modes = SMOKE_MODES if is_smoke else list(MODES)
    allocators = ["glibc default"] if is_smoke else list(ALLOCATORS)

    def all_modes():
        for allocator in allocators:
            for mode in modes:
                reports = measure(root, teacher, mode, allocator)
                per_rank = [r["run_bytes"] / params for r in reports]
                results.setdefault(allocator, {})[mode] = {
                    "ranks": len(reports),
                    "bytes_per_param_by_rank": per_rank,
                    "bytes_per_param_max": max(per_rank),
                    "bytes_per_param_max_not_rank0": max(per_rank[1:], default=per_rank[0]),
                    "run_bytes_by_rank": [r["run_bytes"] for r in reports],
                }

    try:
        benchmark.pedantic(all_modes, rounds=1, iterations=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for allocator, by_mode in results.items():
        for mode, r in by_mode.items():
            assert all(b > 0 for b in r["bytes_per_param_by_rank"]), (allocator, mode)
        if not is_smoke:
            by_mode["FSDP2 fit"] = fit_series(by_mode)
            by_mode["FSDP2 bf16 fit"] = fit_series(by_mode, ", bf16")
    benchmark.extra_info.update(teacher_params=params, modes=results)
    print(json.dumps(results, indent=1))


def test_memory_per_teacher_parameter_of_a_deep_teacher(benchmark, is_smoke):
    """FSDP2 on 1, 2 and 4 ranks and the fit, live tensors, for :data:`DEEP`, in float32 and
    with a bfloat16 teacher gathered in bfloat16: the replicated part in blocks of a 24th of
    the model. The same runs of :data:`NARROW` (the same 24 blocks, tensors and modules at the
    smoke folder's widths: 238 times fewer parameters) give what a run of this structure holds
    whatever its width (code, threads, gloo's buffers, Python's objects per module and tensor,
    the checkpoint's metadata), given in bytes per parameter of :data:`DEEP`; the fits of the
    difference are the bytes that grow with the parameters."""
    if is_smoke:
        pytest.skip("full size only: the smoke folder has no depth to speak of")
    results: dict[str, dict] = {}
    root = Path(tempfile.mkdtemp(prefix="fastgen-bench-memory-"))
    teacher, params = teacher_folder(root, DEEP)
    narrow, narrow_params = teacher_folder(root / "narrow", NARROW)
    allocator = "mmap threshold 64 KiB"

    def all_modes():
        for n in (1, 2, 4):
            for mode in (f"FSDP2 x{n}", f"FSDP2 x{n}, bf16"):
                for folder, name in ((teacher, mode), (narrow, f"{mode}, narrow")):
                    per_rank = [
                        r["run_bytes"] / params for r in measure(root, folder, mode, allocator)
                    ]
                    results[name] = {"ranks": n, "bytes_per_param_by_rank": per_rank,
                                     "bytes_per_param_max": max(per_rank)}  # fmt: skip

    try:
        benchmark.pedantic(all_modes, rounds=1, iterations=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for suffix, name in (("", "FSDP2 fit"), (", bf16", "FSDP2 bf16 fit")):
        results[name] = fit_series(results, suffix)
        assert results[name]["sharded"] > 0
        largest = {n: results[f"FSDP2 x{n}{suffix}"]["bytes_per_param_max"]
                   - results[f"FSDP2 x{n}{suffix}, narrow"]["bytes_per_param_max"]
                   for n in (1, 2, 4)}  # fmt: skip
        replicated, sharded = fit(largest)
        results[f"{name}, less the narrow run"] = {"replicated": replicated, "sharded": sharded}
    benchmark.extra_info.update(teacher_params=params, blocks=DEEP["num_layers"],
                                narrow_params=narrow_params, modes={allocator: results})  # fmt: skip
    print(json.dumps(results, indent=1))
