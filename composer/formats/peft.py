"""Import from and export to HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The host handles files; each method's codec (``register.method(..., peft=codec)``)
translates its config and its tensor names. A codec has:

    peft_types                      PEFT's ``peft_type`` values it reads
    from_peft(peft_config) -> dict  our config (keyword arguments) from adapter_config.json
    to_peft(config, sites) -> dict  adapter_config.json for an adapter at these sites
    tensor_names                    PEFT tensor suffix -> our tensor name, for per-module
                                    tensors ``base_model.model.<module path>.<suffix>``
    split_tensors(raw), join_tensors(handle, sites)   optional, for other layouts (shared
                                    or model-level tensors); see :func:`split_tensors`.

Tensors are grouped by *where* they belong: a module path (a site), ``"shared"`` (the
adapter's shared module) or ``"model"`` (a model-level site). ``peft`` is never imported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapter_composer.errors import AdapterFileError
from adapter_composer.formats.files import (
    check_tensors,
    contiguous,
    is_sharded,
    read_safetensors,
    write_directory_atomically,
)
from adapter_composer.pipeline.graph import Graph
from adapter_composer.registry import MethodRecord, Registry, default_registry

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter read from disk, ready to be declared in a graph and loaded."""

    method: str
    config: Mapping[str, Any]
    targets: tuple[str, ...]
    tensors: Mapping[str, Mapping[str, torch.Tensor]]  # module path -> our tensor name -> tensor
    source: Path

    def declare(self, graph: Graph, name: str) -> str:
        """Declare this adapter in ``graph`` under ``name``."""
        targets = list(self.targets) if self.targets else None
        return graph.adapter(name, self.method, targets=targets, **dict(self.config))

    def load_into(self, composed: Any, name: str) -> None:
        """Copy the weights into adapter ``name`` of ``composed`` (checked first)."""
        handle = composed.adapters[name]
        tensors = {f"{key}.{t}": v for key in handle.modules for t, v in self._for(key).items()}
        tensors.update({f"shared.{t}": v for t, v in self.tensors.get("shared", {}).items()})
        problems = check_tensors(f"{self.source}", tensors, handle.expected_shapes())
        if problems:
            raise AdapterFileError(
                "the PEFT adapter does not fit the model:\n  " + "\n  ".join(problems)
            )
        handle.load_tensors(tensors)

    def _for(self, key: str) -> Mapping[str, torch.Tensor]:
        where = key[len("module.") :] if key.startswith("module.") else key
        return self.tensors.get(where, {})


def unsupported_options(
    peft: Mapping[str, Any], defaults: Mapping[str, Any], *, bias: bool = True
) -> list[str]:
    """The options of a PEFT config this codec cannot honour, as ``key=value`` strings: any
    of ``defaults`` set to something else (unset, ``None`` and empty count as default), and a
    ``bias`` other than "none"."""
    problems = [
        f"{k}={peft[k]!r}"
        for k, default in defaults.items()
        if peft.get(k, default) not in (default, None, [], {})
    ]
    if bias and peft.get("bias", "none") != "none":
        problems.append(f"bias={peft['bias']!r}")
    return problems


def split_tensors(
    raw: Mapping[str, torch.Tensor], names: Mapping[str, str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``base_model.model.<path>.<suffix>`` tensors by module path, renamed to ours."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"tensor {key!r} does not start with {PREFIX!r}")
        body = key[len(PREFIX) :]
        for suffix, ours in names.items():
            if body.endswith("." + suffix):
                out.setdefault(body[: -len(suffix) - 1], {})[ours] = value
                break
        else:
            raise ValueError(f"tensor {key!r} is not one this method has ({sorted(names)})")
    return out


def join_tensors(
    handle: Any, sites: list[Any], names: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_tensors` for an adapter's per-site modules."""
    ours_to_peft = {v: k for k, v in names.items()}
    tensors: dict[str, torch.Tensor] = {}
    for info in sites:
        for t, value in handle.modules[info.key].state_dict().items():
            if t in ours_to_peft:
                tensors[f"{PREFIX}{info.path}.{ours_to_peft[t]}"] = value
    return tensors


def _method_for(registry: Registry, peft_type: str) -> MethodRecord:
    for record in registry.methods.values():
        if record.peft is not None and peft_type in record.peft.peft_types:
            return record
    known = sorted(
        t for r in registry.methods.values() if r.peft is not None for t in r.peft.peft_types
    )
    raise AdapterFileError(
        f"no installed method reads PEFT adapters of type {peft_type!r}; readable types: {known}"
    )


def read_peft(directory: str | Path, *, registry: Registry | None = None) -> PeftAdapter:
    """Read a PEFT adapter directory (without touching any model)."""
    registry = registry or default_registry()
    directory = Path(directory)
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        raise AdapterFileError(f"{directory} holds no {CONFIG}; is it a PEFT adapter directory?")
    try:
        peft_config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{cfg_path} is not valid JSON: {exc}") from None
    method = _method_for(registry, str(peft_config.get("peft_type")))
    try:
        config = method.peft.from_peft(peft_config)
    except ValueError as exc:
        raise AdapterFileError(f"{cfg_path}: {exc}") from None
    raw = read_safetensors(directory / WEIGHTS)
    codec = method.peft
    try:
        tensors = (
            codec.split_tensors(raw)
            if hasattr(codec, "split_tensors")
            else split_tensors(raw, codec.tensor_names)
        )
    except ValueError as exc:
        raise AdapterFileError(f"{directory / WEIGHTS}: {exc}") from None
    targets = tuple(sorted(w for w in tensors if w not in ("shared", "model")))
    return PeftAdapter(method.name, config, targets, tensors, directory)


def export_peft(composed: Any, name: str, directory: Path) -> Path:
    if name not in composed.adapters:
        raise KeyError(f"no adapter {name!r}; adapters: {sorted(composed.adapters)}")
    handle = composed.adapters[name]
    record = composed.registry.method(handle.method)
    if record.peft is None:
        raise AdapterFileError(
            f"method {handle.method!r} has no PEFT equivalent, so adapter {name!r} cannot be exported"
        )
    infos = list(composed._rt.infos[name].values())
    sliced = [i.key for i in infos if i.out_slice is not None]
    if sliced:
        raise AdapterFileError(
            f"adapter {name!r} acts on parts of fused layers ({', '.join(sliced[:4])}), which PEFT cannot express; "
            "target the fused module (e.g. 'attn.qkv' on GPT-2) to export it"
        )
    if any(is_sharded(p) for p in handle.parameters()):
        raise AdapterFileError(
            f"adapter {name!r} lives in a sharded (FSDP) model: save() the composition from it "
            "(every rank calls save), load that into an unsharded model and export from there"
        )
    codec = record.peft
    tensors = (
        codec.join_tensors(handle, infos)
        if hasattr(codec, "join_tensors")
        else join_tensors(handle, infos, codec.tensor_names)
    )
    peft_config = record.peft.to_peft(handle.config, infos)
    tensors = contiguous(tensors)
    files = {
        WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        CONFIG: json.dumps(peft_config, indent=2).encode(),
    }
    return write_directory_atomically(directory, files, CONFIG)
