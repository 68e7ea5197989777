"""Our composition directory: ``composition.json`` plus one safetensors file per adapter.

    composition.json                     the manifest (schema: adapter_composer.formats.manifest)
    adapter.<name>.<token>.safetensors   one per adapter, architecture-neutral tensor names
    operators.<token>.safetensors        operator weights (sum weights, routers), if any

``<token>`` is new for every save: a save writes new files and then replaces the manifest,
which is the commit point (:func:`adapter_composer.formats.commit.commit_with_manifest`),
so the directory always holds one complete save, and other files in it are left alone.

:func:`read_composition` checks everything before any module is built — the manifest and
the graph against strict schemas, every adapter config against its method's schema with
no coercion, the base model's fingerprint, each file's tensor names, shapes and dtypes
from the safetensors headers against the shapes the composition would build (planned on
the meta device), then NaN/Inf in the values — and says exactly what does not match.
Never unpickles. Composing the model from a read directory is :func:`adapter_composer.load`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from adapter_composer.errors import AdapterFileError, CompositionError
from adapter_composer.formats.commit import commit_from_every_rank, commit_with_manifest, new_token
from adapter_composer.formats.files import (
    NONFINITE_FIX,
    check_finite,
    check_fit,
    contiguous,
    dtypes,
    is_sharded,
    member,
    read_safetensors,
    strict_problems,
    tensor_headers,
)
from adapter_composer.formats.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    Manifest,
    fingerprint,
    fingerprint_differences,
    load_manifest,
    parse_manifest,
    read_manifest_bytes,
    referenced_files,
)
from adapter_composer.pipeline.graph import Graph
from adapter_composer.registry import Registry, default_registry

# --- save -------------------------------------------------------------------------------


def _stems(names: list[str]) -> dict[str, str]:
    """A file stem per adapter name, distinct even on case-insensitive file systems."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        stem = name if len(name) <= 80 else name[:64]
        if stem.casefold() in used or stem != name:
            stem = f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        used.add(stem.casefold())
        out[name] = stem
    return out


def _normalized(values: Mapping[str, Any], validated: Any) -> dict[str, Any]:
    """The keys the user gave, with the values as the schema holds them (``r=8.0`` → ``8``),
    so that the strict read of the saved file accepts exactly what was composed."""
    dumped = validated.model_dump(mode="json") if validated is not None else {}
    return {k: dumped.get(k, v) for k, v in values.items()}


def _saved_graph(composed: Any) -> dict[str, Any]:
    data = composed.graph.to_dict()
    for node in data["nodes"]:
        if node["type"] == "adapter":
            handle = composed.adapters.get(node["name"])
            node["config"] = _normalized(node["config"], handle.config if handle is not None else None)
        else:
            node["options"] = _normalized(node["options"], composed._analysis.options.get(node["name"]))
    return data


def save_composition(composed: Any, directory: Path) -> Path:
    """Write ``composed`` to ``directory`` (see the module docstring); returns the directory."""
    token = new_token()
    files: dict[str, bytes] = {}
    adapters = {}
    stems = _stems(list(composed.adapters))
    sharded = any(is_sharded(p) for m in composed._rt.all_modules() for p in m.parameters())
    for name, handle in composed.adapters.items():
        fname = f"adapter.{stems[name]}.{token}.safetensors"
        tensors = contiguous(handle.state_dict())
        files[fname] = save(tensors, metadata={"adapter": name, "method": handle.method})
        adapters[name] = {"file": fname, "method": handle.method, "tensors": len(tensors)}
    operators = {
        f"{node}.{k}": v for node, module in composed._rt.shared.items() for k, v in module.state_dict().items()
    }
    operators_file = f"operators.{token}.safetensors" if operators else None
    if operators_file is not None:
        files[operators_file] = save(contiguous(operators), metadata={"content": "operator weights"})
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
        "graph": _saved_graph(composed),
        "methods": methods,
        "adapters": adapters,
        "operators_file": operators_file,
        "base_model": composed.fingerprint,
    }
    data = json.dumps(manifest, indent=2, allow_nan=False).encode()

    def write() -> Path:
        return commit_with_manifest(Path(directory), files, MANIFEST, data, referenced_files, token)

    return commit_from_every_rank(Path(directory), write) if sharded else write()


# --- strict configs ---------------------------------------------------------------------


def graph_config_problems(graph: Graph, registry: Registry) -> list[str]:
    """Every adapter config and operator option in ``graph`` checked strictly against its
    schema (unknown methods and operators are left to validation, which names them)."""
    problems = []
    for name, spec in graph.specs.items():
        if spec.type == "adapter":
            record = registry.methods.get(spec.method)
            if record is not None:
                problems += strict_problems(record.config, spec.config, f"adapter {name!r} ({spec.method})")
        else:
            record = registry.operators.get(spec.operator)
            if record is not None:
                problems += strict_problems(record.options, spec.options, f"{spec.operator} node {name!r}")
    return problems


# --- read -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedComposition:
    """A composition directory read from disk and checked, before any model is touched."""

    directory: Path
    manifest: Manifest
    graph: Graph
    adapter_tensors: Mapping[str, Mapping[str, torch.Tensor]]  # adapter -> tensor name -> tensor
    operator_tensors: Mapping[str, torch.Tensor]

    def check_against(self, composed: Any) -> None:
        """Raise :class:`AdapterFileError` unless every tensor fits ``composed`` (names, shapes)."""
        problems = []
        for name, tensors in self.adapter_tensors.items():
            handle = composed.adapters[name]
            where = f"adapter {name!r} ({self.manifest.adapters[name].file})"
            problems += check_fit(where, tensors, handle.expected_shapes(), dtypes(handle.state_dict()))
        ops = {f"{node}.{k}": v for node, m in composed._rt.shared.items() for k, v in m.state_dict().items()}
        shapes = {k: tuple(v.shape) for k, v in ops.items()}
        problems += check_fit(self._operators_file(), self.operator_tensors, shapes, dtypes(ops))
        if problems:
            raise AdapterFileError(
                f"{self.directory} does not fit the composition it describes:\n  "
                + "\n  ".join(problems)
            )

    def _operators_file(self) -> str:
        return self.manifest.operators_file or "operators (no file)"

    def load_into(self, composed: Any) -> None:
        """Check, then copy every tensor into ``composed``."""
        self.check_against(composed)
        for name, tensors in self.adapter_tensors.items():
            composed.adapters[name].load_tensors(tensors)
        load_operator_tensors(composed, self.operator_tensors)


def _fail(directory: Path, problems: list[str], head: str, fix: str = "") -> AdapterFileError:
    return AdapterFileError(f"{directory} {head}:\n  " + "\n  ".join(problems) + (f"\n{fix}" if fix else ""))


def _check_planned(directory: Path, manifest: Manifest, graph: Graph, registry: Registry, model: nn.Module, headers: Mapping[str, Any]) -> None:
    """Compare the files' headers with the shapes the composition would build (meta device)."""
    from adapter_composer.pipeline.shapes import planned_shapes
    from adapter_composer.pipeline.validate import analyse

    analysis = analyse(graph, registry, model)
    if analysis.diagnostics:
        raise CompositionError(analysis.diagnostics, f"the graph in {directory / MANIFEST}")
    planned = planned_shapes(analysis)
    if planned is None:
        return  # a method that cannot build on the meta device: checked after building
    problems = []
    for name, entry in manifest.adapters.items():
        where = f"adapter {name!r} ({entry.file})"
        problems += check_fit(where, headers[name], planned.adapters[name], planned.adapter_dtypes[name])
    where = manifest.operators_file or "operators (no file)"
    problems += check_fit(where, headers.get("", {}), planned.operators, planned.operator_dtypes)
    if problems:
        raise _fail(directory, problems, "does not fit the composition it describes (nothing was built)")


class _Changed(Exception):
    """The manifest changed while its files were read (a concurrent save): read again."""


def _read_once(
    directory: Path,
    model: nn.Module | None,
    registry: Registry,
    check_base: bool,
    allow_nonfinite: bool,
    only: str | None,
) -> SavedComposition:
    data = read_manifest_bytes(directory)
    manifest = parse_manifest(data, directory / MANIFEST)
    try:
        graph = Graph.from_dict(manifest.graph)
    except CompositionError as exc:
        raise AdapterFileError(f"{directory / MANIFEST} holds an invalid graph:\n{exc}") from None
    if check_base and model is not None:
        diffs = fingerprint_differences(manifest.base_model.model_dump(by_alias=True), model)
        if diffs:
            raise _fail(
                directory,
                diffs,
                "was saved on a different base model",
                "Load it onto the model it was trained on (or pass check_base=False to try anyway).",
            )
    if set(manifest.adapters) != set(graph.adapters):
        raise AdapterFileError(
            f"{directory / MANIFEST}: adapter files {sorted(manifest.adapters)} do not match the graph's adapters {sorted(graph.adapters)}"
        )
    problems = graph_config_problems(graph, registry)
    if problems:
        raise _fail(directory / MANIFEST, problems, "holds values that do not fit their schemas (nothing is coerced)")
    files = {name: entry.file for name, entry in manifest.adapters.items() if only in (None, name)}
    if manifest.operators_file is not None and only is None:
        files[""] = manifest.operators_file
    paths = {name: member(directory, f, MANIFEST) for name, f in files.items()}
    try:
        headers = {name: tensor_headers(path, f"adapter {name!r}") for name, path in paths.items()}
        if model is not None and only is None:
            _check_planned(directory, manifest, graph, registry, model, headers)
        tensors = {name: read_safetensors(path) for name, path in paths.items()}
    except AdapterFileError:
        if read_manifest_bytes(directory) != data:
            raise _Changed from None
        raise
    if not allow_nonfinite:
        problems = [p for name, t in tensors.items() for p in check_finite(files[name], t)]
        if problems:
            raise _fail(directory, problems, "holds non-finite weights", f"If that is intended, {NONFINITE_FIX}.")
    op_tensors = tensors.pop("", {})
    return SavedComposition(directory, manifest, graph, tensors, op_tensors)


def read_composition(
    directory: str | Path,
    model: nn.Module | None = None,
    *,
    check_base: bool = True,
    registry: Registry | None = None,
    allow_nonfinite: bool = False,
    only: str | None = None,
) -> SavedComposition:
    """Read and check a saved composition (against ``model`` when given; see the module
    docstring). ``only``: read the weights of that adapter alone (for a hot swap)."""
    directory = Path(directory)
    registry = registry or default_registry()
    for _ in range(3):
        try:
            return _read_once(directory, model, registry, check_base, allow_nonfinite, only)
        except _Changed:
            continue
    raise AdapterFileError(f"{directory} kept changing while it was read (concurrent saves?); try again")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked manifest of a saved composition directory, as a dict (``composition.json``
    as written; file names are plain names inside the directory)."""
    return load_manifest(directory).model_dump(by_alias=True)


@torch.no_grad()
def load_operator_tensors(composed: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    for node, module in composed._rt.shared.items():
        for k, v in module.state_dict(keep_vars=True).items():
            v.copy_(tensors[f"{node}.{k}"].to(dtype=v.dtype, device=v.device))


__all__ = [
    "MANIFEST",
    "SavedComposition",
    "fingerprint",
    "fingerprint_differences",
    "graph_config_problems",
    "read_composition",
    "read_manifest",
    "save_composition",
    "strict_problems",
]
