"""The prediction types: what a network's raw output is, spelled once for the whole package.

``Param`` is one of the three parameterizations fastgen converts between (``x0``, ``eps``,
``flow`` with :math:`v = \\epsilon - x_0`); ``PredType`` adds ``"v"``, modelopt's name for
``flow`` under rectified flow, which configs accept.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["PARAMS", "PRED_TYPES", "Param", "PredType", "check_param", "flow_name"]

Param = Literal["x0", "eps", "flow"]
PredType = Literal["x0", "eps", "v", "flow"]
PARAMS: tuple[str, ...] = get_args(Param)
PRED_TYPES: tuple[str, ...] = get_args(PredType)


def flow_name(pred_type: PredType) -> Param:
    """``pred_type`` as one of :data:`PARAMS` (``"v"`` is ``"flow"``)."""
    return "flow" if pred_type == "v" else pred_type


def check_param(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is one of :data:`PARAMS`."""
    if value not in PARAMS:
        raise ValueError(f"{name} must be one of {PARAMS}, got {value!r}")
