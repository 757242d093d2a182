"""``modelopt.torch.fastgen.loader``: recipes by name or path (modelopt's YAML files load
unchanged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastgen.dmd import recipes
from fastgen.dmd.config import DMDConfig

__all__ = ["load_config", "load_dmd_config"]


def load_config(config_file: str | Path) -> dict[str, Any]:
    """A recipe's YAML as a dict (:func:`fastgen.load_config`): a built-in name, modelopt's
    ``"general/distillation/<name>"`` form, or a path."""
    return recipes.load_config(config_file)


def load_dmd_config(config_file: str | Path) -> DMDConfig:
    """A recipe as a validated :class:`~fastgen.DMDConfig` (:func:`fastgen.load_dmd_config`)."""
    return recipes.load_dmd_config(config_file)
