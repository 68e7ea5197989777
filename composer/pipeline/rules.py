"""Per-site rules: method × operator refusals, ordering, commutation, conflicts.

They run on the per-site programs compiled from the graph (so a rule sees exactly what will
act at each site) and add to the analysis' diagnostics; see :mod:`adapter_composer.pipeline.validate`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from adapter_composer.pipeline.plan import Leaf, OpNode, Program
from adapter_composer.registry import Diagnostic

# Pairs of kinds whose order at one site does not matter. Every other pair needs an order
# declared by a stack (or a combination operator that defines the math).
COMMUTING: frozenset[frozenset[str]] = frozenset(
    frozenset(p)
    for p in [
        ("linear.delta", "linear.delta"),
        ("linear.scale_out", "linear.scale_out"),
        ("linear.scale_in", "linear.scale_in"),
        ("linear.scale_in", "linear.scale_out"),
        ("sublayer.parallel", "sublayer.parallel"),
        ("attention.kv_prefix", "attention.kv_prefix"),
        ("optimizer", "optimizer"),
    ]
)


def commute(a: str, b: str) -> bool:
    return frozenset((a, b)) in COMMUTING


def _walk(
    prog: Program, ancestors: tuple[OpNode, ...] = ()
) -> Iterator[tuple[Leaf, tuple[OpNode, ...]]]:
    if isinstance(prog, Leaf):
        yield prog, ancestors
    else:
        for child in prog.children:
            yield from _walk(child, (*ancestors, prog))


def _kinds(prog: Program) -> set[str]:
    return {leaf.kind for leaf in prog.leaves()}


def check_sites(a: Any) -> None:
    reg, out = a.registry, a.diagnostics
    refused: dict[tuple[str, str], Diagnostic] = {}
    unordered: dict[tuple[str, str], list[str]] = {}
    mixed: dict[str, list[str]] = {}
    found: dict[tuple, Diagnostic] = {}
    for (path, family), prog in a.programs.items():
        where = path or "<model>"
        for leaf, ancestors in _walk(prog):
            for node in ancestors:
                if node.implicit or (leaf.adapter, node.node) in refused:
                    continue
                record = reg.operators.get(node.operator)
                for r in reg.rules.refusals:
                    if r.operator == node.operator and (
                        r.method == leaf.method or r.kind == leaf.kind
                    ):
                        refused[(leaf.adapter, node.node)] = Diagnostic(
                            code="unsupported-operator",
                            message=f"adapter {leaf.adapter!r} ({leaf.method}, {leaf.kind}) cannot be composed under {node.operator} node {node.node!r}: {r.reason}",
                            nodes=(node.node, leaf.adapter),
                            sites=(where,),
                            rule="method × operator table (README)",
                            fix=r.fix or "compose it with another operator",
                            plugin=r.plugin,
                        )
                        break
                else:
                    if record is not None and family not in record.families:
                        refused[(leaf.adapter, node.node)] = Diagnostic(
                            code="unsupported-operator",
                            message=f"{node.operator} node {node.node!r} cannot combine {family} sites, where adapter {leaf.adapter!r} ({leaf.method}) acts",
                            nodes=(node.node, leaf.adapter),
                            sites=(where,),
                            rule=f"{node.operator} is implemented for: {', '.join(sorted(record.families))}",
                            fix="compose this adapter with an operator that supports its sites",
                        )
        for node in _opnodes(prog):
            if node.implicit and node.node == "<roots>":
                _check_commuting_roots(node, where, unordered)
            elif node.operator not in ("stack", "route") and not node.implicit:
                kinds = [_kinds(c) for c in node.children]
                if any("linear.scale_in" in k for k in kinds) and any(
                    "linear.scale_out" in k for k in kinds
                ):
                    mixed.setdefault(node.node, []).append(where)
            if node.operator == "stack" and not node.implicit:
                _check_orders(a, node, where, found)
        _check_conflicts(a, prog, where, found)
    out.extend(refused.values())
    out.extend(found.values())
    for (x, y), where in unordered.items():
        out.append(
            Diagnostic(
                code="no-declared-order",
                message=f"adapters {x!r} and {y!r} act at the same site in ways whose order matters, but nothing declares the order",
                nodes=(x, y),
                sites=tuple(where),
                rule="ops that do not commute (a scale and a delta, two sublayer adapters, two prompts) need an order",
                fix=f"put them in a stack: g.stack({x!r}, {y!r}) (or the reverse order)",
            )
        )
    for node, where in mixed.items():
        out.append(
            Diagnostic(
                code="incompatible-scales",
                message=f"node {node!r} combines input scales and output scales at the same site; a weighted combination of both is not one linear layer",
                nodes=(node,),
                sites=tuple(where),
                fix="combine them with a stack (ordered) or route (one per example) instead",
            )
        )


def _opnodes(prog: Program) -> Iterator[OpNode]:
    if isinstance(prog, OpNode):
        yield prog
        for child in prog.children:
            yield from _opnodes(child)


def _check_commuting_roots(
    node: OpNode, where: str, unordered: dict[tuple[str, str], list[str]]
) -> None:
    children = list(node.children)
    for i in range(len(children)):
        for j in range(i + 1, len(children)):
            for li in children[i].leaves():
                for lj in children[j].leaves():
                    if not commute(li.kind, lj.kind):
                        unordered.setdefault((li.adapter, lj.adapter), []).append(where)


def _check_orders(a: Any, node: OpNode, where: str, found: dict[tuple, Diagnostic]) -> None:
    seq = [leaf.method for c in node.children for leaf in c.leaves()]
    for rule in a.registry.rules.orders:
        if rule.first in seq and rule.then in seq and _after(seq, rule.first, rule.then):
            _collect(
                found,
                Diagnostic(
                    code="stack-order",
                    message=f"stack {node.node!r} puts {rule.then} before {rule.first}: {rule.reason}",
                    nodes=(node.node,),
                    sites=(where,),
                    fix=f"reorder the stack so that {rule.first} comes first",
                    plugin=rule.plugin,
                ),
            )


def _check_conflicts(
    a: Any, prog: Program, where: str, found: dict[tuple, Diagnostic]
) -> None:
    leaves = list(prog.leaves())
    for rule in a.registry.rules.conflicts:
        first = [lf for lf in leaves if lf.method == rule.first]
        second = [lf for lf in leaves if lf.method == rule.second and lf not in first]
        if first and second:
            _collect(
                found,
                Diagnostic(
                    code="method-conflict",
                    message=f"{rule.first} ({first[0].adapter!r}) and {rule.second} ({second[0].adapter!r}) act at the same site: {rule.reason}",
                    nodes=(first[0].adapter, second[0].adapter),
                    sites=(where,),
                    fix=rule.fix or "target different sites",
                    plugin=rule.plugin,
                ),
            )


def _after(seq: list[str], first: str, then: str) -> bool:
    """Whether some ``then`` comes before the last ``first`` in ``seq``."""
    return max(i for i, m in enumerate(seq) if m == first) > min(
        i for i, m in enumerate(seq) if m == then
    )


def _collect(found: dict[tuple, Diagnostic], d: Diagnostic) -> None:
    """Keep one diagnostic per problem, gathering the sites where it occurs."""
    key = (d.code, d.message)
    if key in found:
        old = found[key]
        found[key] = Diagnostic(
            d.code, d.message, old.nodes, old.sites + d.sites, d.rule, d.fix, d.plugin
        )
    else:
        found[key] = d
