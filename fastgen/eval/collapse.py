"""The collapse alarm: watches the student's diversity against the teacher's, evaluation after
evaluation, and fires when it stays low or when the samples turn solid-colour or non-finite.

DMD2's reverse-KL term is mode-seeking: a student can drift, over hundreds of updates, towards
a few images per prompt while its losses look healthy. The alarm reads what the evaluations
already compute (the diversity ratio of :func:`fastgen.eval.diversity_ratio`, the decoded
images), so it costs nothing on the training graph.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

__all__ = ["CollapseAlarm", "CollapseConfig", "degenerate_images"]


class CollapseConfig(BaseModel):
    """When the alarm fires.

    Example:
        >>> CollapseConfig(threshold=0.3).patience
        3
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    threshold: float = Field(0.5, gt=0.0, le=1.0)
    """A diversity ratio (student / teacher) below this counts as low."""

    patience: int = Field(3, ge=1)
    """How many evaluations in a row must be low before the alarm fires."""

    solid_std: float = Field(1e-3, ge=0.0)
    """An image whose pixel standard deviation is at most this is solid-colour."""

    solid_fraction: float = Field(0.5, gt=0.0, le=1.0)
    """The alarm fires at once when at least this share of the images is solid-colour."""


def degenerate_images(images: Tensor, solid_std: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Which images ``[N, ...]`` hold a non-finite value, and which are solid-colour.

    An image is solid-colour when the standard deviation over all its values (channels and
    pixels together) is at most ``solid_std``: the empty or single-colour frames a collapsed
    generator produces.

    Returns:
        ``(non_finite, solid)``, two bool tensors ``[N]``.

    Example:
        >>> import torch
        >>> x = torch.stack([torch.zeros(3, 4, 4), torch.rand(3, 4, 4)])
        >>> [v.tolist() for v in degenerate_images(x)]
        [[False, False], [True, False]]
    """
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim < 2:
        raise TypeError(f"images must be a floating-point tensor [N, ...], got {images!r:.80}")
    flat = images.double().flatten(1)
    non_finite = ~flat.isfinite().all(dim=1)
    solid = ~non_finite & (flat.std(dim=1, correction=0) <= solid_std)
    return non_finite, solid


class CollapseAlarm:
    """Fires after ``patience`` low diversity ratios in a row, or at once on degenerate images.

    Its history is part of the run's state (:meth:`state_dict`), so a resumed run keeps
    counting where it stopped.

    Example:
        >>> alarm = CollapseAlarm(CollapseConfig(threshold=0.5, patience=2))
        >>> [alarm.update(r)["collapsed"] for r in (0.9, 0.2, 0.3)]
        [False, False, True]
    """

    def __init__(self, config: CollapseConfig) -> None:
        self.config = config
        self.streak = 0
        self.history: list[float] = []

    def update(self, ratio: float | Tensor, images: Tensor | None = None) -> dict[str, Any]:
        """Record one evaluation's diversity ratio (and its student images, if any).

        Returns:
            ``{"collapsed": bool, "reason": str, "streak": int, "ratio": float}``; ``reason``
            is empty unless the alarm fires.
        """
        ratio = float(ratio)
        self.history.append(ratio)
        low = not ratio >= self.config.threshold  # a NaN ratio counts as low
        self.streak = self.streak + 1 if low else 0
        reason = ""
        if images is not None:
            non_finite, solid = degenerate_images(images, self.config.solid_std)
            if bool(non_finite.any()):
                reason = f"{int(non_finite.sum())} of {len(non_finite)} images are not finite"
            elif float(solid.double().mean()) >= self.config.solid_fraction:
                reason = f"{int(solid.sum())} of {len(solid)} images are solid-colour"
        if not reason and self.streak >= self.config.patience:
            reason = (
                f"the student's diversity is {ratio:.3g} of the teacher's, below "
                f"{self.config.threshold} for {self.streak} evaluations in a row"
            )
        return {"collapsed": bool(reason), "reason": reason, "streak": self.streak, "ratio": ratio}

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"streak", "history"}:
            raise ValueError(
                f"a collapse alarm state has keys streak and history, got {sorted(state)}"
            )
        self.streak, self.history = int(state["streak"]), [float(r) for r in state["history"]]
