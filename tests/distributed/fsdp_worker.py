"""Launched by test_fsdp.py (2 processes, gloo, CPU) with torchrun or with ``accelerate launch``
and an FSDP config file: shard the composed model with FSDP2, train, save the composition
from the sharded model, and write what the test checks it against."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.fsdp_setup import PROBE_KEYS, composed_model, optimizer, probe, train  # noqa: E402


def shard_with_torch(model, composed):
    """The torchrun recipe: one FSDP unit per decoder layer, the rest in the root unit; the
    optimizer is made afterwards, over the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, optimizer(composed)


def shard_with_accelerate(model, composed):
    """accelerate's own FSDP2 preparation (auto-wrap policy etc. from the launcher's config
    file). accelerate 1.15 turns FSDP on only for GPUs and similar devices; on CPU its state
    says "no distribution" (or DDP with cpu=True), so the state is switched to FSDP here,
    which is the only CPU-specific step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # FSDP_* variables set by accelerate launch
    assert plugin.fsdp_version == 2, plugin
    accelerator = Accelerator(fsdp_plugin=plugin)
    assert dist.is_initialized()  # accelerate initialised the (gloo) process group
    for state in (AcceleratorState(), PartialState()):
        state.distributed_type = DistributedType.FSDP
        state.num_processes = dist.get_world_size()
        state.process_index = state.local_process_index = dist.get_rank()
    AcceleratorState().fsdp_plugin = plugin
    return accelerator.prepare(model, optimizer(composed))  # FSDP2 swaps the optimizer's parameters


def main(out: Path, launcher: str) -> None:
    model, composed = composed_model()
    shard = shard_with_torch if launcher == "torchrun" else shard_with_accelerate
    model, opt = shard(model, composed)
    from torch.distributed.fsdp import FSDPModule

    assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    params = composed.parameters()
    assert all(hasattr(p, "full_tensor") for p in params)  # DTensors, each rank holding a shard
    assert sum(p.to_local().numel() for p in params) < sum(p.numel() for p in params)
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = torch.tensor(train(model, composed, rank, world, opt))
    every = [torch.empty_like(losses) for _ in range(world)]
    dist.all_gather(every, losses)
    composed.save(out / "saved")  # every rank: gathered whole, written by rank 0
    gathered = {
        f"{n}.{k}": v.full_tensor().contiguous()
        for n, h in composed.adapters.items()
        for k, v in h.state_dict().items()
    }
    with torch.no_grad():
        logits = model(**probe(), route=PROBE_KEYS).logits
    if rank == 0:
        save_file(gathered, str(out / "gathered.safetensors"))
        save_file({"logits": logits, "losses": torch.stack(every)}, str(out / "outputs.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
