"""The entry points: compose a graph onto a model, plan it, load saved or PEFT adapters.

Each stage of the pipeline can also be run and printed alone: :func:`validate` (every
diagnostic), :func:`plan` (the frozen plan, without touching the model), :func:`compose`
(apply, in place and reversibly).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from adapter_composer.errors import CompositionError
from adapter_composer.formats.composition import read_composition
from adapter_composer.formats.peft import read_peft
from adapter_composer.live.composed import Composed
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
    """Apply a saved composition to ``model`` and load its weights.

    Everything in the directory is checked before the model is touched: the manifest and
    graph against strict schemas, the base model's fingerprint (``check_base=False`` skips
    that check), every tensor's name, shape and dtype against what the composition builds,
    and NaN/Inf values (``allow_nonfinite=True`` loads them anyway). On any error the model
    is left unchanged.
    """
    registry = registry or default_registry()
    saved = read_composition(
        directory, model, check_base=check_base, registry=registry, allow_nonfinite=allow_nonfinite
    )
    composed = compose(model, saved.graph, registry=registry)
    try:
        saved.load_into(composed)
    except BaseException:
        composed.undo()
        raise
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


__all__ = ["compose", "from_peft", "load", "plan"]
