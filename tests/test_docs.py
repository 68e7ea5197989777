"""Meta-tests: every hook is documented and exercised, the README's commands are true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import adapter_composer.registry.hookspecs as hookspecs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HOOKS = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "adapter_composer_spec"))


def test_the_contract_has_the_designed_hooks():
    assert (
        sorted(
            [
                "register_methods",
                "register_architectures",
                "register_operators",
                "register_rules",
                "check_graph",
                "build_site",
            ]
        )
        == HOOKS
    )


def test_every_hook_has_a_templated_docstring():
    for name in HOOKS:
        doc = getattr(hookspecs, name).__doc__ or ""
        for part in ("Receives:", "Returns:", "Called:"):
            assert part in doc, f"{name} docstring lacks {part!r}"


def test_every_hook_is_documented_in_the_readme():
    for name in HOOKS:
        assert f"`{name}(" in README, f"hook {name} is not documented in README.md"


def test_every_hook_is_exercised_by_a_test():
    sources = "\n".join(
        p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py"
    )
    examples = "\n".join(p.read_text() for p in (ROOT / "examples").rglob("*.py"))
    for name in HOOKS:
        implemented = re.search(rf"def {name}\(", sources) or (
            re.search(rf"def {name}\(", examples) and "composer_loha" in sources
        )
        assert implemented, f"no test implements hook {name}"


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert "python examples/demo.py" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == commands[1].strip()


def test_the_demo_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "demo.py"),
            "--steps",
            "4",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reload bit-identical: True" in proc.stdout and "undo() restored" in proc.stdout
    assert "[unknown-method]" in proc.stdout and "[unknown-role]" in proc.stdout
