"""Apply: the only code that changes a model. Builds every module first, then swaps them in.

Nothing is half-applied: all adapter and site modules are built before the first swap, and
a failure during the swaps rolls back the ones already made.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from adapter_composer.pipeline import contract
from adapter_composer.pipeline.plan import Leaf, OpNode, Plan, Program, SitePlan
from adapter_composer.pipeline.validate import Analysis
from adapter_composer.registry import Registry
from adapter_composer.runtime import CONTAINER_ATTR, Container, SharedRef, SiteBuild
from adapter_composer.runtime.linear import Leaf as LinearLeaf
from adapter_composer.runtime.lowrank import release_freed_memory
from adapter_composer.runtime.model import GENERATING, ROUTE, ModelHook, SegmentLeaf, SegmentSite
from adapter_composer.runtime.module import ModuleLeaf
from adapter_composer.runtime.state import CallScope
from adapter_composer.runtime.sublayer import SublayerLeaf
from adapter_composer.sites import SiteInfo


@dataclass(frozen=True)
class NodeContext:
    """What an operator's runtime factory learns about the site it is built for."""

    node: str
    path: str
    family: str
    present: tuple[int, ...]
    state: CallScope  # the composition's per-call state: ``state.current()`` during a call
    info: SiteInfo | None = None


@dataclass
class Runtime:
    """Modules built for a plan, before any of them is put into the model."""

    adapters: dict[str, dict[str, nn.Module]] = field(
        default_factory=dict
    )  # adapter -> key -> module
    infos: dict[str, dict[str, SiteInfo]] = field(default_factory=dict)  # adapter -> key -> site
    shared: dict[str, nn.Module] = field(default_factory=dict)  # operator node -> shared module
    method_shared: dict[str, nn.Module] = field(
        default_factory=dict
    )  # adapter -> module shared by its sites
    sites: dict[tuple[str, str], nn.Module] = field(
        default_factory=dict
    )  # (path, family) -> site module
    nodes: dict[str, dict[tuple[str, str], nn.Module]] = field(default_factory=dict)  # operator node -> site -> runtime node
    container: Container = field(default_factory=Container)

    def all_modules(self) -> list[nn.Module]:
        return [*self.sites.values(), self.container]


@dataclass
class Patch:
    """What apply changed, so that undo can put everything back exactly."""

    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    added_attrs: list[tuple[nn.Module, str]] = field(default_factory=list)
    model_hook: ModelHook | None = None
    undone: bool = False


def build_adapter(analysis: Analysis, name: str, rt: Runtime) -> None:
    """Instantiate adapter ``name``'s modules at all its sites."""
    method = analysis.methods[name]
    config = analysis.configs[name]
    infos = analysis.sites[name]
    shared = None
    if method.shared is not None:
        module = contract.build_shared(method, name, config, infos)
        rt.method_shared[name] = module
        rt.container.methods[name] = module
        shared = SharedRef(module)
    modules: dict[str, nn.Module] = {}
    by_key: dict[str, SiteInfo] = {}
    for info in infos:
        module = contract.build_module(method, name, config, info, shared)
        modules[info.key] = module.to(device=info.device)
        by_key[info.key] = info
    contract.probe_adapter(method, name, infos, modules)  # third-party modules keep the contract
    rt.adapters[name] = modules
    rt.infos[name] = by_key


MODEL_FAMILIES = ("prompt", "prefix")


def _leaf(rt: Runtime, leaf: Leaf, family: str, sp: SitePlan) -> nn.Module:
    module = rt.adapters[leaf.adapter][leaf.key]
    info = rt.infos[leaf.adapter][leaf.key]
    if family == "linear":
        return LinearLeaf(leaf.adapter, leaf.kind, module, info, sp.out_features)
    if family == "sublayer":
        return SublayerLeaf(leaf.adapter, leaf.kind, module, info)
    if family == "module":
        return ModuleLeaf(leaf.adapter, leaf.kind, module, info)
    if family in MODEL_FAMILIES:
        return SegmentLeaf(leaf.adapter, leaf.kind, module, info)
    raise NotImplementedError(f"no runtime for site family {family!r}")


def build_node(
    analysis: Analysis,
    rt: Runtime,
    prog: Program,
    sp: SitePlan,
    state: CallScope,
    info: SiteInfo | None,
) -> nn.Module:
    if isinstance(prog, Leaf):
        return _leaf(rt, prog, sp.family, sp)
    assert isinstance(prog, OpNode)
    children = [build_node(analysis, rt, c, sp, state, info) for c in prog.children]
    reg: Registry = analysis.registry
    record = reg.operator("stack" if prog.implicit else prog.operator)
    options = record.options() if prog.implicit else analysis.options[prog.node]
    if not prog.implicit and prog.node not in rt.shared and record.shared is not None:
        n = len(analysis.graph.spec(prog.node).children)
        module = record.shared(options, n)
        if module is not None:
            rt.shared[prog.node] = module
            rt.container.operators[prog.node] = module
    ctx = NodeContext(prog.node, sp.path, sp.family, prog.present, state, info)
    shared = SharedRef(rt.shared[prog.node]) if prog.node in rt.shared else None
    built = record.families[sp.family](children, options, prog.keys, shared, ctx)
    if not prog.implicit:
        rt.nodes.setdefault(prog.node, {})[(sp.path, sp.family)] = built
    return built


def build_runtime(analysis: Analysis, plan: Plan, state: CallScope) -> Runtime:
    rt = Runtime()
    for name in analysis.sites:
        build_adapter(analysis, name, rt)
    model = analysis.model
    first_info: dict[tuple[str, str], SiteInfo] = {}
    for infos in analysis.sites.values():
        for i in infos:
            first_info.setdefault((i.path, i.family), i)
    for sp in plan.sites:
        info = first_info.get((sp.path, sp.family))
        program = build_node(analysis, rt, sp.program, sp, state, info)
        if sp.family in MODEL_FAMILIES:
            site = SegmentSite(sp.family, program)
            rt.container.model_sites[sp.family] = site
            rt.sites[(sp.path, sp.family)] = site
            continue
        # a sublayer whose output module is also a linear site wraps that site (BERT's attn.o)
        base = rt.sites.get((sp.path, "linear")) or model.get_submodule(sp.path)
        kinds = {leaf.kind for leaf in sp.program.leaves()}
        build = SiteBuild(
            path=sp.path,
            family=sp.family,
            plan=sp,
            program=program,
            state=state,
            kinds=frozenset(kinds),
            info=info,
        )
        rt.sites[(sp.path, sp.family)] = analysis.registry.build_site(base, sp.family, build)
    release_freed_memory(m for site in rt.sites.values() for m in site.modules())
    return rt


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


class BlockInput:
    """Forward pre-hook on a layer: records the layer's input in the call's state (per-layer routers)."""

    def __init__(self, scope: CallScope, layer: int):
        self.scope = scope
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.scope.current()
        if state is not None:
            state.block_inputs[self.layer] = args[0] if args else kwargs.get("hidden_states")


def block_layers(rt: Runtime) -> set[int]:
    """Layers whose input some runtime node reads (``block_layer``), e.g. per-layer routers."""
    return {m.block_layer for site in rt.sites.values() for m in site.modules() if getattr(m, "block_layer", None) is not None}


def patch_model(
    model: nn.Module, rt: Runtime, state: CallScope, plan: Plan, geometry: object = None, block_paths: dict[int, str] | None = None
) -> Patch:
    """Freeze the base, swap the site modules in, install the forward hook; return how to undo it."""
    patch = Patch()
    try:
        for p in model.parameters():
            patch.requires_grad.append((p, p.requires_grad))
            p.requires_grad_(False)
        # deepest modules first (a sublayer site wraps its linear sites), and at one path the
        # linear site before the sublayer site that wraps it (BERT's attn.o)
        order = sorted(rt.sites.items(), key=lambda kv: (-kv[0][0].count("."), kv[0][1] != "linear"))
        for (path, family), site in order:
            if family in MODEL_FAMILIES:
                continue  # lives in the container; the model hook uses it
            parent, attr = _parent(model, path)
            original = getattr(parent, attr)
            setattr(parent, attr, site)
            patch.swaps.append((parent, attr, original, site))
            if family == "sublayer" and not site.own_input:
                source = model.get_submodule(site.input_path)
                patch.hooks.append(source.register_forward_pre_hook(site.capture, with_kwargs=True))
        for layer, path in (block_paths or {}).items():
            block = model.get_submodule(path)
            patch.hooks.append(block.register_forward_pre_hook(BlockInput(state, layer), with_kwargs=True))
        route_keys = frozenset(k for sp in plan.sites for node in _opnodes(sp.program) if node.keys for k in node.keys)
        hook = ModelHook(
            model,
            state,
            rt.container.model_sites["prompt"] if "prompt" in rt.container.model_sites else None,  # noqa: SIM401 (ModuleDict)
            rt.container.model_sites["prefix"] if "prefix" in rt.container.model_sites else None,  # noqa: SIM401
            geometry,
            route_keys,
        )
        patch.hooks.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        patch.hooks.append(model.register_forward_hook(hook.after, with_kwargs=True))
        encoder = model.get_encoder() if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else None
        if isinstance(encoder, nn.Module) and encoder is not model:  # generate() calls it on its own
            patch.hooks.append(encoder.register_forward_pre_hook(hook.encoder_before, with_kwargs=True))
            patch.hooks.append(encoder.register_forward_hook(hook.encoder_after, with_kwargs=True))
        patch.model_hook = hook
        if route_keys and callable(getattr(model, "generate", None)) and "generate" not in vars(model):
            model.generate = RoutedGenerate(model.generate)  # accepts route=..., see below
            patch.added_attrs.append((model, "generate"))
        if not rt.container.is_empty():
            if hasattr(model, CONTAINER_ATTR):
                raise RuntimeError(f"the model already has an attribute {CONTAINER_ATTR!r}")
            model.add_module(CONTAINER_ATTR, rt.container)
            patch.added_attrs.append((model, CONTAINER_ATTR))
        for m in rt.all_modules():
            m.train(model.training)  # new modules start in training mode; follow the model
    except BaseException:
        undo_patch(patch)
        raise
    return patch


class RoutedGenerate:
    """``model.generate(..., route=keys)``: transformers validates generate's keyword
    arguments, so the keys travel in the routing context instead. Inside ``generate`` the
    rows it repeats for beams or returned sequences (``repeat_interleave`` by
    max(num_beams, num_return_sequences)) get their row's key, with ``route=`` or with
    ``composed.routing(keys)`` around the call, as PEFT expands ``adapter_names``.

    An object holding the bound ``generate``, not a closure, so that a deep copy of the
    model calls its own ``generate``."""

    def __init__(self, generate: Any):
        self.generate = generate
        functools.update_wrapper(self, generate)

    def __call__(self, *args: Any, route: Any = None, **kwargs: Any) -> Any:
        generating = GENERATING.set(True)
        token = None if route is None else ROUTE.set(tuple(route) if isinstance(route, list | tuple) else route)  # the hook checks it
        try:
            return self.generate(*args, **kwargs)
        finally:
            if token is not None:
                ROUTE.reset(token)
            GENERATING.reset(generating)


def _opnodes(prog: Program):
    if isinstance(prog, OpNode):
        yield prog
        for child in prog.children:
            yield from _opnodes(child)


@torch.no_grad()
def undo_patch(patch: Patch) -> None:
    if patch.undone:
        return
    for _parent_mod, _attr, _original, site in reversed(patch.swaps):
        if hasattr(site, "unmerge"):
            site.unmerge()
    for parent, attr, original, _site in reversed(patch.swaps):
        setattr(parent, attr, original)
    for handle in patch.hooks:
        handle.remove()
    if patch.model_hook is not None:
        patch.model_hook.release()
    for obj, name in patch.added_attrs:
        if hasattr(obj, name):
            delattr(obj, name)
    for p, flag in patch.requires_grad:
        p.requires_grad_(flag)
    patch.undone = True


__all__ = ["BlockInput", "NodeContext", "Patch", "RoutedGenerate", "Runtime", "build_runtime", "patch_model", "undo_patch"]
