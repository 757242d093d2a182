"""The run config of ``fastgen distill``: a frozen pydantic model, loaded from YAML, with
``--set key.sub=value`` overrides. Unknown keys and bad values are ``ValidationError``s that name
the field."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fastgen.dmd.config import DMDConfig
from fastgen.eval.collapse import CollapseConfig

__all__ = [
    "CacheConfig",
    "CheckpointConfig",
    "LogConfig",
    "LoraConfig",
    "OptimizerConfig",
    "OptimConfig",
    "RunConfig",
    "TeacherConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_run_config",
]

_FROZEN = ConfigDict(
    frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True
)


class OptimizerConfig(BaseModel):
    """AdamW for one network."""

    model_config = _FROZEN

    lr: float = Field(1e-5, gt=0.0)
    """Peak learning rate (after warmup)."""

    betas: tuple[float, float] = (0.0, 0.999)
    """Adam's betas; DMD2 uses beta1 = 0 for the generator and the fake score."""

    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay."""

    eps: float = Field(1e-8, gt=0.0)
    """Adam's epsilon."""

    schedule: Literal["constant", "cosine"] = "constant"
    """After the warmup: constant, or cosine decay to ``min_lr_ratio`` times ``lr`` at
    ``steps``."""

    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """The cosine schedule's final learning rate, as a fraction of ``lr``."""


class OptimConfig(BaseModel):
    """Optimizers, learning-rate schedule and gradient clipping of the three trained networks."""

    model_config = _FROZEN

    student: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The student's optimizer."""

    fake_score: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The fake score's optimizer."""

    discriminator: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The discriminator's optimizer (GAN branch only)."""

    warmup: int = Field(0, ge=0)
    """Linear warmup of every learning rate over this many iterations."""

    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip each network's gradient norm to this (``None``: no clipping, norms still logged)."""

    @model_validator(mode="before")
    @classmethod
    def _shared_schedule(cls, data: Any) -> Any:
        # Deprecated since 0.2.0: ``optim.schedule`` and ``optim.min_lr_ratio`` for all three
        # networks at once (before per-network schedules). Still read, with a warning: each
        # network's own setting, where it has one, wins.
        if not isinstance(data, dict) or not {"schedule", "min_lr_ratio"} & data.keys():
            return data
        data = dict(data)
        shared = {k: data.pop(k) for k in ("schedule", "min_lr_ratio") if k in data}
        warnings.warn(
            f"optim.{' and optim.'.join(shared)} is deprecated: set it per network "
            f"(optim.student.{next(iter(shared))}, optim.fake_score..., optim.discriminator...)",
            DeprecationWarning,
            stacklevel=2,
        )
        for net in ("student", "fake_score", "discriminator"):
            own = data.get(net) or {}
            own = own.model_dump(exclude_unset=True) if isinstance(own, BaseModel) else dict(own)
            data[net] = {**shared, **own}
        return data


class CheckpointConfig(BaseModel):
    """When to save, and how many checkpoints to keep."""

    model_config = _FROZEN

    every: int = Field(500, ge=1)
    """Save every this many iterations (and at the end)."""

    keep: int | None = Field(3, ge=1)
    """Keep the newest this many checkpoints (``None``: keep all)."""

    best: Literal[
        "diversity", "diversity_ratio", "vendi", "recall", "precision", "psnr_to_teacher",
        "clip_score", "fd_to_teacher",
    ] | None = None  # fmt: skip
    """Also keep the checkpoints with the best ``eval`` figure of this name (higher is better,
    but for ``fd_to_teacher``), beside the newest ones; ``eval.every`` must be a multiple of
    ``every``."""

    best_keep: int = Field(1, ge=1)
    """How many best checkpoints to keep."""
    every_minutes: float | None = Field(None, gt=0)
    """Also save once this many minutes have passed since the last save (read after each
    iteration; under DDP/FSDP2 at logging iterations, where the ranks agree)."""

    signals: tuple[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"], ...] = (
        "SIGTERM",
        "SIGUSR1",
    )
    """Preemption notices: on the first, the run finishes the iteration under way, saves and
    stops (:class:`~fastgen.train.Preempted`; ``fastgen distill`` exits with status 75); a
    second ends the process at once. Under DDP/FSDP2 the ranks agree at the next logging
    iteration. ``[]``: no handlers."""


class LogConfig(BaseModel):
    """What is logged, and how often."""

    model_config = _FROZEN

    every: int = Field(10, ge=1)
    """Log scalars every this many iterations (each read is one host sync)."""

    tensorboard: bool = True
    """Write TensorBoard event files to ``out/tensorboard``."""

    wandb: bool = False
    """Also log to Weights & Biases (needs ``wandb`` installed)."""

    wandb_project: str = "fastgen"
    """The W&B project."""

    progress: bool = True
    """A tqdm progress bar on rank 0."""

    name: str = "fastgen distill"
    """The progress bar's label."""


class ValidationConfig(BaseModel):
    """Samples of the EMA student from fixed noise and conditions."""

    model_config = _FROZEN

    every: int | None = Field(None, ge=1)
    """Sample every this many iterations (and at the end); ``None`` disables validation."""

    samples: int = Field(8, ge=1)
    """How many samples (from the first batches of the data, drawn once)."""

    prompts: list[str] | None = None
    """Prompts as text instead of the data's conditions, encoded once at start by the
    teacher's pipeline folder (its text encoders)."""

    teacher_steps: int | None = Field(None, ge=1)
    """Also sample the teacher (this many guided Euler steps, once) as the grid's first row,
    on the same noise and conditions as the student's rows."""


class EvalConfig(BaseModel):
    """Evaluations during training: the EMA student against the teacher on fixed prompts x
    seeds, logged as ``eval/*``, with the collapse alarm (:mod:`fastgen.eval`)."""

    model_config = _FROZEN

    every: int | None = Field(None, ge=1)
    """Evaluate every this many iterations (and at the end); ``None``: no evaluations."""

    prompts: list[str] | None = None
    """Prompts as text, encoded once at start by the teacher's pipeline folder (its text
    encoders); by default the first ``samples`` conditions of the data."""

    samples: int = Field(4, ge=1)
    """How many of the data's conditions are the prompts, without ``prompts``."""

    seeds: int = Field(4, ge=1)
    """Noises per prompt: diversity is measured between a prompt's seeds (2 or more)."""

    seed: int = 0
    """The evaluation noise's seed (drawn once, on its own generator)."""

    teacher_steps: int = Field(8, ge=1)
    """The teacher's Euler steps (with the run's CFG), sampled once."""

    teacher_shift: float = Field(1.0, gt=0.0)
    """The shift of the teacher's ladder (SD3 and Flux sample with 3.0)."""

    clip: str | None = None
    """A local CLIP folder: its image embeddings are the features, and the CLIP score is
    reported (with ``prompts``)."""

    fid_weights: str | None = None
    """A TorchScript feature network (FID's Inception) for the features, if no ``clip``.
    Without either, the features are the pictures' (or latents') pooled values."""

    clip_sha256: str | None = None
    """``clip``'s expected SHA-256 (of the folder's files, :func:`fastgen.eval.features.sha256`)."""

    fid_sha256: str | None = None
    """``fid_weights``' expected SHA-256."""

    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    """When the collapse alarm fires."""

    stop_on_collapse: bool = False
    """Stop the run when the alarm fires (keeping the last checkpoint from before the low
    streak); otherwise warn and go on."""


class TeacherConfig(BaseModel):
    """The teacher: a diffusers model folder, loaded with ``from_pretrained``."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, populate_by_name=True
    )

    path: str
    """A model folder, a pipeline folder (with ``subfolder``), or a hub id."""

    subfolder: str | None = None
    """The network's folder inside a pipeline folder (``transformer``)."""

    class_name: str | None = Field(None, alias="class")
    """The diffusers class (``SD3Transformer2DModel``); by default the folder's
    ``config.json`` ``_class_name``. Written ``class:`` in YAML."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The teacher's weights; student and fake score are float32 copies (with ``lora:``, the
    teacher's weights themselves under float32 adapters; under FSDP2, copies of them in this
    dtype). bf16/fp16 halve the teacher's memory
    and need ``precision: bf16``."""


class CacheConfig(BaseModel):
    """Batches from a latent cache folder (:mod:`fastgen.cache`)."""

    model_config = _FROZEN

    cache: str
    """The cache folder: ``*.safetensors`` shards with ``latents`` and the conditioning."""

    batch_size: int = Field(ge=1)
    """Samples per batch on each rank."""

    shuffle: bool = True
    """A fresh permutation every epoch (seeded by ``seed``)."""


class LoraConfig(BaseModel):
    """LoRA adapters on the student and the fake score (``peft``); their base weights freeze."""

    model_config = _FROZEN

    rank: int = Field(16, ge=1)
    """The adapters' rank ``r``."""

    alpha: float | None = Field(None, gt=0.0)
    """The scale's numerator: updates are scaled by ``alpha / rank`` (``None``: ``rank``)."""

    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Names (or name suffixes) of the layers that get adapters: diffusers' attention
    projections by default."""


class RunConfig(BaseModel):
    """One distillation run: the recipe, the optimization, the loop and its outputs.

    Example:
        >>> run = RunConfig(recipe="dmd2_wan21", dmd={"guidance_scale": 2.0}, steps=10, out="run")
        >>> run.dmd_config().guidance_scale, run.dmd_config().student_sample_steps
        (2.0, 4)
    """

    model_config = _FROZEN

    out: str
    """The run folder: checkpoints, logs, samples, the resolved config. Rerunning with the same
    ``out`` resumes."""

    steps: int = Field(ge=1)
    """Student updates (iterations). Each iteration is ``student_update_freq`` fake-score (and
    discriminator) updates, then one student update and one EMA update."""

    recipe: str | None = None
    """A built-in recipe name or a YAML/JSON path; the recipe names the method (DMD2 when it
    names none): ``dmd2_sd3``, ``scm_sd3``, ``rcm_wan21``, ``meanflow_flux``, ...
    (:func:`fastgen.train.load_method_config`)."""

    dmd: dict[str, Any] = Field(default_factory=dict)
    """:class:`~fastgen.DMDConfig` fields that override a DMD2 recipe's."""

    scm: dict[str, Any] = Field(default_factory=dict)
    """:class:`~fastgen.consistency.SCMConfig` fields that override an sCM recipe's."""

    rcm: dict[str, Any] = Field(default_factory=dict)
    """:class:`~fastgen.consistency.RCMConfig` fields that override an rCM recipe's."""

    meanflow: dict[str, Any] = Field(default_factory=dict)
    """:class:`~fastgen.consistency.MeanFlowConfig` fields that override a MeanFlow recipe's."""

    teacher: TeacherConfig | None = None
    """The teacher from a diffusers model folder; student and fake score start as copies of it
    (CLI; or ``model``)."""

    model: str | None = None
    """The networks, as ``"module:function"``: ``function(run)`` returns a dict with
    ``teacher`` and optionally ``student``, ``fake_score``, ``discriminator`` (CLI; or
    ``teacher``)."""

    data: CacheConfig | str | None = None
    """The data: a latent cache (``{cache, batch_size}``), or ``"module:function"`` whose
    ``function(run, rank, world)`` returns a callable that gives one batch dict per call (CLI)."""

    lora: LoraConfig | None = None
    """LoRA student and fake score instead of full fine-tuning; the export merges the adapter
    and also saves it alone (peft's format)."""

    seed: int | None = 0
    """Seeds the networks' construction (every rank the same) and, offset by the rank, the
    data and noise; ``None`` leaves the RNG to the caller (a script that seeds it itself)."""

    compile: bool = False
    """Each loss through ``torch.compile`` (``fullgraph=True`` except under DDP)."""

    activation_checkpointing: bool = False
    """Recompute each transformer block of the student and the fake score in the backward
    instead of keeping its activations (:func:`fastgen.train.sharding.checkpoint_blocks`):
    less memory, about one more forward of time; the same gradients."""

    deterministic: bool = True
    """Train under deterministic kernels (:func:`fastgen.train.deterministic_kernels`): compiled
    scatters such as an embedding's backward then do not add in a varying order, and a resumed
    run is bitwise the straight run. ``False`` gives up that guarantee under compile (and on
    CUDA) for whatever speed the atomic kernels gain."""

    parallel: Literal["none", "ddp", "fsdp2"] = "none"
    """Under torchrun: replicate the trained networks with DDP, or shard student, fake score and
    teacher with FSDP2 (the discriminator stays replicated)."""

    cpu_offload: bool = False
    """``parallel: fsdp2`` only: FSDP2's ``CPUOffloadPolicy`` for the student, the fake score and
    the teacher: their shards, gradients and optimizer states live in host memory (pinned on
    CUDA) and each block's shards are copied to the device for its all-gather; the optimizer
    steps on the CPU. Device memory then holds a gathered block or two and the activations; the
    process group carries gloo beside NCCL for the reductions of host tensors. Pair it with
    the EMA's own ``cpu_offload``."""

    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: autocast (DDP, one process) or FSDP2's mixed-precision policy (bf16 parameters,
    fp32 gradient reduction); weights and optimizer state stay float32."""

    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizers, schedule, clipping."""

    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoints."""

    log: LogConfig = Field(default_factory=LogConfig)
    """Logs."""

    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    """Validation samples."""

    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluations against the teacher, and the collapse alarm."""

    @model_validator(mode="after")
    def _one_source_of_networks(self) -> RunConfig:
        if self.teacher is not None and self.model is not None:
            raise ValueError("set teacher (a model folder) or model (a factory), not both")
        if (
            self.teacher is not None
            and self.teacher.dtype != "float32"
            and self.precision != "bf16"
        ):
            raise ValueError(
                f"teacher.dtype {self.teacher.dtype} needs precision: bf16 (the student and fake "
                "score train in float32 under autocast)"
            )
        if self.cpu_offload and self.parallel != "fsdp2":
            raise ValueError(
                f"cpu_offload needs parallel: fsdp2 (FSDP2's offload policy), got parallel: "
                f"{self.parallel}"
            )
        if self.eval.every is not None and self.eval.seeds < 2:
            raise ValueError(
                f"eval.seeds must be >= 2 (diversity is between seeds), got {self.eval.seeds}"
            )
        best, every = self.checkpoint.best, self.eval.every
        if best is not None and (every is None or every % self.checkpoint.every):
            raise ValueError(
                f"checkpoint.best needs eval.every to be a multiple of checkpoint.every "
                f"({self.checkpoint.every}), got {every}"
            )
        return self

    @property
    def method(self) -> str:
        """The method the run trains: the recipe's, else the one whose override section is set
        (``dmd2`` by default)."""
        from fastgen.train.recipes import recipe_method

        if self.recipe is not None:
            return recipe_method(self.recipe)
        return next((m for m in ("scm", "rcm", "meanflow") if getattr(self, m)), "dmd2")

    def method_config(self) -> Any:
        """The recipe with its method's overrides (``dmd``, ``scm``, ``rcm`` or ``meanflow``),
        validated: a :class:`~fastgen.DMDConfig`, :class:`~fastgen.consistency.SCMConfig`,
        :class:`~fastgen.consistency.RCMConfig` or :class:`~fastgen.consistency.MeanFlowConfig`.
        Under ``parallel: fsdp2`` the EMA keeps each rank's shard (``ema.mode: local_shard``)
        unless the run's own overrides set ``ema: {mode: ...}``.

        Raises:
            FileNotFoundError: No such recipe.
            ValueError: An override section of another method than the recipe's.
            pydantic.ValidationError: A bad field (named).
        """
        from fastgen.train.recipes import load_method_config

        method = self.method
        for other in ("dmd", "scm", "rcm", "meanflow"):
            if getattr(self, other) and other != ("dmd" if method == "dmd2" else method):
                raise ValueError(
                    f"{other}: overrides of another method; the run trains {method} "
                    f"(recipe {self.recipe!r}): set {'dmd' if method == 'dmd2' else method}: instead"
                )
        overrides = self.dmd if method == "dmd2" else getattr(self, method)
        config = load_method_config(self.recipe, overrides, method=method)
        ema = getattr(config, "ema", None)
        if (
            self.parallel == "fsdp2"
            and ema is not None
            and "mode" not in (overrides.get("ema") or {})
        ):
            # each rank averages its own shard: no whole copy of the student on any rank (a
            # recipe's full_tensor is modelopt's library default, not a run's choice)
            config = config.model_copy(
                update={"ema": ema.model_copy(update={"mode": "local_shard"})}
            )
        return config

    def dmd_config(self) -> DMDConfig:
        """The recipe with ``dmd`` overrides, validated (errors name the field).

        Raises:
            ValueError: The recipe is another method's (see :meth:`method_config`).
        """
        config = self.method_config()
        if not isinstance(config, DMDConfig):
            raise ValueError(
                f"recipe {self.recipe!r} trains {self.method}, not DMD2: see method_config()"
            )
        return config


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _parse_value(text: str) -> Any:
    import yaml

    if text == "":
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    return value


def apply_overrides(fields: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``fields`` with each ``key.sub=value`` set (the value read as YAML: ``3``, ``1e-4``,
    ``true``, ``[0.9, 0.99]``, ``null``).

    Example:
        >>> apply_overrides({"optim": {"warmup": 0}}, ["optim.warmup=10", "dmd.guidance_scale=3"])
        {'optim': {'warmup': 10}, 'dmd': {'guidance_scale': 3}}

    Raises:
        ValueError: An override without ``=`` or with an empty key.
    """
    out = _copy(fields)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set {item!r}: expected key.sub=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


def _copy(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in fields.items()}


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run config YAML file and apply ``--set`` overrides.

    Raises:
        FileNotFoundError: No such file (the message names it).
        ValueError: The file does not hold a mapping; a malformed override.
        pydantic.ValidationError: An unknown key or a bad value.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run config file {str(path)!r}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"run config {path} must hold a mapping, got {type(data).__name__}")
    return RunConfig.model_validate(apply_overrides(data, list(overrides)))
