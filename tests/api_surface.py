"""fastgen's public surface as text, one line per name, and the snapshot that pins it.

Every public module (each ``fastgen.*`` module whose path has no ``_``-prefixed part, the
example program ``fastgen.demo`` aside) contributes its public names (``__all__``, or the
names it defines without a leading underscore), each with its signature; a public class adds
its public methods and properties (those defined in fastgen, not inherited from torch or
pydantic); the two command lines (``fastgen`` and ``python -m fastgen.demo``) add each
subcommand and flag with its default. ``tests/test_api.py`` compares this against
``tests/api_snapshot.txt``.

``python tests/api_surface.py`` prints what changed; ``python tests/api_surface.py --update``
rewrites the snapshot for ``fastgen.__version__``. It adds names freely; it refuses to drop or
change a line unless the CHANGELOG's section for the current version names it (a removal
follows a release of ``DeprecationWarning``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "api_snapshot.txt"
CHANGELOG = ROOT / "CHANGELOG.md"
SKIP = ("fastgen.demo",)  # the example program: its command line is public, its modules are not

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# typing caches Annotated[float, Ge(ge=0)] and Annotated[float, Ge(ge=0.0)] as one (the two
# compare equal), so which spelling a process shows depends on what it built first: "0.0" and
# "0" are written alike.
_WHOLE_FLOAT = re.compile(r"(?<![\w.])(-?\d+)\.0(?![\w.])")


def public_modules() -> list[str]:
    """The importable names of fastgen's public modules, sorted."""
    import fastgen

    names = ["fastgen"]
    for info in pkgutil.walk_packages(fastgen.__path__, "fastgen."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts) or info.name.startswith(SKIP):
            continue
        names.append(info.name)
    return sorted(names)


def _sig(obj: object) -> str:
    try:
        return _WHOLE_FLOAT.sub(r"\1", _ADDRESS.sub("", str(inspect.signature(obj))))
    except (TypeError, ValueError):
        return "(...)"


def _value(obj: object) -> str:
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return f" = {obj!r}"
    if isinstance(obj, (tuple, frozenset)) and all(isinstance(v, (int, float, str)) for v in obj):
        return f" = {obj!r}"
    if inspect.ismodule(obj):
        return f": module {obj.__name__}"
    text = repr(obj)
    if text.startswith("typing.") or text.startswith("Literal["):
        return f" = {text}"
    return f": {type(obj).__name__}"


def _class_lines(prefix: str, cls: type) -> list[str]:
    bases = ", ".join(b.__qualname__ for b in cls.__bases__)
    lines = [f"{prefix} class({bases}){_sig(cls)}"]
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not (klass.__module__ or "").startswith("fastgen"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(member, property):
                lines.append(f"{prefix}.{name}: property")
            elif isinstance(member, (staticmethod, classmethod)):
                lines.append(f"{prefix}.{name}{_sig(member.__func__)}")
            elif inspect.isfunction(member):
                lines.append(f"{prefix}.{name}{_sig(member)}")
    return lines


def module_lines(modname: str) -> list[str]:
    """One line per public name of ``modname`` (classes add their public members)."""
    module = importlib.import_module(modname)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == modname
        ]
    lines = []
    for name in sorted(set(names)):
        prefix = f"{modname}.{name}"
        if not hasattr(module, name):
            lines.append(f"{prefix}: MISSING (listed in __all__)")
            continue
        obj = getattr(module, name)
        if inspect.isclass(obj):
            lines.extend(_class_lines(prefix, obj))
        elif callable(obj) and not inspect.ismodule(obj):
            lines.append(f"{prefix}{_sig(obj)}")
        else:
            lines.append(f"{prefix}{_value(obj)}")
    return lines


def _parser_lines(prog: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in sorted(action.choices.items()):
                lines.append(f"cli: {prog} {name}")
                lines.extend(_parser_lines(f"{prog} {name}", sub))
        elif isinstance(action, argparse._HelpAction):
            continue
        else:
            flag = "/".join(action.option_strings) or action.dest
            extra = " required" if action.required and action.option_strings else ""
            default = (
                ""
                if action.default is None or action.default is False
                else f" default={action.default!r}"
            )
            choices = f" choices={sorted(action.choices)}" if action.choices else ""
            lines.append(f"cli: {prog} {flag}{extra}{default}{choices}")
    return lines


def cli_lines() -> list[str]:
    """Each subcommand and flag of ``fastgen`` and ``python -m fastgen.demo``."""
    from fastgen.cli import build_parser
    from fastgen.demo.cli import build_parser as build_demo_parser

    return _parser_lines("fastgen", build_parser()) + _parser_lines(
        "fastgen.demo", build_demo_parser()
    )


def surface() -> list[str]:
    """The whole public surface, sorted within each module, modules in name order."""
    lines = []
    for modname in public_modules():
        lines.extend(module_lines(modname))
    return lines + cli_lines()


def read_snapshot(path: Path = SNAPSHOT) -> tuple[str, list[str]]:
    """The snapshot's version and its lines (comments dropped)."""
    text = path.read_text().splitlines()
    version = text[0].removeprefix("# fastgen ").strip()
    return version, [line for line in text if line and not line.startswith("#")]


def _key(line: str) -> str:
    """What a line names (``module.name`` or the CLI flag), without its signature."""
    if line.startswith("cli: "):
        return line.split(" default=")[0].split(" required")[0].split(" choices=")[0]
    return re.split(r"[(:= ]", line, maxsplit=1)[0]


def _params(line: str) -> list[str] | None:
    """The parameters of a line's signature, split at top-level commas (``None``: none)."""
    head = re.match(r"[^(]*(?: class\([^)]*\))?\(", line)
    if head is None:
        return None
    params, depth, current = [], 0, ""
    for ch in line[head.end() :]:
        if ch == ")" and depth == 0:
            break
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            params.append(current.strip())
            current = ""
        else:
            current += ch
    return params + ([current.strip()] if current.strip() else [])


def extends(old: str, new: str) -> bool:
    """Whether ``new`` only adds to ``old``: the same parameters in the same order with the
    same defaults, then new ones that all have defaults (every old call still works)."""
    if old.startswith("cli: ") and new.startswith("cli: "):
        # a flag that stops being required, or gains choices it did not have, extends
        return old.replace(" required", "") == new.replace(" required", "") and (
            " required" not in new
        )
    a, b = _params(old), _params(new)
    if a is None or b is None or b[: len(a)] != a:
        return False
    return all("=" in p or p.startswith("**") for p in b[len(a) :])


def diff(old: list[str], new: list[str]) -> dict[str, list[str]]:
    """``removed`` (names gone), ``changed`` (old → new line, not a mere extension),
    ``extended`` (new optional parameters), ``added`` (new names)."""
    old_by, new_by = {_key(x): x for x in old}, {_key(x): x for x in new}
    both = [k for k in old_by if k in new_by and old_by[k] != new_by[k]]
    return {
        "removed": sorted(k for k in old_by if k not in new_by),
        "changed": sorted(
            f"{old_by[k]}  →  {new_by[k]}" for k in both if not extends(old_by[k], new_by[k])
        ),
        "extended": sorted(
            f"{old_by[k]}  →  {new_by[k]}" for k in both if extends(old_by[k], new_by[k])
        ),
        "added": sorted(k for k in new_by if k not in old_by),
    }


def changelog_section(version: str, path: Path = CHANGELOG) -> str:
    """The text of the CHANGELOG's section for ``version`` ('' when there is none)."""
    match = re.search(
        rf"^## \[{re.escape(version)}\][^\n]*\n(.*?)(?=^## \[|\Z)", path.read_text(), re.M | re.S
    )
    return match.group(1) if match else ""


def update(path: Path = SNAPSHOT, changelog: Path = CHANGELOG) -> list[str]:
    """Rewrite the snapshot; return the reasons it refused (empty when it wrote)."""
    from fastgen import __version__

    _, old = read_snapshot(path) if path.exists() else ("", [])
    new = surface()
    changes = diff(old, new)
    dropped = changes["removed"] + [c.split("  →  ")[0] for c in changes["changed"]]
    # "extended" (new optional parameters) and "added" need no announcement
    problems = []
    section = changelog_section(__version__, changelog)
    for line in dropped:
        name = _key(line).removeprefix("cli: ").rsplit(".", 1)[-1].split(" ")[-1]
        if name not in section:
            problems.append(f"{_key(line)}: not named in CHANGELOG.md's [{__version__}] section")
    if not problems:
        body = "\n".join(new)
        path.write_text(
            f"# fastgen {__version__}\n# python tests/api_surface.py --update\n{body}\n"
        )
    return problems


def main() -> int:
    if "--update" in sys.argv[1:]:
        problems = update()
        for p in problems:
            print(p)
        return 1 if problems else 0
    _, old = read_snapshot()
    for kind, items in diff(old, surface()).items():
        for item in items:
            print(f"{kind}: {item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
