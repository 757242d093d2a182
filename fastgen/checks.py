r"""Argument checks shared by fastgen's functions: tensor types, matching shapes and devices,
and ``t`` against the data (with :func:`expand_like`).

Type and shape checks always run and cost nothing under ``torch.compile`` (they read static
metadata). Value checks on ``t`` (inside [0, 1], not NaN) need a host sync, so they run in eager
mode only: they are skipped under ``torch.compile``, ``torch.export`` and CUDA-graph capture, and
:func:`set_value_checks` turns them off in eager mode too.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

__all__ = [
    "check_float_tensor",
    "check_pair",
    "check_t",
    "check_t_values",
    "check_values_in",
    "expand_like",
    "require_size",
    "set_value_checks",
]

_value_checks_enabled = True


def set_value_checks(enabled: bool) -> bool:
    """Turn the eager-mode value checks on ``t`` on or off.

    The checks (every ``t`` in [0, 1], none NaN) cost one host sync per call. They never run
    under ``torch.compile``, ``torch.export`` or CUDA-graph capture; this switch also skips
    them in eager mode, for speed in a trusted training loop.

    Args:
        enabled: ``True`` to check (the default state), ``False`` to skip.

    Returns:
        The previous setting, so a caller can restore it.

    Example:
        >>> import fastgen
        >>> previous = fastgen.set_value_checks(False)
        >>> fastgen.set_value_checks(previous)
        False
    """
    global _value_checks_enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _value_checks_enabled = _value_checks_enabled, enabled
    return previous


def check_float_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def require_size(ok, what: str, a: Tensor, b: Tensor) -> None:
    """Raise ``ValueError`` (``what``, then both shapes) when a size check fails.

    Under ``torch.compile`` a size may be an unbacked symbol (``mark_unbacked``) whose value is
    unknown while tracing: then the check becomes a runtime assertion instead of a guard.
    """
    if not guard_or_true(ok):
        raise ValueError(f"{what}, got {tuple(a.shape)} and {tuple(b.shape)}")
    if torch.compiler.is_compiling():
        torch._check(ok, lambda: what)


def check_pair(name_a: str, a: object, name_b: str, b: object) -> None:
    check_float_tensor(name_a, a)
    check_float_tensor(name_b, b)
    if a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b} must be on one device, got {a.device} and {b.device}"
        )
    what = f"{name_a} and {name_b} must have the same shape"
    if a.ndim != b.ndim:
        raise ValueError(f"{what}, got {tuple(a.shape)} and {tuple(b.shape)}")
    for size_a, size_b in zip(a.shape, b.shape):
        require_size(size_a == size_b, what, a, b)


def _should_check_values(t: Tensor) -> bool:
    # Reading tensor values syncs with the device: never while tracing or capturing a graph.
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if not _value_checks_enabled:
        return False
    # Meta and fake tensors (shape inference, meta-initialised models) have no values to read.
    if t.is_meta or is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_t_values(t: Tensor) -> None:
    if _should_check_values(t) and t.numel() > 0:
        bad = (t < 0) | (t > 1) | torch.isnan(t)
        if bool(bad.any()):
            raise ValueError(
                "t must lie in the closed interval [0, 1] and not be NaN, got values in "
                f"[{t.detach().min().item()}, {t.detach().max().item()}]"
                f"{' (with NaN)' if bool(torch.isnan(t).any()) else ''}"
            )


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    r"""Append trailing singleton dims to ``t`` so that it broadcasts against ``x``.

    ``t`` lines up with the *leading* dims of ``x``: each of its dims must be 1 or equal to
    the matching dim of ``x``. A 0-d ``t`` broadcasts everywhere.

    .. math::

        \operatorname{shape}(t') = \operatorname{shape}(t) + (1,) \times (x.\mathrm{ndim} - t.\mathrm{ndim})

    Args:
        t: Timesteps, shape ``[]``, ``[B]`` or ``[B, ...]`` (a prefix of ``x``'s shape, 1s allowed).
        x: The tensor to broadcast against, shape ``[B, ...]``.

    Returns:
        A view of ``t`` (same dtype and device) with ``x.ndim`` dims.

    Raises:
        TypeError: ``t`` or ``x`` is not a tensor.
        ValueError: ``t`` has more dims than ``x`` or a leading dim that does not match.

    Example:
        >>> import torch
        >>> expand_like(torch.rand(2), torch.zeros(2, 3, 4, 4)).shape
        torch.Size([2, 1, 1, 1])
        >>> expand_like(torch.rand(2, 1, 5), torch.zeros(2, 3, 5, 4, 4)).shape
        torch.Size([2, 1, 5, 1, 1])
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if t.ndim > x.ndim:
        raise ValueError(
            f"t cannot broadcast against the data: t has {t.ndim} dims {tuple(t.shape)}, "
            f"the data only {x.ndim} {tuple(x.shape)}"
        )
    for dim, (t_size, x_size) in enumerate(zip(t.shape, x.shape)):
        # As torch's broadcasting does: a size not known to be 1 must match.
        if not guard_or_false(t_size == 1):
            what = (
                f"t cannot broadcast against the data: t.shape[{dim}] must be 1 or equal the "
                f"data's (t lines up with the leading dims); t and data"
            )
            require_size(t_size == x_size, what, t, x)
    return t.reshape(*t.shape, *([1] * (x.ndim - t.ndim)))


def check_t(t: Tensor, x: Tensor) -> Tensor:
    """Validate ``t`` against the data ``x`` and return it broadcastable to ``x``."""
    check_float_tensor("t", t)
    # A 0-d CPU t broadcasts to any device, as in torch; anything else must sit with the data.
    if t.device != x.device and not (t.ndim == 0 and t.device.type == "cpu"):
        raise ValueError(
            f"t is on {t.device} but the data is on {x.device}: move t to the data's device"
        )
    t = expand_like(t, x)
    check_t_values(t)
    return t


def check_values_in(name: str, x: Tensor, lo: float, hi: float) -> None:
    """Raise ``ValueError`` when ``x`` has a value outside ``[lo, hi]`` or a NaN.

    The rule of :func:`check_t_values` for another interval (TrigFlow's angles in
    ``[0, pi/2]``): eager mode only, skipped under ``torch.compile``, ``torch.export``, graph
    capture and :func:`set_value_checks` ``(False)``.
    """
    if _should_check_values(x) and x.numel() > 0:
        bad = (x < lo) | (x > hi) | torch.isnan(x)
        if bool(bad.any()):
            raise ValueError(
                f"{name} must lie in the closed interval [{lo}, {hi}] and not be NaN, got values "
                f"in [{x.detach().min().item()}, {x.detach().max().item()}]"
            )
