"""FSDP2 (``fully_shard``) on CPU: two gloo processes, launched by torchrun and by ``accelerate
launch`` with an FSDP config file. Two-process training gives the adapters one process gives;
the composition saved from the sharded model loads bit-identically into an unsharded one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapter_composer as ac
from tests.distributed.fsdp_setup import PROBE_KEYS, composed_model, probe, train
from tests.models import tiny_llama

WORKER = Path(__file__).with_name("fsdp_worker.py")
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: "no"
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""


@pytest.fixture(scope="module")
def reference():
    """One process, no sharding: the same steps on whole batches."""
    model, composed = composed_model()
    losses = train(model, composed)
    return {f"{n}.{k}": v.detach().clone() for n, h in composed.adapters.items() for k, v in h.state_dict().items()}, losses


def _launch(launcher: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    else:
        config = out / "fsdp.yaml"
        config.write_text(ACCELERATE_CONFIG)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    proc = subprocess.run([*cmd, str(WORKER), str(out), launcher], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_fsdp_matches_one_process_and_saves_a_loadable_composition(launcher, reference, tmp_path):
    _launch(launcher, tmp_path)
    expected, expected_losses = reference
    gathered = load_file(str(tmp_path / "gathered.safetensors"))
    outputs = load_file(str(tmp_path / "outputs.safetensors"))
    assert gathered.keys() == expected.keys() and len(gathered) == 2 * 2 * 2 * 2 + 2 * 2 * 2
    worst = max((gathered[k] - expected[k]).abs().max().item() for k in expected)
    print(f"{launcher}: 2-process FSDP vs 1 process, max |Δ| over adapter weights {worst:.2e}")
    assert worst < 1e-5
    # each rank saw its own rows; the mean of the two ranks' losses is the whole batch's loss
    losses = outputs["losses"]  # [rank, step]
    assert losses.shape == (2, len(expected_losses)) and not torch.equal(losses[0], losses[1])
    torch.testing.assert_close(losses.mean(0), torch.tensor(expected_losses), rtol=0, atol=1e-5)
    # saved from the sharded model → loaded into an unsharded one: the same tensors, bit for bit
    fresh = tiny_llama()
    loaded = ac.load(fresh, tmp_path / "saved")
    for name, handle in loaded.adapters.items():
        for k, v in handle.state_dict().items():
            assert torch.equal(v, gathered[f"{name}.{k}"]), f"{name}.{k}"
    assert loaded._rt.shared  # the mix's router weights travelled too
    with torch.no_grad():
        logits = fresh(**probe(), route=PROBE_KEYS).logits
    torch.testing.assert_close(logits, outputs["logits"], rtol=0, atol=1e-6)
