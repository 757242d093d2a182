r"""Rectified-flow (RF) helpers: the forward process, the coefficients and the conversions between
x0, eps and flow predictions, and the two timestep samplers of the API (:func:`sample_timesteps`,
:func:`sample_from_t_list`, defined in :mod:`fastgen.timesteps` and importable from both).

This module intentionally does not define a NoiseScheduler class. It exposes the handful of
primitives that DMD2 actually needs as plain functions, so callers can plug fastgen into any
training stack without adopting a new scheduler object.

RF convention used throughout: :math:`\alpha_t = 1 - t` and :math:`\sigma_t = t`, so

.. math::

    x_t = (1 - t)\, x_0 + t\, \epsilon, \qquad v = \epsilon - x_0, \qquad t \in [0, 1],

with t = 0 the data and t = 1 pure noise. By default the arithmetic is in float64 and the
result is rounded once to the output dtype, so every output is the correctly rounded float64
value of its formula, and eager and compiled results are bitwise equal. Under the float32
precision policy (:mod:`fastgen.precision`) the same formulas run in float32 with compensated
products and differences, and no float64 tensor is created.

``t`` may be 0-d, shape ``[B]``, or any shape that lines up with the leading dims of the data
(``[B, 1, T]`` against video latents ``[B, C, T, H, W]`` gives per-frame timesteps);
:func:`expand_like` appends the trailing singleton dims.

Value checks on ``t`` (inside [0, 1], not NaN) need a host sync, so they run in eager mode
only: they are skipped under ``torch.compile``, ``torch.export`` and CUDA-graph capture, and
:func:`set_value_checks` turns them off in eager mode too. Type and shape checks always run.
"""

from __future__ import annotations

from torch import Tensor

from fastgen import _compensated as comp
from fastgen._rounding import round_once
from fastgen.checks import (
    check_float_tensor,
    check_pair,
    check_t,
    check_t_values,
    expand_like,
    set_value_checks,
)
from fastgen.precision import compute_once
from fastgen.pred_type import Param, check_param

# The API places the two samplers in this module; their code lives with the other samplers.
from fastgen.timesteps import sample_from_t_list, sample_timesteps

__all__ = [
    "DENOM_MIN",
    "add_noise",
    "convert_prediction",
    "expand_like",
    "pred_noise_to_pred_x0",
    "pred_x0_from_flow",
    "rf_alpha",
    "rf_sigma",
    "sample_from_t_list",
    "sample_timesteps",
    "set_value_checks",
    "x0_to_eps",
    "x0_to_flow",
]

# Floor for the two denominators (t in the x0 -> eps/flow inversions, 1 - t in eps -> x0).
# It is FastGen's guard: the outputs stay finite on the closed interval t in [0, 1].
DENOM_MIN = 1e-6


def _x0_from_eps(x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    return (x_t - t * eps) / (1.0 - t).clamp_min(DENOM_MIN)


def _x0_from_eps_f32(x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    return comp.div_one_minus(comp.add_prod(x_t, -t, eps)[0], t, DENOM_MIN)


def _eps_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    return (x_t - (1.0 - t) * x0) / t.clamp_min(DENOM_MIN)


def _eps_from_x0_f32(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    # x_t - (1 - t) x0 = (x_t - x0) + t x0: the difference and the product taken exactly.
    d, d_err = comp.two_sum(x_t, -x0)
    return comp.add_prod(d, t, x0, d_err)[0] / t.clamp_min(DENOM_MIN)


def _eps_from_flow_f32(x_t: Tensor, flow: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    # x_t + (1 - t) v = (x_t + v) - t v, the sum and the product taken exactly.
    d, d_err = comp.two_sum(x_t, flow)
    return comp.add_prod(d, -t, flow, d_err)


def add_noise(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    r"""Forward process under rectified flow.

    .. math::

        x_t = (1 - t)\, x_0 + t\, \epsilon

    ``t`` is broadcast across the trailing axes of ``x0`` via :func:`expand_like`. At t = 0
    the result is ``x0`` exactly, at t = 1 it is ``eps`` exactly.

    Args:
        x0: Clean data, shape ``[B, ...]``, floating point.
        eps: Gaussian noise, same shape as ``x0`` (any floating dtype).
        t: Timesteps in [0, 1], shape ``[]``, ``[B]`` or a prefix of ``x0``'s shape.

    Returns:
        ``x_t`` in ``x0``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> add_noise(torch.tensor([[2.0, 4.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0.25]))
        tensor([[1.5000, 3.2500]])
    """
    check_pair("x0", x0, "eps", eps)
    return compute_once(
        lambda x0, eps, t: (1.0 - t) * x0 + t * eps,
        *(x0, eps, check_t(t, x0)),
        dtype=x0.dtype,
        float32=comp.lerp,
    )


def pred_noise_to_pred_x0(pred_noise: Tensor, noisy_latents: Tensor, t: Tensor) -> Tensor:
    r"""Convert an ``eps``-parameterized prediction to an ``x0`` prediction under RF.

    Solves :math:`x_t = (1 - t) x_0 + t \epsilon` for :math:`x_0`, with the denominator
    floored at :data:`DENOM_MIN` so that the result is finite at t = 1:

    .. math::

        x_0 = \frac{x_t - t\, \epsilon}{\max(1 - t,\ 10^{-6})}

    Args:
        pred_noise: Predicted noise, shape ``[B, ...]``.
        noisy_latents: ``x_t``, same shape.
        t: Timesteps in [0, 1], shape ``[]``, ``[B]`` or a prefix of the data shape.

    Returns:
        ``x0`` in ``noisy_latents``' dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> pred_noise_to_pred_x0(torch.tensor([1.0]), torch.tensor([1.5]), torch.tensor(0.5))
        tensor([2.])
    """
    check_pair("pred_noise", pred_noise, "noisy_latents", noisy_latents)
    t = check_t(t, noisy_latents)
    return compute_once(
        _x0_from_eps,
        noisy_latents,
        pred_noise,
        t,
        dtype=noisy_latents.dtype,
        float32=_x0_from_eps_f32,
    )


def pred_x0_from_flow(pred_flow: Tensor, noisy_latents: Tensor, t: Tensor) -> Tensor:
    r"""Convert a flow-parameterized prediction (:math:`v = \epsilon - x_0`) to ``x0``.

    :math:`x_t = (1 - t) x_0 + t \epsilon` and :math:`v = \epsilon - x_0` combine to
    :math:`x_t = x_0 + t v`, so no division is needed and the result is finite everywhere:

    .. math::

        x_0 = x_t - t\, v

    Args:
        pred_flow: Predicted flow ``v``, shape ``[B, ...]``.
        noisy_latents: ``x_t``, same shape.
        t: Timesteps in [0, 1], shape ``[]``, ``[B]`` or a prefix of the data shape.

    Returns:
        ``x0`` in ``noisy_latents``' dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> pred_x0_from_flow(torch.tensor([-1.0]), torch.tensor([1.5]), torch.tensor(0.5))
        tensor([2.])
    """
    check_pair("pred_flow", pred_flow, "noisy_latents", noisy_latents)
    t = check_t(t, noisy_latents)
    return compute_once(
        lambda x_t, flow, t: x_t - t * flow,
        *(noisy_latents, pred_flow, t),
        dtype=noisy_latents.dtype,
        float32=lambda x_t, flow, t: comp.add_prod(x_t, -t, flow),
    )


def rf_alpha(t: Tensor) -> Tensor:
    r"""Rectified-flow data coefficient.

    .. math::

        \alpha_t = 1 - t

    Args:
        t: Timesteps in [0, 1], any shape.

    Returns:
        :math:`\alpha_t` in ``t``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> rf_alpha(torch.tensor([0.0, 0.25, 1.0]))
        tensor([1.0000, 0.7500, 0.0000])
    """
    check_float_tensor("t", t)
    check_t_values(t)
    # 1 - t is exact in float32 for t >= 0.5 and correctly rounded below: one rounding either way.
    return compute_once(lambda t: 1.0 - t, t, dtype=t.dtype)


def rf_sigma(t: Tensor) -> Tensor:
    r"""Rectified-flow noise coefficient.

    .. math::

        \sigma_t = t

    Args:
        t: Timesteps in [0, 1], any shape.

    Returns:
        :math:`\sigma_t`, a new tensor in ``t``'s dtype (exact: nothing to round).

    Example:
        >>> import torch
        >>> rf_sigma(torch.tensor([0.0, 0.25, 1.0]))
        tensor([0.0000, 0.2500, 1.0000])
    """
    check_float_tensor("t", t)
    check_t_values(t)
    return t.clone()


def x0_to_eps(x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    r"""Invert the RF forward process for the noise.

    Given the current ``x_t`` and an ``x0`` prediction, recover the implied noise
    deterministically (the student's ODE unroll); the denominator is floored at
    :data:`DENOM_MIN` so that the result is finite at t = 0:

    .. math::

        \epsilon = \frac{x_t - (1 - t)\, x_0}{\max(t,\ 10^{-6})}

    Args:
        x0: ``x0`` prediction, shape ``[B, ...]``.
        x_t: Noisy latents, same shape.
        t: Timesteps in [0, 1], shape ``[]``, ``[B]`` or a prefix of the data shape.

    Returns:
        ``eps`` in ``x_t``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> x0_to_eps(torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor(0.5))
        tensor([1.])
    """
    check_pair("x0", x0, "x_t", x_t)
    t = check_t(t, x_t)
    return compute_once(_eps_from_x0, x_t, x0, t, dtype=x_t.dtype, float32=_eps_from_x0_f32)


def x0_to_flow(x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    r"""Convert an ``x0`` prediction back into a flow prediction under RF.

    :math:`x_t - x_0 = t (\epsilon - x_0) = t v`, so (denominator floored at
    :data:`DENOM_MIN`, finite at t = 0):

    .. math::

        v = \frac{x_t - x_0}{\max(t,\ 10^{-6})}

    Used when the fake score is flow-native but the loss lives in another parameterization:
    raw flow -> x0 via :func:`pred_x0_from_flow`, then back; the round trip is the identity
    up to float64 round-off.

    Args:
        x0: ``x0`` prediction, shape ``[B, ...]``.
        x_t: Noisy latents, same shape.
        t: Timesteps in [0, 1], shape ``[]``, ``[B]`` or a prefix of the data shape.

    Returns:
        ``v`` in ``x_t``'s dtype: the float64 value rounded once.

    Example:
        >>> import torch
        >>> x0_to_flow(torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor(0.5))
        tensor([-1.])
    """
    check_pair("x0", x0, "x_t", x_t)
    # In float32 the difference and the division round once each: no compensation needed.
    return compute_once(
        lambda x_t, x0, t: (x_t - x0) / t.clamp_min(DENOM_MIN),
        *(x_t, x0, check_t(t, x_t)),
        dtype=x_t.dtype,
    )


def convert_prediction(pred: Tensor, x_t: Tensor, t: Tensor, *, src: Param, dst: Param) -> Tensor:
    r"""Convert a model prediction between the ``x0``, ``eps`` and ``flow`` parameterizations.

    All nine pairs, each one closed form evaluated in float64. Flow <-> x0 and flow -> eps use
    the division-free forms, so they are exact and finite for every t in [0, 1]:

    .. math::

        x_0 = x_t - t v, \quad \epsilon = x_t + (1 - t) v, \quad
        x_0 = \frac{x_t - t \epsilon}{1 - t}, \quad v = \frac{\epsilon - x_t}{1 - t}, \quad
        \epsilon = \frac{x_t - (1 - t) x_0}{t}, \quad v = \frac{x_t - x_0}{t},

    with each denominator floored at :data:`DENOM_MIN`. ``src`` and ``dst`` are static:
    under ``torch.compile`` the choice costs nothing.

    Args:
        pred: The prediction in the ``src`` parameterization, shape ``[B, ...]``.
        x_t: Noisy latents, same shape.
        t: Timesteps in [0, 1], shape ``[]``, ``[B]`` or a prefix of the data shape.
        src: ``"x0"``, ``"eps"`` or ``"flow"``: what ``pred`` is.
        dst: ``"x0"``, ``"eps"`` or ``"flow"``: what to return.

    Returns:
        The prediction in the ``dst`` parameterization, in ``x_t``'s dtype (the float64 value
        rounded once). When ``src == dst`` it is ``pred`` itself (cast to ``x_t``'s dtype).

    Example:
        >>> import torch
        >>> convert_prediction(torch.tensor([-1.0]), torch.tensor([1.5]), torch.tensor(0.5),
        ...                    src="flow", dst="eps")
        tensor([1.])
    """
    for name, value in (("src", src), ("dst", dst)):
        check_param(name, value)
    if src == dst:
        check_pair("pred", pred, "x_t", x_t)
        check_t(t, x_t)
        return pred if pred.dtype == x_t.dtype else round_once(pred, x_t.dtype)
    if src == "flow" and dst == "x0":
        return pred_x0_from_flow(pred, x_t, t)
    if src == "eps" and dst == "x0":
        return pred_noise_to_pred_x0(pred, x_t, t)
    if src == "x0" and dst == "eps":
        return x0_to_eps(pred, x_t, t)
    if src == "x0" and dst == "flow":
        return x0_to_flow(pred, x_t, t)
    check_pair("pred", pred, "x_t", x_t)
    t = check_t(t, x_t)
    if src == "flow":  # flow -> eps
        return compute_once(
            lambda x_t, flow, t: x_t + (1.0 - t) * flow,
            *(x_t, pred, t),
            dtype=x_t.dtype,
            float32=_eps_from_flow_f32,
        )
    return compute_once(  # eps -> flow
        lambda x_t, eps, t: (eps - x_t) / (1.0 - t).clamp_min(DENOM_MIN),
        *(x_t, pred, t),
        dtype=x_t.dtype,
        float32=lambda x_t, eps, t: comp.div_one_minus(eps - x_t, t, DENOM_MIN),
    )


# The samplers live in their own file (one concern each) and join this module's namespace,
# as the API page lists them here.
