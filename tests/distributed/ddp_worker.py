"""Launched by test_ddp.py under torchrun (2 processes, gloo, CPU): routed multi-task training
with the library's train(); every rank saves its adapters for the test to compare."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from adapter_composer.registry import load_registry  # noqa: E402
from adapter_composer.workflow.training import TrainConfig, train  # noqa: E402
from tests.composer.test_training import _setup  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1234 + rank)  # different local RNG: DDP must still agree
    composed, heads, tasks, tok = _setup(load_registry(entry_points=False))
    config = TrainConfig(steps=6, batch_size=8, lr=1e-2, progress=False, seed=0)
    train(composed, heads, tasks, tok, config, out_dir=out / "run")
    tensors = {f"{n}.{k}": v.contiguous() for n, h in composed.adapters.items() for k, v in h.state_dict().items()}
    tensors.update({f"heads.{k}": v.contiguous() for k, v in heads.state_dict().items()})
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
