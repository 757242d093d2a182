r"""TrigFlow (sCM's parameterization) and rectified flow: exact conversions between the two.

TrigFlow writes a noisy sample with an angle :math:`\hat t \in [0, \pi/2]` and noise of the data's
scale :math:`\sigma_d`,

.. math::

    \hat x = \cos\hat t\, x_0 + \sin\hat t\, \sigma_d\, \epsilon, \qquad
    \frac{d\hat x}{d\hat t} = \sigma_d F = -\sin\hat t\, x_0 + \cos\hat t\, \sigma_d\, \epsilon,

and a network :math:`F` (the velocity in units of :math:`\sigma_d`). Matching the signal-to-noise
ratio with rectified flow's :math:`x_t = (1 - t) x_0 + t \epsilon` gives
:math:`\tan\hat t = t / ((1 - t)\sigma_d)` and :math:`\hat x = \sigma_d x_t / \rho` with
:math:`\rho = \sqrt{t^2 + (1 - t)^2 \sigma_d^2}`. Every conversion below is a closed form with no
division that can vanish on the closed intervals (:math:`\rho \ge \sigma_d / \sqrt{1 + \sigma_d^2}`
and :math:`\cos\hat t + \sigma_d \sin\hat t \ge \min(1, \sigma_d)`), so each is finite at both
ends (an angle a rounding put past :math:`\pi/2`, as float32's nearest value is, reads as
:math:`\pi/2`); each computes in float64 (the precision policy's dtype) and rounds once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastgen.checks import check_float_tensor, check_pair, check_t, check_values_in, expand_like
from fastgen.precision import compute_once

__all__ = [
    "HALF_PI",
    "SIGMA_DATA",
    "rf_flow_to_trigflow",
    "rf_to_trigflow_input",
    "rf_to_trigflow_time",
    "trigflow_to_rf_flow",
    "trigflow_to_rf_input",
    "trigflow_to_rf_time",
]

HALF_PI = math.pi / 2
"""TrigFlow's pure-noise angle (rectified flow's t = 1)."""

SIGMA_DATA = 0.5
"""sCM's default data standard deviation :math:`\\sigma_d`."""


def check_sigma_data(sigma_data: object) -> float:
    """``sigma_data`` as a float, or ``ValueError``/``TypeError`` naming it."""
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)):
        raise TypeError(f"sigma_data must be a positive float, got {sigma_data!r}")
    # Finiteness is checked in eager mode: under torch.compile a float may be a symbol.
    finite = torch.compiler.is_compiling() or math.isfinite(sigma_data)
    if not (finite and sigma_data > 0):
        raise ValueError(f"sigma_data must be a positive finite float, got {sigma_data!r}")
    return sigma_data


def check_angle(t_hat: object, x: Tensor | None = None) -> Tensor:
    """Validate a TrigFlow angle (in ``[0, pi/2]``, eager only); broadcast it against ``x``."""
    check_float_tensor("t_hat", t_hat)
    check_values_in("t_hat", t_hat, 0.0, HALF_PI)
    return t_hat if x is None else expand_like(t_hat, x)


# --- the formulas, on tensors in the compute dtype (shared with the losses) ----------------------


def rho(t: Tensor, sigma_data: float) -> Tensor:
    r""":math:`\rho = \sqrt{t^2 + (1 - t)^2 \sigma_d^2}` (never below
    :math:`\sigma_d / \sqrt{1 + \sigma_d^2}`)."""
    return torch.sqrt(t * t + ((1.0 - t) * sigma_data) ** 2)


def time_to_trigflow(t: Tensor, sigma_data: float) -> Tensor:
    return torch.atan2(t, (1.0 - t) * sigma_data)


def cos_sin(t_hat: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of an angle, exact at the ends: float32's nearest value to pi/2 lies above it
    and float64's cosine of its own pi/2 is 6e-17, both read as the pure-noise angle (cos = 0)."""
    t_hat = t_hat.clamp(0.0, HALF_PI)
    return torch.where(t_hat >= HALF_PI, 0.0, torch.cos(t_hat)), torch.sin(t_hat)


def time_to_rf(t_hat: Tensor, sigma_data: float) -> Tensor:
    c, s = cos_sin(t_hat)
    s = sigma_data * s
    return s / (c + s)


def input_to_rf(x_hat: Tensor, t_hat: Tensor, sigma_data: float) -> Tensor:
    c, s = cos_sin(t_hat)
    return x_hat / (c + sigma_data * s)


def flow_to_trigflow(v: Tensor, x_t: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    # F = cos(t_hat) eps - sin(t_hat) x0 / sigma_d with cos = (1 - t) sigma_d / rho,
    # sin = t / rho, eps = x_t + (1 - t) v, x0 = x_t - t v: no division by sin or cos.
    eps = x_t + (1.0 - t) * v
    x0 = x_t - t * v
    return ((1.0 - t) * sigma_data * eps - (t / sigma_data) * x0) / rho(t, sigma_data)


def flow_to_rf(f: Tensor, x_hat: Tensor, t_hat: Tensor, sigma_data: float) -> Tensor:
    # x0 = cos x_hat - sigma_d sin F and eps = sin x_hat / sigma_d + cos F: v = eps - x0.
    c, s = cos_sin(t_hat)
    return (s / sigma_data - c) * x_hat + (c + sigma_data * s) * f


# --- the public primitives ---------------------------------------------------------------------


def rf_to_trigflow_time(t: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    r"""Rectified-flow time to TrigFlow's angle, matching the signal-to-noise ratio.

    .. math::

        \hat t = \operatorname{atan2}\big(t,\ (1 - t)\,\sigma_d\big) \in [0, \pi/2]

    Args:
        t: Timesteps in [0, 1], any shape.
        sigma_data: :math:`\sigma_d` > 0.

    Returns:
        :math:`\hat t` in ``t``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> rf_to_trigflow_time(torch.tensor([0.0, 1 / 3, 1.0]))
        tensor([0.0000, 0.7854, 1.5708])
    """
    sd = check_sigma_data(sigma_data)
    check_float_tensor("t", t)
    check_values_in("t", t, 0.0, 1.0)
    return compute_once(lambda t: time_to_trigflow(t, sd), t, dtype=t.dtype)


def trigflow_to_rf_time(t_hat: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    r"""TrigFlow's angle to rectified-flow time (the inverse of :func:`rf_to_trigflow_time`).

    .. math::

        t = \frac{\sigma_d \sin\hat t}{\cos\hat t + \sigma_d \sin\hat t} \in [0, 1]

    Args:
        t_hat: Angles in :math:`[0, \pi/2]`, any shape.
        sigma_data: :math:`\sigma_d` > 0.

    Returns:
        ``t`` in ``t_hat``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch, math
        >>> trigflow_to_rf_time(torch.tensor([0.0, math.pi / 4, math.pi / 2]))
        tensor([0.0000, 0.3333, 1.0000])
    """
    sd = check_sigma_data(sigma_data)
    check_angle(t_hat)
    return compute_once(lambda t_hat: time_to_rf(t_hat, sd), t_hat, dtype=t_hat.dtype)


def rf_to_trigflow_input(x_t: Tensor, t: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    r"""A rectified-flow sample as TrigFlow's :math:`\hat x` (same :math:`x_0`, same noise).

    .. math::

        \hat x = \frac{\sigma_d\, x_t}{\sqrt{t^2 + (1 - t)^2 \sigma_d^2}}

    Args:
        x_t: Noisy latents ``[B, ...]``.
        t: Timesteps in [0, 1], shape ``[]``, ``[B]`` or a prefix of the data shape.
        sigma_data: :math:`\sigma_d` > 0.

    Returns:
        :math:`\hat x` in ``x_t``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> rf_to_trigflow_input(torch.tensor([[2.0]]), torch.tensor([1.0]))
        tensor([[1.]])
    """
    sd = check_sigma_data(sigma_data)
    check_float_tensor("x_t", x_t)
    t = check_t(t, x_t)
    return compute_once(lambda x, t: sd * x / rho(t, sd), x_t, t, dtype=x_t.dtype)


def trigflow_to_rf_input(x_hat: Tensor, t_hat: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    r"""TrigFlow's :math:`\hat x` as the rectified-flow sample at the matching time.

    .. math::

        x_t = \frac{\hat x}{\cos\hat t + \sigma_d \sin\hat t}

    Args:
        x_hat: TrigFlow latents ``[B, ...]``.
        t_hat: Angles in :math:`[0, \pi/2]`, shape ``[]``, ``[B]`` or a prefix of the data shape.
        sigma_data: :math:`\sigma_d` > 0.

    Returns:
        ``x_t`` in ``x_hat``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch, math
        >>> trigflow_to_rf_input(torch.tensor([[1.0]]), torch.tensor([math.pi / 2]))  # rounded up
        tensor([[2.]])
    """
    sd = check_sigma_data(sigma_data)
    check_float_tensor("x_hat", x_hat)
    t_hat = check_angle(t_hat, x_hat)
    return compute_once(lambda x, a: input_to_rf(x, a, sd), x_hat, t_hat, dtype=x_hat.dtype)


def rf_flow_to_trigflow(
    flow: Tensor, x_t: Tensor, t: Tensor, sigma_data: float = SIGMA_DATA
) -> Tensor:
    r"""A rectified-flow velocity :math:`v = \epsilon - x_0` at :math:`(x_t, t)` as TrigFlow's
    :math:`F` at the matching :math:`(\hat x, \hat t)`.

    .. math::

        F = \cos\hat t\, \epsilon - \frac{\sin\hat t}{\sigma_d} x_0
          = \frac{(1 - t)\,\sigma_d\,\big(x_t + (1 - t) v\big) - \tfrac{t}{\sigma_d}\big(x_t - t v\big)}
                 {\sqrt{t^2 + (1 - t)^2 \sigma_d^2}}

    Division-free in :math:`\sin\hat t`: finite at t = 0 and t = 1.

    Args:
        flow: The velocity ``v``, shape ``[B, ...]``.
        x_t: Noisy latents, same shape.
        t: Timesteps in [0, 1], shape ``[]``, ``[B]`` or a prefix of the data shape.
        sigma_data: :math:`\sigma_d` > 0.

    Returns:
        ``F`` in ``x_t``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> rf_flow_to_trigflow(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([1.0]))
        tensor([[1.]])
    """
    sd = check_sigma_data(sigma_data)
    check_pair("flow", flow, "x_t", x_t)
    t = check_t(t, x_t)
    return compute_once(
        lambda v, x, t: flow_to_trigflow(v, x, t, sd), flow, x_t, t, dtype=x_t.dtype
    )


def trigflow_to_rf_flow(
    trigflow: Tensor, x_hat: Tensor, t_hat: Tensor, sigma_data: float = SIGMA_DATA
) -> Tensor:
    r"""TrigFlow's :math:`F` at :math:`(\hat x, \hat t)` as the rectified-flow velocity
    :math:`v = \epsilon - x_0` (the inverse of :func:`rf_flow_to_trigflow`).

    .. math::

        x_0 = \cos\hat t\, \hat x - \sigma_d \sin\hat t\, F, \quad
        \epsilon = \frac{\sin\hat t}{\sigma_d} \hat x + \cos\hat t\, F, \quad
        v = \Big(\frac{\sin\hat t}{\sigma_d} - \cos\hat t\Big)\hat x + (\cos\hat t + \sigma_d\sin\hat t) F

    Args:
        trigflow: TrigFlow's ``F``, shape ``[B, ...]``.
        x_hat: TrigFlow latents, same shape.
        t_hat: Angles in :math:`[0, \pi/2]`, shape ``[]``, ``[B]`` or a prefix of the data shape.
        sigma_data: :math:`\sigma_d` > 0.

    Returns:
        ``v`` in ``x_hat``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch, math
        >>> trigflow_to_rf_flow(torch.tensor([[-1.0]]), torch.tensor([[1.0]]),
        ...                     torch.tensor([math.pi / 2]))
        tensor([[1.5000]])
    """
    sd = check_sigma_data(sigma_data)
    check_pair("trigflow", trigflow, "x_hat", x_hat)
    t_hat = check_angle(t_hat, x_hat)
    return compute_once(
        lambda f, x, a: flow_to_rf(f, x, a, sd), trigflow, x_hat, t_hat, dtype=x_hat.dtype
    )
