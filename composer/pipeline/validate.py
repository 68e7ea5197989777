"""Validation: every rule runs, every problem is collected, nothing touches the model.

Rules and their stable codes (README "Validation" lists them with examples):

graph      unknown-node, unknown-operator, bad-options, operator-arity, bad-route-keys,
           cycle, forbidden-nesting, duplicate-name, bad-graph-file
adapters   unknown-method, bad-config
targets    unknown-role, role-missing, no-architecture, pattern-matches-nothing, bad-pattern, no-targets,
           target-not-linear, point-missing, bad-layers, role-path-missing, kind-target-mismatch
sites      unsupported-operator, no-declared-order, incompatible-scales, method-conflict,
           stack-order, plugin-check-failed (and whatever plugins add through check_graph:
           the module method's module-overlap, module-replaced-twice, module-tied,
           module-not-trainable)
model      peft-model (raised by compose before validation: a PeftModel is not composed onto)
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from pydantic import BaseModel, ValidationError
from torch import nn

from adapter_composer.pipeline.graph import AdapterSpec, Graph, OperatorSpec
from adapter_composer.pipeline.plan import Program, compile_site, site_groups
from adapter_composer.pipeline.resolve import Resolver
from adapter_composer.pipeline.rules import COMMUTING, check_sites, commute
from adapter_composer.registry import KINDS, Diagnostic, MethodRecord, Registry, default_registry
from adapter_composer.sites import SiteInfo


@dataclass
class Analysis:
    """Everything validation learned; the input of planning."""

    graph: Graph
    registry: Registry
    model: nn.Module | None
    methods: dict[str, MethodRecord] = field(default_factory=dict)
    configs: dict[str, BaseModel] = field(default_factory=dict)
    options: dict[str, BaseModel] = field(default_factory=dict)
    sites: dict[str, list[SiteInfo]] = field(default_factory=dict)
    programs: dict[tuple[str, str], Program] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    resolver: Resolver | None = None


class GraphView:
    """The read-only view of a graph handed to plugins' ``check_graph``."""

    def __init__(self, analysis: Analysis):
        self._a = analysis

    @property
    def specs(self) -> dict[str, Any]:
        return self._a.graph.specs

    @property
    def nx(self) -> nx.DiGraph:
        return self._a.graph.nx

    @property
    def model(self) -> nn.Module | None:
        """The model being composed (to read, never to change), when one is known."""
        return self._a.model

    def roots(self) -> list[str]:
        return self._a.graph.roots()

    def config(self, adapter: str) -> BaseModel | None:
        return self._a.configs.get(adapter)

    def sites(self, adapter: str) -> list[SiteInfo]:
        return list(self._a.sites.get(adapter, []))

    @property
    def programs(self) -> Mapping[tuple[str, str], Program]:
        return dict(self._a.programs)

    def method_of(self, adapter: str) -> str | None:
        spec = self._a.graph.specs.get(adapter)
        return spec.method if isinstance(spec, AdapterSpec) else None


def _close(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


# --- graph structure ------------------------------------------------------------------


def _check_structure(a: Analysis) -> None:
    graph, reg, out = a.graph, a.registry, a.diagnostics
    specs = graph.specs
    for spec in specs.values():
        if not isinstance(spec, OperatorSpec):
            continue
        for child in spec.children:
            if child not in specs:
                out.append(
                    Diagnostic(
                        code="unknown-node",
                        message=f"{spec.operator} node {spec.name!r} refers to {child!r}, which is not declared"
                        + _close(child, list(specs)),
                        nodes=(spec.name, child),
                        fix=f"declare {child!r} with g.adapter(...) or fix the name",
                    )
                )
        record = reg.operators.get(spec.operator)
        if record is None:
            out.append(
                Diagnostic(
                    code="unknown-operator",
                    message=f"node {spec.name!r} uses operator {spec.operator!r}, which no plugin registers"
                    + _close(spec.operator, list(reg.operators)),
                    nodes=(spec.name,),
                    rule=f"registered operators: {', '.join(reg.operators)}",
                    fix="use a registered operator or install the plugin that provides it",
                )
            )
            continue
        try:
            options = record.options.model_validate(spec.options)
        except ValidationError as exc:
            out.append(
                _pydantic_diag(
                    "bad-options",
                    f"{spec.operator} node {spec.name!r}",
                    exc,
                    record.options,
                    (spec.name,),
                )
            )
            continue
        a.options[spec.name] = options
        n = len(spec.children)
        if n < record.min_children:
            out.append(
                Diagnostic(
                    code="operator-arity",
                    message=f"{spec.operator} node {spec.name!r} has {n} children; it needs at least {record.min_children}",
                    nodes=(spec.name,),
                    fix="add children or remove the node",
                )
            )
        if record.keyed:
            keys = spec.keys or ()
            if len(keys) != n or len(set(keys)) != len(keys):
                out.append(
                    Diagnostic(
                        code="bad-route-keys",
                        message=f"{spec.operator} node {spec.name!r} needs one distinct key per child; got keys {list(keys)} for {n} children",
                        nodes=(spec.name,),
                        fix='declare it as g.route({"key": child, ...})',
                    )
                )
        elif spec.keys is not None:
            out.append(
                Diagnostic(
                    code="bad-options",
                    message=f"{spec.operator} node {spec.name!r} takes no keys (only keyed operators such as route do)",
                    nodes=(spec.name,),
                )
            )
        if record.check is not None:
            for problem in record.check(options, n, spec.keys):
                out.append(
                    Diagnostic(
                        code="bad-options",
                        message=f"{spec.operator} node {spec.name!r}: {problem}",
                        nodes=(spec.name,),
                    )
                )
    _check_cycles(a)
    _check_nesting(a)


def _check_cycles(a: Analysis) -> None:
    specs = a.graph.specs
    g = a.graph.nx.subgraph([n for n in a.graph.nx.nodes if n in specs])
    for cycle in list(nx.simple_cycles(g))[:10]:
        path = " → ".join([*cycle, cycle[0]])
        under = sorted(
            {
                d
                for n in cycle
                for d in nx.descendants(g, n) | {n}
                if isinstance(specs.get(d), AdapterSpec)
            }
        )
        a.diagnostics.append(
            Diagnostic(
                code="cycle",
                message=f"the graph has a cycle: {path}"
                + (f" (adapters under it: {', '.join(under)})" if under else ""),
                nodes=tuple(cycle),
                rule="a composition graph is acyclic: a node cannot contain itself",
                fix=f"remove one of the edges on the cycle, e.g. {cycle[-1]!r} → {cycle[0]!r}",
            )
        )


def nesting_table(reg: Registry) -> dict[tuple[str, str], tuple[bool, str]]:
    """(outer, inner) -> (allowed, reason). A pair is allowed only if some rule allows it and
    none forbids it, so the answer never depends on the order plugins were called in."""
    table: dict[tuple[str, str], tuple[bool, str]] = {}
    for rule in reg.rules.nesting:
        key = (rule.outer, rule.inner)
        if not rule.allowed:
            table[key] = (False, rule.reason or f"forbidden by plugin {rule.plugin!r}")
        elif table.get(key, (True, ""))[0]:
            table[key] = (True, rule.reason)
    return table


def _check_nesting(a: Analysis) -> None:
    specs = a.graph.specs
    table = nesting_table(a.registry)
    allowed = sorted(f"{o} ⊃ {i}" for (o, i), (ok, _) in table.items() if ok)
    for spec in specs.values():
        if not isinstance(spec, OperatorSpec) or spec.operator not in a.registry.operators:
            continue
        for child in spec.children:
            inner = specs.get(child)
            if not isinstance(inner, OperatorSpec) or inner.operator not in a.registry.operators:
                continue
            ok, reason = table.get((spec.operator, inner.operator), (False, "no rule allows it"))
            if not ok:
                a.diagnostics.append(
                    Diagnostic(
                        code="forbidden-nesting",
                        message=f"{spec.operator} node {spec.name!r} contains {inner.operator} node {child!r}: {reason}",
                        nodes=(spec.name, child),
                        rule=f"allowed nestings (outer ⊃ inner): {', '.join(allowed)}",
                        fix="restructure the graph so that only allowed nestings occur",
                    )
                )


# --- adapters -------------------------------------------------------------------------


def _pydantic_diag(
    code: str, what: str, exc: ValidationError, model: type, nodes: tuple[str, ...]
) -> Diagnostic:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        got = e.get("input")
        parts.append(
            f"{loc}: {e['msg']}"
            + (f" (got {got!r})" if e["type"] != "missing" and not isinstance(got, dict) else "")
        )
    fields = ", ".join(model.model_fields)
    return Diagnostic(
        code=code,
        message=f"{what}: " + "; ".join(parts),
        nodes=nodes,
        rule=f"accepted fields: {fields}",
        fix="fix or remove the fields named above",
    )


def _check_adapters(a: Analysis) -> None:
    reg = a.registry
    for name, spec in a.graph.adapters.items():
        method = reg.methods.get(spec.method)
        if method is None:
            a.diagnostics.append(
                Diagnostic(
                    code="unknown-method",
                    message=f"adapter {name!r} uses method {spec.method!r}, which no plugin registers"
                    + _close(spec.method, list(reg.methods)),
                    nodes=(name,),
                    rule=f"registered methods: {', '.join(reg.methods)}",
                    fix="use a registered method or install the plugin that provides it",
                )
            )
            continue
        a.methods[name] = method
        try:
            a.configs[name] = method.config.model_validate(spec.config)
        except ValidationError as exc:
            a.diagnostics.append(
                _pydantic_diag(
                    "bad-config", f"adapter {name!r} ({spec.method})", exc, method.config, (name,)
                )
            )


# --- entry point ----------------------------------------------------------------------


def analyse(graph: Graph, registry: Registry, model: nn.Module | None = None) -> Analysis:
    """Run every rule and collect every diagnostic (see :func:`validate`)."""
    a = Analysis(graph=graph, registry=registry, model=model)
    _check_structure(a)
    _check_adapters(a)
    if model is not None:
        a.resolver = Resolver(model, registry)
        for name, method in a.methods.items():
            config = a.configs.get(name)
            if config is None:
                continue
            a.sites[name] = a.resolver.sites(graph.spec(name), method, config, a.diagnostics)
        structural = {"unknown-node", "cycle", "unknown-operator", "bad-options"}
        if not any(d.code in structural for d in a.diagnostics):
            names = {n: m.name for n, m in a.methods.items()}
            for key, here in site_groups(a.sites).items():
                prog = compile_site(graph, names, here)
                if prog is not None:
                    a.programs[key] = prog
            check_sites(a)
    a.diagnostics.extend(registry.check_graph(GraphView(a)))
    return a


def validate(
    graph: Graph, registry: Registry | None = None, model: nn.Module | None = None
) -> list[Diagnostic]:
    """Every problem with ``graph`` (on ``model``, when given), without raising."""
    return analyse(graph, registry or default_registry(), model).diagnostics


__all__ = ["COMMUTING", "KINDS", "Analysis", "GraphView", "analyse", "commute", "validate"]
