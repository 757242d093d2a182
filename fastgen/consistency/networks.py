r"""A MeanFlow network from a flow model: the model plus an embedding of :math:`t - r`.

MeanFlow's student predicts the average velocity :math:`u(x_t, r, t)`; a pretrained flow model
takes one time. :class:`MeanFlowNet` gives it the second one the way NVlabs/FastGen's networks
do (``r_embedder``): a copy of the model's own timestep embedding reads the sinusoidal features
of :math:`t - r`, and its output is added to the model's timestep embedding. The copy's last
layer starts at zero, so the new network is the teacher exactly until it trains, and at
:math:`r = t` the average velocity is the instantaneous one the teacher predicts.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MeanFlowNet"]


def _embedding_modules(base: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The first sinusoidal projection (diffusers' ``Timesteps``) and the first MLP reading it
    (``TimestepEmbedding``) inside ``base``."""
    proj = embed = None
    for module in base.modules():
        kind = type(module).__name__
        if proj is None and kind == "Timesteps":
            proj = module
        elif embed is None and kind == "TimestepEmbedding":
            embed = module
    if proj is None or embed is None:
        raise ValueError(
            f"{type(base).__name__} has no diffusers timestep embedding (Timesteps and "
            "TimestepEmbedding modules); give a student that takes r itself"
        )
    return proj, embed


class MeanFlowNet(nn.Module):
    r"""``forward(hidden_states, timestep, r, **kwargs)``: ``base`` with :math:`t - r` embedded.

    .. math::

        \operatorname{emb}(t) \;\to\; \operatorname{emb}(t)
        + \operatorname{MLP}_r\big(\operatorname{sin}(t - r)\big)

    ``timestep`` and ``r`` come on the network's own scale (diffusers' 0..1000, or 0..1 for
    Qwen-Image, whose projection scales inside). The embedding's output is added in its dtype
    (the model's); ``MLP_r`` starts as a float32 copy of the model's timestep MLP (it trains,
    also on a bf16 LoRA base) with its last layer zero, so ``MeanFlowNet(base)`` predicts exactly what ``base`` does at any ``r``.

    Args:
        base: A diffusers transformer (SD3, Flux, Wan, Qwen-Image, ...), taken over (not copied).

    Raises:
        ValueError: ``base`` has no diffusers timestep embedding.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
        proj, embed = _embedding_modules(base)
        self.base = base
        self.r_embedder = copy.deepcopy(embed).float()  # it trains: float32, whatever the base
        self.zero_r_output()
        self._proj = [proj]  # a list: the projection stays the base's submodule, not ours too
        self._delta: Tensor | None = None
        embed.register_forward_hook(self._add_delta)

    @torch.no_grad()
    def zero_r_output(self) -> None:
        """Zero ``r_embedder``'s last layer (this rank's shard of it under FSDP2): the network is
        then ``base`` exactly, at any ``r``."""
        last = [m for m in self.r_embedder.modules() if isinstance(m, nn.Linear)][-1]
        for p in last.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).zero_()

    def weight_sources(self) -> dict[str, str]:
        """Name prefixes of this network's weights → the base model file's: ``base.`` is the
        model itself and ``r_embedder.`` starts as its timestep MLP
        (:func:`fastgen.train.sharding.load_shards`'s ``names``)."""
        _, embed = _embedding_modules(self.base)
        path = next(name for name, m in self.base.named_modules() if m is embed)
        return {"r_embedder.": f"{path}.", "base.": ""}

    def _add_delta(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output if self._delta is None else output + self._delta.to(output.dtype)

    @property
    def config(self) -> Any:
        """The base model's config (diffusers')."""
        return self.base.config

    def forward(self, hidden_states: Tensor, timestep: Tensor, r: Tensor, **kwargs: Any) -> Any:
        dtype = next(self.r_embedder.parameters()).dtype
        self._delta = self.r_embedder(self._proj[0](timestep - r).to(dtype))
        try:
            return self.base(hidden_states=hidden_states, timestep=timestep, **kwargs)
        finally:
            self._delta = None

    def save_pretrained(self, folder: str, **kwargs: Any) -> None:
        """The base in diffusers' format in ``folder`` and ``r_embedder.safetensors`` beside it."""
        from safetensors.torch import save_file

        self.base.save_pretrained(folder, **kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in self.r_embedder.state_dict().items()}
        save_file(state, f"{folder}/r_embedder.safetensors")

    @classmethod
    def from_pretrained(cls, folder: str, base_class: type, **kwargs: Any) -> MeanFlowNet:
        """Load :meth:`save_pretrained`'s folder (``base_class``: the diffusers class)."""
        from safetensors.torch import load_file

        net = cls(base_class.from_pretrained(folder, **kwargs))
        net.r_embedder.load_state_dict(load_file(f"{folder}/r_embedder.safetensors"))
        return net
