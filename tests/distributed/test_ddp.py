"""Distributed data parallel training on CPU: torchrun, two processes, gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_ranks_end_with_identical_adapters(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), "the ranks disagree after training"
    # trained: the LoRA B matrices moved away from their zero initialisation
    assert any(k.endswith("lora_B") and a[k].abs().sum() > 0 for k in a)
    assert (tmp_path / "run" / "checkpoints").is_dir()  # rank 0 wrote the checkpoint
