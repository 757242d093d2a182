"""``modelopt.torch.fastgen.methods``: the distillation methods (DMD2)."""

from fastgen.compat.modelopt.methods import dmd
from fastgen.compat.modelopt.methods.dmd import DMDPipeline

__all__ = ["DMDPipeline", "dmd"]
