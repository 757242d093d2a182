"""The demo's data: scikit-learn's 8x8 handwritten digits, and a ring of 8 Gaussians."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

N_CLASSES = 10
N_MODES, RADIUS, MODE_STD = 8, 2.0, 0.08
# The held-out split is fixed (its own seed), whatever --seed the run uses.
SPLIT_SEED, N_HELD_OUT = 20260, 497


@dataclass(frozen=True)
class Digits:
    """Images ``[N, 1, 8, 8]`` in [-1, 1] and labels ``[N]`` (int64), split once."""

    train_x: Tensor
    train_y: Tensor
    eval_x: Tensor
    eval_y: Tensor


def load_digits(device: torch.device) -> Digits:
    """The 1,797 images of ``sklearn.datasets.load_digits`` (bundled, no download), scaled from
    [0, 16] to [-1, 1]; 497 held out for evaluation (a fixed permutation), 1,300 to train."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held, train = order[:N_HELD_OUT], order[N_HELD_OUT:]
    return Digits(x[train].to(device), y[train].to(device), x[held].to(device), y[held].to(device))


def batch_of(x: Tensor, y: Tensor, n: int, generator: torch.Generator | None = None):
    """``n`` images and labels drawn with replacement (on their device, no host sync)."""
    index = torch.randint(0, len(y), (n,), device=y.device, generator=generator)
    return x[index], y[index]


def mode_centers(device: torch.device) -> Tensor:
    angles = torch.arange(N_MODES, device=device, dtype=torch.float32) * (2 * math.pi / N_MODES)
    return RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def sample_ring(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points of the ring of 8 Gaussians (std MODE_STD around radius RADIUS)."""
    which = torch.randint(0, N_MODES, (n,), device=device, generator=generator)
    noise = torch.randn(n, 2, device=device, generator=generator)
    return mode_centers(device)[which] + MODE_STD * noise
