"""A small discriminator on captured teacher features: one head per tapped block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["Discriminator", "group_count"]


def group_count(channels: int, max_groups: int = 32) -> int:
    """The GroupNorm group count for ``channels``: the largest divisor <= ``max_groups`` that
    leaves at least 4 channels per group (1 when none does).

    Example:
        >>> group_count(96), group_count(48), group_count(20), group_count(6)
        (24, 12, 5, 1)
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    fits = [g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= 4]
    return max(fits, default=1)


def _conv_head(channels: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1),
        nn.GroupNorm(group_count(hidden), hidden),
        nn.SiLU(),
        nn.Conv2d(hidden, hidden, 4, stride=2, padding=1),
        nn.GroupNorm(group_count(hidden), hidden),
        nn.SiLU(),
        nn.Conv2d(hidden, 1, 1),
    )


def _token_head(channels: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1)
    )


class Discriminator(nn.Module):
    """Logits ``[B, n_heads]`` from a list of teacher features, one head per feature.

    ``layout="spatial"``: features ``[B, C, H, W]``, each through a conv head (3x3 conv,
    GroupNorm, SiLU, strided 4x4 conv, GroupNorm, SiLU, 1x1 conv), averaged over space.
    ``layout="tokens"``: features ``[B, N, C]`` (transformer blocks); with ``grid=(h, w)``
    (``h * w = N``, the patch grid) they are reshaped to ``[B, C, h, w]`` and go through the conv
    heads, otherwise through a per-token MLP head averaged over tokens. GroupNorm groups divide
    the channels (:func:`group_count`).

    Args:
        channels: Channels of each tapped feature, in tap order.
        layout: ``"spatial"`` or ``"tokens"``.
        grid: The token grid ``(h, w)`` for ``layout="tokens"``, both at least 2.
        hidden: Width of each head.

    Example:
        >>> import torch
        >>> disc = Discriminator([16, 16], layout="tokens", grid=(4, 4), hidden=8)
        >>> disc([torch.randn(2, 16, 16), torch.randn(2, 16, 16)]).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        channels: Sequence[int],
        *,
        layout: Literal["spatial", "tokens"] = "spatial",
        grid: tuple[int, int] | None = None,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if isinstance(channels, int) or len(channels) == 0:
            raise ValueError(f"channels must list one channel count per tap, got {channels!r}")
        if layout not in ("spatial", "tokens"):
            raise ValueError(f"layout must be 'spatial' or 'tokens', got {layout!r}")
        if grid is not None and layout != "tokens":
            raise ValueError(
                f"grid=(h, w) goes with layout='tokens', got grid={grid!r}, layout={layout!r}"
            )
        if grid is not None and (len(grid) != 2 or min(grid) < 2):
            # the conv heads' 4x4 stride-2 kernel needs at least 2 rows and 2 columns
            raise ValueError(f"grid must be (h, w) with h, w >= 2, got grid={grid!r}")
        self.layout, self.grid = layout, None if grid is None else (int(grid[0]), int(grid[1]))
        conv = layout == "spatial" or grid is not None
        make = _conv_head if conv else _token_head
        self.heads = nn.ModuleList(make(int(c), hidden) for c in channels)
        self._conv = conv

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"got {len(features)} features for {len(self.heads)} heads")
        logits = []
        for head, f in zip(self.heads, features):
            expected = 3 if self.layout == "tokens" else 4
            if f.ndim != expected:
                raise ValueError(
                    f"layout={self.layout!r} takes {expected}-D features, got shape {tuple(f.shape)}"
                )
            if self.grid is not None:
                h, w = self.grid
                if f.shape[1] != h * w:
                    raise ValueError(
                        f"grid={self.grid!r} takes {h * w} tokens, got shape {tuple(f.shape)}"
                    )
                f = rearrange(f, "b (h w) c -> b c h w", h=h, w=w)
            # Features arrive in the teacher's dtype; the head computes in its own.
            out = head(f.to(head[0].weight.dtype))
            logits.append(out.mean(dim=(2, 3)) if self._conv else out.mean(dim=1))
        return torch.cat(logits, dim=1)
