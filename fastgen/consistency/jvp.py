r"""Directional derivatives of a network: forward-mode AD inside the compiled graph, or finite
differences.

Consistency losses need :math:`\partial_s f(x + s\,\dot x,\ t + s\,\dot t)|_{s=0}`, the
derivative of the network along the probability-flow ODE. :func:`jvp` takes it with
``torch.func.jvp`` (forward-mode AD: one pass, exact) or with a central difference
(two passes, for networks whose kernels have no forward-mode rule).

Forward mode needs every op of the network to have a forward-mode rule that also traces under
``torch.compile``. Two common ones do not in torch 2.13 on CPU: the fused CPU (and flash/cuDNN)
kernels of ``F.scaled_dot_product_attention`` and ``F.layer_norm`` with an affine weight (its
forward-mode rule fails under fake tensors). :func:`jvp` therefore runs the network with the
math attention kernel (``sdpa_kernel(SDPBackend.MATH)``, a composite of matmuls and softmax) and
with ``F.layer_norm(x, s, w, b)`` evaluated as ``F.layer_norm(x, s) * w + b`` (the same value up
to one rounding). Diffusers' attention processors call ``F.scaled_dot_product_attention``, so
SD3, Flux, Wan and Qwen-Image transformers run through it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from fastgen._rounding import round_once
from fastgen.checks import check_float_tensor, expand_like
from fastgen.precision import compute_dtype, widen

__all__ = ["JVPMethod", "finite_difference_jvp", "jvp", "round_with_tangent"]

JVPMethod = Literal["forward", "finite_difference"]


class _SplitAffineLayerNorm(TorchFunctionMode):
    """``F.layer_norm(x, s, w, b)`` as ``F.layer_norm(x, s) * w + b`` (forward mode traces)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            weight, bias = bound.get("weight"), bound.get("bias")
            if weight is not None or bias is not None:
                y = func(
                    bound["input"], bound["normalized_shape"], None, None, bound.get("eps", 1e-5)
                )
                if weight is not None:
                    y = y * weight
                return y if bias is None else y + bias
        if (
            getattr(func, "__module__", None) == "torch._tensor"
            and args
            and isinstance(args[0], Tensor)
        ):
            # A Tensor method written in Python (unflatten, split, ...): called as a method, as
            # Dynamo traces it without the mode (it cannot trace their super() calls).
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)


def round_with_tangent(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded once to ``dtype`` (:func:`fastgen.precision.compute_once`'s rounding), with
    the plain cast's derivatives in both modes: a forward-mode tangent survives it.

    Example:
        >>> import torch
        >>> round_with_tangent(torch.tensor([1 / 3], dtype=torch.float64), torch.bfloat16)
        tensor([0.3340], dtype=torch.bfloat16)
    """
    if x.dtype == dtype:
        return x
    with torch.no_grad():
        once = round_once(x.detach(), dtype)
    nearest = x.to(dtype)
    # The value of `once`, the derivative of the cast (written a - (a - b): a -0.0 keeps its sign).
    return nearest - (nearest.detach() - once)


def _check(primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> None:
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError("primals and tangents must be tuples of tensors")
    if len(primals) != len(tangents):
        raise ValueError(
            f"primals and tangents must have the same length, got {len(primals)} and "
            f"{len(tangents)}"
        )
    for i, (p, v) in enumerate(zip(primals, tangents)):
        check_float_tensor(f"primals[{i}]", p)
        check_float_tensor(f"tangents[{i}]", v)
        if p.shape != v.shape:
            raise ValueError(
                f"tangents[{i}] must have primals[{i}]'s shape, got {tuple(v.shape)} and "
                f"{tuple(p.shape)}"
            )


def finite_difference_jvp(
    fn: Callable[..., Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    *,
    step: float | tuple[Tensor, Tensor] = 1e-3,
) -> Tensor:
    r"""The derivative of ``fn`` along ``tangents`` by a (per-sample one- or two-sided) difference.

    .. math::

        \partial_v f(p) \approx \frac{f(p + h_+ v) - f(p - h_- v)}{h_+ + h_-}

    with :math:`h_+ = h_- = h` for a float ``step`` (central, :math:`O(h^2)`), or per-sample
    ``[B]`` tensors ``(h_plus, h_minus)`` (a zero side makes the difference one-sided; both zero
    gives 0). The shifted inputs are formed in float64 and rounded once to each primal's dtype;
    the difference is taken in float64. ``fn`` runs twice: networks with dropout should run in
    eval mode (the two calls draw different masks).

    Args:
        fn: A function of the primals returning one tensor.
        primals: The point, a tuple of tensors (batch first).
        tangents: The direction, one tensor per primal, same shapes.
        step: :math:`h`, or per-sample ``(h_plus, h_minus)`` of shape ``[B]``.

    Returns:
        The derivative in ``fn``'s output dtype (the float64 value rounded once).

    Raises:
        TypeError: A primal or tangent is not a floating tensor.
        ValueError: Mismatched lengths or shapes; a non-positive float ``step``.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> finite_difference_jvp(lambda x: x**3, (x,), (torch.ones_like(x),), step=1e-4)
        tensor([ 3.0000, 12.0000], dtype=torch.float64)
    """
    _check(primals, tangents)
    wide = compute_dtype(primals[0].device)
    if isinstance(step, tuple):
        h_plus, h_minus = (widen(h, wide) for h in step)
    else:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise ValueError(f"step must be a positive float or a pair of tensors, got {step!r}")
        h_plus = h_minus = float(step)

    def shifted(h: Tensor | float, sign: float) -> list[Tensor]:
        out = []
        for p, v in zip(primals, tangents):
            hh = expand_like(h, p) if isinstance(h, Tensor) else h
            out.append(round_with_tangent(widen(p, wide) + sign * hh * widen(v, wide), p.dtype))
        return out

    f_plus = fn(*shifted(h_plus, 1.0))
    f_minus = fn(*shifted(h_minus, -1.0))
    diff = widen(f_plus, wide) - widen(f_minus, wide)
    if isinstance(h_plus, Tensor):
        denom = expand_like(h_plus + h_minus, diff)
        value = torch.where(denom > 0, diff / denom.clamp_min(torch.finfo(wide).tiny), 0.0)
    else:
        value = diff / (h_plus + h_minus)
    return round_once(value, f_plus.dtype)


def jvp(
    fn: Callable[..., Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    *,
    method: JVPMethod = "forward",
    step: float | tuple[Tensor, Tensor] = 1e-3,
) -> Tensor:
    r"""The Jacobian-vector product of ``fn`` at ``primals`` along ``tangents``.

    .. math::

        \partial_v f(p) = \frac{d}{ds} f(p + s v)\Big|_{s=0}

    ``method="forward"`` runs ``torch.func.jvp`` (one pass carrying the tangents, exact up to
    round-off) with attention on the math kernel and affine layer norms split (see the module
    docstring); it traces into the caller's compiled graph with no break.
    ``"finite_difference"`` runs :func:`finite_difference_jvp` with ``step``.

    Args:
        fn: A function of the primals returning one tensor.
        primals: The point, a tuple of tensors.
        tangents: The direction, one tensor per primal, same shapes and dtypes.
        method: ``"forward"`` or ``"finite_difference"``.
        step: The finite-difference step (ignored by ``"forward"``).

    Returns:
        The derivative, in ``fn``'s output dtype.

    Raises:
        TypeError: A primal or tangent is not a floating tensor.
        ValueError: A bad ``method``; mismatched lengths or shapes.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> jvp(lambda x: x**3, (x,), (torch.ones_like(x),))
        tensor([ 3., 12.], dtype=torch.float64)
    """
    if method not in ("forward", "finite_difference"):
        raise ValueError(f"method must be 'forward' or 'finite_difference', got {method!r}")
    if method == "finite_difference":
        return finite_difference_jvp(fn, primals, tangents, step=step)
    _check(primals, tangents)
    with sdpa_kernel([SDPBackend.MATH]), _SplitAffineLayerNorm():
        return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]
