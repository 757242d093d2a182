"""Test networks shared by several test files: a diffusers-shaped toy DiT and a toy discriminator.

``ToyDiT`` is called like diffusers' transformers (``hidden_states=``, ``timestep=``,
``encoder_hidden_states=``, optional ``pooled_projections=``) and returns an object with
``.sample`` (or a tuple with ``return_dict=False``); its blocks sit in ``transformer_blocks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn


@dataclass
class ToyOutput:
    sample: Tensor


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm(x)
        kv = torch.cat([h, context], dim=1)
        x = x + self.attn(h, kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm(x))


class ToyDiT(nn.Module):
    """Patchify, add time and conditioning embeddings, a few blocks, unpatchify."""

    def __init__(
        self,
        channels: int = 4,
        patch: int = 2,
        dim: int = 32,
        depth: int = 2,
        cond_dim: int = 8,
        pooled_dim: int | None = None,
        r_embedding: bool = False,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.proj_in = nn.Linear(channels * patch * patch, dim)
        self.time = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
        # A second time input (MeanFlow's r), embedded like the first.
        self.time_r = (
            nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
            if r_embedding
            else None
        )
        self.context = nn.Linear(cond_dim, dim)
        self.pooled = None if pooled_dim is None else nn.Linear(pooled_dim, dim)
        self.transformer_blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, channels * patch * patch)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor | None = None,
        pooled_projections: Tensor | None = None,
        return_dict: bool = True,
        r: Tensor | None = None,
    ):
        b, h = hidden_states.shape[0], hidden_states.shape[2]
        x = rearrange(
            hidden_states, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch, q=self.patch
        )
        x = self.proj_in(x.to(self.proj_in.weight.dtype))
        freqs = torch.exp(
            torch.arange(8, device=x.device, dtype=torch.float32) * -math.log(1e4) / 8
        )
        angles = timestep.float()[:, None] * freqs * 1000.0
        temb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1).to(x.dtype))
        if self.time_r is not None and r is not None:
            angles = r.float()[:, None] * freqs * 1000.0
            temb = temb + self.time_r(torch.cat([angles.sin(), angles.cos()], dim=1).to(x.dtype))
        x = x + temb[:, None, :]
        if self.pooled is not None and pooled_projections is not None:
            x = x + self.pooled(pooled_projections.to(x.dtype))[:, None, :]
        if encoder_hidden_states is None:
            context = x.new_zeros(b, 1, x.shape[-1])
        else:
            context = self.context(encoder_hidden_states.to(x.dtype))
        for block in self.transformer_blocks:
            x = block(x, context)
        out = rearrange(
            self.proj_out(x),
            "b (h w) (c p q) -> b c (h p) (w q)",
            h=h // self.patch,
            p=self.patch,
            q=self.patch,
        ).to(hidden_states.dtype)
        return ToyOutput(sample=out) if return_dict else (out,)


class ToyTokenDiscriminator(nn.Module):
    """One linear head per tapped block on mean-pooled tokens: logits [B, n_heads]."""

    def __init__(self, dim: int = 32, n_heads: int = 2) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(n_heads))

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.cat([head(f.mean(dim=1)) for head, f in zip(self.heads, features)], dim=1)


def toy_batch(b: int = 4, dtype: torch.dtype = torch.float32, cond_dim: int = 8):
    """latents, noise, conditioning, negative conditioning for ToyDiT."""
    latents = torch.randn(b, 4, 8, 8, dtype=dtype)
    noise = torch.randn(b, 4, 8, 8, dtype=dtype)
    cond = torch.randn(b, 3, cond_dim, dtype=dtype)
    neg = torch.zeros(b, 3, cond_dim, dtype=dtype)
    return latents, noise, cond, neg


def compile_loss_over_batches(pipe, batches, stance_from: int | None = None):
    """Compile ``pipe.compute_loss`` once (fullgraph, dynamic batch) and run it forward and
    backward on a toy batch of each size; from batch number ``stance_from`` on a recompile
    raises. Returns the CompileCounter."""
    from torch._dynamo.testing import CompileCounter

    def fn(lat, noise, cond, neg, it):
        return pipe.compute_loss(lat, noise, cond, negative_encoder_hidden_states=neg, iteration=it)

    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    try:
        for i, b in enumerate(batches):
            if stance_from is not None and i == stance_from:
                torch.compiler.set_stance("fail_on_recompile")
            out = compiled(*toy_batch(b), torch.tensor(i))  # an int 0 or 1 is specialized
            out["total"].backward()
            assert torch.isfinite(out["total"])
    finally:
        torch.compiler.set_stance("default")
    return counter


def assert_consistency_loss_is_one_frame(pipe, jvp: str, batches) -> None:
    """fullgraph: a graph break raises. The finite-difference JVP: one frame for every batch
    (a recompile raises). Forward mode compiles once per batch size on torch 2.13
    (test_consistency_meanflow's xfail says why): two sizes show each is one frame."""
    if jvp == "finite_difference":
        assert compile_loss_over_batches(pipe, batches, stance_from=1).frame_count == 1
    else:
        assert compile_loss_over_batches(pipe, batches[:2]).frame_count <= 2


class ToyAverageVelocity(nn.Module):
    """A network whose derivative along the ODE is known in closed form (float64 oracle):

    u(x, t, r) = tanh(W x) t^2 + a r, so d/ds u(x + s v, t + s, r) = (1 - tanh^2(W x)) (W v) t^2
    + 2 t tanh(W x) (W acts on the last dim; t and r are the network's timesteps).
    """

    def __init__(self, dim: int = 4, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.a = nn.Parameter(torch.tensor(0.3, dtype=dtype))

    def forward(self, hidden_states, timestep, r, encoder_hidden_states=None):
        shape = (-1,) + (1,) * (hidden_states.ndim - 1)
        t, r = timestep.to(hidden_states.dtype).view(shape), r.to(hidden_states.dtype).view(shape)
        return torch.tanh(self.w(hidden_states)) * t**2 + self.a * r

    def derivative(self, x: Tensor, v: Tensor, t: Tensor) -> Tensor:
        t = t.view((-1,) + (1,) * (x.ndim - 1))
        h = torch.tanh(self.w(x))
        return (1 - h**2) * self.w(v) * t**2 + 2 * t * h
