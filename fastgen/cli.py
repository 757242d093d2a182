"""The ``fastgen`` command: ``fastgen cache --pipeline DIR --images DIR --out CACHE``,
``fastgen cache --verify CACHE``, ``fastgen distill RUN.yaml [--set k=v ...] [--fresh]``,
``fastgen sample --student DIR --cache DIR --out FILE`` and ``fastgen recipes``. ``distill``
runs under ``torchrun --nproc_per_node=N`` too, and exports a diffusers student to
``out/export``.

A bad run config, a missing path or a failed import is one line on stderr naming the key or the
path, and exit status 2 (so is a damaged checkpoint at resume, a cache changed under a run, a
full disk or an unwritable run folder: a save that fails leaves the newest whole checkpoint
newest); a loss that turns NaN or inf stops the run with exit status 1; a
preemption notice (SIGTERM or SIGUSR1 by default) saves a checkpoint after the iteration under
way and exits with status 75 (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
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

    from fastgen.cache import CacheError
    from fastgen.errors import CheckpointError
    from fastgen.train import (
        EXIT_PREEMPTED,
        NonFiniteDataError,
        NonFiniteLossError,
        Preempted,
        Trainer,
        load_run_config,
    )

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
    if run.model is None and run.teacher is None:
        raise UsageError(
            f"{args.config}: teacher: required (a diffusers model folder), or model: "
            "('module:function' building the networks)"
        )
    if run.data is None:
        raise UsageError(
            f"{args.config}: data: required ({{cache, batch_size}} or 'module:function')"
        )
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    data = _data(run, rank, world)
    if getattr(data, "placeholder_latents", False) and (
        dmd.gan_loss_weight_gen > 0
        or (dmd.student_sample_steps > 1 and not dmd.backward_simulation)
    ):
        raise UsageError(
            f"data.cache: {run.data.cache!r} holds placeholder latents (a prompts-only cache); "
            "this recipe reads real latents (the GAN branch, or a multi-step student without "
            "backward_simulation): encode images with fastgen cache --images"
        )
    torch.manual_seed(run.seed or 0)  # the same initial weights on every rank
    nets = _networks(run, dmd)
    call = None
    if run.teacher is not None:
        from fastgen.train.folders import call_for

        call = call_for(type(nets["teacher"]).__name__)
    config = getattr(nets["teacher"], "config", None)
    if hasattr(data, "shapes") and isinstance(config, Mapping):  # before step 1, not in conv2d
        from fastgen.train.data_checks import check_cache_against_config

        try:
            check_cache_against_config(data.shapes, config,
                                       packs_patches=getattr(call, "packs_patches", False))  # fmt: skip
        except CacheError as err:
            raise UsageError(str(err)) from None
    try:
        trainer = Trainer(run, data=data, dmd=dmd, call=call, **nets)
    except (ValueError, TypeError) as err:  # the run config against the networks it got
        raise UsageError(f"{args.config}: {_one_line(err)}") from None
    try:
        result = trainer.fit(fresh=args.fresh)
    except NonFiniteDataError as err:  # bad input, named by shard and sample
        raise UsageError(str(err)) from None
    except (CheckpointError, CacheError) as err:  # a damaged checkpoint, a cache changed since
        raise UsageError(_one_line(err)) from None
    except OSError as err:  # out of disk, an unwritable run folder, a file gone: the path
        raise UsageError(_os_line(err)) from None
    except NonFiniteLossError as err:
        print(f"fastgen: {err}", file=sys.stderr)
        return 1
    except Preempted as err:  # saved: a requeue script reruns the same command on this status
        if trainer.main:
            print(f"fastgen: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    if trainer.main:
        print(f"done: {result['step']} steps in {run.out}")
        student = trainer.ema_student()
        if hasattr(student, "save_pretrained"):
            from fastgen.train.folders import export_student

            folder = export_student(student, run.out, dmd, run.teacher)
            print(f"exported the student to {folder}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _networks(run: Any, dmd: Any) -> dict[str, Any]:
    if run.teacher is not None:
        import copy

        import torch

        from fastgen.train.folders import default_discriminator, load_teacher

        try:
            teacher = load_teacher(run.teacher)
        except (OSError, ValueError) as err:
            raise UsageError(_one_line(err)) from None
        nets = {
            "teacher": teacher,
            "student": copy.deepcopy(teacher).to(torch.float32),
            "fake_score": copy.deepcopy(teacher).to(torch.float32),
        }
        if dmd.gan_loss_weight_gen > 0:
            try:
                nets["discriminator"] = default_discriminator(teacher)
            except ValueError as err:
                raise UsageError(f"teacher: {err}") from None
        return nets
    nets = _import(run.model, "model")(run)
    if not isinstance(nets, dict) or "teacher" not in nets:
        raise UsageError("model: the function must return a dict with 'teacher'")
    unknown = sorted(set(nets) - {"teacher", "student", "fake_score", "discriminator"})
    if unknown:
        raise UsageError(f"model: unexpected networks {unknown}")
    return nets


def _data(run: Any, rank: int, world: int) -> Any:
    if isinstance(run.data, str):
        return _import(run.data, "data")(run, rank, world)
    from fastgen.cache import CacheError, LatentCache

    try:
        return LatentCache(run.data.cache, batch_size=run.data.batch_size, rank=rank,
                           world=world, seed=run.seed or 0, shuffle=run.data.shuffle)  # fmt: skip
    except CacheError as err:
        raise UsageError(f"data.cache: {err}") from None


def _os_line(err: OSError) -> str:
    if err.filename is None:
        return _one_line(err)
    return f"{err.filename}: {err.strerror or _one_line(err)}"


def _one_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _sample(args: argparse.Namespace) -> int:
    import torch

    from fastgen.cache import LatentCache
    from fastgen.sampling import sample
    from fastgen.train.folders import call_for, load_model, read_export
    from fastgen.train.images import image_grid, write_png

    try:
        settings = read_export(args.student)
        student = load_model(args.student, class_name=settings.get("class_name"), where="--student")
        cache = LatentCache(args.cache, batch_size=args.samples, shuffle=False)
    except (OSError, ValueError) as err:
        raise UsageError(_one_line(err)) from None
    batch = cache()
    latents = batch.pop("latents")
    kwargs = {k: v for k, v in batch.items() if not k.startswith("negative_")}
    ehs = kwargs.pop("encoder_hidden_states", None)
    t_list = settings["t_list"] if args.steps is None else _ladder(settings["t_list"], args.steps)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed))
    student.eval()
    x = sample(student, noise.to(latents.dtype), t_list, mode=settings["student_sample_type"],
               pred_type=settings["pred_type"], num_train_timesteps=settings["num_train_timesteps"],
               encoder_hidden_states=ehs, call=call_for(type(student).__name__),
               **kwargs)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"samples": x, "t_list": t_list}, out.with_suffix(".pt"))
    picture = x.ndim in (4, 5)  # images or video (first frame); packed tokens have none
    if picture:
        write_png(out.with_suffix(".png"), image_grid(x.float()))
    print(f"wrote {len(x)} samples ({len(t_list) - 1} steps) to {out.with_suffix('.pt')}"
          + (f" and {out.with_suffix('.png')}" if picture else ""))  # fmt: skip
    return 0


def _cache(args: argparse.Namespace) -> int:
    if args.verify is not None:
        from fastgen.cache import CacheError, verify_cache

        try:
            found = verify_cache(args.verify)
        except CacheError as err:
            raise UsageError(str(err)) from None
        print(f"{args.verify}: {found['samples']} samples in {found['shards']} shards: readable, "
              f"finite, {found['hashed']} tensors match their SHA-256")  # fmt: skip
        return 0
    if args.pipeline is None or args.out is None:
        raise UsageError("cache: --pipeline and --out are required (or --verify CACHE)")
    from fastgen.train.encode import encode_cache

    try:
        result = encode_cache(args.pipeline, args.out, images=args.images, captions=args.captions,
                              prompts=args.prompts, resolution=args.resolution,
                              negative_prompt=args.negative_prompt, shard_size=args.shard_size,
                              batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    except (OSError, ValueError) as err:
        raise UsageError(_one_line(err)) from None
    print(f"{result['samples']} samples in {args.out}: {result['shards']} shards written, "
          f"{result['skipped']} already there")  # fmt: skip
    return 0


def _ladder(t_list: list[float], steps: int) -> list[float]:
    """The first ``steps`` rungs of the student's ladder, then 0."""
    if not 1 <= steps <= len(t_list) - 1:
        raise UsageError(
            f"--steps must be 1..{len(t_list) - 1} (the student's ladder), got {steps}"
        )
    return [*t_list[:steps], 0.0]


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
    enc = sub.add_parser(
        "cache", help="encode images and captions (or prompts) into a latent cache"
    )
    enc.add_argument("--pipeline", help="a diffusers pipeline folder (its VAE and text encoders)")
    enc.add_argument("--out", help="the cache folder to write")
    enc.add_argument("--verify", metavar="CACHE", help="check a whole cache instead: readable, "
                     "every tensor's SHA-256, every value finite (nothing is written)")  # fmt: skip
    enc.add_argument(
        "--images", help="an image folder with metadata.jsonl ({file_name, text} per line)"
    )
    enc.add_argument(
        "--captions", help="the captions file, if not the image folder's metadata.jsonl"
    )
    enc.add_argument("--prompts", help="a text file, one prompt per line (placeholder latents)")
    enc.add_argument("--resolution", type=int, default=512, help="square image side in pixels")
    enc.add_argument("--negative-prompt", default="", help="the unconditional prompt (for CFG)")
    enc.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    enc.add_argument("--batch-size", type=int, default=8, help="samples per encoder call")
    enc.add_argument("--seed", type=int, default=0, help="the VAE's sampling seed")
    enc.set_defaults(fn=_cache)
    smp = sub.add_parser("sample", help="sample an exported student on a cache's conditioning")
    smp.add_argument(
        "--student", required=True, help="the exported student (out/export/transformer)"
    )
    smp.add_argument(
        "--cache", required=True, help="a latent cache: its first samples' conditioning"
    )
    smp.add_argument(
        "--out", required=True, help="the output (writes OUT.pt, and OUT.png for images)"
    )
    smp.add_argument("--samples", type=int, default=8, help="how many samples")
    smp.add_argument(
        "--steps", type=int, default=None, help="fewer steps than the student's ladder"
    )
    smp.add_argument("--seed", type=int, default=0, help="the noise's seed")
    smp.set_defaults(fn=_sample)
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
