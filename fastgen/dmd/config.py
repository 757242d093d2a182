"""DMD2 configs: the field names and defaults of ``modelopt.torch.fastgen``, validated strictly.

Frozen pydantic models with ``extra="forbid"``: an unknown key (a typo in a YAML recipe) or a
bad value is a ``pydantic.ValidationError`` that names the field. Cross-field rules (R1 needs
the GAN branch, a multi-step student needs a ladder of ``student_sample_steps + 1`` rungs) are
checked once, at construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fastgen.config import SampleTimestepConfig
from fastgen.pred_type import PredType

__all__ = ["DMDConfig", "DistillationConfig", "EMAConfig", "PredType"]

"""A network's output parameterization; under rectified flow ``"v"`` is ``"flow"``."""


def _modelopt_sample_t_cfg() -> SampleTimestepConfig:
    # modelopt's SampleTimestepConfig defaults to the shifted family (Wan 2.2's setting);
    # fastgen's own default is uniform. A bare DMDConfig draws from the shifted family.
    return SampleTimestepConfig(time_dist_type="shifted")


_FROZEN = ConfigDict(
    frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True
)


class EMAConfig(BaseModel):
    """Exponential moving average of the student's weights.

    Example:
        >>> EMAConfig(type="power").gamma
        16.97
    """

    model_config = _FROZEN

    decay: float = Field(0.9999, ge=0.0, le=1.0)
    """Decay for ``type="constant"``: shadow = decay * shadow + (1 - decay) * live."""

    type: Literal["constant", "halflife", "power"] = "constant"
    """Schedule of the per-update decay: ``constant``; ``power``: (1 - 1/iter) ** (gamma + 1);
    ``halflife``: a half-life in images, ramped up over the first images."""

    start_iter: int = Field(0, ge=0)
    """Iteration at which tracking starts; the shadow is (re)initialised from the live weights
    there, and updates before it are ignored."""

    gamma: float = Field(16.97, gt=0.0)
    """Exponent of the ``power`` schedule."""

    halflife_kimg: float = Field(500.0, gt=0.0)
    """Half-life of the ``halflife`` schedule, in thousands of images."""

    rampup_ratio: float | None = Field(0.05, gt=0.0)
    """``halflife``: the half-life is at most ``rampup_ratio`` times the images seen so far;
    ``None`` disables the ramp-up."""

    batch_size: int = Field(1, ge=1)
    """Global batch size per update, to count images for the ``halflife`` schedule."""

    fsdp2: bool = True
    """Treat DTensor (FSDP2) parameters as sharded: ``mode`` decides what the shadow holds."""

    mode: Literal["full_tensor", "local_shard"] = "full_tensor"
    """FSDP2: ``full_tensor`` all-gathers each parameter (every rank holds the whole EMA);
    ``local_shard`` keeps an EMA of each rank's shard only (no collective, 1/world memory)."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = "float32"
    """Shadow dtype of the parameters (buffers keep theirs); ``None`` keeps each parameter's.
    float32 by default: in bf16 an update (1 - decay) * (live - shadow) rounds away."""

    cpu_offload: bool = False
    """Keep the shadows in CPU memory (pinned, on CUDA) instead of beside the weights: each
    update copies one parameter at a time over and averages it there. Frees the shadows'
    4 bytes per parameter (per rank, divided by the ranks with ``local_shard``) of device memory
    for one host copy per update."""


class DistillationConfig(BaseModel):
    """What every few-step distillation method shares: parameterization, guidance, timesteps.

    Example:
        >>> DistillationConfig(pred_type="v").pred_type
        'v'
    """

    model_config = _FROZEN

    pred_type: PredType = "flow"
    """What the teacher, student and fake score predict: ``x0``, ``eps``, ``flow`` (``v`` is
    the same as ``flow`` under rectified flow)."""

    guidance_scale: float | None = None
    """Classifier-free guidance scale of the teacher, ``cond + (s - 1) (cond - uncond)``;
    ``None`` disables CFG (no unconditional teacher call)."""

    sample_t_cfg: SampleTimestepConfig = Field(default_factory=_modelopt_sample_t_cfg)
    """How the perturbation timesteps of every loss are drawn, and the student's ladder
    ``t_list``. Defaults to the shifted family (shift 5), as modelopt's does."""

    student_sample_steps: int = Field(1, ge=1)
    """Number of student steps at inference (1 = one-step generator)."""

    student_sample_type: Literal["sde", "ode"] = "ode"
    """How the student moves between rungs when it is unrolled: ``ode`` re-noises with the
    implied noise, ``sde`` with fresh noise."""

    num_train_timesteps: int | None = Field(None, ge=1)
    """If set, models receive ``t * num_train_timesteps`` (diffusers' SD3/Flux/Wan convention)
    instead of ``t`` in [0, 1]."""

    timestep_dtype: Literal["float32", "latents"] = "float32"
    """dtype of the timestep passed to the models: ``float32`` (exact for every t * 1000 that
    float32 holds), or ``latents`` (the latents' dtype, as modelopt does; in bf16 this turns
    750 into 752)."""


class DMDConfig(DistillationConfig):
    """DMD2 hyperparameters (the defaults mirror modelopt's, tuned there for Wan 2.2 5B).

    Example:
        >>> cfg = DMDConfig(student_sample_steps=2,
        ...                 sample_t_cfg={"time_dist_type": "shifted", "t_list": [0.999, 0.833, 0.0]})
        >>> cfg.sample_t_cfg.t_list
        (0.999, 0.833, 0.0)
    """

    student_update_freq: int = Field(5, ge=1)
    """One student update per this many fake-score (and discriminator) updates; the training
    loop enforces the alternation."""

    fake_score_pred_type: PredType | None = "x0"
    """Parameterization in which the fake score's denoising loss is computed (its raw output
    is converted from ``pred_type``); ``None`` means ``pred_type``."""

    backward_simulation: bool = False
    """Multi-step students: train each rung on the student's own unrolled samples (re-noised at
    the rung) instead of on noised real latents."""

    rung_sampling: Literal["independent", "stratified"] = "independent"
    """How a multi-step student's batch draws its rungs. ``independent``: each sample its own
    uniform rung. ``stratified``: each sample's rung is still uniform, but the batch splits into
    rung groups whose sizes differ by at most one (a random offset, in random order), so the
    backward-simulation unroll runs each call only on the rows that need it: about (K - 1) / 2
    calls' worth of rows instead of K - 1, at fixed shapes (no host read). Per-sample keyword
    arguments must then be tensors (batch first); the unroll gathers them."""

    gan_loss_weight_gen: float = Field(0.0, ge=0.0)
    """Weight of the GAN generator term in the student loss; 0 disables the GAN branch."""

    gan_use_same_t_noise: bool = False
    """Discriminator update: noise the real latents with the fake branch's ``t`` and noise."""

    gan_r1_reg_weight: float = Field(0.0, ge=0.0)
    """Weight of the approximate R1 penalty on the discriminator; 0 disables it."""

    gan_r1_reg_alpha: float = Field(0.1, gt=0.0)
    """Standard deviation of the perturbation of real data in the approximate R1 penalty."""

    ema: EMAConfig | None = None
    """EMA of the student, updated by ``DMDPipeline.update_ema``; ``None`` disables it."""

    guidance_batching: Literal["separate", "batched"] = "separate"
    """How the teacher's conditional and unconditional calls run under CFG: ``separate`` (two
    calls of batch B, as modelopt does) or ``batched`` (one call of batch 2B: conditioning and
    every batch-shaped keyword argument concatenated). ``batched`` needs both calls to take the
    same keyword arguments and conditioning of one shape; its outputs equal the separate calls'
    up to the network's own batch-size rounding. Not with the GAN branch (its features come
    from the conditional call)."""

    @model_validator(mode="after")
    def _check_dmd(self) -> DMDConfig:
        if self.guidance_batching == "batched" and self.gan_loss_weight_gen > 0:
            raise ValueError(
                "guidance_batching='batched' cannot run with the GAN branch "
                "(gan_loss_weight_gen > 0): its features come from the conditional call alone"
            )
        if self.gan_r1_reg_weight > 0 and self.gan_loss_weight_gen <= 0:
            raise ValueError(
                "gan_r1_reg_weight > 0 needs the GAN branch: set gan_loss_weight_gen > 0"
            )
        t_list = self.sample_t_cfg.t_list
        steps = self.student_sample_steps
        if self.backward_simulation and steps <= 1:
            raise ValueError("backward_simulation needs student_sample_steps > 1")
        if steps > 1 and t_list is None:
            raise ValueError(
                f"student_sample_steps = {steps} needs sample_t_cfg.t_list with "
                f"{steps + 1} entries (the student's ladder, ending in 0)"
            )
        if t_list is not None and len(t_list) != steps + 1:
            raise ValueError(
                f"sample_t_cfg.t_list has {len(t_list)} entries but student_sample_steps = "
                f"{steps} needs {steps + 1} (one per step, then the final 0)"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> DMDConfig:
        """Load a YAML (or ``.json``) file, or a built-in recipe by name, into a config.

        See :func:`fastgen.dmd.load_dmd_config`.
        """
        from fastgen.dmd.recipe_files import load_config

        return cls.model_validate(load_config(path))

    def to_yaml(self) -> str:
        """The config as YAML text that :meth:`from_yaml` loads back to an equal config."""
        import yaml

        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)
