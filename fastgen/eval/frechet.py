r"""Fréchet distance between Gaussian fits of two feature sets (FID when the features are
Inception's), in float64, with the matrix square roots taken by symmetric eigendecompositions.

.. math::

    \operatorname{FD} = \lVert \mu_a - \mu_b \rVert^2
    + \operatorname{tr}\big(\Sigma_a + \Sigma_b - 2 (\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2})^{1/2}\big)

The trace term equals pytorch-fid's and clean-fid's :math:`\operatorname{tr}((\Sigma_a
\Sigma_b)^{1/2})` (the two matrices are similar), computed here without a general
(non-symmetric) ``sqrtm``, so it is real by construction and needs no imaginary-part check.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["frechet_distance", "gaussian_stats", "stats_frechet_distance"]


def check_features(name: str, x: object) -> None:
    """A feature set is a floating-point ``[N, D]`` tensor with ``N >= 2``."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 2:
        raise TypeError(f"{name} must be a floating-point tensor [N, D], got {x!r:.80}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {x.shape[0]}")


def _sqrtm_psd(m: Tensor) -> Tensor:
    # eigh reads the lower triangle: the round-off asymmetry of a product is ignored.
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features`` ``[N, D]``, in float64.

    Example:
        >>> mu, cov = gaussian_stats(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> mu.tolist(), cov.tolist()
        ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    check_features("features", features)
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def stats_frechet_distance(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> Tensor:
    """Fréchet distance between two Gaussians given by mean and covariance (float64, 0-d).

    Example:
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> float(stats_frechet_distance(torch.zeros(2), eye, torch.ones(2), 4 * eye))
        4.0
    """
    mu_a, mu_b, cov_a, cov_b = (x.double() for x in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (*mu_a.shape,) * 2:
        raise ValueError(
            f"means {tuple(mu_a.shape)}, {tuple(mu_b.shape)} and covariances "
            f"{tuple(cov_a.shape)}, {tuple(cov_b.shape)} do not describe two D-dim Gaussians"
        )
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return ((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a + cov_b - 2 * cross)


def frechet_distance(a: Tensor, b: Tensor) -> Tensor:
    """Fréchet distance between Gaussian fits of two feature sets ``[N, D]``, ``[M, D]``.

    Returns:
        A 0-d float64 tensor, whatever the features' dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(500, 3, dtype=torch.float64, generator=g)
        >>> round(float(frechet_distance(a, a + 1.0)), 9)  # a shift by (1, 1, 1)
        3.0
    """
    check_features("a", a)
    check_features("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b have different feature widths: {a.shape[1]} vs {b.shape[1]}")
    return stats_frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
