"""Improved precision and recall (Kynkäänniemi et al. 2019) between two feature sets."""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen.eval.frechet import check_features

__all__ = ["knn_precision_recall"]


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """Each set's manifold is the union of balls reaching each point's k-th nearest neighbour in
    that set; precision is the share of ``fake`` inside the real manifold, recall the share of
    ``real`` inside the fake one. Distances in float64.

    Args:
        real: ``[N, D]`` reference features (the data, or the teacher's samples).
        fake: ``[M, D]`` features of the samples judged.
        k: the neighbour whose distance sets each ball's radius (``1 <= k < min(N, M)``).

    Returns:
        ``(precision, recall)``, two 0-d float64 tensors in [0, 1].

    Example:
        >>> x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
        >>> [float(v) for v in knn_precision_recall(x, x + 100.0)]
        [0.0, 0.0]
    """
    check_features("real", real)
    check_features("fake", fake)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k must be an int in [1, {min(len(real), len(fake)) - 1}], got {k!r}")

    def radii(x: Tensor) -> Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # neighbour 0 is the point itself

    real, fake = real.double(), fake.double()
    r_real, r_fake = radii(real), radii(fake)
    precision = (torch.cdist(fake, real) <= r_real[None, :]).any(dim=1).double().mean()
    recall = (torch.cdist(real, fake) <= r_fake[None, :]).any(dim=1).double().mean()
    return precision, recall
