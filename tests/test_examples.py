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
