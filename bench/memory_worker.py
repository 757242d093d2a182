"""One rank of a memory measurement: ``fastgen distill CONFIG`` with this process's peak memory.

``python bench/memory_worker.py CONFIG OUT_DIR`` (or under ``torchrun``) runs the real CLI and
writes ``OUT_DIR/rank<R>.json``: the resident memory once fastgen, diffusers (the teacher's
class), peft, FSDP2 and DCP are imported, the
peak resident memory of the whole process (``ru_maxrss``), and their difference, the run's own
memory on this rank. The data is :func:`batches`, named in the config as
``data: "memory_worker:batches"`` (this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def batches(run, rank: int, world: int):
    """SD3-shaped batches of 2 (latents 16×16×16, 8 text tokens); the widths come from the
    teacher folder's config."""
    import torch

    config = json.loads((Path(run.teacher.path) / "config.json").read_text())
    g = torch.Generator().manual_seed(1000 + rank)

    def data() -> dict:
        return {
            "latents": torch.randn(2, 16, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(2, 8, config["joint_attention_dim"], generator=g),
            "pooled_projections": torch.randn(2, config["pooled_projection_dim"], generator=g),
        }

    return data


def main(argv: list[str]) -> int:
    config, out = argv
    # imports are not the run's memory: torch, diffusers and the teacher's class, peft, FSDP2, DCP
    import diffusers
    import peft  # noqa: F401
    import torch.distributed.checkpoint
    import torch.distributed.fsdp  # noqa: F401
    import yaml

    import fastgen.cli
    import fastgen.train

    teacher = Path(yaml.safe_load(Path(config).read_text())["teacher"]["path"])
    getattr(diffusers, json.loads((teacher / "config.json").read_text())["_class_name"])
    base = _rss_bytes()
    code = fastgen.cli.main(["distill", config])
    if code:
        return int(code)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = int(os.environ.get("RANK", "0"))
    Path(out).mkdir(parents=True, exist_ok=True)
    report = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")),
              "base_rss_bytes": base, "peak_rss_bytes": peak, "run_bytes": peak - base}  # fmt: skip
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
