"""Our composition directory: ``composition.json`` plus one safetensors file per adapter.

Writes are atomic (:func:`adapter_composer.formats.files.write_directory_atomically`). Reads
check the base model's fingerprint and every tensor's name and shape before anything is
applied, and say exactly what does not match. Never unpickles. Composing the model from a
read directory is :func:`adapter_composer.load`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adapter_composer.errors import AdapterFileError, CompositionError
from adapter_composer.formats.files import (
    check_tensors,
    contiguous,
    is_sharded,
    read_safetensors,
    safe_filename,
    write_directory_atomically,
    write_from_every_rank,
)
from adapter_composer.pipeline.graph import Graph
from adapter_composer.registry import Registry
from adapter_composer.sites import logical_shape

FORMAT = "adapter-composer.composition"
VERSION = 1
MANIFEST = "composition.json"


# --- fingerprint ----------------------------------------------------------------------


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Model type, class and every parameter's shape (names as in the unpatched model).

    Shapes are logical: a bitsandbytes 4-bit weight counts as the [out, in] matrix it packs,
    so a composition trained on a quantised base loads onto the full-precision model (and
    back), which is how QLoRA adapters are deployed."""
    shapes = {name: list(logical_shape(p)) for name, p in model.named_parameters()}
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "class": type(model).__name__,
        "num_parameters": sum(math.prod(v) for v in shapes.values()),
        "shapes_sha256": digest,
        "shapes": shapes,
    }


def fingerprint_differences(saved: Mapping[str, Any], model: nn.Module) -> list[str]:
    """What differs between a saved fingerprint and ``model`` (empty when they match)."""
    now = fingerprint(model)
    if (
        saved.get("shapes_sha256") == now["shapes_sha256"]
        and saved.get("model_type") == now["model_type"]
    ):
        return []
    out = []
    if saved.get("model_type") != now["model_type"]:
        out.append(
            f"model type: saved on {saved.get('model_type')!r}, this model is {now['model_type']!r}"
        )
    old, new = saved.get("shapes", {}), now["shapes"]
    changed = [k for k in old if k in new and list(old[k]) != list(new[k])]
    for k in changed[:8]:
        out.append(f"parameter {k}: saved shape {tuple(old[k])}, this model {tuple(new[k])}")
    if len(changed) > 8:
        out.append(f"... and {len(changed) - 8} more parameters with other shapes")
    missing = [k for k in old if k not in new]
    extra = [k for k in new if k not in old]
    if missing:
        out.append(
            f"{len(missing)} parameter(s) of the saved base are missing here, e.g. {missing[:3]}"
        )
    if extra:
        out.append(f"{len(extra)} parameter(s) here were not in the saved base, e.g. {extra[:3]}")
    return out or ["the parameter shapes differ"]


# --- save / load ----------------------------------------------------------------------


def save_composition(composed: Any, directory: Path) -> Path:
    """Write the directory. On a model sharded with FSDP2 every rank calls this: the tensors
    are gathered whole (bit for bit) and rank 0 writes them."""
    files: dict[str, Any] = {}
    adapters = {}
    sharded = any(is_sharded(p) for m in composed._rt.all_modules() for p in m.parameters())
    for name, handle in composed.adapters.items():
        fname = safe_filename(name) + ".safetensors"
        tensors = contiguous(handle.state_dict())
        files[fname] = lambda p, t=tensors, n=name, m=handle.method: save_file(
            t, str(p), metadata={"adapter": n, "method": m}
        )
        adapters[name] = {"file": fname, "method": handle.method, "tensors": len(tensors)}
    operators = {}
    for node, module in composed._rt.shared.items():
        tensors = {f"{node}.{k}": v for k, v in module.state_dict().items()}
        operators.update(tensors)
    if operators:
        tensors = contiguous(operators)
        files["operators.safetensors"] = lambda p, t=tensors: save_file(
            t, str(p), metadata={"content": "operator weights"}
        )
    registry: Registry = composed.registry
    methods = {}
    for handle in composed.adapters.values():
        record = registry.method(handle.method)
        methods[handle.method] = {
            "plugin": record.plugin,
            "version": registry.plugin_version(record.plugin),
        }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "graph": composed.graph.to_dict(),
        "methods": methods,
        "adapters": adapters,
        "operators_file": "operators.safetensors" if operators else None,
        "base_model": composed.fingerprint,
    }
    files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    if sharded:
        return write_from_every_rank(directory, files, MANIFEST)
    return write_directory_atomically(directory, files, MANIFEST)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise AdapterFileError(f"{directory} holds no {MANIFEST}; is it a saved composition?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not an adapter-composer composition (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise AdapterFileError(
            f"{path} has format version {manifest.get('version')!r}; this library reads {VERSION}"
        )
    return manifest


@dataclass(frozen=True)
class SavedComposition:
    """A composition directory read from disk and checked, before any model is touched."""

    directory: Path
    manifest: Mapping[str, Any]
    graph: Graph
    adapter_tensors: Mapping[str, Mapping[str, torch.Tensor]]  # adapter -> tensor name -> tensor
    operator_tensors: Mapping[str, torch.Tensor]

    def check_against(self, composed: Any) -> None:
        """Raise :class:`AdapterFileError` unless every tensor fits ``composed`` (names, shapes)."""
        entries = self.manifest.get("adapters", {})
        problems = []
        for name, tensors in self.adapter_tensors.items():
            problems += check_tensors(
                f"adapter {name!r} ({entries[name]['file']})",
                tensors,
                composed.adapters[name].expected_shapes(),
            )
        expected_ops = {
            f"{node}.{k}": tuple(v.shape)
            for node, m in composed._rt.shared.items()
            for k, v in m.state_dict().items()
        }
        problems += check_tensors("operators.safetensors", self.operator_tensors, expected_ops)
        if problems:
            raise AdapterFileError(
                f"{self.directory} does not fit the composition it describes:\n  "
                + "\n  ".join(problems)
            )

    def load_into(self, composed: Any) -> None:
        """Check, then copy every tensor into ``composed``."""
        self.check_against(composed)
        for name, tensors in self.adapter_tensors.items():
            composed.adapters[name].load_tensors(tensors)
        load_operator_tensors(composed, self.operator_tensors)


def read_composition(
    directory: str | Path, model: nn.Module | None = None, *, check_base: bool = True
) -> SavedComposition:
    """Read and check a saved composition (against ``model``'s fingerprint when given)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if check_base and model is not None:
        diffs = fingerprint_differences(manifest.get("base_model", {}), model)
        if diffs:
            raise AdapterFileError(
                f"{directory} was saved on a different base model:\n  " + "\n  ".join(diffs) + "\n"
                "Load it onto the model it was trained on (or pass check_base=False to try anyway)."
            )
    try:
        graph = Graph.from_dict(manifest.get("graph"))
    except CompositionError as exc:
        raise AdapterFileError(f"{directory / MANIFEST} holds an invalid graph:\n{exc}") from None
    entries = manifest.get("adapters", {})
    if set(entries) != set(graph.adapters):
        raise AdapterFileError(
            f"{directory / MANIFEST}: adapter files {sorted(entries)} do not match the graph's adapters {sorted(graph.adapters)}"
        )
    files = {name: read_safetensors(directory / entry["file"]) for name, entry in entries.items()}
    op_tensors = (
        read_safetensors(directory / manifest["operators_file"])
        if manifest.get("operators_file")
        else {}
    )
    return SavedComposition(directory, manifest, graph, files, op_tensors)


@torch.no_grad()
def load_operator_tensors(composed: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    for node, module in composed._rt.shared.items():
        for k, v in module.state_dict(keep_vars=True).items():
            v.copy_(tensors[f"{node}.{k}"].to(dtype=v.dtype, device=v.device))
