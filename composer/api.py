"""The staged pipeline: graph → validate → plan → apply. Each stage can be run and printed alone."""

from __future__ import annotations

import functools

from torch import nn

from registry import Diagnostic, Registry, load_registry

from .apply import block_layers, build_runtime, patch_model
from .composed import Composed
from .errors import ComposerError, CompositionError
from .graph import Graph
from .plan import AdapterPlan, Plan, SitePlan
from .runtime.state import CallState
from .sites import is_linear, linear_shape
from .validate import Analysis, analyse


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry used when none is passed: built-ins plus installed plugins, built on first use."""
    return load_registry()


def make_plan(analysis: Analysis) -> Plan:
    """The plan of a validated analysis (sites in the model's module order)."""
    model = analysis.model
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    sites = []
    for (path, family), prog in sorted(
        analysis.programs.items(), key=lambda kv: (order.get(kv[0][0], -1), kv[0][1])
    ):
        module = model.get_submodule(path) if path else model
        fan_in, fan_out = linear_shape(module) if is_linear(module) else (0, 0)
        input_path = None
        if family == "sublayer":
            input_path = next(
                (
                    i.input_path
                    for infos in analysis.sites.values()
                    for i in infos
                    if i.path == path
                ),
                None,
            )
        sites.append(
            SitePlan(path, family, type(module).__name__, fan_in, fan_out, prog, input_path)
        )
    adapters = tuple(
        AdapterPlan(
            name=name,
            method=analysis.methods[name].name,
            plugin=analysis.methods[name].plugin,
            config=analysis.configs[name].model_dump(mode="json"),
            keys=tuple(s.key for s in analysis.sites.get(name, [])),
        )
        for name in analysis.graph.adapters
        if name in analysis.methods
    )
    arch = analysis.resolver.arch if analysis.resolver else None
    model_type = analysis.resolver.model_type if analysis.resolver else None
    return Plan(model_type, arch.name if arch else None, adapters, tuple(sites))


def plan(model: nn.Module, graph: Graph, *, registry: Registry | None = None) -> Plan:
    """Validate ``graph`` on ``model`` and return the plan, without touching the model."""
    analysis = analyse(graph, registry or default_registry(), model)
    if analysis.diagnostics:
        raise CompositionError(analysis.diagnostics)
    return make_plan(analysis)


def _already_composed(model: nn.Module) -> bool:
    from .runtime import CONTAINER_ATTR

    return hasattr(model, CONTAINER_ATTR) or any(getattr(m, "is_composer_site", False) for m in model.modules())


def compose(model: nn.Module, graph: Graph, *, registry: Registry | None = None) -> Composed:
    """Validate, plan and apply ``graph`` to ``model`` (patched in place; ``undo()`` reverts).

    Raises :class:`CompositionError` listing every problem before anything is changed.
    The base model's parameters are frozen; only adapter parameters train.
    """
    from .io import fingerprint

    if not isinstance(model, nn.Module):
        raise TypeError(f"compose() needs a torch nn.Module, got {type(model).__name__}")
    if not isinstance(graph, Graph):
        raise TypeError(f"compose() needs a composer.Graph, got {type(graph).__name__}")
    if _already_composed(model):
        raise ComposerError("this model already has a composition applied; call undo() on it first")
    registry = registry or default_registry()
    analysis = analyse(graph, registry, model)
    if analysis.diagnostics:
        raise CompositionError(analysis.diagnostics)
    the_plan = make_plan(analysis)
    print_ = fingerprint(model)
    state = CallState()
    runtime = build_runtime(analysis, the_plan, state)
    block_paths = {}
    for layer in sorted(block_layers(runtime)):
        path = analysis.resolver.block_path(layer)
        if path is None:
            raise CompositionError(
                [Diagnostic(code="point-missing", message=f"a per-layer router needs the input of layer {layer}, but the architecture maps no 'block' role",
                            fix="use router='site', or add a 'block' role to the architecture plugin")]
            )
        block_paths[layer] = path
    patch = patch_model(model, runtime, state, the_plan, block_paths=block_paths)
    return Composed(
        model, graph.copy(), the_plan, registry, analysis, runtime, patch, state, print_
    )
