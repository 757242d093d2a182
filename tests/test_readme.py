"""The README's examples run, and its two one-line commands are the ones CI uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def command_after(marker: str) -> str:
    lines = README.splitlines()
    return lines[lines.index(marker) + 1].strip()


def test_one_line_commands():
    demo = command_after("<!-- demo-command -->")
    tests = command_after("<!-- test-command -->")
    assert "torch==2.13.0" in demo and "[demo]" in demo and "fastgen.demo" in demo
    assert "torch==2.13.0" in tests and "test" in tests and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and 'eval "$test_cmd"' in ci
