"""The ``fastgen`` command: ``fastgen distill RUN.yaml [--set k=v ...] [--fresh]`` and
``fastgen recipes``. Runs under ``torchrun --nproc_per_node=N`` too.

A bad run config, a missing path or a failed import is one line on stderr naming the key or the
path, and exit status 2; a loss that turns NaN or inf stops the run with exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["main"]


class UsageError(Exception):
    """A user error the CLI reports in one line (exit status 2)."""


def _import(spec: str, key: str) -> Callable:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{key}: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"{key}: cannot import {module_name!r}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"{key}: {module_name!r} has no function {attr!r}")
    return fn


def _validation_line(err: Any, prefix: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{prefix}{loc}: {first['msg']}{more}"


def _distill(args: argparse.Namespace) -> int:
    import pydantic
    import torch

    from fastgen.train import NonFiniteLossError, Trainer, load_run_config

    try:
        run = load_run_config(args.config, args.set)
    except pydantic.ValidationError as err:
        raise UsageError(_validation_line(err, f"{args.config}: ")) from None
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        dmd = run.dmd_config()
    except pydantic.ValidationError as err:
        raise UsageError(_validation_line(err, f"{args.config}: dmd.")) from None
    except FileNotFoundError as err:
        raise UsageError(f"recipe: {err}") from None
    if run.model is None:
        raise UsageError(
            f"{args.config}: model: required ('module:function' building the networks)"
        )
    if run.data is None:
        raise UsageError(f"{args.config}: data: required ('module:function' giving batches)")
    build, make_data = _import(run.model, "model"), _import(run.data, "data")
    torch.manual_seed(run.seed or 0)  # the same initial weights on every rank
    nets = build(run)
    if not isinstance(nets, dict) or "teacher" not in nets:
        raise UsageError("model: the function must return a dict with 'teacher'")
    unknown = sorted(set(nets) - {"teacher", "student", "fake_score", "discriminator"})
    if unknown:
        raise UsageError(f"model: unexpected networks {unknown}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    data = make_data(run, rank, world)
    try:
        trainer = Trainer(run, data=data, dmd=dmd, **nets)
    except (ValueError, TypeError) as err:  # the run config against the networks it got
        raise UsageError(f"{args.config}: {err}") from None
    try:
        result = trainer.fit(fresh=args.fresh)
    except NonFiniteLossError as err:
        print(f"fastgen: {err}", file=sys.stderr)
        return 1
    if trainer.main:
        print(f"done: {result['step']} steps in {run.out}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from fastgen.dmd.recipes import list_recipes

    for name in list_recipes():
        text = (files("fastgen.dmd") / "recipes" / f"{name}.yaml").read_text(encoding="utf-8")
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").rstrip())
        print(f"{name}: {' '.join(comment)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgen`` console script."""
    parser = argparse.ArgumentParser(prog="fastgen", description="DMD2 few-step distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    distill = sub.add_parser("distill", help="run (or resume) a distillation from a run config")
    distill.add_argument("config", help="the run config (YAML)")
    distill.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a run config key (dotted), e.g. --set optim.student.lr=1e-5")  # fmt: skip
    distill.add_argument("--fresh", action="store_true",
                         help="start over instead of resuming from the run folder's checkpoints")  # fmt: skip
    distill.set_defaults(fn=_distill)
    recipes = sub.add_parser("recipes", help="the built-in DMD2 recipes and their sources")
    recipes.set_defaults(fn=_recipes)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as err:
        print(f"fastgen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
