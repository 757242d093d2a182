"""The DMD2 step as a library: configs, recipes, the pipeline, EMA, GAN feature capture.

Public names follow ``modelopt.torch.fastgen`` so that switching is an import change.
"""

from fastgen.dmd.capture import FeatureCapture, attach_feature_capture
from fastgen.dmd.config import DistillationConfig, DMDConfig, EMAConfig
from fastgen.dmd.discriminator import Discriminator, group_count
from fastgen.dmd.ema import ExponentialMovingAverage, ema_decay
from fastgen.dmd.factory import create_fake_score
from fastgen.dmd.guidance import classifier_free_guidance
from fastgen.dmd.pipeline import DMDPipeline
from fastgen.dmd.recipes import list_recipes, load_config, load_dmd_config

__all__ = [
    # configs and recipes
    "DistillationConfig",
    "DMDConfig",
    "EMAConfig",
    "load_config",
    "load_dmd_config",
    "list_recipes",
    # the pipeline and its helpers
    "DMDPipeline",
    "classifier_free_guidance",
    "create_fake_score",
    "ExponentialMovingAverage",
    "ema_decay",
    # GAN: feature capture and discriminator
    "FeatureCapture",
    "attach_feature_capture",
    "Discriminator",
    "group_count",
]
