"""``modelopt.torch.fastgen.losses``: modelopt's signatures over fastgen's losses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastgen import losses as _losses
from fastgen.checks import expand_like
from fastgen.flow_matching import add_noise, rf_alpha, rf_sigma
from fastgen.precision import compute_once

__all__ = ["dsm_loss", "gan_disc_loss", "gan_gen_loss", "r1_loss", "vsd_loss"]

_NEEDS = {"x0": ("x0",), "eps": ("eps",), "flow": ("x0", "eps"), "v": ("x0", "eps", "t")}

gan_gen_loss = _losses.gan_gen_loss
gan_disc_loss = _losses.gan_disc_loss


def dsm_loss(
    pred_type: str,
    net_pred: Tensor,
    *,
    x0: Tensor | None = None,
    eps: Tensor | None = None,
    t: Tensor | None = None,
    alpha_fn: Callable[[Tensor], Tensor] | None = None,
    sigma_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r"""Denoising score matching for ``x0`` / ``eps`` / ``flow`` / ``v`` predictions.

    ``x0``, ``eps`` and ``flow`` are :func:`fastgen.dsm_loss`. ``v`` is modelopt's
    v-prediction target

    .. math::

        v = \alpha_t\,\epsilon - \sigma_t\,x_0

    with ``alpha_fn``/``sigma_fn`` (rectified flow: ``rf_alpha``/``rf_sigma``, then the target
    is ``add_noise(eps, -x0, t)``), regressed as fastgen's ``x0`` loss regresses its target.
    Each target is computed in float64 and the loss rounded once.

    Raises:
        ValueError: An unknown ``pred_type``, or a tensor or function it needs is missing.
    """
    if pred_type not in _NEEDS:
        raise ValueError(f"pred_type must be one of {tuple(_NEEDS)}, got {pred_type!r}")
    given = {"x0": x0, "eps": eps, "t": t}
    missing = [name for name in _NEEDS[pred_type] if given[name] is None]
    if pred_type == "v" and (alpha_fn is None or sigma_fn is None):
        missing.append("alpha_fn and sigma_fn")
    if missing:
        raise ValueError(f"dsm_loss(pred_type={pred_type!r}) needs {', '.join(missing)}")
    if pred_type == "v":
        target = _v_target(x0, eps, t, alpha_fn, sigma_fn)
        pred_type, x0 = "x0", target
    # fastgen's dsm_loss checks all three tensors: the ones the target does not read stand in
    # for each other, and t is all zeros when the target does not need it.
    x0 = eps if x0 is None else x0
    eps = x0 if eps is None else eps
    t = torch.zeros(x0.shape[:1], device=x0.device, dtype=torch.float32) if t is None else t
    return _losses.dsm_loss(net_pred, x0=x0, eps=eps, t=t, pred_type=pred_type)


def _v_target(x0: Tensor, eps: Tensor, t: Tensor, alpha_fn, sigma_fn) -> Tensor:
    if alpha_fn is rf_alpha and sigma_fn is rf_sigma:
        return add_noise(eps, -x0, t)  # (1 - t) eps + t (-x0): exact, rounded once
    alpha = expand_like(alpha_fn(t), x0)
    sigma = expand_like(sigma_fn(t), x0)
    return compute_once(lambda a, e, s, x: a * e - s * x, alpha, eps, sigma, x0, dtype=x0.dtype)


def vsd_loss(
    gen_data: Tensor,
    teacher_x0: Tensor,
    fake_score_x0: Tensor,
    additional_scale: Tensor | None = None,
) -> Tensor:
    """:func:`fastgen.vsd_loss` (the weight and the score difference in float64)."""
    return _losses.vsd_loss(gen_data, teacher_x0, fake_score_x0, additional_scale)


def r1_loss(real_logits: Tensor, perturbed_real_logits: Tensor) -> Tensor:
    """:func:`fastgen.r1_loss`: ``mean((D(x) - D(x + alpha z))^2)``."""
    return _losses.r1_loss(real_logits, perturbed_real_logits)
