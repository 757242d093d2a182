"""Recipes of every method: a recipe names its method, and a run switches method by recipe.

DMD2's built-in recipes live in ``fastgen/dmd/recipes/`` (``dmd2_<family>``), the consistency
family's in ``fastgen/consistency/recipes/`` (``scm_<family>``, ``rcm_<family>``,
``meanflow_<family>`` for sd3, flux, wan21 and qwen_image). A recipe file is a mapping of its
method's config fields plus ``method:`` (``dmd2``, ``scm``, ``rcm`` or ``meanflow``); without
it the method is DMD2, so modelopt's DMD2 recipe files load unchanged.

Example:
    >>> load_method_config("meanflow_sd3", {"r_sample_ratio": 0.5}).r_sample_ratio
    0.5
    >>> recipe_method("rcm_wan21")
    'rcm'
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastgen.consistency.config import MeanFlowConfig, RCMConfig, SCMConfig
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.recipe_files import _read, _resolve

__all__ = [
    "METHODS",
    "MethodConfig",
    "list_method_recipes",
    "load_method_config",
    "method_of",
    "recipe_method",
    "recipe_source",
]

METHODS: dict[str, type] = {
    "dmd2": DMDConfig,
    "scm": SCMConfig,
    "rcm": RCMConfig,
    "meanflow": MeanFlowConfig,
}
"""Method name -> its config class."""

MethodConfig = DMDConfig | SCMConfig | RCMConfig | MeanFlowConfig

_FOLDERS = (files("fastgen.dmd") / "recipes", files("fastgen.consistency") / "recipes")


def list_method_recipes() -> dict[str, str]:
    """Every built-in recipe's name -> its method, by name.

    Example:
        >>> list_method_recipes()["scm_flux"]
        'scm'
    """
    out = {}
    for folder in _FOLDERS:
        for p in folder.iterdir():
            if p.name.endswith(".yaml"):
                out[p.name[: -len(".yaml")]] = str(_read(p).get("method", "dmd2"))
    return dict(sorted(out.items()))


def recipe_source(name_or_path: str | Path) -> Any:
    """The file a recipe name or path resolves to (a built-in's packaged file, or the path)."""
    return _resolve(name_or_path, _FOLDERS, lambda: list(list_method_recipes()))


def _fields(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    fields = dict(_read(recipe_source(name_or_path)))
    method = fields.pop("method", "dmd2")
    if method not in METHODS:
        raise ValueError(
            f"recipe {str(name_or_path)!r}: method must be one of {sorted(METHODS)}, got {method!r}"
        )
    return method, fields


def recipe_method(name_or_path: str | Path) -> str:
    """The method a recipe names (``dmd2`` when it names none)."""
    return _fields(name_or_path)[0]


def method_of(config: Any) -> str:
    """The method name of a config object (``rcm`` for an :class:`RCMConfig`, which is also an
    :class:`SCMConfig`)."""
    for name, cls in reversed(list(METHODS.items())):  # rcm before scm (its base class)
        if type(config) is cls:
            return name
    raise TypeError(
        f"expected a method config ({', '.join(c.__name__ for c in METHODS.values())}), "
        f"got {type(config).__name__}"
    )


def load_method_config(
    recipe: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    method: str | None = None,
) -> MethodConfig:
    """A recipe with ``overrides``, validated as its method's config.

    Args:
        recipe: A built-in recipe name or a YAML/JSON path, or None (the method's defaults).
        overrides: Fields that replace the recipe's; a mapping given for a mapping field (a
            section such as ``ema`` or rCM's ``dmd``) merges into the recipe's, key by key.
        method: The method expected; with ``recipe=None`` the method to build (default
            ``dmd2``).

    Raises:
        FileNotFoundError: No such recipe.
        ValueError: The recipe names an unknown method, or another method than ``method``.
        pydantic.ValidationError: An unknown field or a bad value (the field named).
    """
    if recipe is None:
        found, fields = method or "dmd2", {}
        if found not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {found!r}")
    else:
        found, fields = _fields(recipe)
        if method is not None and method != found:
            raise ValueError(f"recipe {str(recipe)!r} is a {found} recipe, not {method}")
    return METHODS[found].model_validate(_merge(fields, overrides or {}))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    # key by key, so that rcm: {dmd: {student_update_freq: 2}} keeps the recipe's other dmd fields
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
