"""The composition graph: adapters and operators, stored as a networkx graph.

A graph is pure data: declaring it touches no model and needs no registry. Names given as
children may refer to nodes declared later; :func:`adapter_composer.validate` resolves them and
reports anything missing, cyclic or ill-typed, all at once.

    g = Graph()
    g.adapter("sst2", "lora", r=8, alpha=16, targets=["attn.q", "attn.v"])
    g.adapter("mrpc", "lora", r=8, alpha=16, targets=["attn.q", "attn.v"])
    g.route({"sst2": "sst2", "mrpc": "mrpc"})
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import networkx as nx

from adapter_composer.errors import CompositionError, UnknownNodeError
from adapter_composer.pipeline.specs import (
    NAME_PATTERN,
    AdapterSpec,
    OperatorSpec,
    Spec,
    _spec,
    adapter_spec,
    duplicate_diagnostic,
    node_from_dict,
)
from adapter_composer.registry import Diagnostic

FORMAT = "adapter-composer.graph"
VERSION = 1
class Node(str):
    """The name of a node, returned by the declaring call; usable wherever a name is."""


def _name_of(item: Any) -> str:
    if isinstance(item, str):
        return str(item)
    raise CompositionError(
        [
            Diagnostic(
                code="bad-node",
                message=f"expected a node name or a node returned by Graph, got {item!r:.80}",
                fix="pass the names (or the values g.adapter(...) returned) of declared nodes",
            )
        ]
    )


class Graph:
    """A composition graph. See the module docstring for an example."""

    def __init__(self) -> None:
        self._g = nx.DiGraph()
        self._specs: dict[str, Spec] = {}
        self._counter = 0

    # --- declaration ------------------------------------------------------------------

    def adapter(
        self,
        name: str,
        method: str,
        *,
        targets: Sequence[str] | str | None = None,
        layers: Iterable[int] | None = None,
        **config: Any,
    ) -> Node:
        """Declare an adapter ``name`` of ``method``; keyword arguments are its config."""
        return self._add(adapter_spec(name, method, targets, layers, config))

    def op(
        self,
        operator: str,
        *children: Any,
        name: str | None = None,
        keys: Sequence[str] | None = None,
        **options: Any,
    ) -> Node:
        """Declare a node of any registered operator (``stack``/``sum``/``mix``/``route`` have shortcuts)."""
        if name is None:
            self._counter += 1
            name = f"{operator}_{self._counter}"
            while name in self._specs:
                self._counter += 1
                name = f"{operator}_{self._counter}"
        spec = _spec(
            OperatorSpec,
            name=name,
            operator=operator,
            children=tuple(_name_of(c) for c in children),
            keys=None if keys is None else tuple(str(k) for k in keys),
            options=options,
        )
        return self._add(spec)

    def stack(self, *children: Any, name: str | None = None) -> Node:
        """Apply children in order at every site they share (prefixes concatenate in order)."""
        return self.op("stack", *children, name=name)

    def sum(
        self,
        *children: Any,
        weights: Sequence[float] | None = None,
        name: str | None = None,
        **options: Any,
    ) -> Node:
        """Weighted sum of the children's effects: W x + Σ wᵢ Δᵢ(x)."""
        if weights is not None:
            options["weights"] = list(weights)
        return self.op("sum", *children, name=name, **options)

    def mix(self, *children: Any, name: str | None = None, **options: Any) -> Node:
        """Learned gate over the children: W x + Σ gᵢ(x) Δᵢ(x)."""
        return self.op("mix", *children, name=name, **options)

    def route(self, table: Mapping[str, Any], *, name: str | None = None, **options: Any) -> Node:
        """Per-example selection by key: ``{"sst2": "sst2_lora", "mrpc": "mrpc_lora"}``."""
        if not isinstance(table, Mapping):
            raise CompositionError(
                [
                    Diagnostic(
                        code="bad-node",
                        message=f"route() takes a mapping key -> child, got {type(table).__name__}",
                        fix='g.route({"sst2": "sst2_lora", "mrpc": "mrpc_lora"})',
                    )
                ]
            )
        return self.op("route", *table.values(), keys=list(table.keys()), name=name, **options)

    def _add(self, spec: Spec) -> Node:
        if spec.name in self._specs:
            raise CompositionError([duplicate_diagnostic(spec.name, self._specs[spec.name])])
        self._specs[spec.name] = spec
        self._g.add_node(spec.name)
        if isinstance(spec, OperatorSpec):
            for child in spec.children:
                self._g.add_edge(spec.name, child)
        return Node(spec.name)

    def remove(self, name: str) -> None:
        """Remove a node (operators referring to it then report it missing at validation)."""
        if name not in self._specs:
            raise UnknownNodeError(f"no node named {name!r}; nodes: {list(self._specs)}")
        del self._specs[name]
        if self._g.has_node(name):
            parents = list(self._g.predecessors(name))
            self._g.remove_node(name)
            for parent in parents:  # keep the dangling reference visible to validation
                self._g.add_edge(parent, name)

    def replace(self, spec: Spec) -> None:
        """Replace the spec of an existing node with one of the same name."""
        if spec.name not in self._specs:
            raise UnknownNodeError(f"no node named {spec.name!r}; nodes: {list(self._specs)}")
        old = self._specs[spec.name]
        if isinstance(old, OperatorSpec):
            for child in old.children:
                if self._g.has_edge(spec.name, child):
                    self._g.remove_edge(spec.name, child)
        self._specs[spec.name] = spec
        if isinstance(spec, OperatorSpec):
            for child in spec.children:
                self._g.add_edge(spec.name, child)

    # --- queries ----------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> Spec:
        try:
            return self._specs[name]
        except (KeyError, TypeError):
            raise UnknownNodeError(f"no node named {name!r}; nodes: {list(self._specs)}") from None

    @property
    def specs(self) -> dict[str, Spec]:
        return dict(self._specs)

    @property
    def adapters(self) -> dict[str, AdapterSpec]:
        return {n: s for n, s in self._specs.items() if isinstance(s, AdapterSpec)}

    @property
    def nx(self) -> nx.DiGraph:
        """A copy of the underlying networkx graph (edges: operator → child)."""
        return self._g.copy()

    def roots(self) -> list[str]:
        """Declared nodes no operator refers to, in declaration order."""
        return [n for n in self._specs if self._g.in_degree(n) == 0]

    def copy(self) -> Graph:
        other = Graph()
        other._g = self._g.copy()
        other._specs = dict(self._specs)
        other._counter = self._counter
        return other

    def __repr__(self) -> str:
        return f"Graph({len(self.adapters)} adapters, {len(self._specs) - len(self.adapters)} operators)"

    def tree(self) -> str:
        """A text rendering of the graph from its roots."""
        lines: list[str] = []

        def walk(name: str, depth: int, key: str | None, seen: tuple[str, ...]) -> None:
            pad = "  " * depth + (f"{key}: " if key else "")
            spec = self._specs.get(name)
            if spec is None:
                lines.append(f"{pad}{name} (undeclared)")
            elif name in seen:
                lines.append(f"{pad}{name} (cycle)")
            elif isinstance(spec, AdapterSpec):
                cfg = ", ".join(f"{k}={v}" for k, v in spec.config.items())
                lines.append(f"{pad}{name}: {spec.method}({cfg})")
            else:
                opts = ", ".join(f"{k}={v}" for k, v in spec.options.items())
                lines.append(f"{pad}{name}: {spec.operator}({opts})")
                keys = spec.keys or [None] * len(spec.children)
                for child, k in zip(spec.children, keys, strict=False):
                    walk(child, depth + 1, k, (*seen, name))

        for root in self.roots():
            walk(root, 0, None, ())
        return "\n".join(lines)

    # --- serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "nodes": [
                s.model_dump(mode="json", exclude_defaults=False) for s in self._specs.values()
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Graph:
        """A graph from :meth:`to_dict`'s output (e.g. parsed JSON), checked strictly: every
        field has its declared type, nothing is coerced (``"layers": ["1"]`` or ``[true]`` is
        refused, not read as ``[1]``), and unknown keys are refused."""
        problems: list[Diagnostic] = []
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CompositionError(
                [
                    Diagnostic(
                        code="bad-graph-file",
                        message=f"not an adapter-composer graph (expected a JSON object with format={FORMAT!r})",
                        fix="write graphs with Graph.to_json()",
                    )
                ]
            )
        if data.get("version") != VERSION:
            problems.append(
                Diagnostic(
                    code="bad-graph-file",
                    message=f"graph format version {data.get('version')!r:.40} is not supported (this library reads {VERSION})",
                    fix="upgrade adapter-composer",
                )
            )
        extra = sorted(str(k) for k in data if k not in ("format", "version", "nodes"))
        if extra:
            problems.append(
                Diagnostic(code="bad-graph-file", message=f"unknown top-level keys {extra[:5]}")
            )
        nodes = data.get("nodes", [])
        if not isinstance(nodes, list):
            nodes = []
            problems.append(
                Diagnostic(code="bad-graph-file", message="'nodes' must be a list of node objects")
            )
        graph = cls()
        for i, raw in enumerate(nodes):
            spec = node_from_dict(i, raw, problems)
            if spec is None:
                continue
            if spec.name in graph._specs:
                problems.append(duplicate_diagnostic(spec.name, graph._specs[spec.name]))
                continue
            graph._add(spec)
        if problems:
            raise CompositionError(problems, "reading a graph")
        return graph

    @classmethod
    def from_json(cls, text: str) -> Graph:
        try:
            data = json.loads(text)
        except RecursionError:
            raise CompositionError(
                [Diagnostic(code="bad-graph-file", message="graph JSON nests too deeply to read")],
                "reading a graph",
            ) from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise CompositionError(
                [Diagnostic(code="bad-graph-file", message=f"graph JSON does not parse: {exc}")],
                "reading a graph",
            ) from None
        return cls.from_dict(data)


__all__ = [
    "FORMAT",
    "NAME_PATTERN",
    "VERSION",
    "AdapterSpec",
    "Graph",
    "Node",
    "OperatorSpec",
    "Spec",
    "adapter_spec",
    "duplicate_diagnostic",
]
