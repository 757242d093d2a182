"""The consistency samplers export: a student that samples itself with ``consistency_sample``
(sCM, rCM) or ``meanflow_sample`` goes through ``torch.export`` with a dynamic batch dim and
gives the eager sampler's output at other batch sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import ToyDiT, toy_batch

from fastgen.consistency import consistency_sample, meanflow_sample, scm_t_list


class Sampler(nn.Module):
    def __init__(self, net: nn.Module, method: str, t_list: list[float]) -> None:
        super().__init__()
        self.net, self.method, self.t_list = net, method, t_list

    def forward(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.method == "meanflow":
            return meanflow_sample(self.net, noise, self.t_list, num_train_timesteps=1000,
                                   encoder_hidden_states=cond)  # fmt: skip
        return consistency_sample(self.net, noise, self.t_list, num_train_timesteps=1000,
                                  encoder_hidden_states=cond)  # fmt: skip


@pytest.mark.parametrize(
    ("method", "steps"), [("scm", 1), ("scm", 2), ("meanflow", 1), ("meanflow", 2)]
)
def test_the_sampler_exports_with_a_dynamic_batch(method, steps):
    torch.manual_seed(0)
    net = ToyDiT(dim=16, depth=2, r_embedding=method == "meanflow").eval()
    t_list = (
        scm_t_list(steps) if method == "scm" else ([1.0, 0.0] if steps == 1 else [1.0, 0.5, 0.0])
    )
    sampler = Sampler(net, method, t_list)
    _, noise, cond, _ = toy_batch(3)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(sampler, (noise, cond), dynamic_shapes=({0: batch}, {0: batch}))
    for b in (2, 5):
        _, noise, cond, _ = toy_batch(b)
        torch.manual_seed(1)  # sCM's second step draws fresh noise: the same draws both ways
        got = program.module()(noise, cond)
        torch.manual_seed(1)
        want = sampler(noise, cond)
        assert got.shape == noise.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
