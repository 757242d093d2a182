r"""Diversity of samples drawn for the same prompt with different seeds, and its ratio to the
teacher's: the figure that falls when a distilled student collapses onto a few modes.

Features come grouped by prompt, ``[P, K, D]``: ``K`` seeds for each of ``P`` prompts. Both
measures are computed within each prompt's group and averaged over prompts, so the spread
*between* prompts (which a collapsed student still has) does not count.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["diversity_ratio", "mean_pairwise_distance", "vendi_score"]


def _check_groups(name: str, x: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 3:
        raise TypeError(
            f"{name} must be a floating-point tensor [prompts, seeds, D], got {x!r:.80}"
        )
    if x.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 seeds per prompt, got {x.shape[1]}")


def mean_pairwise_distance(features: Tensor) -> Tensor:
    r"""Mean Euclidean distance between the features of two seeds of one prompt.

    .. math::

        \frac{1}{P} \sum_p \binom{K}{2}^{-1} \sum_{i < j} \lVert f_{p,i} - f_{p,j} \rVert_2

    Args:
        features: ``[P, K, D]``, ``K >= 2`` seeds per prompt.

    Returns:
        A 0-d float64 tensor (0 when every seed gives the same features).

    Example:
        >>> float(mean_pairwise_distance(torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])))
        5.0
    """
    _check_groups("features", features)
    x = features.double()
    k = x.shape[1]
    d = torch.cdist(x, x)  # [P, K, K], zero diagonal
    return (d.sum(dim=(1, 2)) / (k * (k - 1))).mean()


def vendi_score(features: Tensor) -> Tensor:
    r"""Vendi score (Friedman & Dieng 2023) with the cosine kernel, averaged over prompts: the
    effective number of distinct samples among a prompt's ``K`` seeds, from 1 (all the same) to
    ``K`` (mutually orthogonal features).

    .. math::

        \operatorname{VS} = \exp\Big(-\sum_i \lambda_i \log \lambda_i\Big), \quad
        \lambda = \operatorname{eig}(\hat F \hat F^\top / K), \ \hat F \text{ rows of unit norm}

    Returns:
        A 0-d float64 tensor.

    Example:
        >>> round(float(vendi_score(torch.eye(3)[None])), 6)
        3.0
    """
    _check_groups("features", features)
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    k = x.shape[1]
    lam = torch.linalg.eigvalsh(x @ x.transpose(1, 2) / k).clamp_min(0)
    entropy = -torch.special.xlogy(lam, lam).sum(dim=-1)
    return entropy.exp().mean()


def diversity_ratio(student: Tensor, teacher: Tensor) -> Tensor:
    """The student's mean pairwise distance over the teacher's, on the same prompts and seeds.

    1 means as diverse as the teacher; a student that gives one image whatever the seed scores
    0. Returns a 0-d float64 tensor (``inf`` when the teacher itself has no diversity and the
    student has some; ``nan`` when neither has).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> teacher = torch.randn(2, 4, 8, generator=g)
        >>> float(diversity_ratio(teacher[:, :1].expand(-1, 4, -1), teacher))
        0.0
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher features differ in shape: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)} (the same prompts and seeds are needed)"
        )
    return mean_pairwise_distance(student) / mean_pairwise_distance(teacher)
