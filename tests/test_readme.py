"""Every Python snippet in README.md runs (with the tiny models of tests/readme_fixture.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests import readme_fixture

ROOT = Path(__file__).resolve().parents[1]
CONTINUE = "<!-- readme-test: continue -->"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, continues the previous block) for every ```python fence."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((line, m.group(1), before == CONTINUE))
    return blocks


BLOCKS = python_blocks((ROOT / "README.md").read_text())


def test_the_readme_has_snippets():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def snippet_runs(tmp_path_factory):
    """Run every block once, in order, each in its own working directory."""
    root = tmp_path_factory.mktemp("readme")
    results: dict[int, BaseException | None] = {}
    ns: dict = {}
    work = root
    cwd = os.getcwd()
    for line, code, continues in BLOCKS:
        if not (continues and ns):
            work = root / f"block-{line}"
            work.mkdir()
            ns = {"__name__": f"readme_line_{line}", **readme_fixture.namespace(work)}
        os.chdir(work)
        try:
            exec(compile(code, f"README.md:{line}", "exec"), ns)
            results[line] = None
        except BaseException as exc:  # reported per block below
            results[line] = exc
        finally:
            os.chdir(cwd)
    return results


@pytest.mark.parametrize("line", [b[0] for b in BLOCKS], ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_snippet_runs(snippet_runs, line):
    error = snippet_runs[line]
    if error is not None:
        raise AssertionError(f"the README snippet at line {line} fails: {type(error).__name__}: {error}") from error
