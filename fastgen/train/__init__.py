"""The trainer: a run config and the DMD2 loop that ``fastgen distill`` runs; diffusers model
folders in and out (:mod:`fastgen.train.folders`), LoRA (:mod:`fastgen.train.lora`) and
``fastgen cache`` (:mod:`fastgen.train.encode`)."""

from fastgen.train.config import (
    CacheConfig,
    CheckpointConfig,
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
from fastgen.train.trainer import NonFiniteLossError, Trainer

__all__ = [
    # the run config
    "RunConfig",
    "OptimConfig",
    "OptimizerConfig",
    "CheckpointConfig",
    "LogConfig",
    "ValidationConfig",
    "TeacherConfig",
    "CacheConfig",
    "LoraConfig",
    "load_run_config",
    "apply_overrides",
    # the loop
    "Trainer",
    "NonFiniteLossError",
    "NonFiniteDataError",
    "check_cache_against_config",
    "deterministic_kernels",
    # preemption
    "Preempted",
    "PreemptionNotice",
    "EXIT_PREEMPTED",
]
