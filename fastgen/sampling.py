r"""The few-step student's own sampler: its ladder ``t_list``, as DMD2 trains it.

.. math::

    x_{t_0} = t_0\,\epsilon, \qquad \hat x_0^{(k)} = \hat x_0(x_{t_k}, t_k), \qquad
    x_{t_{k+1}} = (1 - t_{k+1})\,\hat x_0^{(k)} + t_{k+1}\,\epsilon_k

with :math:`\epsilon_k` the implied noise of :math:`(\hat x_0^{(k)}, x_{t_k})` (``mode="ode"``)
or fresh Gaussian noise (``mode="sde"``, what backward simulation trains on). The last rung is
``t = 0``: the output is the last :math:`\hat x_0`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastgen.dmd.calls import NetworkCall, check_kwargs
from fastgen.flow_matching import add_noise, convert_prediction, x0_to_eps
from fastgen.pred_type import PredType, flow_name

__all__ = ["sample"]


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: Tensor,
    t_list: Sequence[float],
    *,
    mode: Literal["ode", "sde"] = "ode",
    pred_type: PredType = "flow",
    num_train_timesteps: int | None = None,
    encoder_hidden_states: Tensor | None = None,
    generator: torch.Generator | None = None,
    call: NetworkCall | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """Sample a few-step student along its ladder.

    The model is called as :class:`~fastgen.DMDPipeline` calls it in training:
    ``model(hidden_states=x, timestep=t, encoder_hidden_states=..., **model_kwargs)``, with
    ``t * num_train_timesteps`` in float32 when that is set, and may return a tensor, a tuple or
    an object with ``.sample``. Without ``generator`` there is no host sync and no Python branch
    on tensor values, so it compiles with ``fullgraph=True`` and exports (``mode="sde"`` then
    draws with the global RNG); a generator keeps the eager path reproducible.

    Args:
        model: The student (or its EMA copy).
        noise: Gaussian noise ``[B, ...]``: the input at ``t_list[0]``.
        t_list: The ladder, decreasing, ending in 0 (``DMDConfig.sample_t_cfg.t_list``;
            ``[max_t, 0.0]`` for a 1-step student).
        mode: ``"ode"`` re-noises with the implied noise, ``"sde"`` with fresh noise.
        pred_type: What the model predicts (``x0``, ``eps``, ``flow``/``v``).
        num_train_timesteps: Scale of the model's timestep (diffusers' 1000), or ``None``.
        encoder_hidden_states: Conditioning.
        generator: For the fresh noise of ``mode="sde"`` (eager only).
        call: How the model is called, when not diffusers' standard keywords (Qwen-Image:
            :class:`fastgen.plugins.qwen_image.QwenImageCall`); ``num_train_timesteps`` is then
            the call's own.
        **model_kwargs: Passed to every model call.

    Returns:
        The sample in ``noise``'s dtype, every step rounded once (the conversions' rule).

    Raises:
        ValueError: ``t_list`` has fewer than 2 entries or does not end in 0; a bad ``mode``.
        TypeError: The model returned no tensor.

    Example:
        >>> import torch
        >>> class Flow(torch.nn.Module):  # the exact flow of data at 0
        ...     def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        ...         return hidden_states / timestep[:, None]
        >>> x = sample(Flow(), torch.ones(2, 3), [1.0, 0.5, 0.0])
        >>> x.abs().max().item()
        0.0
    """
    ladder = [float(t) for t in t_list]
    if len(ladder) < 2 or ladder[-1] != 0.0:
        raise ValueError(f"t_list must hold at least 2 rungs and end in 0, got {ladder}")
    if mode not in ("ode", "sde"):
        raise ValueError(f"mode must be 'ode' or 'sde', got {mode!r}")
    check_kwargs(model_kwargs)
    pred = flow_name(pred_type)
    if call is None:
        call = NetworkCall(num_train_timesteps=num_train_timesteps)  # the pipeline's calls
    n, device = noise.shape[0], noise.device
    x = add_noise(torch.zeros_like(noise), noise, torch.full((n,), ladder[0], device=device))
    for t_now, t_next in itertools.pairwise(ladder):
        t = torch.full((n,), t_now, device=device, dtype=torch.float32)
        raw = call(model, "model", x, t, encoder_hidden_states, model_kwargs)
        x0 = convert_prediction(raw, x, t, src=pred, dst="x0")
        if t_next == 0.0:
            return x0
        if mode == "ode":
            eps = x0_to_eps(x0, x, t)
        elif generator is None:  # randn_like: the same draws, and it exports with a symbolic batch
            eps = torch.randn_like(x)
        else:
            eps = torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator)
        x = add_noise(x0, eps, torch.full((n,), t_next, device=device))
    return x
