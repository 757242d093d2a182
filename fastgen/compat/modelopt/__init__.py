"""``modelopt.torch.fastgen``'s module tree, names, signatures and exception types over fastgen.

``import fastgen.compat.modelopt as mtf`` replaces ``import modelopt.torch.fastgen as mtf``:
the same submodules (``config``, ``flow_matching``, ``losses``, ``utils``, ``ema``,
``factory``, ``loader``, ``pipeline``, ``methods.dmd``, ``discriminators``,
``plugins.qwen_image``), each a thin layer over fastgen's own functions and classes.

Where the two differ on purpose, the compat layer keeps fastgen's behaviour (the migration
table in the docs lists every row):

- arithmetic is float64 with one rounding to the output dtype, where modelopt rounds each
  float32 step (results agree to float32 round-off, not bitwise);
- the pipeline reads ``pred_type="v"`` as the flow it is under rectified flow throughout;
  modelopt converts a ``"v"`` output as flow but regresses its fake score on the v target
  ``alpha_t * eps - sigma_t * x0``. :func:`losses.dsm_loss` with ``pred_type="v"`` computes
  modelopt's v target, as modelopt's does;
- a multi-step student draws one rung per sample with no collective (modelopt broadcasts one
  rung from rank 0 for the whole batch).
"""

# After the core names, as in modelopt: the plugins build on DMDPipeline.
from fastgen.compat.modelopt import discriminators, flow_matching, losses, methods, plugins, utils
from fastgen.compat.modelopt.config import (
    DistillationConfig,
    DMDConfig,
    EMAConfig,
    SampleTimestepConfig,
)
from fastgen.compat.modelopt.ema import ExponentialMovingAverage
from fastgen.compat.modelopt.factory import create_fake_score
from fastgen.compat.modelopt.loader import load_config, load_dmd_config
from fastgen.compat.modelopt.methods.dmd import DMDPipeline
from fastgen.compat.modelopt.pipeline import DistillationPipeline

__all__ = [
    "DMDConfig",
    "DistillationConfig",
    "EMAConfig",
    "SampleTimestepConfig",
    "ExponentialMovingAverage",
    "create_fake_score",
    "load_config",
    "load_dmd_config",
    "DMDPipeline",
    "DistillationPipeline",
    "discriminators",
    "flow_matching",
    "losses",
    "methods",
    "plugins",
    "utils",
]
