"""Crash injection: a save SIGKILLed before each of its file-system steps, in a child process.

``crash_child.py`` runs every kill point of a save and reports what the library's reader
finds afterwards. At every instant the path must hold the complete old save or the
complete new one (a first save: nothing, or the new one), a later save over the wreck must
work and leave exactly one save's files, and the user's own files are never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child (POSIX)")


def _kill_points(kind: str, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.safety.crash_child", kind, str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(records: list[dict], our_files) -> None:
    over = [r for r in records if not r["fresh"]]
    fresh = [r for r in records if r["fresh"]]
    assert len(over) >= 8 and len(fresh) >= 5, records  # every step of both kinds of save was hit
    for r in records:
        expected = ("none", "new") if r["fresh"] else ("old", "new")
        assert r["state"] in expected, r  # never torn, never unloadable, never a raw error
        assert r["killed"] == (r["step"] != "(not killed)"), r
        assert r["third_loads"] is True, r  # a later save over the wreck works ...
        assert our_files(r["left"]), r  # ... and leaves one save's files, nothing stranded
        assert r["user_files_intact"], r
    # before the commit point the old save is what loads, after it the new one
    states = [r["state"] for r in over]
    assert states == sorted(states, key=lambda s: s != "old") and {"old", "new"} <= set(states)
    assert over[-1]["state"] == fresh[-1]["state"] == "new"


def test_composition_save_survives_a_kill_at_every_step(tmp_path):
    def one_save(left):
        tokens = {name.split(".")[-2] for name in left if name.endswith(".safetensors")}
        if len(tokens) != 1:
            return False
        token = tokens.pop()
        return sorted(n.replace(token, "T") for n in left) == [
            "adapter.a.T.safetensors", "adapter.b.T.safetensors", "composition.json", "operators.T.safetensors"
        ]

    records = _kill_points("composition", tmp_path)
    _check(records, one_save)
    steps = {r["step"].split(" ")[0] for r in records}
    assert {"write", "rename", "remove"} <= steps


def test_peft_export_survives_a_kill_at_every_step(tmp_path):
    records = _kill_points("peft", tmp_path)
    _check(records, lambda left: left == ["adapter_config.json", "adapter_model.safetensors"])
    # the kill between the two renames (new weights beside the old config) still reads as new
    between = [r for r in records if not r["fresh"] and r["step"].startswith("rename .adapter_config.json")]
    assert between and between[0]["state"] == "new"
