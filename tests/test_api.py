"""The public API holds: the API page's names where the page puts them, and the snapshot.

``tests/spec/flow_matching.txt`` is the API page of ``flow_matching`` as published; the test
parses its ``- name(signature)`` lines rather than copying them. ``tests/api_snapshot.txt``
pins every public name, signature, subcommand and flag (``tests/api_surface.py``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from api_surface import (
    CHANGELOG,
    ROOT,
    SNAPSHOT,
    changelog_section,
    diff,
    extends,
    read_snapshot,
    surface,
    update,
)

import fastgen
from fastgen import flow_matching

PAGE = Path(__file__).parent / "spec" / "flow_matching.txt"
EMPTY = inspect.Parameter.empty


def page_signatures() -> dict[str, inspect.Signature]:
    """``name -> Signature`` for every ``- name(args)`` entry of the API page."""
    found = {}
    for line in PAGE.read_text().splitlines():
        match = re.fullmatch(r"- (\w+)\((.*)\)", line.strip())
        if not match:
            continue
        name, args = match.groups()
        node = ast.parse(f"def {name}({args}): pass").body[0].args
        params = []
        positional = node.args
        pos_defaults = [EMPTY] * (len(positional) - len(node.defaults)) + node.defaults
        for arg, default in zip(positional, pos_defaults):
            params.append((arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default))
        for arg, default in zip(node.kwonlyargs, node.kw_defaults):
            params.append((arg.arg, inspect.Parameter.KEYWORD_ONLY, default or EMPTY))
        found[name] = inspect.Signature(
            [
                inspect.Parameter(
                    n, kind, default=d if d is EMPTY else eval(ast.unparse(d), {"torch": torch})
                )
                for n, kind, d in params
            ]
        )
    return found


PAGE_SIGNATURES = page_signatures()


def test_the_page_lists_its_nine_functions():
    # The parser itself: a page it misreads would make the tests below vacuous.
    assert sorted(PAGE_SIGNATURES) == sorted(
        [
            "add_noise",
            "pred_noise_to_pred_x0",
            "pred_x0_from_flow",
            "rf_alpha",
            "rf_sigma",
            "sample_from_t_list",
            "sample_timesteps",
            "x0_to_eps",
            "x0_to_flow",
        ]
    )
    sig = PAGE_SIGNATURES["sample_timesteps"]
    assert [p.kind for p in sig.parameters.values()] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.KEYWORD_ONLY,
    ]
    assert sig.parameters["dtype"].default is torch.float32
    assert sig.parameters["device"].default is EMPTY


@pytest.mark.parametrize("name", sorted(PAGE_SIGNATURES))
def test_page_name_importable_from_flow_matching_with_its_signature(name):
    module = importlib.import_module("fastgen.flow_matching")
    assert name in module.__all__, f"{name} is not in fastgen.flow_matching.__all__"
    ours = inspect.signature(getattr(module, name)).parameters
    page = PAGE_SIGNATURES[name].parameters
    assert list(ours)[: len(page)] == list(page), f"{name}: parameters {list(ours)} vs {list(page)}"
    for pname, p in page.items():
        assert ours[pname].kind == p.kind, f"{name}({pname}): {ours[pname].kind} vs {p.kind}"
        assert ours[pname].default == p.default, f"{name}({pname}): default differs"
    for extra in list(ours)[len(page) :]:  # additions keep every call written for the page valid
        q = ours[extra]
        assert q.kind == q.KEYWORD_ONLY and q.default is not EMPTY, f"{name}({extra})"


@pytest.mark.parametrize("name", sorted(PAGE_SIGNATURES))
def test_page_name_is_the_package_roots_object(name):
    if hasattr(fastgen, name):
        assert getattr(flow_matching, name) is getattr(fastgen, name)


def test_samplers_from_flow_matching_draw_what_the_root_draws():
    cfg = fastgen.SampleTimestepConfig(time_dist_type="logitnormal")
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = flow_matching.sample_timesteps(5, cfg, device="cpu", generator=gen_a)
    b = fastgen.timesteps.sample_timesteps(5, cfg, device="cpu", generator=gen_b)
    assert torch.equal(a, b) and a.dtype == torch.float32
    rungs = flow_matching.sample_from_t_list(64, [0.9, 0.5, 0.0], device="cpu")
    rung_set = torch.tensor([0.9, 0.5])  # the rungs above 0, rounded to float32
    assert torch.isin(rungs, rung_set).all() and rungs.dtype == torch.float32
    assert torch.isin(rung_set, rungs).all()  # 64 draws reach both rungs


def test_public_surface_matches_the_snapshot():
    _, pinned = read_snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        now = surface()
    changes = diff(pinned, now)
    report = "\n".join(f"  {kind}: {item}" for kind, items in changes.items() for item in items)
    assert not any(changes.values()), (
        "the public API differs from tests/api_snapshot.txt:\n"
        f"{report}\n"
        "A new name: run `python tests/api_surface.py --update` (one line each). A removed or "
        "changed name: keep it working with a DeprecationWarning for one release and say so in "
        "CHANGELOG.md first."
    )


def test_snapshot_names_the_two_samplers_and_the_cli():
    _, pinned = read_snapshot()
    text = "\n".join(pinned)
    assert "fastgen.flow_matching.sample_timesteps(n: 'int', cfg:" in text
    assert "fastgen.flow_matching.sample_from_t_list(n: 'int', t_list:" in text
    assert "cli: fastgen distill --fresh" in text and "cli: fastgen.demo --quick" in text


def test_version_is_one_number_everywhere():
    version, _ = read_snapshot()
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; fastgen runs on 3.10)
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "fastgen.version.__version__" }' in pyproject
    assert version == fastgen.__version__, "regenerate the snapshot for the new version"
    assert changelog_section(fastgen.__version__), f"CHANGELOG.md has no [{fastgen.__version__}]"
    newest = re.search(r"^## \[(\d[^\]]*)\]", CHANGELOG.read_text(), re.M).group(1)
    assert newest == fastgen.__version__


def _fake_snapshot(tmp_path: Path, version: str, extra: str) -> Path:
    lines = SNAPSHOT.read_text().splitlines()
    path = tmp_path / "snapshot.txt"
    path.write_text("\n".join([f"# fastgen {version}", *lines[1:], extra]) + "\n")
    return path


def test_update_refuses_a_silent_removal(tmp_path):
    gone = "fastgen.flow_matching.retired_helper(x: 'Tensor') -> 'Tensor'"
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text(f"## [{fastgen.__version__}] - today\n\n### Added\n- nothing\n")
    path = _fake_snapshot(tmp_path, "0.0.1", gone)
    problems = update(path, changelog)
    assert problems == [
        f"fastgen.flow_matching.retired_helper: not named in CHANGELOG.md's "
        f"[{fastgen.__version__}] section"
    ]
    assert gone in path.read_text()  # nothing written
    # The CHANGELOG's section names the removal: written, the name gone, the version new.
    changelog.write_text(
        f"## [{fastgen.__version__}] - today\n\n### Removed\n- `retired_helper` (deprecated)\n"
    )
    assert update(path, changelog) == []
    assert "retired_helper" not in path.read_text()
    assert read_snapshot(path)[0] == fastgen.__version__


def test_update_adds_names_freely(tmp_path):
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text(f"## [{fastgen.__version__}] - today\n")
    lines = [x for x in SNAPSHOT.read_text().splitlines() if "sample_from_t_list" not in x]
    path = tmp_path / "snapshot.txt"
    path.write_text("\n".join(lines) + "\n")
    assert update(path, changelog) == []
    assert "fastgen.flow_matching.sample_from_t_list(" in path.read_text()


@pytest.mark.parametrize(
    ("old", "new", "compatible"),
    [
        (
            "m.f(a: 'int', *, b: 'int' = 1) -> 'int'",
            "m.f(a: 'int', *, b: 'int' = 1, c=None) -> 'int'",
            True,
        ),
        (
            "m.f(a: 'int', *, b: 'int' = 1) -> 'int'",
            "m.f(a: 'int', *, b: 'int' = 2) -> 'int'",
            False,
        ),
        (
            "m.f(a: 'int', *, b: 'int' = 1) -> 'int'",
            "m.f(a: 'int', *, b: 'int' = 1, c) -> 'int'",
            False,
        ),
        (
            "m.f(a: 'int', b: 'int') -> 'int'",
            "m.f(a: 'int', role: 'str', b: 'int') -> 'int'",
            False,
        ),
        (
            "m.C class(B)(*, x: Literal['a', 'b'] = 'a')",
            "m.C class(B)(*, x: Literal['a', 'b'] = 'a', y: int = 0)",
            True,
        ),
        ("cli: fastgen sample --cache required", "cli: fastgen sample --cache", True),
        ("cli: fastgen sample --cache", "cli: fastgen sample --cache required", False),
    ],
)
def test_extensions_are_told_from_breaking_changes(old, new, compatible):
    assert extends(old, new) is compatible
