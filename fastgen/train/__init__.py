"""The trainer: a run config, the run built from it (:func:`build`) and the DMD2 loop that
``fastgen distill`` runs; diffusers model folders in and out (:mod:`fastgen.train.folders`), LoRA (:mod:`fastgen.train.lora`) and
``fastgen cache`` (:mod:`fastgen.train.encode`)."""

from fastgen.train.build import RunError, build
from fastgen.train.config import (
    CacheConfig,
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    LoraConfig,
    OptimConfig,
    OptimizerConfig,
    RunConfig,
    TeacherConfig,
    ValidationConfig,
    apply_overrides,
    load_run_config,
)
from fastgen.train.data_checks import NonFiniteDataError, check_cache_against_config
from fastgen.train.determinism import deterministic_kernels
from fastgen.train.preemption import EXIT_PREEMPTED, Preempted, PreemptionNotice
from fastgen.train.trainer import CollapseError, NonFiniteLossError, Trainer

__all__ = [
    # the run config
    "RunConfig",
    "OptimConfig",
    "OptimizerConfig",
    "CheckpointConfig",
    "LogConfig",
    "ValidationConfig",
    "EvalConfig",
    "TeacherConfig",
    "CacheConfig",
    "LoraConfig",
    "load_run_config",
    "apply_overrides",
    # the run, built
    "build",
    "RunError",
    # the loop
    "Trainer",
    "NonFiniteLossError",
    "CollapseError",
    "NonFiniteDataError",
    "check_cache_against_config",
    "deterministic_kernels",
    # preemption
    "Preempted",
    "PreemptionNotice",
    "EXIT_PREEMPTED",
]
