r"""Paired bootstrap intervals: how sure a small evaluation is of a difference.

Student and teacher are scored on the same prompts and noise, so their per-sample figures
pair up; resampling the pairs (not each side alone) keeps what they share out of the interval.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["paired_bootstrap"]


def paired_bootstrap(
    a: Tensor,
    b: Tensor,
    *,
    samples: int = 2000,
    level: float = 0.95,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    r"""Mean of the paired differences ``a - b`` with a percentile bootstrap interval.

    .. math::

        \bar d = \tfrac{1}{N} \sum_i (a_i - b_i), \qquad
        [\,q_{(1-\ell)/2},\ q_{(1+\ell)/2}\,] \text{ of } \bar d^{*} \text{ over resamples}

    Args:
        a, b: ``[N]`` per-sample figures of the two models on the same inputs, ``N >= 2``.
        samples: bootstrap resamples.
        level: the interval's coverage, in (0, 1).
        generator: the resampling's generator (a fixed seed gives the same interval).

    Returns:
        ``{"mean", "low", "high", "level", "n"}`` (Python floats; evaluation runs off the
        training graph).

    Example:
        >>> a = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> paired_bootstrap(a, a - 1, generator=torch.Generator().manual_seed(0))["low"]
        1.0
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D tensors of one length, got {a!r:.60} and {b!r:.60}")
    if a.shape[0] < 2:
        raise ValueError(f"a and b need at least 2 pairs, got {a.shape[0]}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    d = (a.double() - b.double()).cpu()
    n = d.shape[0]
    index = torch.randint(0, n, (samples, n), generator=generator)
    means = d[index].mean(dim=1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return {"mean": float(d.mean()), "low": low, "high": high, "level": level, "n": n}
