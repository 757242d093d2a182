"""``modelopt.torch.fastgen.config``: fastgen's configs (a superset of modelopt's fields, the
same defaults)."""

from fastgen.config import SampleTimestepConfig
from fastgen.dmd.config import DistillationConfig, DMDConfig, EMAConfig

__all__ = ["DMDConfig", "DistillationConfig", "EMAConfig", "SampleTimestepConfig"]
