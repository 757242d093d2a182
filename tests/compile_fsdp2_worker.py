"""``compile: true`` under FSDP2, on 2 gloo ranks: ``torchrun --nproc_per_node=2
tests/compile_fsdp2_worker.py RUN_YAML OUT``. Run by tests/test_train_sharding.py; rank 0
prints one JSON line.

The trainer's ``torch.compile`` calls get a counting backend (``CompileCounter``: the graphs
dynamo hands over, run as traced). For a DMD2 run (RUN_YAML: a tiny SD3 folder, the GAN
branch on) and an sCM run (forward-mode JVP) it reports the graphs compiled, the blocks whose
forward is compiled, and the tensors that differ from the same run without compile.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch._dynamo.testing import CompileCounter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import differences
from test_train import state_of
from workers import finish

from fastgen.train import RunConfig, build
from fastgen.train.sharding import blocks

COUNTER = CompileCounter()
_compile = torch.compile


def counted(fn, **options):
    return _compile(fn, backend=COUNTER, **options)


def main() -> None:
    config, out = Path(sys.argv[1]), Path(sys.argv[2])
    fields = yaml.safe_load(config.read_text())
    scm = {k: v for k, v in fields.items() if k != "dmd"} | {
        "recipe": "scm_sd3", "scm": {"ema": {"decay": 0.5}}}  # fmt: skip
    result = {}
    for method, base in (("dmd2", fields), ("scm", scm)):

        def run(name: str, compile: bool, method=method, base=base) -> RunConfig:
            return RunConfig.model_validate(
                base | {"out": str(out / f"{method}-{name}"), "steps": 2, "compile": compile}
            )

        eager = build(run("eager", False))
        eager.fit()
        torch._dynamo.reset()  # the blocks' graphs of the last method are not reused
        frames = COUNTER.frame_count
        torch.compile = counted  # the trainer's compile calls count their graphs
        try:
            compiled = build(run("compiled", True))
            pipe = compiled.pipeline
            nets = [n for n in (pipe.teacher, pipe.student, pipe.fake_score) if n is not None]
            compiled.fit()
        finally:
            torch.compile = _compile
        result[method] = {
            "graphs": COUNTER.frame_count - frames,
            "compiled_blocks": sum("forward" in vars(b) for net in nets for b in blocks(net)),
            "blocks": sum(len(blocks(net)) for net in nets),
            "compiled_vs_eager": differences(state_of(eager), state_of(compiled)),
        }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    finish({"ranks": gathered})


if __name__ == "__main__":
    main()
