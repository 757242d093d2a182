"""Recipe files: a YAML (or JSON) file by path, or a built-in recipe by name, read into a dict.

Built-in recipes live in ``fastgen/dmd/recipes/``; ``load_config("dmd2_wan21")`` finds one by
name, and so does modelopt's path form ``"general/distillation/dmd2_qwen_image"``. Empty YAML
values mean ``None``, as in modelopt's recipes. Validation is the caller's:
:func:`fastgen.dmd.load_dmd_config` (and :meth:`fastgen.dmd.DMDConfig.from_yaml`) for DMD2,
``fastgen.train.recipes`` for every method.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

__all__ = ["list_recipes", "load_config"]

_SUFFIXES = (".yaml", ".yml", ".json")
_BUILTIN = files("fastgen.dmd") / "recipes"


def list_recipes() -> list[str]:
    """Names of the built-in recipes.

    Example:
        >>> "dmd2_qwen_image" in list_recipes()
        True
    """
    return sorted(p.name.rsplit(".", 1)[0] for p in _BUILTIN.iterdir() if p.name.endswith(".yaml"))


def _resolve(name_or_path: str | Path, folders: tuple = (_BUILTIN,), names: Any = None):
    """The recipe file: ``name_or_path`` itself (suffix optional), else a built-in of that name
    in ``folders`` (``names()``: the built-in names, for the error)."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or Path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    candidates = [path] if path.suffix in _SUFFIXES else []
    candidates += [path.with_name(path.name + s) for s in _SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    stem = path.name[: -len(path.suffix)] if path.suffix in _SUFFIXES else path.name
    for folder in folders:
        builtin = folder / f"{stem}.yaml"
        if builtin.is_file():
            return builtin
    raise FileNotFoundError(
        f"no recipe file {str(name_or_path)!r} (tried {', '.join(map(str, candidates))}) and no "
        f"built-in recipe {stem!r}; built-in recipes: {', '.join((names or list_recipes)())}"
    )


def load_config(name_or_path: str | Path) -> dict[str, Any]:
    """Read a recipe into a plain dict (not validated).

    Args:
        name_or_path: A ``.yaml``/``.yml``/``.json`` file (the suffix may be left out), or the
            name of a built-in recipe (a leading folder, as in modelopt's
            ``general/distillation/dmd2_qwen_image``, is ignored when no such file exists).

    Returns:
        The mapping; an empty file gives ``{}``.

    Raises:
        FileNotFoundError: Neither a file nor a built-in recipe has that name.
        ValueError: The file does not hold a mapping.
    """
    return _read(_resolve(name_or_path))


def _read(source: Any) -> dict[str, Any]:
    import yaml

    text = source.read_text(encoding="utf-8")
    data = json.loads(text) if source.name.endswith(".json") else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"recipe {source} must hold a mapping of fields, got {type(data).__name__}"
        )
    return data
