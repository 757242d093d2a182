"""The demo's networks, called diffusers-style (``hidden_states=``, ``timestep=``,
``encoder_hidden_states=``) as :class:`~fastgen.DMDPipeline` calls them."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from fastgen.demo.data import N_CLASSES


def fourier(t: Tensor, n_freqs: int) -> Tensor:
    freqs = 2.0 ** torch.arange(n_freqs, device=t.device, dtype=torch.float32) * math.pi
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class VelocityMLP(nn.Module):
    """Ring job: v(x_t, t), an MLP on the point, random Fourier features of the point, and
    Fourier features of t.

    The point's Fourier features (``n_point`` fixed frequencies drawn once with seed 0, scale
    ``scale``) let one network step map noise onto 8 separate modes with narrow bridges between
    them: with the plain point as input, the 1-step student left about a third of its samples
    between modes. ``net.3`` and ``net.5`` (the last two hidden activations) are the blocks the
    GAN branch taps.
    """

    def __init__(
        self, width: int = 128, n_freqs: int = 8, n_point: int = 32, scale: float = 0.5
    ) -> None:
        super().__init__()
        self.n_freqs = n_freqs
        freqs = torch.randn(2, n_point, generator=torch.Generator().manual_seed(0)) * scale
        self.register_buffer("point_freqs", freqs)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * n_point + 2 * n_freqs, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 2),
        )

    def forward(
        self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states=None
    ) -> Tensor:
        angles = hidden_states @ self.point_freqs
        features = [hidden_states, angles.sin(), angles.cos(), fourier(timestep, self.n_freqs)]
        return self.net(torch.cat(features, dim=1))


class RingDiscriminator(nn.Module):
    """Ring job's GAN heads: one MLP per tapped teacher activation ``[B, C]``, logits ``[B, n]``."""

    TAPS = ("net.3", "net.5")

    def __init__(self, width: int = 128, hidden: int = 128) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            for _ in self.TAPS
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.cat([head(f) for head, f in zip(self.heads, features)], dim=1)


class ResBlock(nn.Module):
    """Pre-norm residual MLP block, modulated (scale, shift) by the conditioning."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(width, 2 * width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.film(cond).chunk(2, dim=1)
        return x + self.mlp(self.norm(x) * (1 + scale) + shift)


class DigitsFlowNet(nn.Module):
    """Digits job: class-conditional v(x_t, t, label) for ``[B, 1, 8, 8]`` images.

    A residual MLP on the flattened image; time (Fourier features) and label (an embedding
    with one extra "no label" entry, index 10, for classifier-free guidance) modulate each block.
    ``encoder_hidden_states`` carries the labels ``[B]`` (int64).
    """

    def __init__(self, width: int = 256, depth: int = 4, n_freqs: int = 8) -> None:
        super().__init__()
        self.n_freqs = n_freqs
        self.inp = nn.Linear(64, width)
        self.time = nn.Sequential(nn.Linear(2 * n_freqs, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(N_CLASSES + 1, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 64))

    def forward(
        self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor
    ) -> Tensor:
        x = self.inp(rearrange(hidden_states, "b c h w -> b (c h w)"))
        cond = nn.functional.silu(
            self.time(fourier(timestep, self.n_freqs)) + self.label(encoder_hidden_states)
        )
        for block in self.blocks:
            x = block(x, cond)
        return rearrange(self.out(x), "b (c h w) -> b c h w", c=1, h=8)


class DigitsClassifier(nn.Module):
    """A small CNN for the metrics: ``features`` (64-d, for FD and precision/recall) and logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, N_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitsMeanFlowNet(nn.Module):
    """Digits job, MeanFlow: the average velocity u(x_t, r, t, label) from a :class:`DigitsFlowNet`.

    The flow network's layers plus an embedding of the gap ``t - r`` (Fourier features, an MLP
    whose last layer starts at zero) added to its conditioning: built from the teacher, it starts
    as the teacher, ``u(x_t, r, t) = v(x_t, t)``, the exact average velocity as ``r -> t``.
    """

    def __init__(self, flow: DigitsFlowNet) -> None:
        super().__init__()
        self.flow = flow
        width = flow.inp.out_features
        self.gap = nn.Sequential(
            nn.Linear(2 * flow.n_freqs, width), nn.SiLU(), nn.Linear(width, width)
        )
        nn.init.zeros_(self.gap[2].weight)
        nn.init.zeros_(self.gap[2].bias)

    def forward(
        self, hidden_states: Tensor, timestep: Tensor, r: Tensor, encoder_hidden_states: Tensor
    ) -> Tensor:
        f = self.flow
        x = f.inp(rearrange(hidden_states, "b c h w -> b (c h w)"))
        cond = nn.functional.silu(
            f.time(fourier(timestep, f.n_freqs))
            + self.gap(fourier(timestep - r, f.n_freqs))
            + f.label(encoder_hidden_states)
        )
        for block in f.blocks:
            x = block(x, cond)
        return rearrange(f.out(x), "b (c h w) -> b c h w", c=1, h=8)
