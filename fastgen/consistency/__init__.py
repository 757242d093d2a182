r"""The consistency family: sCM (distillation and training), MeanFlow and rCM, with the
TrigFlow conversions and the JVP (forward-mode AD inside the compiled graph, or finite
differences) they are trained through.

Convention as everywhere in fastgen: :math:`x_t = (1 - t) x_0 + t \epsilon`, t = 0 data, t = 1
noise, :math:`v = \epsilon - x_0`; TrigFlow's angle :math:`\hat t \in [0, \pi/2]` maps to it
through :mod:`fastgen.consistency.trigflow`.
"""

from fastgen.consistency.config import MeanFlowConfig, RCMConfig, SCMConfig
from fastgen.consistency.jvp import JVPMethod, finite_difference_jvp, jvp, round_with_tangent
from fastgen.consistency.meanflow import MeanFlowPipeline, meanflow_loss, sample_t_r
from fastgen.consistency.rcm import RCMPipeline
from fastgen.consistency.sampling import consistency_sample, meanflow_sample, scm_t_list
from fastgen.consistency.scm import AdaptiveWeight, SCMPipeline, scm_loss
from fastgen.consistency.trigflow import (
    HALF_PI,
    SIGMA_DATA,
    rf_flow_to_trigflow,
    rf_to_trigflow_input,
    rf_to_trigflow_time,
    trigflow_to_rf_flow,
    trigflow_to_rf_input,
    trigflow_to_rf_time,
)

__all__ = [
    # TrigFlow <-> rectified flow
    "HALF_PI",
    "SIGMA_DATA",
    "rf_to_trigflow_time",
    "trigflow_to_rf_time",
    "rf_to_trigflow_input",
    "trigflow_to_rf_input",
    "rf_flow_to_trigflow",
    "trigflow_to_rf_flow",
    # JVP
    "JVPMethod",
    "jvp",
    "finite_difference_jvp",
    "round_with_tangent",
    # sCM (sCD, sCT)
    "SCMConfig",
    "SCMPipeline",
    "AdaptiveWeight",
    "scm_loss",
    # rCM
    "RCMConfig",
    "RCMPipeline",
    # MeanFlow
    "MeanFlowConfig",
    "MeanFlowPipeline",
    "meanflow_loss",
    "sample_t_r",
    # sampling
    "consistency_sample",
    "meanflow_sample",
    "scm_t_list",
]
