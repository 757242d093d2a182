"""Sample-quality metrics: sliced W2 and mode statistics (ring); Fréchet distance and k-NN
precision and recall in a classifier's feature space (digits), through :mod:`fastgen.eval`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

import fastgen.eval
from fastgen.demo.data import MODE_STD, mode_centers


def sliced_wasserstein(a: Tensor, b: Tensor, projections: Tensor) -> float:
    """Sliced W2: sqrt of the mean over projections of W2^2 between the 1-D marginals."""
    pa = torch.sort(a.double() @ projections.double(), dim=0).values
    pb = torch.sort(b.double() @ projections.double(), dim=0).values
    return math.sqrt(float(((pa - pb) ** 2).mean()))


def near_modes(samples: Tensor) -> Tensor:
    """``[N, 8]``: whether each sample lies within 3 standard deviations of each mode's center."""
    return torch.cdist(samples.float(), mode_centers(samples.device)) < 3 * MODE_STD


def modes_covered(samples: Tensor) -> int:
    """Modes with at least 1% of the samples within 3 standard deviations of their center."""
    return int((near_modes(samples).float().mean(dim=0) >= 0.01).sum())


def ring_precision(samples: Tensor) -> float:
    """Share of the samples within 3 standard deviations of some mode (on the ring, not between)."""
    return float(near_modes(samples).any(dim=1).float().mean())


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (:mod:`fastgen.eval`)."""
    return float(fastgen.eval.frechet_distance(a, b))


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (:func:`fastgen.eval.knn_precision_recall`)."""
    precision, recall = fastgen.eval.knn_precision_recall(real, fake, k)
    return float(precision), float(recall)
