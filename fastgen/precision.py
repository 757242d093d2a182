r"""Precision policy: the dtype fastgen computes in before its one rounding to the output.

``"float64"`` is the exact contract: every output is the float64 value of its formula, rounded
once (bf16/fp16 outputs are correctly rounded). ``"float32"`` computes in float32 and creates no
float64 tensor at all: for devices without float64 (Apple MPS) or with slow float64 (most
consumer and inference GPUs, CPUs under ``torch.compile``). Its divisions and products use
compensated float32 steps, so float32 outputs stay within a few ulps of the float64 policy's and
bf16/fp16 outputs nearly always equal them (the measured worst cases are in the README).
``"auto"`` (the default) is float64, except float32 for tensors on MPS.

The policy is a process-wide setting read while tracing: ``torch.compile`` guards on it, so a
compiled function recompiles once when it changes and never mixes the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

from fastgen._rounding import round_once, round_pair

__all__ = [
    "Precision",
    "compute_dtype",
    "compute_once",
    "get_precision",
    "set_precision",
    "use_precision",
    "widen",
]

Precision = Literal["auto", "float64", "float32"]
_PRECISIONS = ("auto", "float64", "float32")

_precision: Precision = "auto"


def set_precision(policy: Precision) -> Precision:
    """Set the process-wide precision policy.

    Args:
        policy: ``"auto"`` (float64, float32 on MPS), ``"float64"`` or ``"float32"``.

    Returns:
        The previous policy, so a caller can restore it.

    Raises:
        TypeError: ``policy`` is not a string.
        ValueError: ``policy`` is not one of the three.

    Example:
        >>> import fastgen
        >>> previous = fastgen.set_precision("float32")
        >>> fastgen.set_precision(previous)
        'float32'
    """
    global _precision
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a str, one of {_PRECISIONS}, got {type(policy).__name__}")
    if policy not in _PRECISIONS:
        raise ValueError(f"policy must be one of {_PRECISIONS}, got {policy!r}")
    previous, _precision = _precision, policy
    return previous


def get_precision() -> Precision:
    """The current precision policy (``"auto"`` unless set)."""
    return _precision


@contextlib.contextmanager
def use_precision(policy: Precision) -> Iterator[None]:
    """Run a block of code under ``policy``, restoring the previous policy on exit.

    Example:
        >>> import torch, fastgen
        >>> with fastgen.use_precision("float32"):
        ...     x_t = fastgen.add_noise(torch.ones(2), torch.zeros(2), torch.tensor(0.25))
        >>> x_t
        tensor([0.7500, 0.7500])
    """
    previous = set_precision(policy)
    try:
        yield
    finally:
        set_precision(previous)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype fastgen computes in for tensors on ``device`` under the current policy."""
    if _precision == "float32" or (_precision == "auto" and device.type == "mps"):
        return torch.float32
    return torch.float64


def widen(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in the compute ``dtype`` (exact: every bf16/fp16/float32 value is a float64 value).

    Eager mode casts directly; under ``torch.compile`` a bf16/fp16 value goes to float64
    through float32, the faster of the two there (the measurements are on the benchmarks page).
    The bits are the same either way.
    """
    if (
        dtype == torch.float64
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.compiler.is_compiling()
    ):
        return x.to(torch.float32).to(torch.float64)
    return x.to(dtype)


def compute_once(
    formula: Callable[..., Tensor],
    *inputs: Tensor | float,
    dtype: torch.dtype,
    float32: Callable[..., Tensor | tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    r"""Widen ``inputs`` to the compute dtype, evaluate ``formula`` there, round once to ``dtype``.

    The one place fastgen's numerics contract is carried out. Under the float64 policy every
    tensor input goes to float64 (exactly), ``formula`` runs there and the result is rounded
    once (:func:`~fastgen._rounding.round_once`: correctly rounded to bf16/fp16 too). Under
    the float32 policy the inputs stay float32 and ``float32`` (when given) runs instead: a
    compensated form of the same formula that returns either a tensor or a pair
    ``(hi, lo)`` of float32 tensors whose sum is the value, rounded once as that sum.

    Args:
        formula: The formula, on tensors in the compute dtype (Python floats pass through).
        *inputs: Its arguments; tensors are widened, anything else is passed as it is. The
            first tensor's device picks the compute dtype.
        dtype: The output dtype.
        float32: The float32 policy's form of ``formula`` (default: ``formula`` itself).

    Returns:
        ``formula(*inputs)`` in ``dtype``, rounded once.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
        >>> compute_once(lambda a, b: a / b, x, 3.0, dtype=torch.bfloat16)
        tensor([0.3340, 1.0000], dtype=torch.bfloat16)
    """
    device = next(x.device for x in inputs if isinstance(x, Tensor))
    wide = compute_dtype(device)
    args = [widen(x, wide) if isinstance(x, Tensor) else x for x in inputs]
    if wide == torch.float32 and float32 is not None:
        out = float32(*args)
        if isinstance(out, tuple):
            return round_pair(*out, dtype)
        return round_once(out, dtype)
    return round_once(formula(*args), dtype)
