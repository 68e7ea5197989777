"""Training checkpoints: ``<out_dir>/checkpoints/step-N``, written atomically.

A checkpoint holds the composition (``Composed.save``, loadable on its own with
``adapter_composer.load``), the heads beside it, the optimizer and scheduler, the sampler's
position and the RNG states, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.workflow.mixture import MixtureSampler

CHECKPOINTS = "checkpoints"
CALLBACKS = "callbacks.safetensors"  # stateful callbacks (AdaLoRA's controller), by position


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, values in state["state"].items():
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _stateful(callbacks: Sequence[Any]) -> list[tuple[int, Any]]:
    """The callbacks with checkpoint state (``checkpoint_state()`` / ``load_checkpoint_state()``)."""
    return [(i, cb) for i, cb in enumerate(callbacks) if callable(getattr(cb, "checkpoint_state", None))]


def save_checkpoint(directory: Path, step: int, composed: Any, heads: nn.Module, optimizer: Any, scheduler: Any, sampler: MixtureSampler, config: Any, callbacks: Sequence[Any] = ()) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temporary directory renamed into place)."""
    root = Path(directory) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    composed.save(tmp / "composition")
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(tmp / "heads.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    states = {f"{i}/{k}": v.contiguous() for i, cb in _stateful(callbacks) for k, v in cb.checkpoint_state().items()}
    if states:
        save_file(states, str(tmp / CALLBACKS))
    trainer = {
        "step": step,
        "config": asdict(config),
        "optimizer": meta,
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "python_random": repr(random.getstate()),
    }
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    root = Path(directory) / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    return steps[-1] if steps else None


def load_checkpoint(path: Path, composed: Any, heads: nn.Module, optimizer: Any, scheduler: Any, sampler: MixtureSampler, callbacks: Sequence[Any] = ()) -> int:
    from adapter_composer.formats.composition import read_manifest
    from adapter_composer.formats.files import read_safetensors

    manifest = read_manifest(path / "composition")
    for name, entry in manifest["adapters"].items():
        if name not in composed.adapters:
            raise ComposerError(f"checkpoint {path} holds adapter {name!r}, which this composition does not have")
        composed.replace_weights(name, read_safetensors(path / "composition" / entry["file"]))
    if manifest.get("operators_file"):
        from adapter_composer.formats.composition import load_operator_tensors

        load_operator_tensors(composed, read_safetensors(path / "composition" / manifest["operators_file"]))
    heads.load_state_dict(load_file(str(path / "heads.safetensors")))
    trainer = json.loads((path / "trainer.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, trainer["optimizer"]))
    scheduler.load_state_dict(trainer["scheduler"])
    sampler.load_state_dict(trainer["sampler"])
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(ast.literal_eval(trainer["python_random"]))
    _load_callback_states(path, callbacks)
    return int(trainer["step"])


def _load_callback_states(path: Path, callbacks: Sequence[Any]) -> None:
    """Give each stateful callback the state it saved (by position in ``callbacks``)."""
    stateful = _stateful(callbacks)
    saved: dict[int, dict[str, torch.Tensor]] = {}
    if (path / CALLBACKS).exists():
        for name, value in load_file(str(path / CALLBACKS)).items():
            index, _, key = name.partition("/")
            saved.setdefault(int(index), {})[key] = value
    if sorted(saved) != [i for i, _ in stateful]:
        raise ComposerError(
            f"checkpoint {path} holds the state of callbacks at positions {sorted(saved)}, but this run's "
            f"stateful callbacks are at {[i for i, _ in stateful]}: resume with the callbacks the run was started "
            "with (e.g. the same AdaLoraController), in the same order"
        )
    for i, cb in stateful:
        cb.load_checkpoint_state(saved[i])

