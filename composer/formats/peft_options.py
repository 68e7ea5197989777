"""PEFT options the host handles for every method: task types, ``modules_to_save``, target
matching with ``layers_to_transform``, and the metadata fields PEFT writes.

PEFT decides where an adapter acts from its config alone (checked against peft 0.21.2,
``check_target_module_exists``): a module path ``p`` is a target when

    p ∈ target_modules  or  p ends with "." + t for some t ∈ target_modules

and, when ``layers_to_transform`` is set, the index after ``layers_pattern`` in ``p`` (the
first ``<name>.<digits>.`` when no pattern is given) is one of those layers; a path inside a
``modules_to_save`` module is never a target. Exports write the shortest suffixes for which
that rule selects exactly the adapter's sites (``["query", "value"]``), adding
``layers_to_transform`` when only some layers are adapted, and fall back to full paths
otherwise. Imports read ``modules_to_save`` (plus the heads a task type adds:
``SEQ_CLS``/``TOKEN_CLS`` → ``classifier``, ``score``; ``QUESTION_ANS`` → ``qa_outputs``) as
whole-module tensors, and check every adapted path against ``layers_to_transform``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapter_composer.patterns import compile_pattern
from adapter_composer.patterns import match as bounded_match

PREFIX = "base_model.model."
# the PEFT release whose adapter_config.json layout exports follow (and are tested against)
PEFT_FORMAT_VERSION = "0.21.2"
TASK_HEADS: Mapping[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
PATH_LISTS = ("target_modules", "feedforward_modules")  # config fields that list module paths


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model (None for other modules)."""
    if not hasattr(model, "config") or not hasattr(model, "base_model"):
        return None
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False) and name.endswith(
        ("ForConditionalGeneration", "ForSeq2SeqLM")
    ):
        return "SEQ_2_SEQ_LM"
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


# --- PEFT's matching rule -------------------------------------------------------------


def layer_index(path: str, pattern: str | Sequence[str] | None) -> int | None:
    """The layer index PEFT reads from ``path`` for ``layers_to_transform``."""
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:  # the pattern comes from a file: matched in bounded time
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = bounded_match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path, what="layers_pattern")
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def _in_modules(path: str, modules: Iterable[str]) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in modules)


def peft_targets(
    names: Iterable[str],
    targets: Sequence[str],
    layers: Sequence[int] | None = None,
    pattern: str | None = None,
    modules_to_save: Sequence[str] = (),
) -> set[str]:
    """The module paths among ``names`` that PEFT adapts for this list-style config."""
    found = set()
    for path in names:
        if _in_modules(path, modules_to_save):
            continue
        if path not in targets and not any(path.endswith("." + t) for t in targets):
            continue
        if layers is not None:
            index = layer_index(path, pattern)
            if index is None or index not in layers:
                continue
        found.add(path)
    return found


def _layering(path: str) -> tuple[str, int] | None:
    """(layers_pattern, index) for the first ``<name>.<digits>.`` in ``path``."""
    match = re.match(r"(?:^|.*?\.)(?P<name>[^.]+)\.(?P<idx>\d+)\.", path)
    return None if match is None else (match.group("name"), int(match.group("idx")))


@dataclass(frozen=True)
class TargetSpec:
    """How an export names its sites: PEFT fields and each site path's target name."""

    target_modules: list[str]
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None
    name_of: Mapping[str, str] = field(default_factory=dict)


def _subsets_exact(want: set[str], name_of: Mapping[str, str], subsets: Sequence[Iterable[str]]) -> bool:
    """Each subset (e.g. IA3's ``feedforward_modules``), written with the same suffixes, selects
    exactly itself among the targets (PEFT matches these lists with a plain ``str.endswith``)."""
    for subset in subsets:
        subset = set(subset)
        names = {name_of[p] for p in subset}
        if {p for p in want if any(p.endswith(n) for n in names)} != subset:
            return False
    return True


def suffix_targets(
    paths: Iterable[str],
    names: Iterable[str],
    modules_to_save: Sequence[str] = (),
    *,
    use_layers: bool = True,
    subsets: Sequence[Iterable[str]] = (),
) -> TargetSpec:
    """The shortest suffix-style targets PEFT resolves to exactly ``paths`` on a model whose
    module paths are ``names`` (full paths when nothing shorter is exact); with
    ``use_layers``, suffixes restricted by ``layers_to_transform`` count too. ``subsets`` are
    other path lists of the config that must stay exact under the same suffixes."""
    want = set(paths)
    names = list(names)
    layering = {_layering(p) for p in want}
    pattern = None
    if use_layers and None not in layering and len({lp[0] for lp in layering}) == 1:
        pattern = next(iter(layering))[0]
    layers = sorted({lp[1] for lp in layering}) if pattern else None
    depth = max(len(p.split(".")) for p in want)
    for k in range(1, depth + 1):
        name_of = {p: ".".join(p.split(".")[-k:]) for p in want}
        targets = sorted(set(name_of.values()))
        if not _subsets_exact(want, name_of, subsets):
            continue
        if peft_targets(names, targets, modules_to_save=modules_to_save) == want:
            return TargetSpec(targets, name_of=name_of)
        if pattern and peft_targets(names, targets, layers, pattern, modules_to_save) == want:
            return TargetSpec(targets, layers, pattern, name_of)
    return TargetSpec(sorted(want), name_of={p: p for p in want})


# --- import: modules_to_save and layers_to_transform ----------------------------------


@dataclass(frozen=True)
class HostOptions:
    """The options of an adapter_config.json the host handles itself."""

    modules: tuple[str, ...] = ()  # module names whose whole tensors the file may hold
    saved: tuple[str, ...] = ()  # those named by modules_to_save itself (PEFT writes their tensors)
    layers: tuple[int, ...] | None = None
    layers_pattern: str | list[str] | None = None


def take_host_options(peft: Mapping[str, Any]) -> tuple[dict[str, Any], HostOptions]:
    """Split ``modules_to_save``, ``layers_to_transform`` and ``layers_pattern`` off a PEFT
    config (the method's codec reads the rest)."""
    rest = dict(peft)
    saved = rest.pop("modules_to_save", None) or []
    if isinstance(saved, str):
        saved = [saved]
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise ValueError(f"modules_to_save must be a list of module names, got {saved!r:.60}")
    heads = TASK_HEADS.get(str(rest.get("task_type")), ())
    layers = rest.pop("layers_to_transform", None)
    pattern = rest.pop("layers_pattern", None)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (
        not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise ValueError(f"layers_to_transform must be a list of layer indices, got {layers!r:.60}")
    if pattern is not None and not (
        isinstance(pattern, str) or (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern))
    ):
        raise ValueError(f"layers_pattern must be a string or a list of strings, got {pattern!r:.60}")
    for p in [pattern] if isinstance(pattern, str) else pattern or ():
        compile_pattern(p, what="layers_pattern")
    modules = tuple(dict.fromkeys([*map(str, saved), *heads]))
    return rest, HostOptions(modules, tuple(map(str, saved)), None if not layers else tuple(layers), pattern or None)


def _module_of(body: str, modules: Sequence[str]) -> tuple[str, str] | None:
    """(module path, tensor name inside it) when ``body`` lies in a module named in ``modules``."""
    parts = body.split(".")
    for j in range(1, len(parts)):
        path = ".".join(parts[:j])
        if any(path == m or path.endswith("." + m) for m in modules):
            return path, ".".join(parts[j:])
    return None


def split_module_tensors(
    raw: Mapping[str, torch.Tensor], modules: Sequence[str], suffixes: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the method's tensors, module path -> whole-module tensors) of a PEFT weights file.
    A tensor ending with one of the method's ``suffixes`` always belongs to the method."""
    suffixes = tuple("." + s for s in suffixes)
    rest: dict[str, torch.Tensor] = {}
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        where = None
        if modules and key.startswith(PREFIX) and not (suffixes and key.endswith(suffixes)):
            where = _module_of(key[len(PREFIX) :], modules)
        if where is None:
            rest[key] = value
        else:
            found.setdefault(where[0], {})[where[1]] = value
    return rest, found


def _named(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def missing_modules(saved: Sequence[str], found: Iterable[str], names: Iterable[str]) -> list[str]:
    """Names in ``modules_to_save`` that a module of the model (``names``) has but the file
    holds no tensors for (PEFT always saves them: the file is incomplete)."""
    found, names = list(found), list(names)
    return [
        n for n in saved if any(_named(p, n) for p in names) and not any(_named(p, n) for p in found)
    ]


def layer_problems(paths: Iterable[str], options: HostOptions) -> list[str]:
    """Adapted paths that ``layers_to_transform`` excludes (a file PEFT would not have written)."""
    if options.layers is None:
        return []
    problems = []
    for path in sorted(paths):
        index = layer_index(path, options.layers_pattern)
        if index is None:
            problems.append(f"{path}: no layer index found (layers_pattern={options.layers_pattern!r})")
        elif index not in options.layers:
            problems.append(f"{path}: layer {index} is not in layers_to_transform={list(options.layers)}")
    return problems


__all__ = [
    "PEFT_FORMAT_VERSION",
    "TASK_HEADS",
    "HostOptions",
    "TargetSpec",
    "layer_index",
    "layer_problems",
    "missing_modules",
    "peft_targets",
    "peft_task_type",
    "split_module_tensors",
    "suffix_targets",
    "take_host_options",
]
