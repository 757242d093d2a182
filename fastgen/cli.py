"""The ``fastgen`` command: ``fastgen cache --pipeline DIR --images DIR --out CACHE``,
``fastgen cache --verify CACHE``, ``fastgen distill RUN.yaml [--set k=v ...] [--fresh]``,
``fastgen sample --student DIR (--cache DIR | --pipeline DIR --prompts FILE) --out OUT``,
``fastgen eval --student DIR --pipeline DIR --prompts FILE --out DIR`` and ``fastgen recipes``.
``distill`` runs under ``torchrun --nproc_per_node=N`` too (the run built by
:func:`fastgen.train.build`), and exports a diffusers student to ``out/export``.

A bad run config, a missing path or a failed import is one line on stderr naming the key or the
path, and exit status 2 (so is a damaged checkpoint at resume, a cache changed under a run, a
full disk or an unwritable run folder: a save that fails leaves the newest whole checkpoint
newest); a loss that turns NaN or inf, or a collapse alarm with ``eval.stop_on_collapse``,
stops the run with exit status 1; a preemption notice (SIGTERM or SIGUSR1 by default) saves a
checkpoint after the iteration under way and exits with status 75 (rerun the same command to
resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


class UsageError(Exception):
    """A user error the CLI reports in one line (exit status 2)."""


def _validation_line(err: Any, prefix: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{prefix}{loc}: {first['msg']}{more}"


def _distill(args: argparse.Namespace) -> int:
    import pydantic

    from fastgen.cache import CacheError
    from fastgen.errors import CheckpointError
    from fastgen.train import (
        EXIT_PREEMPTED,
        CollapseError,
        NonFiniteDataError,
        NonFiniteLossError,
        Preempted,
        RunError,
        build,
        load_run_config,
    )

    try:
        run = load_run_config(args.config, args.set)
    except pydantic.ValidationError as err:
        raise UsageError(_validation_line(err, f"{args.config}: ")) from None
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        trainer = build(run)
    except pydantic.ValidationError as err:
        section = "dmd" if run.method == "dmd2" else run.method
        raise UsageError(_validation_line(err, f"{args.config}: {section}.")) from None
    except RunError as err:
        raise UsageError(f"{args.config}: {err}") from None
    try:
        result = trainer.fit(fresh=args.fresh)
    except NonFiniteDataError as err:  # bad input, named by shard and sample
        raise UsageError(str(err)) from None
    except (CheckpointError, CacheError) as err:  # a damaged checkpoint, a cache changed since
        raise UsageError(_one_line(err)) from None
    except OSError as err:  # out of disk, an unwritable run folder, a file gone: the path
        raise UsageError(_os_line(err)) from None
    except (NonFiniteLossError, CollapseError) as err:
        print(f"fastgen: {err}", file=sys.stderr)
        return 1
    except Preempted as err:  # saved: a requeue script reruns the same command on this status
        if trainer.main:
            print(f"fastgen: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    if trainer.main:
        print(f"done: {result['step']} steps in {run.out}")
    # a diffusers student is exported (under FSDP2 every rank takes part in the gathers)
    folder = trainer.export()
    if folder is not None:
        print(f"exported the student to {folder}")
    if trainer.world > 1:
        import gc

        import torch.distributed as dist

        # DDP's reducers go while the process group is alive: freed at interpreter exit, one can
        # drop the group's last reference there, and gloo's destructor then joins a thread that
        # waits for the GIL the exiting thread holds
        del trainer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _os_line(err: OSError) -> str:
    if err.filename is None:
        return _one_line(err)
    return f"{err.filename}: {err.strerror or _one_line(err)}"


def _one_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _sample(args: argparse.Namespace) -> int:
    if args.pipeline is not None:
        return _sample_pictures(args)
    if args.cache is None:
        raise UsageError("fastgen sample needs --cache DIR (or --pipeline DIR with --prompts FILE)")
    import torch

    from fastgen.cache import LatentCache
    from fastgen.train.folders import load_exported, read_export, sample_exported
    from fastgen.train.images import image_grid, write_png

    try:
        settings = read_export(args.student)
        student = load_exported(args.student, settings)
        cache = LatentCache(args.cache, batch_size=args.samples, shuffle=False)
    except (OSError, ValueError) as err:
        raise UsageError(_one_line(err)) from None
    batch = cache()
    latents = batch.pop("latents")
    kwargs = {k: v for k, v in batch.items() if not k.startswith("negative_")}
    ehs = kwargs.pop("encoder_hidden_states", None)
    t_list = settings["t_list"] if args.steps is None else _ladder(settings["t_list"], args.steps)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed))
    x = sample_exported(student, noise.to(latents.dtype), t_list, settings, ehs, kwargs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"samples": x, "t_list": t_list}, out.with_suffix(".pt"))
    picture = x.ndim in (4, 5)  # images or video (first frame); packed tokens have none
    if picture:
        write_png(out.with_suffix(".png"), image_grid(x.float()))
    print(f"wrote {len(x)} samples ({len(t_list) - 1} steps) to {out.with_suffix('.pt')}"
          + (f" and {out.with_suffix('.png')}" if picture else ""))  # fmt: skip
    return 0


def _sample_pictures(args: argparse.Namespace) -> int:
    """``--pipeline``: RGB pictures decoded by the pipeline's VAE, one PNG each and a grid."""
    import torch

    from fastgen.cache import LatentCache
    from fastgen.train.decode import decode
    from fastgen.train.evaluate import (
        load_pipeline,
        load_student,
        read_prompts,
        sample_student,
        write_pictures,
    )

    if (args.cache is None) == (args.prompts is None):
        raise UsageError("--pipeline needs one of --cache DIR and --prompts FILE")
    try:
        pipe = load_pipeline(args.pipeline)
        student, settings = load_student(args.student, pipe)
        if args.prompts is not None:
            prompts = read_prompts(args.prompts)
            prompts = (prompts * args.samples)[: args.samples]
            resolution = args.resolution or int(getattr(pipe.vae.config, "sample_size", 0) or 512)
            images, _, _ = sample_student(student, settings, pipe, prompts, seed=args.seed,
                                          resolution=resolution, steps=args.steps)  # fmt: skip
        else:
            cache = LatentCache(args.cache, batch_size=args.samples, shuffle=False)
            batch = cache()
            latents = batch.pop("latents")
            kwargs = {k: v for k, v in batch.items() if not k.startswith("negative_")}
            ehs = kwargs.pop("encoder_hidden_states", None)
            t_list = (
                settings["t_list"]
                if args.steps is None
                else _ladder(settings["t_list"], args.steps)
            )
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed))
            from fastgen.train.folders import sample_exported

            x = sample_exported(student, noise, t_list, settings, ehs, kwargs)
            images = decode(pipe, x)
    except (OSError, ValueError) as err:
        raise UsageError(_one_line(err)) from None
    grid = write_pictures(args.out, images)
    h, w = images.shape[-2:]
    print(f"wrote {len(images)} pictures ({w}x{h}) and {grid}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fastgen.train.evaluate import evaluate, read_prompts, sweep

    if (args.student is None) == (args.checkpoints is None):
        raise UsageError("fastgen eval needs one of --student DIR and --checkpoints DIR")
    try:
        prompts = read_prompts(args.prompts)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if args.checkpoints is not None:
            summary = sweep(args.checkpoints, args.pipeline, prompts, args.out, metrics=metrics,
                            clip=args.clip, fid_weights=args.fid_weights,
                            reference=args.reference, seeds=args.seeds,
                            clip_sha256=args.clip_sha256, fid_sha256=args.fid_sha256,
                            teacher=not args.no_teacher, teacher_steps=args.teacher_steps,
                            guidance_scale=args.guidance_scale, resolution=args.resolution,
                            seed=args.seed)  # fmt: skip
            print(f"wrote {args.out}/sweep.json: {len(summary['checkpoints'])} checkpoints, "
                  f"{len(summary['scored_now'])} scored now")  # fmt: skip
            return 0
        result = evaluate(args.student, args.pipeline, prompts, args.out, metrics=metrics,
                          clip=args.clip, fid_weights=args.fid_weights, reference=args.reference,
                          clip_sha256=args.clip_sha256, fid_sha256=args.fid_sha256,
                          seeds=args.seeds, teacher=not args.no_teacher,
                          teacher_steps=args.teacher_steps, guidance_scale=args.guidance_scale,
                          resolution=args.resolution, steps=args.steps, seed=args.seed)  # fmt: skip
    except (OSError, ValueError) as err:
        raise UsageError(_one_line(err)) from None
    figures = {k: round(v, 4) for k, v in result["student"].items() if isinstance(v, float)}
    print(f"wrote {args.out}/eval.json and report.md; student: {figures}")
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
    from fastgen.train.recipes import list_method_recipes, recipe_source

    for name, method in list_method_recipes().items():
        text = recipe_source(name).read_text(encoding="utf-8")
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").rstrip())
        print(f"{name} [{method}]: {' '.join(comment)}")
        import yaml

        fields = yaml.safe_load(text) or {}
        knobs = [f"{k}={v}" for k, v in fields.items() if k != "method" and not isinstance(v, dict)]
        print(f"    {', '.join(knobs)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fastgen`` command line: its subcommands and their flags."""
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
    smp.add_argument("--cache", help="a latent cache: its first samples' conditioning")
    smp.add_argument(
        "--pipeline", help="a pipeline folder: decode with its VAE (PNG per sample and a grid)"
    )
    smp.add_argument("--prompts", help="with --pipeline: a text file, one prompt per line")
    smp.add_argument("--resolution", type=int, default=None,
                     help="with --prompts: the picture's side in pixels (default: the VAE's)")  # fmt: skip
    smp.add_argument(
        "--out", required=True,
        help="the output: OUT.pt (and OUT.png) without --pipeline, a folder of PNGs with it",
    )  # fmt: skip
    smp.add_argument("--samples", type=int, default=8, help="how many samples")
    smp.add_argument(
        "--steps", type=int, default=None, help="fewer steps than the student's ladder"
    )
    smp.add_argument("--seed", type=int, default=0, help="the noise's seed")
    smp.set_defaults(fn=_sample)
    ev = sub.add_parser("eval", help="score an exported student (and its teacher) on prompts")
    ev.add_argument("--student", help="the export folder (out/export) or its transformer")
    ev.add_argument(
        "--checkpoints", help="a run's checkpoints folder: score each checkpoint's EMA student once"
    )
    ev.add_argument(
        "--pipeline", required=True, help="the teacher's pipeline folder (VAE, text encoders)"
    )
    ev.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    ev.add_argument("--out", required=True, help="the folder for eval.json, report.md and pictures")
    ev.add_argument("--metrics", default="clip,diversity,fid", help="any of clip, diversity, fid")
    ev.add_argument("--clip", help="a local CLIP folder (transformers' CLIPModel and tokenizer)")
    ev.add_argument(
        "--fid-weights", help="a TorchScript feature network (e.g. inception-2015-12-05.pt)"
    )
    ev.add_argument("--clip-sha256", help="the CLIP folder's expected SHA-256 (checked)")
    ev.add_argument("--fid-sha256", help="the feature network's expected SHA-256 (checked)")
    ev.add_argument("--reference", help="a folder of reference pictures for FID")
    ev.add_argument("--seeds", type=int, default=4, help="noises per prompt (diversity needs 2+)")
    ev.add_argument("--no-teacher", action="store_true", help="score the student alone")
    ev.add_argument("--teacher-steps", type=int, default=None, help="default: the pipeline's")
    ev.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="the teacher's CFG (default: the pipeline's)",
    )
    ev.add_argument(
        "--resolution", type=int, default=None, help="picture side in pixels (default: the VAE's)"
    )
    ev.add_argument("--steps", type=int, default=None, help="fewer steps than the student's ladder")
    ev.add_argument("--seed", type=int, default=0, help="the first prompt's noise seed")
    ev.set_defaults(fn=_eval)
    recipes = sub.add_parser(
        "recipes", help="the built-in recipes (DMD2, sCM, rCM, MeanFlow) and their sources"
    )
    recipes.set_defaults(fn=_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgen`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as err:
        print(f"fastgen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
