"""The docs site's Python examples run, and its pages are the ones mkdocs.yml lists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [(page, code) for page in PAGES
          for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]  # fmt: skip


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in nav_pages(item)]
    return [p for value in node.values() for p in nav_pages(value)]


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav) == sorted(str(p.relative_to(DOCS)) for p in PAGES)


def test_docs_have_python_examples():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize(
    ("page", "code"),
    BLOCKS,
    ids=[f"{p.relative_to(DOCS)}:{i}" for i, (p, _) in enumerate(BLOCKS)],
)
def test_docs_example_runs(page, code):
    exec(compile(code, str(page), "exec"), {"__name__": "docs_example"})


def test_benchmarks_page_is_generated_from_the_committed_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    results = sorted((ROOT / "bench" / "results").glob("*.json"))
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert page == report.site(results), "regenerate: python bench/report.py --site ..."
    for path in results:  # every results file has its section
        assert f"## `{path.name}`" in page
