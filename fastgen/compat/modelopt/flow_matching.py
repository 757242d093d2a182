"""``modelopt.torch.fastgen.flow_matching``: fastgen's rectified-flow primitives (float64 inside,
one rounding) and timestep samplers."""

from fastgen.flow_matching import (
    add_noise,
    pred_noise_to_pred_x0,
    pred_x0_from_flow,
    rf_alpha,
    rf_sigma,
    x0_to_eps,
    x0_to_flow,
)
from fastgen.timesteps import sample_from_t_list, sample_timesteps

__all__ = [
    "add_noise",
    "pred_noise_to_pred_x0",
    "pred_x0_from_flow",
    "rf_alpha",
    "rf_sigma",
    "sample_from_t_list",
    "sample_timesteps",
    "x0_to_eps",
    "x0_to_flow",
]
