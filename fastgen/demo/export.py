"""Export the 1-step student for serving: ``torch.export`` with a dynamic batch, labels as input."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fastgen.flow_matching import add_noise, pred_x0_from_flow


class OneStepSampler(nn.Module):
    """``forward(noise, labels)``: the student's x0 from ``t0 * noise`` at ``t0`` (one step)."""

    def __init__(self, student: nn.Module, t0: float) -> None:
        super().__init__()
        self.student, self.t0 = student, t0

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        t = torch.full((noise.shape[0],), self.t0, device=noise.device)
        x = add_noise(torch.zeros_like(noise), noise, t)
        flow = self.student(hidden_states=x, timestep=t, encoder_hidden_states=labels)
        return pred_x0_from_flow(flow, x, t)


def export_one_step(
    student: nn.Module, t0: float, path: Path, example: tuple[Tensor, Tensor]
) -> nn.Module:
    """Export, save to ``path`` (``.pt2``) and load back; returns the loaded program's module."""
    return export_sampler(OneStepSampler(student, t0), path, example)


def export_sampler(sampler: nn.Module, path: Path, example: tuple[Tensor, Tensor]) -> nn.Module:
    """Export ``sampler(noise, labels)`` with a dynamic batch, save to ``path`` and load back."""
    sampler = sampler.eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(sampler, example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, path)
    return torch.export.load(path).module()
