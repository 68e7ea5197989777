"""Saving and loading compositions: ``composition.json`` plus one safetensors file per adapter.

Writes are atomic: everything goes to a temporary sibling directory that replaces the
target in one rename. Reads check the base model's fingerprint and every tensor's name and
shape before anything is applied, and say exactly what does not match. Never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from registry import Registry

from .errors import AdapterFileError, CompositionError
from .graph import Graph

FORMAT = "adapter-composer.composition"
VERSION = 1
MANIFEST = "composition.json"


# --- fingerprint ----------------------------------------------------------------------


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Model type, class and every parameter's shape (names as in the unpatched model)."""
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "class": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
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


# --- atomic directory writes ----------------------------------------------------------


def _safe_filename(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return stem if stem == name else f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def write_directory_atomically(directory: Path, files: Mapping[str, Any], marker: str) -> Path:
    """Write ``files`` (name → bytes, or a callable(path) that writes) as ``directory``.

    The target is replaced in one rename. An existing directory is only replaced when it
    holds ``marker`` (a previous save) or is empty, so that nothing unrelated is lost.
    """
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise AdapterFileError(f"{directory} exists and is not a directory")
        entries = list(directory.iterdir())
        if entries and not (directory / marker).exists():
            raise AdapterFileError(
                f"{directory} is a non-empty directory without {marker}; refusing to overwrite it"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for name, content in files.items():
            target = tmp / name
            if callable(content):
                content(target)
            else:
                target.write_bytes(content)
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every failure into an :class:`AdapterFileError`."""
    if not path.is_file():
        raise AdapterFileError(f"missing file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from None


def check_tensors(
    where: str, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Names and shapes that do not match, as readable lines."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(
            f"{where}: missing tensors {missing[:6]}"
            + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        )
    if extra:
        problems.append(
            f"{where}: unexpected tensors {extra[:6]}"
            + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
        )
    for k in sorted(set(expected) & set(tensors)):
        if tuple(tensors[k].shape) != tuple(expected[k]):
            problems.append(
                f"{where}: tensor {k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(expected[k])}"
            )
    return problems


# --- save / load ----------------------------------------------------------------------


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_composition(composed: Any, directory: Path) -> Path:
    files: dict[str, Any] = {}
    adapters = {}
    for name, handle in composed.adapters.items():
        fname = _safe_filename(name) + ".safetensors"
        tensors = _contiguous(handle.state_dict())
        files[fname] = lambda p, t=tensors, n=name, m=handle.method: save_file(
            t, str(p), metadata={"adapter": n, "method": m}
        )
        adapters[name] = {"file": fname, "method": handle.method, "tensors": len(tensors)}
    operators = {}
    for node, module in composed._rt.shared.items():
        tensors = {f"{node}.{k}": v for k, v in module.state_dict().items()}
        operators.update(tensors)
    if operators:
        tensors = _contiguous(operators)
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


def load(
    model: nn.Module,
    directory: str | Path,
    *,
    registry: Registry | None = None,
    check_base: bool = True,
) -> Any:
    """Apply a saved composition to ``model`` and load its weights.

    Refuses a base model whose fingerprint differs (``check_base=False`` skips that check;
    tensor shapes are always checked). On any error the model is left unchanged.
    """
    from .api import compose

    directory = Path(directory)
    manifest = read_manifest(directory)
    if check_base:
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
    composed = compose(model, graph, registry=registry)
    try:
        problems = []
        for name, tensors in files.items():
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
        problems += check_tensors("operators.safetensors", op_tensors, expected_ops)
        if problems:
            raise AdapterFileError(
                f"{directory} does not fit the composition it describes:\n  "
                + "\n  ".join(problems)
            )
        for name, tensors in files.items():
            composed.adapters[name].load_tensors(tensors)
        _load_operator_tensors(composed, op_tensors)
    except BaseException:
        composed.undo()
        raise
    return composed


@torch.no_grad()
def _load_operator_tensors(composed: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    for node, module in composed._rt.shared.items():
        for k, v in module.state_dict(keep_vars=True).items():
            v.copy_(tensors[f"{node}.{k}"].to(dtype=v.dtype, device=v.device))
