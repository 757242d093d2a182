"""Sample-quality metrics: sliced W2 and mode statistics (ring); Fréchet distance and k-NN
precision and recall in a classifier's feature space (digits)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def _sqrtm_psd(m: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    r"""Fréchet distance between Gaussian fits of two feature sets ``[N, D]``, in float64.

    .. math::

        \lVert \mu_a - \mu_b \rVert^2 + \operatorname{tr}\big(\Sigma_a + \Sigma_b
        - 2 (\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2})^{1/2}\big)
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
    union of balls reaching each point's k-th nearest neighbour in that set; precision is the
    share of fake samples inside the real manifold, recall the share of real inside the fake."""

    def radii(x: Tensor) -> Tensor:
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # the 0-th neighbour is the point itself

    real, fake = real.double(), fake.double()
    r_real, r_fake = radii(real), radii(fake)
    precision = (torch.cdist(fake, real) <= r_real[None, :]).any(dim=1).double().mean()
    recall = (torch.cdist(real, fake) <= r_fake[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)
