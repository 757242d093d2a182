"""A pytest plugin (``-p modelopt_alias``): ``modelopt.torch.fastgen[.X]`` *is* the module
``fastgen.compat.modelopt[.X]``.

When pytest configures the plugin, ``modelopt`` and ``modelopt.torch`` become empty packages,
so nothing of an installed nvidia-modelopt runs, and every submodule of the compat layer is
registered under modelopt's dotted name before any test file imports it. Importing this file
(as pytest's doctest collection does) changes nothing.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import pkgutil
import sys
import types

import fastgen.compat.modelopt as compat

PREFIX, TARGET = "fastgen.compat.modelopt", "modelopt.torch.fastgen"


def install() -> None:
    parents = {}
    for name in ("modelopt", "modelopt.torch"):
        module = types.ModuleType(name)
        module.__path__ = []  # a package with nothing in it
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = parents[name] = module
    parents["modelopt"].torch = parents["modelopt.torch"]
    parents["modelopt.torch"].fastgen = compat
    sys.modules[TARGET] = compat
    for info in pkgutil.walk_packages(compat.__path__, PREFIX + "."):
        sys.modules[TARGET + info.name[len(PREFIX) :]] = importlib.import_module(info.name)


def pytest_configure(config) -> None:
    install()
