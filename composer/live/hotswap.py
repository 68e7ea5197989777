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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from adapter_composer.errors import (
    AdapterFileError,
    ComposerError,
    CompositionError,
    HotSwapError,
    UnknownAdapterError,
    WeightsError,
)
from adapter_composer.formats.files import check_fit, dtypes
from adapter_composer.live.handles import AdapterHandle
from adapter_composer.pipeline.apply import Runtime, _leaf, build_adapter
from adapter_composer.pipeline.graph import AdapterSpec, OperatorSpec, adapter_spec
from adapter_composer.pipeline.plan import AdapterPlan, Leaf, OpNode
from adapter_composer.pipeline.shapes import planned_shapes
from adapter_composer.pipeline.validate import _pydantic_diag
from adapter_composer.registry import Diagnostic

Tensors = Mapping[str, torch.Tensor] | Callable[[list[str]], Mapping[str, torch.Tensor]]


def _route_nodes(composed: Any, node: str) -> dict[tuple[str, str], Any]:
    """(path, family) -> the runtime node of operator ``node`` there (indexed at build time)."""
    return dict(composed._rt.nodes.get(node, {}))


@dataclass
class _Staged:
    """A new adapter built and loaded beside the composition, not yet part of it."""

    spec: AdapterSpec
    record: Any
    config: Any
    infos: list
    rt: Runtime
    leaves: dict
    plan_leaves: dict
    handle: AdapterHandle


def _tensor_problems(
    where: str, tensors: Any, shapes: Mapping[str, tuple[int, ...]], kinds: Mapping[str, torch.dtype]
) -> list[str]:
    """Names, shapes, dtypes and values (NaN/Inf are never hot-swapped in)."""
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        return [f"{where}: tensors must be a mapping of names to torch tensors"]
    return check_fit(where, tensors, shapes, kinds, allow_nonfinite=False)


def _refuse(problems: list[str], source: Path | None) -> ComposerError:
    body = "\n  ".join(problems)
    if source is not None:
        return AdapterFileError(f"{source} does not fit the adapter (nothing was changed):\n  {body}")
    return WeightsError(f"the tensors do not fit the adapter (nothing was changed):\n  {body}")


def _stage(
    composed: Any,
    name: str,
    method: str,
    route: str,
    targets: Sequence[str] | None,
    layers: Sequence[int] | None,
    tensors: Tensors | None,
    config: Mapping[str, Any],
    source: Path | None,
) -> _Staged:
    """Check everything and build the new adapter without touching the composition."""
    composed._require_active()
    analysis, graph = composed._analysis, composed.graph
    node = graph.specs.get(route) if isinstance(route, str) else None
    if not isinstance(node, OperatorSpec) or node.operator != "route":
        raise HotSwapError(f"{route!r} is not a route node of this composition; route nodes: {_routes(composed)}")
    spec = adapter_spec(name, method, targets, layers, config)
    if name in graph:
        raise CompositionError([Diagnostic(code="duplicate-name", message=f"the name {name!r} is already used", nodes=(name,))])
    record = composed.registry.methods.get(method)
    if record is None:
        raise CompositionError([Diagnostic(code="unknown-method", message=f"no plugin registers method {method!r}", nodes=(name,))])
    try:
        cfg = record.config.model_validate(spec.config)
    except ValidationError as exc:
        raise CompositionError([_pydantic_diag("bad-config", f"adapter {name!r} ({method})", exc, record.config, (name,))]) from None
    diags: list[Diagnostic] = []
    infos = analysis.resolver.sites(spec, record, cfg, diags)
    if diags:
        raise CompositionError(diags, "hot swap")
    nodes = _route_nodes(composed, route)
    outside = [i.path for i in infos if (i.path, i.family) not in nodes]
    if outside:
        raise HotSwapError(
            f"adapter {name!r} acts at {outside[:3]}, where route {route!r} does not act; "
            "hot swap only replaces what a route already covers (re-compose to add sites)"
        )
    scratch = dataclasses.replace(analysis, methods={name: record}, configs={name: cfg}, sites={name: infos})
    given = tensors([i.key for i in infos]) if callable(tensors) else tensors
    if given is not None and source is not None:  # from a file: shapes first, planned on the
        planned = planned_shapes(scratch, [name])  # meta device, so a bomb allocates nothing
        if planned is not None:
            problems = _tensor_problems(f"adapter {name!r}", given, planned.adapters[name], planned.adapter_dtypes[name])
            if problems:
                raise _refuse(problems, source)
    rt = Runtime()
    build_adapter(scratch, name, rt)
    leaves, plan_leaves = {}, {}
    for info in infos:
        where = (info.path, info.family)
        plan_leaf = Leaf(name, record.name, info.kind, info.key, info.out_slice)
        plan_leaves[where] = plan_leaf
        leaf = _leaf(rt, plan_leaf, info.family, composed.plan.site(*where))
        leaf.train(composed.model.training)
        if info.family == "linear":
            object.__setattr__(leaf, "site", composed._rt.sites[where])  # back-reference, not a submodule
        leaves[where] = leaf
    handle = AdapterHandle(name, record.name, cfg, rt.adapters[name], rt.method_shared.get(name))
    if given is not None:
        problems = _tensor_problems(f"adapter {name!r}", given, handle.expected_shapes(), dtypes(handle.state_dict()))
        if problems:
            raise _refuse(problems, source)
        handle.load_tensors(given)
    return _Staged(spec, record, cfg, infos, rt, leaves, plan_leaves, handle)


def _commit(composed: Any, staged: _Staged, route: str, key: str) -> AdapterHandle:
    """Put a staged adapter into the composition (nothing here checks or builds)."""
    name, rt, analysis, graph = staged.spec.name, composed._rt, composed._analysis, composed.graph
    node = graph.spec(route)
    analysis.methods[name], analysis.configs[name], analysis.sites[name] = staged.record, staged.config, staged.infos
    rt.adapters[name], rt.infos[name] = staged.rt.adapters[name], staged.rt.infos[name]
    if name in staged.rt.method_shared:
        rt.method_shared[name] = staged.rt.method_shared[name]
        rt.container.methods[name] = staged.rt.method_shared[name]
    previous = dict(zip(node.keys or (), node.children, strict=True)).get(key)
    graph._add(staged.spec)
    graph.replace(_replace_key(graph, node, key, name))
    if previous is not None and not any(
        previous in s.children for s in graph.specs.values() if isinstance(s, OperatorSpec)
    ):  # the adapter this key served is no longer used anywhere: drop it
        graph.remove(previous)
        _forget(composed, previous)
        composed.adapters.pop(previous, None)
    nodes = _route_nodes(composed, route)
    for where, leaf in staged.leaves.items():
        nodes[where].set_child(key, leaf)
    _refresh_plan(composed, route, {where: {key: staged.plan_leaves[where]} for where in staged.leaves})
    composed.adapters[name] = staged.handle
    composed._patch.model_hook.route_keys = composed._patch.model_hook.route_keys | {key}
    return staged.handle


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
) -> AdapterHandle:
    """Declare adapter ``name`` and serve it under route node ``route`` for ``key`` (replacing
    whatever that key served). ``tensors`` (architecture-neutral names, as saved) are loaded.

    Everything is checked, and the new adapter built and loaded, before the composition
    changes: on any error it serves exactly what it served before."""
    if not isinstance(key, str):
        raise HotSwapError(f"route keys are strings, got {key!r:.60}")
    staged = _stage(composed, name, method, route, targets, layers, tensors, config, None)
    return _commit(composed, staged, route, key)


def _replace_key(graph: Any, node: OperatorSpec, key: str, name: str) -> OperatorSpec:
    children, keys = list(node.children), list(node.keys or ())
    if key in keys:
        children[keys.index(key)] = name
    else:
        children.append(name)
        keys.append(key)
    return node.model_copy(update={"children": tuple(children), "keys": tuple(keys)})


def _known(composed: Any, name: Any) -> None:
    if not isinstance(name, str) or name not in composed.adapters:
        raise UnknownAdapterError(f"no adapter {name!r:.80}; adapters: {sorted(composed.adapters)}")


def remove_adapter(composed: Any, name: str) -> None:
    """Stop serving adapter ``name`` (it must sit directly under route nodes only)."""
    composed._require_active()
    graph = composed.graph
    _known(composed, name)
    parents = [s for s in graph.specs.values() if isinstance(s, OperatorSpec) and name in s.children]
    if not parents or any(p.operator != "route" for p in parents):
        raise HotSwapError(f"adapter {name!r} is not only under route nodes; hot removal needs that (re-compose instead)")
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
    """Load new weights into adapter ``name`` in place (same shapes): the cheapest swap.
    Names, shapes, dtypes (floating point) and values (finite) are checked first."""
    _known(composed, name)
    handle = composed.adapters[name]
    problems = _tensor_problems(f"adapter {name!r}", tensors, handle.expected_shapes(), dtypes(handle.state_dict()))
    if problems:
        raise _refuse(problems, None)
    handle.load_tensors(tensors)


def load_adapter(composed: Any, directory: str | Path, *, name: str, route: str, key: str, adapter: str | None = None) -> AdapterHandle:
    """Serve an adapter from disk under ``route`` for ``key``: a PEFT adapter directory, or a
    saved composition (pick ``adapter``, default the only one / ``name``). The directory is
    read and checked as :func:`adapter_composer.load` checks it, and the adapter built and
    loaded, before the composition changes."""
    from adapter_composer.formats.composition import read_composition
    from adapter_composer.formats.manifest import MANIFEST, load_manifest
    from adapter_composer.formats.peft import CONFIG, read_peft

    if not isinstance(key, str):
        raise HotSwapError(f"route keys are strings, got {key!r:.60}")
    directory = Path(directory)
    if (directory / CONFIG).is_file():
        peft = read_peft(directory, registry=composed.registry)
        if peft.modules:
            raise HotSwapError(
                f"{directory} also holds whole modules (modules_to_save: {sorted(peft.modules)}); hot swap serves one "
                "adapter per key, so re-compose instead: ac.from_peft, or a route over stack(adapter, module copy)"
            )
        staged = _stage(composed, name, peft.method, route, list(peft.targets), None, peft.neutral_tensors, peft.config, directory)
        return _commit(composed, staged, route, key)
    if not (directory / MANIFEST).is_file():
        raise AdapterFileError(f"{directory} is neither a PEFT adapter nor a saved composition")
    nodes = sorted(load_manifest(directory).adapters)
    pick = adapter or (name if name in nodes else (nodes[0] if len(nodes) == 1 else None))
    if pick not in nodes:
        raise HotSwapError(f"choose adapter= among {nodes} in {directory}")
    saved = read_composition(directory, registry=composed.registry, only=pick)
    base = saved.manifest.base_model
    if (base.shapes_sha256, base.model_type) != (composed.fingerprint["shapes_sha256"], composed.fingerprint["model_type"]):
        raise AdapterFileError(f"{directory} was saved on a different base model than this composition's")
    spec = saved.graph.spec(pick)
    staged = _stage(
        composed, name, spec.method, route, spec.targets, spec.layers, saved.adapter_tensors[pick], spec.config, directory
    )
    return _commit(composed, staged, route, key)


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
