"""Consistency-family configs: sCM (distillation and training), MeanFlow, rCM.

Frozen pydantic models with ``extra="forbid"``, like :class:`fastgen.DMDConfig`: an unknown key
or a bad value is a ``pydantic.ValidationError`` that names the field. They extend
:class:`fastgen.dmd.DistillationConfig` (parameterization, teacher guidance, timesteps, the
networks' timestep scale).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fastgen.config import SampleTimestepConfig
from fastgen.dmd.config import DistillationConfig, DMDConfig, EMAConfig

__all__ = ["MeanFlowConfig", "RCMConfig", "SCMConfig"]

Mode = Literal["distillation", "training"]


def _logitnormal() -> SampleTimestepConfig:
    return SampleTimestepConfig(time_dist_type="logitnormal")


class SCMConfig(DistillationConfig):
    """sCM (Lu & Song 2024): continuous-time consistency in TrigFlow, trained through a JVP.

    Example:
        >>> SCMConfig(mode="training").tangent_warmup_steps
        10000
    """

    sample_t_cfg: SampleTimestepConfig = Field(default_factory=_logitnormal)
    """How the rectified-flow time t of each sample is drawn (mapped to TrigFlow's angle)."""

    mode: Mode = "distillation"
    """``distillation``: the tangent follows the (guided) teacher's PF-ODE; ``training``: the
    conditional velocity of the noised sample (no teacher)."""

    sigma_data: float = Field(0.5, gt=0.0)
    """Data standard deviation of TrigFlow (its noise has this scale)."""

    tangent_warmup_steps: int = Field(10000, ge=0)
    """The tangent's second term is scaled by ``min(1, iteration / tangent_warmup_steps)``;
    0 disables the warmup."""

    tangent_norm_const: float = Field(0.1, gt=0.0)
    """Tangent normalization ``g / (||g|| + c)``: this is c."""

    tangent_norm_spatial_invariance: bool = True
    """Normalize with the root-mean-square norm (``||g|| / sqrt(D)``) instead of the plain one."""

    prior_weighting: bool = True
    """Weight each sample's loss by ``1 / t`` (t floored at ``DENOM_MIN``)."""

    divide_by_dim: bool = True
    """Divide the weighted loss by the per-sample size D."""

    jvp: Literal["forward", "finite_difference"] = "forward"
    """How the network's derivative along the ODE is taken."""

    jvp_fd_step: float = Field(1e-3, gt=0.0, lt=1.0)
    """Step of the finite-difference JVP (along the tangent, in its own units; below 1 keeps the
    shifted angles inside [0, pi/2], as the tangent vanishes at both ends)."""

    ema: EMAConfig | None = None
    """EMA of the student, kept by the trainer (the samples and the export use it); ``None``
    disables it."""

    @model_validator(mode="after")
    def _check_scm(self) -> SCMConfig:
        if self.mode == "training" and self.guidance_scale is not None:
            raise ValueError(
                "guidance_scale guides the teacher's tangent: mode='training' has no teacher"
            )
        return self


class MeanFlowConfig(DistillationConfig):
    """MeanFlow (Geng et al. 2025): the average velocity ``u(x_t, r, t)`` through the JVP identity.

    The student predicts ``u`` directly; ``pred_type`` is the teacher's (distillation).

    Example:
        >>> MeanFlowConfig(r_sample_ratio=0.25).loss_type
        'opt_grad'
    """

    sample_t_cfg: SampleTimestepConfig = Field(default_factory=_logitnormal)
    """How t is drawn (and r, unless ``sample_r_cfg`` is set); then ``t, r = max, min``."""

    sample_r_cfg: SampleTimestepConfig | None = None
    """A separate distribution for r; ``None`` draws r like t."""

    r_sample_ratio: float = Field(0.25, ge=0.0, le=1.0)
    """Expected fraction of the batch whose r is drawn; the rest (the first rows) has r = t
    (plain flow matching)."""

    mode: Mode = "training"
    """``training``: the target velocity is ``eps - x0`` (with guidance from the student itself);
    ``distillation``: the (guided) teacher's velocity."""

    loss_type: Literal["l2", "opt_grad"] = "opt_grad"
    """``l2``: adaptively weighted squared error to the target; ``opt_grad``: the same gradient
    direction written as a regression on the (weighted, normalized) tangent."""

    adaptive_weight_power: float = Field(1.0, ge=0.0)
    """Adaptive weight ``1 / (e + c) ** p`` with e the per-sample error (``l2``) or tangent
    norm (``opt_grad``): this is p (0 disables)."""

    adaptive_weight_const: float = Field(0.1, gt=0.0)
    """The c of the adaptive weight."""

    tangent_warmup_steps: int = Field(0, ge=0)
    """The JVP term is scaled by ``min(1, iteration / tangent_warmup_steps)``; 0 disables."""

    tangent_spatial_invariance: bool = False
    """``opt_grad``: scale the tangent by ``1 / sqrt(D)`` before its norm is taken."""

    guidance_t_start: float = Field(0.0, ge=0.0, le=1.0)
    """Guidance applies only for t in [guidance_t_start, guidance_t_end]."""

    guidance_t_end: float = Field(1.0, ge=0.0, le=1.0)
    """See ``guidance_t_start``."""

    guidance_mixture_ratio: float | None = None
    """Training mode: mix the student's conditional velocity into the target,
    ``s v + (1 - s - m) u_neg + m u_cond``; ``None`` uses ``u_neg + s (v - u_neg)``."""

    cond_dropout_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Training-time guidance: expected fraction of rows (the first ones) that see the negative
    conditioning and the unguided target."""

    r_keyword: str = "r"
    """The keyword under which the network receives r (scaled like ``timestep``)."""

    jvp: Literal["forward", "finite_difference"] = "forward"
    """How the network's derivative along the ODE is taken."""

    jvp_fd_step: float = Field(1e-4, gt=0.0, lt=0.5)
    """Step in t of the finite-difference JVP (one-sided where t +- step leaves [r, 1])."""

    ema: EMAConfig | None = None
    """EMA of the student, kept by the trainer (the samples and the export use it); ``None``
    disables it."""

    @model_validator(mode="after")
    def _check_meanflow(self) -> MeanFlowConfig:
        if self.guidance_t_start > self.guidance_t_end:
            raise ValueError(
                f"guidance_t_start ({self.guidance_t_start}) must not exceed guidance_t_end "
                f"({self.guidance_t_end})"
            )
        if self.guidance_mixture_ratio is not None and self.mode != "training":
            raise ValueError("guidance_mixture_ratio applies to mode='training' only")
        if self.r_keyword in ("hidden_states", "timestep", "encoder_hidden_states"):
            raise ValueError(f"r_keyword {self.r_keyword!r} is a keyword the pipeline sets itself")
        return self


class RCMConfig(SCMConfig):
    """rCM: sCM distillation regularized by DMD2's distribution-matching (score) term.

    ``dmd`` configures the score term (its fake score, its noise times); it must share the
    parameterization and the networks' timestep convention with the sCM part.

    Example:
        >>> RCMConfig(dmd_weight=0.01).dmd.student_sample_steps
        1
    """

    dmd_weight: float = Field(0.01, ge=0.0)
    """Weight of the DMD2 term in the student's loss."""

    dmd: DMDConfig = Field(default_factory=DMDConfig)
    """The DMD2 term's config (a 1-step student: the consistency model from pure noise)."""

    @model_validator(mode="after")
    def _check_rcm(self) -> RCMConfig:
        if self.mode != "distillation":
            raise ValueError("rCM distills a teacher: mode must be 'distillation'")
        for name in ("pred_type", "num_train_timesteps", "timestep_dtype"):
            if getattr(self.dmd, name) != getattr(self, name):
                raise ValueError(
                    f"dmd.{name} ({getattr(self.dmd, name)!r}) must equal {name} "
                    f"({getattr(self, name)!r}): one set of networks serves both terms"
                )
        if self.dmd.student_sample_steps != 1:
            raise ValueError(
                "dmd.student_sample_steps must be 1 (the consistency model's one step)"
            )
        return self
