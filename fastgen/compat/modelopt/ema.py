"""``modelopt.torch.fastgen.ema``: fastgen's EMA (modelopt's config, update rule and state)."""

from fastgen.dmd.ema import ExponentialMovingAverage

__all__ = ["ExponentialMovingAverage"]
