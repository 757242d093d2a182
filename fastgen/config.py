"""Frozen pydantic configs: validated once at construction, never inside ``forward``.

Field names follow FastGen's ``SampleTConfig`` so existing configs carry over. Every
rejection is a ``pydantic.ValidationError`` (a ``ValueError``) that names the field.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from fastgen.pred_type import Param

__all__ = ["MODE_SCALE_MAX", "ParamConverterConfig", "SampleTimestepConfig", "check_t_list"]

# SD3's mode map t = 1 - u - s (cos^2(pi u / 2) - 1 + u) is monotone (so a quantile function)
# exactly when -1 < s < 1 / (pi / 2 - 1).
MODE_SCALE_MAX = 1.0 / (math.pi / 2.0 - 1.0)

TimeDistType = Literal[
    "uniform", "logitnormal", "lognormal", "shifted", "polynomial", "mode", "cosmap"
]


def check_t_list(t_list: Any, name: str = "t_list") -> tuple[float, ...]:
    """Validate a student's timestep ladder and return it as a tuple of floats.

    Args:
        t_list: At least 2 finite numbers in [0, 1], strictly decreasing, the last exactly 0.
        name: The argument name used in error messages.

    Returns:
        The ladder as a tuple of Python floats.

    Raises:
        ValueError: Any rule above is broken; the message names ``name`` and the rule.

    Example:
        >>> check_t_list([0.999, 0.5, 0.0])
        (0.999, 0.5, 0.0)
    """
    if isinstance(t_list, (str, bytes)) or not hasattr(t_list, "__len__"):
        raise ValueError(f"{name} must be a list of floats, got {type(t_list).__name__}")
    values = []
    for i, v in enumerate(t_list):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name}[{i}] must be a float, got {type(v).__name__}")
        values.append(float(v))
    if len(values) < 2:
        raise ValueError(
            f"{name} must have at least 2 entries (start and the final 0), got {len(values)}"
        )
    for i, v in enumerate(values):
        if not (0.0 <= v <= 1.0):  # also rejects NaN
            raise ValueError(f"{name}[{i}] = {v} is outside [0, 1]")
    for i in range(1, len(values)):
        if not values[i] < values[i - 1]:
            raise ValueError(
                f"{name} must be strictly decreasing, but {name}[{i}] = {values[i]} >= "
                f"{name}[{i - 1}] = {values[i - 1]}"
            )
    if values[-1] != 0.0:
        raise ValueError(f"{name} must end with exactly 0 (the data), got {values[-1]}")
    return tuple(values)


class SampleTimestepConfig(BaseModel):
    """How training timesteps are drawn: a distribution on [0, 1] truncated to [min_t, max_t].

    Example:
        >>> cfg = SampleTimestepConfig(time_dist_type="logitnormal", train_p_mean=-0.4)
        >>> SampleTimestepConfig.model_validate_json(cfg.model_dump_json()) == cfg
        True
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True
    )

    time_dist_type: TimeDistType = "uniform"
    """Distribution family: ``uniform``, ``logitnormal`` (logit t ~ N(mean, std)), ``lognormal``
    (log t ~ N(mean, std)), ``shifted`` (shift-map of a uniform), ``polynomial`` (uniform on a
    1000-point grid), ``mode`` and ``cosmap`` (SD3's maps)."""

    train_p_mean: float = Field(0.0, validation_alias=AliasChoices("train_p_mean", "p_mean"))
    """Mean of the normal in logit space (``logitnormal``) or log space (``lognormal``);
    ``p_mean`` (modelopt's name) is accepted too."""

    train_p_std: float = Field(1.0, gt=0.0, validation_alias=AliasChoices("train_p_std", "p_std"))
    """Standard deviation of that normal; > 0. ``p_std`` (modelopt's name) is accepted too."""

    shift: float = Field(5.0, gt=0.0)
    """``shifted``: t = shift * u / (1 + (shift - 1) * u); > 0, 1 is uniform, > 1 favours noise."""

    mode_scale: float = Field(1.29, gt=-1.0, lt=MODE_SCALE_MAX)
    """``mode``: SD3's scale; -1 < mode_scale < 1 / (pi/2 - 1) ~ 1.75, where the map is monotone."""

    min_t: float = Field(0.001, ge=0.0, le=1.0)
    """Lower end of the support (inclusive); 0 <= min_t < max_t."""

    max_t: float = Field(0.999, ge=0.0, le=1.0)
    """Upper end of the support (inclusive); min_t < max_t <= 1."""

    t_list: tuple[float, ...] | None = None
    """The student's timestep ladder for multi-step training: at least 2 entries, strictly
    decreasing, inside [0, 1], last exactly 0. ``None`` for a 1-step student."""

    stratified: bool = False
    """Draw the batch's uniforms one per stratum [i/n, (i+1)/n), randomly permuted: same
    distribution per sample, lower variance per batch."""

    @property
    def p_mean(self) -> float:
        """modelopt's name for :attr:`train_p_mean`."""
        return self.train_p_mean

    @property
    def p_std(self) -> float:
        """modelopt's name for :attr:`train_p_std`."""
        return self.train_p_std

    @model_validator(mode="before")
    @classmethod
    def _reject_edm_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "log_t_df" in data:
            raise ValueError(
                "log_t_df is FastGen's EDM-only option (Student-t log-sigma sampling); it has "
                "no meaning under rectified flow: use time_dist_type instead"
            )
        if isinstance(data, dict):
            for name, alias in (("train_p_mean", "p_mean"), ("train_p_std", "p_std")):
                if name in data and alias in data:
                    raise ValueError(f"give {name} or its alias {alias}, not both")
        return data

    @field_validator("t_list", mode="before")
    @classmethod
    def _check_t_list(cls, value: Any) -> Any:
        return None if value is None else check_t_list(value)

    @model_validator(mode="after")
    def _check_bounds(self) -> SampleTimestepConfig:
        if not self.min_t < self.max_t:
            raise ValueError(f"min_t ({self.min_t}) must be smaller than max_t ({self.max_t})")
        return self


class ParamConverterConfig(BaseModel):
    """Which parameterization a prediction is in (``src``) and which one is wanted (``dst``).

    Example:
        >>> ParamConverterConfig(src="flow", dst="x0")
        ParamConverterConfig(src='flow', dst='x0')
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    src: Param
    """The model's output parameterization."""

    dst: Param
    """The parameterization to convert to."""
