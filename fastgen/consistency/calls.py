r"""Network calls on wide inputs: ``(x, t)`` in the compute dtype, rounded once to what the
network takes, with forward-mode tangents kept through the rounding (:mod:`fastgen.consistency.jvp`
differentiates through these calls).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastgen.checks import check_pair
from fastgen.consistency.jvp import round_with_tangent
from fastgen.dmd.calls import NetworkCall

__all__ = ["call_wide", "timestep_of"]


def timestep_of(call: NetworkCall, t: Tensor, dtype: torch.dtype) -> Tensor:
    """The network's ``timestep`` for a wide time ``t``, as :meth:`NetworkCall.timestep` makes
    it (``t * num_train_timesteps`` in float32, or in the latents' ``dtype``), rounded once with
    its tangent kept."""
    scale = call.num_train_timesteps
    out_dtype = torch.float32 if call.timestep_dtype == "float32" else dtype
    return round_with_tangent(t if scale is None else t * float(scale), out_dtype)


def call_wide(
    call: NetworkCall,
    model: nn.Module,
    role: str,
    x: Tensor,
    t: Tensor,
    encoder_hidden_states: Tensor | None,
    model_kwargs: dict[str, Any],
    *,
    dtype: torch.dtype,
    times: dict[str, Tensor] | None = None,
) -> Tensor:
    """``model``'s raw prediction at wide ``(x, t)``: ``x`` rounded once to ``dtype``, ``t`` to
    the timestep's dtype, each extra time in ``times`` passed under its keyword like ``timestep``.

    Raises:
        TypeError: The network returned no tensor.
        ValueError: Its prediction's shape differs from ``x``'s.
    """
    x_in = round_with_tangent(x, dtype)
    kwargs = dict(model_kwargs)
    for name, value in (times or {}).items():
        kwargs[name] = timestep_of(call, value, dtype)
    raw = call.forward(
        model, role, x_in, timestep_of(call, t, dtype), encoder_hidden_states, kwargs
    )
    check_pair(f"{role} output", raw, "hidden_states", x_in)
    return raw
