"""``modelopt.torch.fastgen.pipeline``: the base of the distillation pipelines."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastgen.dmd.config import DistillationConfig
from fastgen.timesteps import sample_timesteps

__all__ = ["DistillationPipeline"]


class DistillationPipeline:
    """Holds the student and the teacher (frozen here) and samples timesteps.

    Args:
        student: The trainable student (not wrapped).
        teacher: The reference model, frozen (``eval()``, ``requires_grad_(False)``).
        config: A :class:`~fastgen.DistillationConfig` (or a subclass).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillationConfig):
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config

    @property
    def device(self) -> torch.device:
        """Device of the student's first parameter (CPU for a parameterless student)."""
        for p in self.student.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the student's first parameter (float32 for a parameterless student)."""
        for p in self.student.parameters():
            return p.dtype
        return torch.float32

    def sample_timesteps(
        self, n: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """``n`` timesteps from ``config.sample_t_cfg``."""
        return sample_timesteps(
            n, self.config.sample_t_cfg, device=device or self.device, dtype=dtype
        )
