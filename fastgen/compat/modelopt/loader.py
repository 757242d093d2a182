"""``modelopt.torch.fastgen.loader``: recipes by name or path (modelopt's YAML files load
unchanged)."""

from fastgen.dmd.recipes import load_config, load_dmd_config

__all__ = ["load_config", "load_dmd_config"]
