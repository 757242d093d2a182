r"""fastgen: DMD2-style few-step distillation of diffusion and flow models.

Convention, stated once: :math:`x_t = (1 - t) x_0 + t \epsilon`, t in [0, 1] (t = 0 data,
t = 1 noise), flow :math:`v = \epsilon - x_0`. Each output is computed in the precision
policy's dtype (float64 by default; float32 under ``set_precision("float32")``) and rounded
once to the output dtype; every public callable compiles with ``fullgraph=True`` and exports.

:mod:`fastgen.dmd` holds the DMD2 step (``DMDPipeline``, ``DMDConfig``, EMA, recipes), with the
public names of ``modelopt.torch.fastgen``; :mod:`fastgen.plugins` model families (Qwen-Image);
:mod:`fastgen.compat.modelopt` modelopt's module layout; :mod:`fastgen.train` the trainer.
"""

from fastgen.checkpoint import CheckpointInfo, latest_checkpoint, load_checkpoint, save_checkpoint
from fastgen.config import ParamConverterConfig, SampleTimestepConfig
from fastgen.dmd import (
    Discriminator,
    DistillationConfig,
    DMDConfig,
    DMDPipeline,
    EMAConfig,
    ExponentialMovingAverage,
    FeatureCapture,
    attach_feature_capture,
    classifier_free_guidance,
    create_fake_score,
    list_recipes,
    load_config,
    load_dmd_config,
)
from fastgen.errors import CheckpointError
from fastgen.flow_matching import (
    DENOM_MIN,
    add_noise,
    convert_prediction,
    expand_like,
    pred_noise_to_pred_x0,
    pred_x0_from_flow,
    rf_alpha,
    rf_sigma,
    set_value_checks,
    x0_to_eps,
    x0_to_flow,
)
from fastgen.losses import dsm_loss, gan_disc_loss, gan_gen_loss, r1_loss, vsd_loss
from fastgen.modules import ParamConverter, RFForward, TimestepSampler
from fastgen.precision import get_precision, set_precision, use_precision
from fastgen.sampling import sample
from fastgen.timesteps import make_t_list, resolution_shift, sample_from_t_list, sample_timesteps
from fastgen.version import __version__ as __version__

__all__ = [
    # flow-matching primitives (the spec)
    "add_noise",
    "expand_like",
    "pred_noise_to_pred_x0",
    "pred_x0_from_flow",
    "rf_alpha",
    "rf_sigma",
    "x0_to_eps",
    "x0_to_flow",
    "convert_prediction",
    "DENOM_MIN",
    "set_value_checks",
    # precision policy
    "set_precision",
    "get_precision",
    "use_precision",
    # timestep sampling
    "SampleTimestepConfig",
    "sample_timesteps",
    "sample_from_t_list",
    "make_t_list",
    "resolution_shift",
    # modules
    "ParamConverter",
    "ParamConverterConfig",
    "RFForward",
    "TimestepSampler",
    # DMD2 losses
    "dsm_loss",
    "vsd_loss",
    "gan_gen_loss",
    "gan_disc_loss",
    "r1_loss",
    # the DMD2 step
    "DistillationConfig",
    "DMDConfig",
    "EMAConfig",
    "load_dmd_config",
    "load_config",
    "list_recipes",
    "DMDPipeline",
    "classifier_free_guidance",
    "create_fake_score",
    "ExponentialMovingAverage",
    "FeatureCapture",
    "attach_feature_capture",
    "Discriminator",
    # the few-step sampler
    "sample",
    # checkpoints
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "CheckpointInfo",
    "CheckpointError",
]
