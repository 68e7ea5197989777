"""Hot swap: add, replace or remove one adapter of a live composition, under a route node.

Multi-tenant serving (as in LoRAX and S-LoRA) keeps many adapters resident behind one
``route`` node and changes them while serving. Here a swap builds only the new adapter's
modules and puts each one into the route nodes of the sites it acts on (an O(1) change to
each node); nothing else is re-composed, re-validated or re-applied, and the plan is
updated for the touched sites only. The swap's cost is the new adapter's weights, not the
number of adapters already there.

Limits (each refused with a clear error): the adapter must sit directly under the route
node, and act only at sites the route node already covers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adapter_composer.errors import ComposerError, CompositionError
from adapter_composer.formats.files import check_tensors
from adapter_composer.pipeline.apply import _leaf, build_adapter
from adapter_composer.pipeline.graph import AdapterSpec, OperatorSpec
from adapter_composer.pipeline.plan import AdapterPlan, Leaf, OpNode
from adapter_composer.registry import Diagnostic


def _route_nodes(composed: Any, node: str) -> dict[tuple[str, str], Any]:
    """(path, family) -> the runtime node of operator ``node`` there (indexed at build time)."""
    return dict(composed._rt.nodes.get(node, {}))


def add_adapter(
    composed: Any,
    name: str,
    method: str,
    *,
    route: str,
    key: str,
    targets: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    **config: Any,
) -> Any:
    """Declare adapter ``name`` and serve it under route node ``route`` for ``key`` (replacing
    whatever that key served). ``tensors`` (architecture-neutral names, as saved) are loaded."""
    composed._require_active()
    analysis = composed._analysis
    graph = composed.graph
    node = graph.specs.get(route)
    if not isinstance(node, OperatorSpec) or node.operator != "route":
        raise ComposerError(f"{route!r} is not a route node of this composition; route nodes: {_routes(composed)}")
    if name in graph:
        raise CompositionError([Diagnostic(code="duplicate-name", message=f"the name {name!r} is already used", nodes=(name,))])
    spec = AdapterSpec(
        name=name,
        method=method,
        targets=None if targets is None else tuple(targets),
        layers=None if layers is None else tuple(layers),
        config=config,
    )
    diags: list[Diagnostic] = []
    record = composed.registry.methods.get(method)
    if record is None:
        raise CompositionError([Diagnostic(code="unknown-method", message=f"no plugin registers method {method!r}", nodes=(name,))])
    try:
        cfg = record.config.model_validate(config)
    except Exception as exc:  # pydantic's ValidationError: report it as validation does
        raise CompositionError([Diagnostic(code="bad-config", message=f"adapter {name!r} ({method}): {exc}", nodes=(name,))]) from None
    infos = analysis.resolver.sites(spec, record, cfg, diags)
    if diags:
        raise CompositionError(diags, "hot swap")
    nodes = _route_nodes(composed, route)
    outside = [i.path for i in infos if (i.path, i.family) not in nodes]
    if outside:
        raise ComposerError(
            f"adapter {name!r} acts at {outside[:3]}, where route {route!r} does not act; "
            "hot swap only replaces what a route already covers (re-compose to add sites)"
        )
    # build: the new modules and leaves, before anything changes
    analysis.methods[name], analysis.configs[name], analysis.sites[name] = record, cfg, infos
    build_adapter(analysis, name, composed._rt)
    leaves, plan_leaves = {}, {}
    for info in infos:
        where = (info.path, info.family)
        plan_leaf = Leaf(name, record.name, info.kind, info.key, info.out_slice)
        plan_leaves[where] = plan_leaf
        leaf = _leaf(composed._rt, plan_leaf, info.family, composed.plan.site(*where))
        leaf.train(composed.model.training)
        if info.family == "linear":
            object.__setattr__(leaf, "site", composed._rt.sites[where])  # back-reference, not a submodule
        leaves[where] = leaf
    if tensors is not None:
        from adapter_composer.live.handles import AdapterHandle

        handle = AdapterHandle(name, record.name, cfg, composed._rt.adapters[name], composed._rt.method_shared.get(name))
        problems = check_tensors(f"adapter {name!r}", tensors, handle.expected_shapes())
        if problems:
            _forget(composed, name)
            raise ComposerError("the tensors do not fit the adapter:\n  " + "\n  ".join(problems))
        handle.load_tensors(tensors)
    # commit: graph, route nodes, plan, handles
    previous = dict(zip(node.keys or (), node.children, strict=True)).get(key)
    replaced = _replace_key(graph, node, key, name)
    graph._add(spec)
    graph.replace(replaced)
    if previous is not None and not any(
        previous in s.children for s in graph.specs.values() if isinstance(s, OperatorSpec)
    ):  # the adapter this key served is no longer used anywhere: drop it
        graph.remove(previous)
        _forget(composed, previous)
        composed.adapters.pop(previous, None)
    for where, leaf in leaves.items():
        nodes[where].set_child(key, leaf)
    _refresh_plan(composed, route, {where: {key: plan_leaves[where]} for where in leaves})
    from adapter_composer.live.handles import AdapterHandle

    composed.adapters[name] = AdapterHandle(name, record.name, cfg, composed._rt.adapters[name], composed._rt.method_shared.get(name))
    composed._patch.model_hook.route_keys = composed._patch.model_hook.route_keys | {key}
    return composed.adapters[name]


def _replace_key(graph: Any, node: OperatorSpec, key: str, name: str) -> OperatorSpec:
    children, keys = list(node.children), list(node.keys or ())
    if key in keys:
        children[keys.index(key)] = name
    else:
        children.append(name)
        keys.append(key)
    return node.model_copy(update={"children": tuple(children), "keys": tuple(keys)})


def remove_adapter(composed: Any, name: str) -> None:
    """Stop serving adapter ``name`` (it must sit directly under route nodes only)."""
    composed._require_active()
    graph = composed.graph
    if name not in composed.adapters:
        raise KeyError(f"no adapter {name!r}; adapters: {sorted(composed.adapters)}")
    parents = [s for s in graph.specs.values() if isinstance(s, OperatorSpec) and name in s.children]
    if not parents or any(p.operator != "route" for p in parents):
        raise ComposerError(f"adapter {name!r} is not only under route nodes; hot removal needs that (re-compose instead)")
    for parent in parents:
        keys = [k for k, c in zip(parent.keys, parent.children, strict=True) if c == name]
        updates = {}
        for where, route_node in _route_nodes(composed, parent.name).items():
            for k in keys:
                if k in route_node.keys:
                    route_node.remove_child(k)
            updates[where] = {k: None for k in keys}
        kept = [(k, c) for k, c in zip(parent.keys, parent.children, strict=True) if c != name]
        graph.replace(parent.model_copy(update={"children": tuple(c for _, c in kept), "keys": tuple(k for k, _ in kept)}))
        _refresh_plan(composed, parent.name, updates)
    graph.remove(name)
    _forget(composed, name)
    composed.adapters.pop(name, None)
    composed.plan = dataclasses.replace(composed.plan, adapters=tuple(a for a in composed.plan.adapters if a.name != name))
    routes = {k for s in graph.specs.values() if isinstance(s, OperatorSpec) and s.keys for k in s.keys}
    composed._patch.model_hook.route_keys = frozenset(routes)


def replace_weights(composed: Any, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load new weights into adapter ``name`` in place (same shapes): the cheapest swap."""
    handle = composed.adapters[name]
    problems = check_tensors(f"adapter {name!r}", tensors, handle.expected_shapes())
    if problems:
        raise ComposerError("the tensors do not fit the adapter:\n  " + "\n  ".join(problems))
    handle.load_tensors(tensors)


def load_adapter(composed: Any, directory: str | Path, *, name: str, route: str, key: str, adapter: str | None = None) -> Any:
    """Serve an adapter from disk under ``route`` for ``key``: a PEFT adapter directory, or a
    saved composition (pick ``adapter``, default the only one / ``name``)."""
    from adapter_composer.formats.composition import MANIFEST, read_manifest
    from adapter_composer.formats.files import read_safetensors
    from adapter_composer.formats.peft import CONFIG, read_peft

    directory = Path(directory)
    if (directory / CONFIG).is_file():
        peft = read_peft(directory, registry=composed.registry)
        if peft.modules:
            raise ComposerError(
                f"{directory} also holds whole modules (modules_to_save: {sorted(peft.modules)}); hot swap serves one "
                "adapter per key, so re-compose instead: ac.from_peft, or a route over stack(adapter, module copy)"
            )
        handle = add_adapter(composed, name, peft.method, route=route, key=key, targets=list(peft.targets), **dict(peft.config))
        peft.load_into(composed, name)
        return handle
    if not (directory / MANIFEST).is_file():
        raise ComposerError(f"{directory} is neither a PEFT adapter nor a saved composition")
    manifest = read_manifest(directory)
    nodes = {n["name"]: n for n in manifest["graph"]["nodes"] if n.get("type") == "adapter"}
    pick = adapter or (name if name in nodes else (next(iter(nodes)) if len(nodes) == 1 else None))
    if pick not in nodes:
        raise ComposerError(f"choose adapter= among {sorted(nodes)} in {directory}")
    spec = nodes[pick]
    tensors = read_safetensors(directory / manifest["adapters"][pick]["file"])
    return add_adapter(
        composed, name, spec["method"], route=route, key=key, targets=spec.get("targets"), layers=spec.get("layers"), tensors=tensors, **spec.get("config", {})
    )


def _forget(composed: Any, name: str) -> None:
    rt, analysis = composed._rt, composed._analysis
    for store in (rt.adapters, rt.infos, rt.method_shared, analysis.methods, analysis.configs, analysis.sites):
        store.pop(name, None)
    if name in rt.container.methods:
        del rt.container.methods[name]


def _rewire(prog: Any, node: str, order: tuple[str, ...], updates: Mapping[str, Leaf | None]) -> Any:
    """``prog`` with route ``node``'s children for the keys in ``updates`` replaced, added
    (a Leaf) or removed (None); only the path from the root to that node is rebuilt."""
    if isinstance(prog, Leaf):
        return prog
    children = tuple(_rewire(c, node, order, updates) if isinstance(c, OpNode) else c for c in prog.children)
    if prog.node != node or prog.keys is None:
        return dataclasses.replace(prog, children=children)
    table = dict(zip(prog.keys, children, strict=True))
    for key, leaf in updates.items():
        if leaf is None:
            table.pop(key, None)
        else:
            table[key] = leaf
    keys = tuple(k for k in order if k in table)
    return dataclasses.replace(prog, children=tuple(table[k] for k in keys), keys=keys, present=tuple(order.index(k) for k in keys))


def _refresh_plan(composed: Any, route: str, updates: Mapping[tuple[str, str], Mapping[str, Leaf | None]]) -> None:
    """Update the plan at the touched sites only, and its adapter list."""
    analysis = composed._analysis
    order = tuple(composed.graph.spec(route).keys or ())
    sites = []
    for sp in composed.plan.sites:
        where = (sp.path, sp.family)
        if where in updates:
            sp = dataclasses.replace(sp, program=_rewire(sp.program, route, order, updates[where]))
            analysis.programs[where] = sp.program
        sites.append(sp)
    kept = [a for a in composed.plan.adapters if a.name in analysis.methods]
    known = {a.name for a in kept}
    for name in analysis.methods:
        if name not in known:
            kept.append(
                AdapterPlan(
                    name,
                    analysis.methods[name].name,
                    analysis.methods[name].plugin,
                    analysis.configs[name].model_dump(mode="json"),
                    tuple(s.key for s in analysis.sites[name]),
                )
            )
    composed.plan = dataclasses.replace(composed.plan, sites=tuple(sites), adapters=tuple(kept))


def _routes(composed: Any) -> list[str]:
    return [s.name for s in composed.graph.specs.values() if isinstance(s, OperatorSpec) and s.operator == "route"]
