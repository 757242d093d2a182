"""``fastgen eval`` and ``fastgen sample --pipeline``: an exported student (and its teacher)
sampled on prompts, decoded with the pipeline's VAE, and scored with :mod:`fastgen.eval`.

The student samples along its own ladder (``fastgen.json`` of the export) with
:func:`fastgen.sample`; the teacher is the pipeline folder's own pipeline, called with its
scheduler and step count on **the same initial noise**, so every student picture has a teacher
picture to be compared with (PSNR, feature distance, CLIP-score difference, each with a paired
bootstrap interval). Each prompt is sampled with ``seeds`` noises, for diversity. Feature
networks come from local files only (:mod:`fastgen.eval.features`).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastgen.eval import (
    diversity_ratio,
    frechet_distance,
    mean_pairwise_distance,
    paired_bootstrap,
    vendi_score,
)
from fastgen.eval.features import ClipScorer, FeatureNet
from fastgen.train.decode import DECODERS, decode
from fastgen.train.encode import PipelineFamily, read_pixels
from fastgen.train.folders import load_exported, read_export, sample_exported
from fastgen.train.images import image_grid, write_png

__all__ = [
    "METRICS",
    "evaluate",
    "load_student",
    "read_prompts",
    "sample_student",
    "write_pictures",
]

METRICS = ("clip", "diversity", "fid")
"""What ``fastgen eval --metrics`` can ask for (``seconds_per_image`` is always reported)."""


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: no file {str(path)!r}")
    prompts = [
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompt")
    return prompts


def load_pipeline(path: str | Path) -> Any:
    """The whole pipeline folder (VAE, text encoders, the teacher), on the CPU, float32.

    Raises:
        FileNotFoundError: No ``model_index.json``.
        ValueError: A pipeline class without a decoder.
    """
    import diffusers

    _quiet()
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"--pipeline: no model_index.json in {str(path)!r}")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    if index["_class_name"] not in DECODERS:
        raise ValueError(
            f"--pipeline: {index['_class_name']} has no decoder here (one of {', '.join(DECODERS)})"
        )
    # components saved as absent (SD3 without T5) are passed as None, as they were saved
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_student(
    path: str | Path, pipe: Any | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An exported student (``out/export`` or its ``transformer``) and its sampling settings.

    With ``pipe``, the student must be the pipeline's kind of network: the same class and the
    same input channels as the pipeline's transformer.

    Raises:
        FileNotFoundError: No export there.
        ValueError: A student that does not belong to the pipeline.
    """
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    settings = read_export(folder)
    student = load_exported(folder, settings)
    if pipe is not None:
        teacher = getattr(pipe, "transformer", None)
        if type(teacher).__name__ != settings.get("class_name", type(student).__name__):
            raise ValueError(
                f"--student is a {type(student).__name__}, the pipeline's transformer a "
                f"{type(teacher).__name__}: not the student of this pipeline"
            )
        key = "in_channels"
        if student.config.get(key) != teacher.config.get(key):
            raise ValueError(
                f"--student has {key}={student.config.get(key)}, the pipeline's transformer "
                f"{teacher.config.get(key)}: not the student of this pipeline"
            )
    return student, settings


def _ladder(t_list: list[float], steps: int | None) -> list[float]:
    if steps is None:
        return list(t_list)
    if not 1 <= steps <= len(t_list) - 1:
        raise ValueError(
            f"--steps must be 1..{len(t_list) - 1} (the student's ladder), got {steps}"
        )
    return [*t_list[:steps], 0.0]


def _noise(family: PipelineFamily, n: int, resolution: int, seed: int) -> dict[str, Tensor]:
    """The initial noise (and, for packed latents, their ids) for ``n`` samples."""
    shapes = family.placeholder(1, resolution)
    g = torch.Generator().manual_seed(seed)
    out = {k: v.expand(n, *v.shape[1:]).clone() for k, v in shapes.items() if k != "latents"}
    out["latents"] = torch.randn((n, *shapes["latents"].shape[1:]), generator=g)
    return out


def _quiet() -> None:
    """No progress bars from diffusers and transformers: a command's errors stay one line."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sample_student(
    student: torch.nn.Module,
    settings: dict[str, Any],
    pipe: Any,
    prompts: Sequence[str],
    *,
    seeds: int = 1,
    seed: int = 0,
    resolution: int = 512,
    steps: int | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Sample the student for each prompt and seed, and decode.

    Returns:
        ``(images, noise, seconds)``: pictures ``[P * seeds, 3, H, W]`` in [0, 1] (prompt-major),
        the initial noise (the teacher's ``latents``), and the wall time of sampling and decoding.
    """
    family = PipelineFamily(pipe, seed)
    t_list = _ladder(settings["t_list"], steps)
    images, noises, seconds = [], [], 0.0
    for i, prompt in enumerate(prompts):
        noise = _noise(family, seeds, resolution, seed + i)
        cond = family.conditioning([prompt] * seeds)
        ehs = cond.pop("encoder_hidden_states", None)
        kwargs = {**cond, **{k: v for k, v in noise.items() if k != "latents"}}

        def run(noise=noise, ehs=ehs, kwargs=kwargs) -> Tensor:
            x = sample_exported(student, noise["latents"], t_list, settings, ehs, kwargs)
            return decode(pipe, x)

        pictures, took = _timed(run)
        images.append(pictures)
        noises.append(noise["latents"])
        seconds += took
    return torch.cat(images), torch.cat(noises), seconds


def sample_teacher(
    pipe: Any,
    prompts: Sequence[str],
    noise: Tensor,
    *,
    seeds: int,
    resolution: int,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> tuple[Tensor, float]:
    """The pipeline itself on the same prompts and initial noise as the student."""
    images, seconds = [], 0.0
    options: dict[str, Any] = {"height": resolution, "width": resolution, "output_type": "pt"}
    if steps is not None:
        options["num_inference_steps"] = steps
    if guidance_scale is not None:
        options["guidance_scale"] = guidance_scale
    for i, prompt in enumerate(prompts):
        latents = noise[i * seeds : (i + 1) * seeds]
        out, took = _timed(
            lambda p=prompt, z=latents: pipe(prompt=[p] * seeds, latents=z, **options)
        )
        pictures = out.frames[:, 0] if hasattr(out, "frames") else out.images  # Wan: first frame
        images.append(torch.as_tensor(pictures).float())
        seconds += took
    return torch.cat(images), seconds


def _peak_memory() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "memory": "cuda allocated"}
    # ru_maxrss is the process's peak resident set in KiB (Linux): process-wide, monotonic.
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "memory": "process peak RSS"}  # fmt: skip


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-pair PSNR in dB of pictures in [0, 1] ``[N, 3, H, W]`` (float64; ``inf`` if equal)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def write_pictures(
    folder: str | Path, images: Tensor, *, columns: int | None = None, name: str = "sample"
) -> Path:
    """One PNG per picture (``NAME_0000.png``, ...) and ``NAME_grid.png``; returns the grid."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        write_png(folder / f"{name}_{i:04d}.png", image.float())
    grid = folder / f"{name}_grid.png"
    write_png(grid, image_grid(images.float() * 2 - 1, columns=columns))
    return grid


def _interval(values_a: Tensor, values_b: Tensor) -> dict[str, float]:
    return paired_bootstrap(values_a, values_b, generator=torch.Generator().manual_seed(0))


def evaluate(
    student: str | Path,
    pipeline: str | Path,
    prompts: Sequence[str],
    out: str | Path,
    *,
    metrics: Sequence[str] = METRICS,
    clip: str | Path | None = None,
    fid_weights: str | Path | None = None,
    reference: str | Path | None = None,
    clip_sha256: str | None = None,
    fid_sha256: str | None = None,
    seeds: int = 4,
    teacher: bool = True,
    teacher_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score an exported student (and by default its teacher) and write ``out/eval.json``,
    ``out/report.md`` and the pictures.

    Returns:
        The contents of ``eval.json``: ``{"student": {...}, "teacher": {...}, "paired": {...},
        "features": {...}, "settings": {...}}``; per metric asked for, ``clip_score`` (and
        ``clip_cosine``), ``diversity`` (and ``vendi``, and the student's
        ``diversity_ratio``), ``fid`` (with ``reference``), ``fid_to_teacher``; always
        ``seconds_per_image``.

    ``clip_sha256``/``fid_sha256``: the feature networks' expected SHA-256 (checked; a missing
    file's error names it).

    Raises:
        FileNotFoundError: A missing student, pipeline, weights or reference path.
        ValueError: An unknown metric, a metric without its feature network, too few seeds for
            diversity, a student that is not the pipeline's.
    """
    metrics = list(dict.fromkeys(metrics))
    _check_options(metrics, clip, fid_weights, reference, seeds, teacher, student,
                   {"--clip": clip_sha256, "--fid-weights": fid_sha256})  # fmt: skip
    scorer = ClipScorer(clip, sha256=clip_sha256) if clip is not None else None
    fid_net = FeatureNet(fid_weights, sha256=fid_sha256) if fid_weights is not None else None
    pipe = load_pipeline(pipeline)
    net, settings = load_student(student, pipe)
    return evaluate_student(net, settings, pipe, prompts, out, metrics=metrics, scorer=scorer,
                            fid_net=fid_net, reference=reference, seeds=seeds, teacher=teacher,
                            teacher_steps=teacher_steps, guidance_scale=guidance_scale,
                            resolution=resolution, steps=steps, seed=seed,
                            names={"student": str(student), "pipeline": str(pipeline)})  # fmt: skip


def _check_options(metrics, clip, fid_weights, reference, seeds, teacher, student=None,
                   hashes=None) -> None:  # fmt: skip
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"--metrics: unknown {', '.join(unknown)} (known: {', '.join(METRICS)})")
    if "clip" in metrics and clip is None:
        raise ValueError("--metrics clip needs --clip DIR (a local CLIP folder)")
    if "fid" in metrics and fid_weights is None:
        raise ValueError("--metrics fid needs --fid-weights FILE (a TorchScript feature network)")
    if "fid" in metrics and reference is None and not teacher:
        raise ValueError("--metrics fid needs --reference DIR or the teacher (drop --no-teacher)")
    if "diversity" in metrics and seeds < 2:
        raise ValueError(f"--metrics diversity needs --seeds >= 2, got {seeds}")
    if "diversity" in metrics and clip is None and fid_weights is None:
        raise ValueError("--metrics diversity needs --clip or --fid-weights for its features")
    for flag, path in (("--reference", reference), ("--student", student), ("--clip", clip),
                       ("--fid-weights", fid_weights)):  # fmt: skip
        if path is not None and not Path(path).exists():  # every path before any loading
            expected = (hashes or {}).get(flag)
            hint = f" (expected sha256 {expected})" if expected else ""
            raise FileNotFoundError(f"{flag}: no file {str(path)!r}{hint}")
    _quiet()


def evaluate_student(
    net: torch.nn.Module,
    settings: dict[str, Any],
    pipe: Any,
    prompts: Sequence[str],
    out: str | Path,
    *,
    metrics: Sequence[str] = METRICS,
    scorer: ClipScorer | None = None,
    fid_net: FeatureNet | None = None,
    reference: str | Path | None = None,
    seeds: int = 4,
    teacher: bool = True,
    teacher_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` on a loaded student (its sampling settings: ``fastgen.json``'s keys)
    and a loaded pipeline, with the feature networks loaded."""
    metrics = list(dict.fromkeys(metrics))
    if resolution is None:
        resolution = int(getattr(pipe.vae.config, "sample_size", None) or 512)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, dict[str, Any]] = {}
    images_s, noise, secs_s = sample_student(net, settings, pipe, prompts, seeds=seeds, seed=seed,
                                             resolution=resolution, steps=steps)  # fmt: skip
    runs["student"] = {"images": images_s, "seconds": secs_s, **_peak_memory()}
    if teacher:
        images_t, secs_t = sample_teacher(pipe, prompts, noise, seeds=seeds, resolution=resolution,
                                          steps=teacher_steps, guidance_scale=guidance_scale)  # fmt: skip
        runs["teacher"] = {"images": images_t, "seconds": secs_t, **_peak_memory()}

    texts = [p for p in prompts for _ in range(seeds)]
    result: dict[str, Any] = {"features": {}, "paired": {}}
    feats: dict[str, Tensor] = {}
    for who, run in runs.items():
        images = run["images"]
        entry: dict[str, Any] = {
            "seconds_per_image": run["seconds"] / len(images),
            "peak_memory_bytes": run["peak_memory_bytes"],
            "images": len(images),
        }
        if scorer is not None:
            score, cos = scorer.scores(images, texts)
            run["clip"] = score
            if "clip" in metrics:
                entry.update(clip_score=float(score.mean()), clip_cosine=float(cos.mean()))
        if fid_net is not None:
            feats[who] = fid_net(images)
        if "diversity" in metrics:
            f = scorer.image_embeds(images) if scorer is not None else feats[who]
            run["groups"] = f.reshape(len(prompts), seeds, -1)
            entry.update(diversity=float(mean_pairwise_distance(run["groups"])),
                         vendi=float(vendi_score(run["groups"])))  # fmt: skip
        result[who] = entry
    if "fid" in metrics and reference is not None:
        real = fid_net(_read_folder(reference, resolution))
        for who in runs:
            result[who]["fid"] = float(frechet_distance(feats[who], real))
    if "teacher" in runs:
        s, t = runs["student"], runs["teacher"]
        paired = result["paired"]
        paired["psnr_db"] = _interval(psnr(s["images"], t["images"]), torch.zeros(len(texts)))
        if "fid" in metrics:
            result["student"]["fid_to_teacher"] = float(
                frechet_distance(feats["student"], feats["teacher"])
            )
            distance = (feats["student"] - feats["teacher"]).norm(dim=1)
            paired["feature_distance"] = _interval(distance, torch.zeros_like(distance))
        if "clip" in metrics:
            paired["clip_score_difference"] = _interval(s["clip"], t["clip"])
        if "diversity" in metrics:
            result["student"]["diversity_ratio"] = float(diversity_ratio(s["groups"], t["groups"]))
    if scorer is not None:
        result["features"]["clip"] = scorer.describe()
    if fid_net is not None:
        result["features"]["fid"] = fid_net.describe()
    result["settings"] = {
        **(names or {}), "prompts": len(prompts),
        "seeds": seeds, "seed": seed, "resolution": resolution, "metrics": metrics,
        "student_t_list": _ladder(settings["t_list"], steps), "teacher_steps": teacher_steps,
        "guidance_scale": guidance_scale,
    }  # fmt: skip
    for who, run in runs.items():
        write_pictures(out / who, run["images"], columns=seeds, name=who)
    (out / "eval.json").write_text(
        json.dumps(result, indent=1, allow_nan=True) + "\n", encoding="utf-8"
    )
    (out / "report.md").write_text(_report(result, prompts, list(runs)), encoding="utf-8")
    return result


def _read_folder(folder: str | Path, resolution: int) -> Tensor:
    """The PNG/JPEG pictures of a folder, centre-cropped and resized to ``resolution``."""
    files = sorted(
        p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )
    if len(files) < 2:
        raise ValueError(f"--reference: {folder} holds {len(files)} pictures (FID needs >= 2)")
    return torch.stack([(read_pixels(f, resolution) + 1) / 2 for f in files])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _report(result: dict[str, Any], prompts: Sequence[str], who: list[str]) -> str:
    keys = [k for k in ("clip_score", "clip_cosine", "diversity", "vendi", "diversity_ratio", "fid",
                        "fid_to_teacher", "seconds_per_image") if k in result["student"]]  # fmt: skip
    lines = ["# fastgen eval", "", f"{len(prompts)} prompts x {result['settings']['seeds']} seeds, "
             f"{result['settings']['resolution']} px.", "",
             "| | " + " | ".join(who) + " |", "|---|" + "---:|" * len(who)]  # fmt: skip
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(result[w].get(k, "")) for w in who) + " |")
    if result["paired"]:
        lines += [
            "",
            "Student against teacher on the same noise (mean, 95% paired bootstrap interval):",
            "",
        ]
        for name, r in result["paired"].items():
            lines.append(f"- {name}: {_fmt(r['mean'])} [{_fmt(r['low'])}, {_fmt(r['high'])}]")
    lines += [""] + [f"![{w}]({w}/{w}_grid.png)" for w in who]
    lines += ["", "Rows are prompts, columns seeds:", ""] + [
        f"{i + 1}. {p}" for i, p in enumerate(prompts)
    ]
    return "\n".join(lines) + "\n"


def sweep(
    checkpoints: str | Path,
    pipeline: str | Path,
    prompts: Sequence[str],
    out: str | Path,
    *,
    metrics: Sequence[str] = METRICS,
    clip: str | Path | None = None,
    fid_weights: str | Path | None = None,
    reference: str | Path | None = None,
    clip_sha256: str | None = None,
    fid_sha256: str | None = None,
    seeds: int = 4,
    teacher: bool = True,
    teacher_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score every checkpoint of a run (its EMA student) once: ``out/step_N/eval.json`` each,
    skipping the checkpoints already scored, and ``out/sweep.json`` with every step's figures.

    The student's architecture comes from the run's ``config.yaml`` (beside ``checkpoints``),
    built as the run built it (:func:`fastgen.train.build_networks`, LoRA adapters included);
    its weights are the checkpoint's EMA shadows alone (:func:`fastgen.checkpoint.load_ema_weights`).
    Arguments as for :func:`evaluate`.

    Raises:
        FileNotFoundError: No checkpoints folder, or no ``config.yaml`` beside it.
        ValueError: A run without an EMA; the options' errors as :func:`evaluate`'s.
    """
    import yaml

    from fastgen.checkpoint import load_ema_weights
    from fastgen.train.build import build_networks
    from fastgen.train.config import RunConfig
    from fastgen.train.folders import sampling_settings

    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"--checkpoints: no folder {str(checkpoints)!r}")
    config_file = checkpoints.parent / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"--checkpoints: no run config {str(config_file)!r} beside it")
    metrics = list(dict.fromkeys(metrics))
    _check_options(metrics, clip, fid_weights, reference, seeds, teacher, None,
                   {"--clip": clip_sha256, "--fid-weights": fid_sha256})  # fmt: skip
    run = RunConfig.model_validate(yaml.safe_load(config_file.read_text(encoding="utf-8")))
    dmd = run.dmd_config()
    if dmd.ema is None:
        raise ValueError(f"{config_file}: the run keeps no EMA student to evaluate")
    steps = sorted(p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step_"))
    out = Path(out)
    todo = [p for p in steps if not (out / p.name / "eval.json").is_file()]
    if todo:
        scorer = ClipScorer(clip, sha256=clip_sha256) if clip is not None else None
        fid_net = FeatureNet(fid_weights, sha256=fid_sha256) if fid_weights is not None else None
        pipe = load_pipeline(pipeline)
        torch.manual_seed(run.seed or 0)
        net = build_networks(run, dmd)["student"]
        if run.lora is not None:
            from fastgen.train.lora import add_lora

            add_lora(net, run.lora)
        net.eval()
        if type(net).__name__ != type(getattr(pipe, "transformer", None)).__name__:
            raise ValueError(
                f"--checkpoints: the run's student is a {type(net).__name__}, the pipeline's "
                f"transformer a {type(pipe.transformer).__name__}"
            )
        settings = sampling_settings(dmd, type(net).__name__)
        for path in todo:
            load_ema_weights(path, net, dmd.ema)
            evaluate_student(net, settings, pipe, prompts, out / path.name, metrics=metrics,
                             scorer=scorer, fid_net=fid_net, reference=reference, seeds=seeds,
                             teacher=teacher, teacher_steps=teacher_steps,
                             guidance_scale=guidance_scale, resolution=resolution, seed=seed,
                             names={"checkpoint": str(path), "pipeline": str(pipeline)})  # fmt: skip
    table = {}
    for path in steps:
        result = json.loads((out / path.name / "eval.json").read_text(encoding="utf-8"))
        table[path.name] = {k: v for k, v in result["student"].items() if isinstance(v, float)}
    summary = {"checkpoints": table, "scored_now": [p.name for p in todo]}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary
