"""The trainer: a run config and the DMD2 loop that ``fastgen distill`` runs."""

from fastgen.train.config import (
    CheckpointConfig,
    LogConfig,
    OptimConfig,
    OptimizerConfig,
    RunConfig,
    ValidationConfig,
    apply_overrides,
    load_run_config,
)
from fastgen.train.trainer import NonFiniteLossError, Trainer

__all__ = [
    # the run config
    "RunConfig",
    "OptimConfig",
    "OptimizerConfig",
    "CheckpointConfig",
    "LogConfig",
    "ValidationConfig",
    "load_run_config",
    "apply_overrides",
    # the loop
    "Trainer",
    "NonFiniteLossError",
]
