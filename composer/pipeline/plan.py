"""The plan: for every site, the ordered program of ops; frozen, JSON-serialisable, printable.

A plan is a pure function of (graph, registry, model shapes). Building it changes nothing;
``adapter_composer.pipeline.apply`` is the only code that patches a model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapter_composer.errors import UnknownSiteError
from adapter_composer.pipeline.graph import AdapterSpec, Graph, OperatorSpec
from adapter_composer.sites import SiteInfo, is_linear, linear_shape

if TYPE_CHECKING:  # the analysis is made by validate, which compiles site programs with this module
    from adapter_composer.pipeline.validate import Analysis


@dataclass(frozen=True)
class Leaf:
    """One adapter's op at a site."""

    adapter: str
    method: str
    kind: str
    key: str
    out_slice: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "method": self.method,
            "kind": self.kind,
            "key": self.key,
            "out_slice": self.out_slice,
        }

    def leaves(self) -> Iterable[Leaf]:
        yield self

    def render(self) -> str:
        part = "" if self.out_slice is None else f"[{self.out_slice[0]}:{self.out_slice[1]}]"
        return f"{self.adapter}:{self.method}{part}"


@dataclass(frozen=True)
class OpNode:
    """An operator node restricted to one site: ``present`` are the indices of the node's
    children that act here (a sum's weights and a route's keys follow them)."""

    node: str
    operator: str
    children: tuple[Leaf | OpNode, ...]
    present: tuple[int, ...]
    keys: tuple[str, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    implicit: bool = False  # the stack of the graph's roots, which validation checked commute

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "operator": self.operator,
            "present": list(self.present),
            "keys": None if self.keys is None else list(self.keys),
            "options": dict(self.options),
            "implicit": self.implicit,
            "children": [c.to_dict() for c in self.children],
        }

    def leaves(self) -> Iterable[Leaf]:
        for child in self.children:
            yield from child.leaves()

    def render(self) -> str:
        if self.keys is not None:
            inner = ", ".join(
                f"{k}→{c.render()}" for k, c in zip(self.keys, self.children, strict=True)
            )
        else:
            inner = ", ".join(c.render() for c in self.children)
        name = "+" if self.implicit else self.operator
        opts = self.options.get("weights")
        if opts is not None:
            name += "[" + ", ".join(f"{opts[i]:g}" for i in self.present) + "]"
        return f"{name}({inner})"


Program = Leaf | OpNode


@dataclass(frozen=True)
class SitePlan:
    path: str
    family: str
    module_type: str
    in_features: int
    out_features: int
    program: Program
    input_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "family": self.family,
            "module_type": self.module_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "input_path": self.input_path,
            "program": self.program.to_dict(),
        }


@dataclass(frozen=True)
class AdapterPlan:
    name: str
    method: str
    plugin: str
    config: Mapping[str, Any]
    keys: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "plugin": self.plugin,
            "config": dict(self.config),
            "sites": list(self.keys),
        }


@dataclass(frozen=True)
class Plan:
    model_type: str | None
    architecture: str | None
    adapters: tuple[AdapterPlan, ...]
    sites: tuple[SitePlan, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "architecture": self.architecture,
            "adapters": [a.to_dict() for a in self.adapters],
            "sites": [s.to_dict() for s in self.sites],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def site(self, path: str, family: str | None = None) -> SitePlan:
        for s in self.sites:
            if s.path == path and (family is None or s.family == family):
                return s
        raise UnknownSiteError(f"no site at {path!r} in this plan; its sites: {sorted({s.path for s in self.sites})[:8]}")

    def explain(self) -> str:
        """A table of sites × ops, then the adapters."""
        rows = [(s.path or "<model>", s.family, s.program.render()) for s in self.sites]
        w0 = max([len("site")] + [len(r[0]) for r in rows])
        w1 = max([len("family")] + [len(r[1]) for r in rows])
        lines = [
            f"Plan for {self.model_type or 'model'} ({self.architecture or 'module patterns'}): "
            f"{len(self.adapters)} adapter(s), {len(self.sites)} site(s)",
            f"{'site':<{w0}}  {'family':<{w1}}  ops (innermost first)",
            f"{'-' * w0}  {'-' * w1}  {'-' * 21}",
        ]
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        lines.append("")
        lines.append("Adapters:")
        for a in self.adapters:
            cfg = ", ".join(
                f"{k}={v}" for k, v in a.config.items() if v not in (None, {}, [], (), False)
            )
            lines.append(
                f"  {a.name}: {a.method} ({cfg}) at {len(a.keys)} site(s)  [plugin {a.plugin}]"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


# --- compiling graph + resolved sites into per-site programs ----------------------------


def site_groups(
    sites_by_adapter: Mapping[str, list[SiteInfo]],
) -> dict[tuple[str, str], dict[str, list[SiteInfo]]]:
    """(path, family) -> adapter -> its SiteInfos there, in first-seen order."""
    groups: dict[tuple[str, str], dict[str, list[SiteInfo]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for adapter, sites in sites_by_adapter.items():
        for s in sites:
            groups[(s.path, s.family)][adapter].append(s)
    return groups


def compile_site(
    graph: Graph, methods: Mapping[str, str], here: Mapping[str, list[SiteInfo]]
) -> Program | None:
    """The program of one site: the graph restricted to the adapters acting ``here``."""
    memo: dict[str, Program | None] = {}

    def build(name: str) -> Program | None:
        if name in memo:
            return memo[name]
        memo[name] = None  # guards against cycles (validation reports them)
        spec = graph.spec(name)
        result: Program | None
        if isinstance(spec, AdapterSpec):
            infos = sorted(here.get(name, []), key=lambda s: s.key)
            leaves = [Leaf(name, methods[name], s.kind, s.key, s.out_slice) for s in infos]
            if not leaves:
                result = None
            elif len(leaves) == 1:
                result = leaves[0]
            else:
                result = OpNode(
                    name, "stack", tuple(leaves), tuple(range(len(leaves))), implicit=True
                )
        else:
            assert isinstance(spec, OperatorSpec)
            children, present = [], []
            for i, child in enumerate(spec.children):
                prog = build(child)
                if prog is not None:
                    children.append(prog)
                    present.append(i)
            if not children:
                result = None
            elif spec.operator == "stack" and len(children) == 1:
                result = children[0]
            else:
                keys = None if spec.keys is None else tuple(spec.keys[i] for i in present)
                result = OpNode(
                    spec.name,
                    spec.operator,
                    tuple(children),
                    tuple(present),
                    keys,
                    dict(spec.options),
                )
        memo[name] = result
        return result

    progs = [p for p in (build(r) for r in graph.roots()) if p is not None]
    if not progs:
        return None
    if len(progs) == 1:
        return progs[0]
    return OpNode("<roots>", "stack", tuple(progs), tuple(range(len(progs))), implicit=True)


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
