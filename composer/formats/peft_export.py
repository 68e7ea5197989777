"""Export to HF PEFT's format: the method's codec writes its config and tensors, the host adds
what every method shares (``modules_to_save`` copies, ``task_type``, ``base_model_name_or_path``,
``peft_version``, suffix-style ``target_modules`` and ``layers_to_transform``), and the pair of
files is committed crash-safely, the config last (:mod:`adapter_composer.formats.commit`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapter_composer.errors import AdapterFileError, ComposerError, UnknownAdapterError
from adapter_composer.formats.commit import commit_fixed_files
from adapter_composer.formats.files import contiguous, is_sharded
from adapter_composer.formats.peft_options import (
    PATH_LISTS,
    PEFT_FORMAT_VERSION,
    PREFIX,
    peft_task_type,
    suffix_targets,
)
from adapter_composer.pipeline.graph import Graph, OperatorSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


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


def _always_on(graph: Graph, name: str) -> bool:
    """Whether adapter ``name`` acts on every call: no route, sum or mix above it."""
    parents = [s for s in graph.specs.values() if isinstance(s, OperatorSpec) and name in s.children]
    return all(p.operator == "stack" and _always_on(graph, p.name) for p in parents)


def _modules_to_save(composed: Any, modules: Sequence[str] | None) -> list[str]:
    copies = [n for n, h in composed.adapters.items() if h.method == "module"]
    if modules is None:
        return [n for n in copies if _always_on(composed.graph, n)]
    wrong = [m for m in modules if m not in copies]
    if wrong:
        raise ComposerError(
            f"modules={wrong} are not 'module' adapters of this composition (those are: {sorted(copies)})"
        )
    return list(modules)


def peft_metadata(
    composed: Any,
    peft_config: Mapping[str, Any],
    infos: list[Any],
    module_paths: list[str],
    *,
    base_model_name_or_path: str | None,
    revision: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """The fields PEFT writes besides the method's own, and suffix-style target names.

    ``task_type`` follows the model class (``BertForSequenceClassification`` → ``SEQ_CLS``),
    ``base_model_name_or_path`` the model's ``config._name_or_path`` (where it was loaded
    from), ``peft_version`` the PEFT format these files follow (:data:`PEFT_FORMAT_VERSION`)."""
    model = composed.model
    out = dict(peft_config)
    out["task_type"] = task_type or out.get("task_type") or peft_task_type(model)
    out["base_model_name_or_path"] = base_model_name_or_path or (
        getattr(getattr(model, "config", None), "_name_or_path", None) or None
    )
    out["revision"] = revision
    out["peft_version"] = PEFT_FORMAT_VERSION
    out["modules_to_save"] = sorted(module_paths) or None
    paths = sorted({i.path for i in infos})
    if isinstance(out.get("target_modules"), list) and sorted(out["target_modules"]) == paths:
        layered = "layers_to_transform" in out  # PEFT's config class of this method has the field
        subsets = [out[k] for k in PATH_LISTS[1:] if isinstance(out.get(k), list) and set(out[k]) <= set(paths)]
        spec = suffix_targets(
            paths, composed._analysis.resolver.names, module_paths, use_layers=layered, subsets=subsets
        )
        for key in PATH_LISTS:
            if isinstance(out.get(key), list):
                out[key] = sorted({spec.name_of.get(p, p) for p in out[key]})
        if layered:
            out["layers_to_transform"] = spec.layers_to_transform
            out["layers_pattern"] = spec.layers_pattern
    return out


def export_peft(
    composed: Any,
    name: str,
    directory: Path,
    *,
    modules: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write adapter ``name`` as PEFT does, with ``modules`` (``module`` adapters; by default
    every one that acts on every call) as ``modules_to_save``."""
    if name not in composed.adapters:
        raise UnknownAdapterError(f"no adapter {name!r}; adapters: {sorted(composed.adapters)}")
    handle = composed.adapters[name]
    record = composed.registry.method(handle.method)
    if handle.method == "module":
        raise ComposerError(
            f"adapter {name!r} is a whole-module copy: PEFT saves those as modules_to_save of another adapter; "
            f"export that one, e.g. to_peft('<lora adapter>', directory, modules=[{name!r}])"
        )
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
    module_paths = []
    for copy_name in _modules_to_save(composed, modules):
        copies = composed.adapters[copy_name]
        for info in composed._rt.infos[copy_name].values():
            if info.path in module_paths:
                raise ComposerError(
                    f"two of modules={list(modules or [])} copy {info.path!r}; a PEFT file holds one copy per module"
                )
            module_paths.append(info.path)
            for t, value in copies.modules[info.key].state_dict().items():
                tensors[f"{PREFIX}{info.path}.{t}"] = value
    peft_config = peft_metadata(
        composed,
        codec.to_peft(handle.config, infos),
        infos,
        module_paths,
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,
        task_type=task_type,
    )
    tensors = contiguous(tensors)
    files = {
        WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        CONFIG: json.dumps(peft_config, indent=2).encode(),
    }
    return commit_fixed_files(directory, files, CONFIG)  # weights first, the config last


__all__ = ["CONFIG", "WEIGHTS", "export_peft", "join_tensors", "peft_metadata"]
