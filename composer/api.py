"""The entry points: compose a graph onto a model, plan it, load saved or PEFT adapters.

Each stage of the pipeline can also be run and printed alone: :func:`validate` (every
diagnostic), :func:`plan` (the frozen plan, without touching the model), :func:`compose`
(apply, in place and reversibly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from adapter_composer.errors import AdapterFileError, ArgumentError, CompositionError
from adapter_composer.formats.composition import read_composition
from adapter_composer.formats.peft import read_peft
from adapter_composer.live.composed import Composed
from adapter_composer.live.hf import SUBDIR, composition_dir, load_base
from adapter_composer.pipeline.graph import Graph
from adapter_composer.pipeline.plan import Plan, make_plan
from adapter_composer.pipeline.validate import analyse
from adapter_composer.registry import Registry, default_registry


def plan(model: nn.Module, graph: Graph, *, registry: Registry | None = None) -> Plan:
    """Validate ``graph`` on ``model`` and return the plan, without touching the model."""
    analysis = analyse(graph, registry or default_registry(), model)
    if analysis.diagnostics:
        raise CompositionError(analysis.diagnostics)
    return make_plan(analysis)


def compose(model: nn.Module, graph: Graph, *, registry: Registry | None = None) -> Composed:
    """Validate, plan and apply ``graph`` to ``model`` (patched in place; ``undo()`` reverts).

    Raises :class:`CompositionError` listing every problem before anything is changed.
    The base model's parameters are frozen; only adapter parameters train.
    """
    return Composed.create(model, graph, registry=registry)


def load(
    model: nn.Module,
    directory: str | Path,
    *,
    registry: Registry | None = None,
    check_base: bool = True,
    allow_nonfinite: bool = False,
) -> Composed:
    """Apply a saved composition to ``model`` and load its weights. ``directory`` is a saved
    composition or a directory written by the composed model's ``save_pretrained``.

    Everything in the directory is checked before the model is touched: the manifest and
    graph against strict schemas, the base model's fingerprint (``check_base=False`` skips
    that check), every tensor's name, shape and dtype against what the composition builds,
    and NaN/Inf values (``allow_nonfinite=True`` loads them anyway). On any error the model
    is left unchanged.
    """
    registry = registry or default_registry()
    saved = read_composition(
        composition_dir(directory), model, check_base=check_base, registry=registry, allow_nonfinite=allow_nonfinite
    )
    composed = compose(model, saved.graph, registry=registry)
    try:
        saved.load_into(composed)
    except BaseException:
        composed.undo()
        raise
    return composed


def from_pretrained(
    model: nn.Module | type,
    directory: str | Path,
    *,
    registry: Registry | None = None,
    **kwargs: Any,
) -> Composed:
    """Load a composed model, the way HF's ``from_pretrained`` reads.

    ``from_pretrained(AutoModelForX, d)`` (a transformers model class): ``d`` was written by a
    composed model's ``save_pretrained`` or ``Trainer.save_model``; the base model is loaded from
    it (``kwargs`` go to the class's ``from_pretrained``), then the composition, with identical
    outputs. ``from_pretrained(model, d)`` (a model): PEFT's ``PeftModel.from_pretrained(model, d)``
    spelling of :func:`load`, for a saved composition or such a directory.
    """
    if isinstance(model, nn.Module):
        if kwargs:
            raise ArgumentError(f"from_pretrained(model, directory) takes no model options, got {sorted(kwargs)}")
        return load(model, directory, registry=registry)
    directory = Path(directory)
    if not (directory / SUBDIR / "composition.json").is_file():
        raise AdapterFileError(
            f"{directory} was not written by a composed model's save_pretrained (no {SUBDIR}/composition.json); "
            "for a composition saved with composed.save(d), load the base model and call ac.load(base, d)"
        )
    base, info = load_base(model, directory, **kwargs)
    composed = load(base, directory / SUBDIR, registry=registry)
    live = set(composed.model.state_dict())
    problems = [f"missing (re-initialised): {k}" for k in sorted(info.get("missing_keys", ()))]
    problems += [f"unexpected: {k}" for k in sorted(set(info.get("unexpected_keys", ())) - live)]
    problems += [f"mismatched: {k}" for k in sorted(info.get("mismatched_keys", ()))]
    if problems:
        composed.undo()
        raise AdapterFileError(f"{directory} does not hold the weights of this model:\n  " + "\n  ".join(problems[:20]))
    return composed


def from_peft(
    model: nn.Module,
    directory: str | Path,
    name: str = "default",
    *,
    registry: Registry | None = None,
    allow_nonfinite: bool = False,
) -> Composed:
    """Compose ``model`` with the PEFT adapter in ``directory`` under ``name`` (checked as
    :func:`load` checks a composition; ``allow_nonfinite=True`` loads NaN/Inf weights)."""
    registry = registry or default_registry()
    adapter = read_peft(directory, registry=registry, allow_nonfinite=allow_nonfinite)
    adapter.check_fits(model, name, registry)
    graph = Graph()
    adapter.declare(graph, name)
    composed = compose(model, graph, registry=registry)
    try:
        adapter.load_into(composed, name)
    except BaseException:
        composed.undo()
        raise
    return composed


__all__ = ["compose", "from_peft", "from_pretrained", "load", "plan"]
