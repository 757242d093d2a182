"""YAML recipes: files, and built-in recipes loadable by name.

A recipe is a YAML (or JSON) mapping of :class:`~fastgen.dmd.DMDConfig` fields; empty YAML values
mean ``None``, as in modelopt's recipes, whose files load unchanged. Built-in recipes live in
``fastgen/dmd/recipes/``; ``load_dmd_config("dmd2_wan21")`` finds one by name, and so does
modelopt's path form ``"general/distillation/dmd2_qwen_image"``. Reading the files is
:mod:`fastgen.dmd.recipe_files` (``list_recipes`` and ``load_config`` are its own, named here
too), which the config's ``from_yaml`` uses without importing this module.
"""

from __future__ import annotations

from pathlib import Path

from fastgen.dmd.config import DMDConfig
from fastgen.dmd.recipe_files import list_recipes, load_config

__all__ = ["list_recipes", "load_config", "load_dmd_config"]


def load_dmd_config(name_or_path: str | Path) -> DMDConfig:
    """Load a recipe into a validated :class:`~fastgen.dmd.DMDConfig`.

    Args:
        name_or_path: See :func:`load_config`.

    Returns:
        The config.

    Raises:
        pydantic.ValidationError: An unknown key or a bad value; the message names the field.
        FileNotFoundError: No such recipe.

    Example:
        >>> cfg = load_dmd_config("dmd2_wan21")
        >>> cfg.guidance_scale, cfg.student_sample_steps, cfg.gan_loss_weight_gen
        (5.0, 4, 0.03)
    """
    return DMDConfig.model_validate(load_config(name_or_path))
