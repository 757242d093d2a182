r"""The consistency family's samplers: the consistency model's 1- and 2-step sampler and
MeanFlow's jumps along the average velocity.

A consistency model maps a noisy sample straight to its :math:`\hat x_0`; its few-step sampler
re-noises that estimate with fresh noise at the next time (sCM's 2-step sampler re-noises at
TrigFlow's :math:`\hat t = 1.1`, :func:`scm_t_list`). Read in rectified flow this is exactly the
``"sde"`` ladder sampler of :func:`fastgen.sample`, which :func:`consistency_sample` runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastgen.checks import check_float_tensor
from fastgen.consistency.calls import call_wide
from fastgen.consistency.trigflow import HALF_PI, check_sigma_data
from fastgen.dmd.calls import NetworkCall, check_kwargs
from fastgen.flow_matching import add_noise
from fastgen.precision import compute_dtype, compute_once, widen
from fastgen.pred_type import PredType
from fastgen.sampling import sample

__all__ = ["consistency_sample", "meanflow_sample", "scm_t_list"]

SCM_MID_ANGLE = 1.1
"""sCM's intermediate angle for 2-step sampling (Lu & Song 2024)."""


def scm_t_list(
    steps: int = 1, *, sigma_data: float = 0.5, mid_angle: float = SCM_MID_ANGLE
) -> list[float]:
    r"""sCM's sampling ladder in rectified-flow time: ``[1, 0]`` or ``[1, t_mid, 0]``.

    .. math::

        t_{\text{mid}} = \frac{\sigma_d \sin\hat t_{\text{mid}}}{\cos\hat t_{\text{mid}} + \sigma_d \sin\hat t_{\text{mid}}}

    Args:
        steps: 1 or 2.
        sigma_data: :math:`\sigma_d` of the TrigFlow the model was trained in.
        mid_angle: :math:`\hat t_{\text{mid}}` in :math:`(0, \pi/2)` (sCM: 1.1).

    Returns:
        The ladder, a list of Python floats.

    Example:
        >>> [round(t, 4) for t in scm_t_list(2)]
        [1.0, 0.4956, 0.0]
    """
    sd = check_sigma_data(sigma_data)
    if steps not in (1, 2):
        raise ValueError(f"steps must be 1 or 2, got {steps!r}")
    if not 0.0 < mid_angle < HALF_PI:
        raise ValueError(f"mid_angle must lie in (0, pi/2), got {mid_angle!r}")
    if steps == 1:
        return [1.0, 0.0]
    s = sd * math.sin(mid_angle)
    return [1.0, s / (math.cos(mid_angle) + s), 0.0]


def consistency_sample(
    model: nn.Module,
    noise: Tensor,
    t_list: Sequence[float] = (1.0, 0.0),
    *,
    pred_type: PredType = "flow",
    num_train_timesteps: int | None = None,
    encoder_hidden_states: Tensor | None = None,
    generator: torch.Generator | None = None,
    call: NetworkCall | None = None,
    **model_kwargs: Any,
) -> Tensor:
    r"""Sample a consistency model (sCM, rCM) in 1 or a few steps.

    .. math::

        \hat x_0^{(0)} = \hat x_0(t_0 \epsilon_0, t_0), \qquad
        \hat x_0^{(k)} = \hat x_0\big((1 - t_k)\, \hat x_0^{(k-1)} + t_k \epsilon_k,\ t_k\big)

    with fresh noise :math:`\epsilon_k` at each rung; the default ladder is one step from pure
    noise, :func:`scm_t_list` ``(2)`` sCM's 2-step ladder. This is :func:`fastgen.sample` with
    ``mode="sde"`` (compiles with ``fullgraph=True`` when ``generator`` is None).

    Args:
        model: The consistency model (a rectified-flow network).
        noise: Gaussian noise ``[B, ...]``.
        t_list: Decreasing rectified-flow times ending in 0.
        pred_type: What the model predicts.
        num_train_timesteps: Scale of the model's timestep, or None.
        encoder_hidden_states: Conditioning.
        generator: For the re-noising draws (eager only).
        call: How the model is called.
        **model_kwargs: Passed to every call.

    Returns:
        The sample in ``noise``'s dtype.

    Example:
        >>> import torch
        >>> class Flow(torch.nn.Module):  # the exact flow of data at 0
        ...     def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        ...         return hidden_states / timestep[:, None]
        >>> x = consistency_sample(Flow(), torch.ones(2, 3), scm_t_list(2))
        >>> bool(x.abs().max() < 1e-6)
        True
    """
    return sample(
        model, noise, t_list, mode="sde", pred_type=pred_type,
        num_train_timesteps=num_train_timesteps, encoder_hidden_states=encoder_hidden_states,
        generator=generator, call=call, **model_kwargs,
    )  # fmt: skip


@torch.no_grad()
def meanflow_sample(
    model: nn.Module,
    noise: Tensor,
    t_list: Sequence[float] = (1.0, 0.0),
    *,
    r_keyword: str = "r",
    num_train_timesteps: int | None = None,
    encoder_hidden_states: Tensor | None = None,
    call: NetworkCall | None = None,
    **model_kwargs: Any,
) -> Tensor:
    r"""Sample with a MeanFlow network: jump along ``t_list`` with the average velocity.

    .. math::

        x_{t_0} = t_0\, \epsilon, \qquad x_{t_{k+1}} = x_{t_k} - (t_k - t_{k+1})\,
        u(x_{t_k}, t_{k+1}, t_k)

    One step from pure noise (the default ``t_list``) is :math:`x_0 = x_1 - u(x_1, 0, 1)`. No host
    sync and no branch on tensor values: it compiles with ``fullgraph=True``.

    Args:
        model: The MeanFlow network (or its EMA copy).
        noise: Gaussian noise ``[B, ...]``.
        t_list: Decreasing times from ``t_0`` (1 for pure noise) to 0.
        r_keyword: The keyword under which the network takes r.
        num_train_timesteps: Scale of the network's times (diffusers' 1000), or None.
        encoder_hidden_states: Conditioning.
        call: How the model is called (default: diffusers' keywords).
        **model_kwargs: Passed to every call.

    Returns:
        The sample in ``noise``'s dtype, each step computed in float64 and rounded once.

    Raises:
        ValueError: ``t_list`` has fewer than 2 entries, is not decreasing or does not end in 0.

    Example:
        >>> import torch
        >>> class Exact(torch.nn.Module):  # every sample flows to the data point 0
        ...     def forward(self, hidden_states, timestep, r, encoder_hidden_states=None):
        ...         return hidden_states / timestep[:, None]
        >>> meanflow_sample(Exact(), torch.ones(2, 3)).abs().max().item()
        0.0
    """
    ladder = [float(t) for t in t_list]
    if len(ladder) < 2 or ladder[-1] != 0.0 or any(a <= b for a, b in itertools.pairwise(ladder)):
        raise ValueError(f"t_list must decrease to 0 in at least 2 entries, got {ladder}")
    if not 0.0 < ladder[0] <= 1.0:
        raise ValueError(f"t_list must start in (0, 1], got {ladder[0]}")
    check_float_tensor("noise", noise)
    check_kwargs(model_kwargs)
    call = call or NetworkCall(num_train_timesteps=num_train_timesteps)
    n, device, wide = noise.shape[0], noise.device, compute_dtype(noise.device)
    x = add_noise(torch.zeros_like(noise), noise, torch.full((n,), ladder[0], device=device))
    for t_now, t_next in itertools.pairwise(ladder):
        t = torch.full((n,), t_now, device=device, dtype=wide)
        r = torch.full((n,), t_next, device=device, dtype=wide)
        u = call_wide(
            call, model, "model", widen(x, wide), t, encoder_hidden_states, model_kwargs,
            dtype=noise.dtype, times={r_keyword: r},
        )  # fmt: skip
        x = compute_once(lambda x, u, dt: x - dt * u, x, u, t_now - t_next, dtype=noise.dtype)
    return x
