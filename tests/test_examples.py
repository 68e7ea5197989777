"""The fast examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_multi_tenant_serving():
    out = _run("multi_tenant_serving.py")
    assert "served 4 requests" in out and "hot-loaded tenant 'hooli'" in out and "retired tenant 'initech'" in out


def test_multitask_walkthrough(tmp_path):
    import json

    out = _run("multitask_walkthrough.py", "--steps", "40", "--out", str(tmp_path))
    assert "| lora route |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    for setup in ("lora per task", "lora route", "lora mix"):
        assert results[setup]["scores"]["sentiment"] > 0.7, results
