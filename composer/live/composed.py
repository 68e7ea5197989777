"""``Composed``: a model with a composition applied, and everything one does with it."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import ArgumentError, ComposerError, CompositionError, RoutingError
from adapter_composer.formats.composition import fingerprint
from adapter_composer.live.handles import AdapterHandle, ParameterReport
from adapter_composer.live.merge_plan import plan_merge
from adapter_composer.pipeline.apply import (
    Patch,
    Runtime,
    block_layers,
    build_runtime,
    patch_model,
    undo_patch,
)
from adapter_composer.pipeline.graph import Graph
from adapter_composer.pipeline.plan import Plan, make_plan
from adapter_composer.pipeline.validate import Analysis, analyse
from adapter_composer.registry import Diagnostic, Registry, default_registry
from adapter_composer.runtime import CONTAINER_ATTR
from adapter_composer.runtime.linear import LinearSite
from adapter_composer.runtime.model import ModelHook
from adapter_composer.runtime.state import CallScope, CallState, not_picklable
from adapter_composer.sites import logical_shape


class Composed:
    """A model with a composition applied in place. Made by :func:`adapter_composer.compose`."""

    def __init__(
        self,
        model: nn.Module,
        graph: Graph,
        plan: Plan,
        registry: Registry,
        analysis: Analysis,
        runtime: Runtime,
        patch: Patch,
        calls: CallScope,
        fingerprint: dict[str, Any],
    ):
        self.model = model
        self.graph = graph
        self.plan = plan
        self.registry = registry
        self._analysis = analysis
        self._rt = runtime
        self._patch = patch
        self.calls = calls  # where the sites find each call's state (see adapter_composer.runtime.state)
        self.fingerprint = fingerprint
        self.adapters: dict[str, AdapterHandle] = {
            name: AdapterHandle(
                name,
                analysis.methods[name].name,
                analysis.configs[name],
                mods,
                runtime.method_shared.get(name),
            )
            for name, mods in runtime.adapters.items()
        }
        if patch.model_hook is not None:
            patch.model_hook.composed = self  # Composed.of(model), e.g. of a deep copy of the model

    @classmethod
    def create(cls, model: nn.Module, graph: Graph, *, registry: Registry | None = None) -> Composed:
        """Validate, plan and apply ``graph`` to ``model``; see :func:`adapter_composer.compose`."""
        if not isinstance(model, nn.Module):
            raise ArgumentError(
                f"compose() needs a torch nn.Module (a transformers model), got {type(model).__name__}; "
                "load the model first, e.g. AutoModelForCausalLM.from_pretrained(path)"
            )
        if not isinstance(graph, Graph):
            raise ArgumentError(
                f"compose() needs an adapter_composer.Graph, got {type(graph).__name__}; "
                "build one with ac.Graph() (or ac.Graph.from_json(text) for a saved graph)"
            )
        if _already_composed(model):
            raise ComposerError("this model already has a composition applied; call undo() on it first")
        from adapter_composer.live.hf import install, peft_diagnostic

        peft = peft_diagnostic(model)
        if peft is not None:
            raise CompositionError([peft])
        registry = registry or default_registry()
        analysis = analyse(graph, registry, model)
        if analysis.diagnostics:
            raise CompositionError(analysis.diagnostics)
        the_plan = make_plan(analysis)
        print_ = fingerprint(model)
        calls = CallScope()
        runtime = build_runtime(analysis, the_plan, calls)
        block_paths = {}
        for layer in sorted(block_layers(runtime)):
            path = analysis.resolver.block_path(layer)
            if path is None:
                raise CompositionError(
                    [Diagnostic(code="point-missing", message=f"a per-layer router needs the input of layer {layer}, but the architecture maps no 'block' role",
                                fix="use router='site', or add a 'block' role to the architecture plugin")]
                )
            block_paths[layer] = path
        patch = patch_model(model, runtime, calls, the_plan, block_paths=block_paths)
        composed = cls(model, graph.copy(), the_plan, registry, analysis, runtime, patch, calls, print_)
        install(composed)  # save_pretrained / Trainer checkpoints that reload (see adapter_composer.live.hf)
        return composed

    @classmethod
    def of(cls, model: nn.Module) -> Composed:
        """The composition applied to ``model``, e.g. to a ``copy.deepcopy`` of a composed model
        (whose copy has its own: saving, undoing or hot-swapping it leaves the original alone)."""
        hook = _model_hook(model)
        if hook is None or not isinstance(hook.composed, cls):
            raise ComposerError(f"this {type(model).__name__} has no composition applied; compose it with adapter_composer.compose")
        return hook.composed

    # --- copies -----------------------------------------------------------------------

    def __deepcopy__(self, memo: dict) -> Composed:
        """An independent composition on a deep copy of the model. The registry (plugins are
        code) is shared, not copied; everything else, weights and call state included, is new."""
        registry = self.registry
        memo.setdefault(id(registry), registry)
        for record in (*registry.methods.values(), *registry.operators.values(), *registry.architectures):
            memo.setdefault(id(record), record)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise not_picklable("the Composed handle")

    # --- lifecycle --------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return not self._patch.undone

    def _require_active(self) -> None:
        if self._patch.undone:
            raise ComposerError("this composition was undone; compose the model again to use it")

    def undo(self) -> nn.Module:
        """Put the original modules back (same objects, bit-identical state) and return the model."""
        undo_patch(self._patch)
        return self.model

    def sites(self) -> dict[tuple[str, str], nn.Module]:
        return dict(self._rt.sites)

    # --- training ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> Composed:
        """Training mode: the base stays frozen, only adapter parameters train."""
        self._require_active()
        self.model.train(mode)
        return self

    def eval(self) -> Composed:
        return self.train(False)

    def parameters(self) -> list[nn.Parameter]:
        """All trainable parameters of the composition (adapters and operator weights)."""
        seen: set[int] = set()
        out = []
        for module in self._rt.all_modules():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups; methods may ask for their own (LoRA+ raises B's rate)."""
        groups: list[dict[str, Any]] = []
        claimed: set[int] = set()
        for name, handle in self.adapters.items():
            method = self._analysis.methods[name]
            if method.param_groups is None:
                continue
            for group in method.param_groups(handle.config, handle.modules, lr):
                params = [p for p in group["params"] if p.requires_grad and id(p) not in claimed]
                claimed.update(id(p) for p in params)
                if params:
                    groups.append(
                        {"weight_decay": weight_decay, **group, "params": params, "adapter": name}
                    )
        rest = [p for p in self.parameters() if id(p) not in claimed]
        if rest:
            groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay})
        return groups

    def print_trainable_parameters(self) -> None:
        """PEFT's line: ``trainable params: T || all params: A || trainable%: P``, where, as in
        PEFT, A counts every parameter (the frozen base and the adapters) and P = 100·T/A.
        (:meth:`trainable_parameters` gives the per-adapter table, with T as % of the base.)"""
        report = self.trainable_parameters()
        total = report.trainable + report.base
        print(
            f"trainable params: {report.trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * report.trainable / max(total, 1):.4f}"
        )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the block, without undoing anything (PEFT's
        ``disable_adapter()``). It holds for calls made in this thread (or asyncio task) only:
        other threads using the model meanwhile still get the composition."""
        from adapter_composer.runtime.switch import switched_off

        self._require_active()
        if self.merged:
            raise ComposerError("the composition is merged into the weights; call unmerge() before disable_adapter()")
        with switched_off(self.calls):
            yield

    def trainable_parameters(self) -> ParameterReport:
        per_adapter = {n: h.num_parameters(trainable_only=True) for n, h in self.adapters.items()}
        per_operator = {
            n: sum(p.numel() for p in m.parameters() if p.requires_grad)
            for n, m in self._rt.shared.items()
        }
        per_operator = {k: v for k, v in per_operator.items() if v}
        trainable = sum(p.numel() for p in self.parameters())
        adapter_ids = {id(p) for p in self.parameters()}
        base = sum(math.prod(logical_shape(p)) for p in self.model.parameters() if id(p) not in adapter_ids)
        return ParameterReport(per_adapter, per_operator, trainable, base)

    # --- routing and gates ------------------------------------------------------------

    @contextlib.contextmanager
    def routing(self, keys: Sequence[str | None] | str | None) -> Iterator[None]:
        """Route every forward call inside the block: one key per batch row (or one key
        for all rows); ``None`` rows use the base model. Also works around ``generate()``."""
        from adapter_composer.runtime.model import ROUTE

        if keys is not None and not isinstance(keys, str | list | tuple):
            raise RoutingError(f"routing() takes a key or a list of keys (one per row), not {type(keys).__name__}")
        token = ROUTE.set(
            None if keys is None else (keys if isinstance(keys, str) else tuple(keys))
        )
        try:
            yield
        finally:
            ROUTE.reset(token)

    @contextlib.contextmanager
    def record_gates(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the gate values of every mix site during the block: ``{"node@site": gates}``
        (for each site, those of the latest call). Only the calls made in this thread or task
        (and in tasks or threads started from it with a copy of its context) are recorded."""
        with self.calls.recording() as recorded:
            yield recorded

    @property
    def state(self) -> CallState | None:
        """The state of the latest forward call in this thread or task (None before any)."""
        return self.calls.current()

    def aux_loss(self) -> torch.Tensor:
        """The load-balancing losses of the latest forward call in this thread or task (mix
        sites), summed; add it to the task loss while training. Zero when there is none."""
        state = self.calls.current()
        losses = [] if state is None else list(state.aux_losses.values())
        if not losses:
            return torch.zeros(())
        return torch.stack([loss.float() for loss in losses]).sum()

    # --- hot swap (see adapter_composer.live.hotswap) ----------------------------------------------

    def add_adapter(
        self, name: str, method: str, *, route: str, key: str, **kwargs: Any
    ) -> AdapterHandle:
        """Serve a new adapter under route node ``route`` for ``key``, without re-composing."""
        from adapter_composer.live.hotswap import add_adapter

        return add_adapter(self, name, method, route=route, key=key, **kwargs)

    def load_adapter(
        self, directory: str | Path, *, name: str, route: str, key: str, adapter: str | None = None
    ) -> AdapterHandle:
        """Serve an adapter from disk (PEFT directory or saved composition) under ``route``."""
        from adapter_composer.live.hotswap import load_adapter

        return load_adapter(self, directory, name=name, route=route, key=key, adapter=adapter)

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` (which sits under route nodes only)."""
        from adapter_composer.live.hotswap import remove_adapter

        remove_adapter(self, name)

    def replace_weights(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load new weights into adapter ``name`` in place (same shapes)."""
        from adapter_composer.live.hotswap import replace_weights

        replace_weights(self, name, tensors)

    # --- merging ----------------------------------------------------------------------

    def merge(self, partial: bool = False) -> list[str]:
        """Fold every adapter into the base weights (exactly; originals are kept for unmerge).

        Refuses, listing every reason, when something cannot be folded exactly (an adapter
        under route or mix, a method that is not linear). With ``partial=True`` merges the
        linear sites that can be and returns the adapters left active.
        """
        self._require_active()
        mergeable, left = plan_merge(self, partial)
        for site in mergeable:
            site.merge()
        return left

    def merge_sum(self, node: str, strategy: str = "linear", **options: Any) -> Any:
        """Merge the adapters under sum node ``node`` into one update per site with a named
        strategy (linear, cat: exact; svd, ties, dare: approximate, with their error).
        See :mod:`adapter_composer.live.merging`."""
        from adapter_composer.live.merging import merge_sum

        return merge_sum(self, node, strategy, **options)

    def unmerge(self) -> None:
        """Restore the weights saved by :meth:`merge` (bit-identical)."""
        for site in self._rt.sites.values():
            if hasattr(site, "unmerge"):
                site.unmerge()

    @property
    def merged(self) -> bool:
        return any(getattr(s, "merged", False) for s in self._rt.sites.values())

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold everything into the weights, remove the composition, and return the plain model.

        Irreversible: the original weights are not kept."""
        self.merge()
        for site in self._rt.sites.values():
            if hasattr(site, "forget_originals"):
                site.forget_originals()
        kept = [(parent, attr, site.unloaded()) for parent, attr, _, site in self._patch.swaps if isinstance(site, LinearSite)]
        undo_patch(self._patch)
        for parent, attr, module in kept:
            if module is not None:  # merged into a new layer (a quantised base): keep that layer
                setattr(parent, attr, module)
        return self.model

    # --- files ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``composition.json`` and one safetensors file per adapter, atomically."""
        from adapter_composer.formats.composition import save_composition

        return save_composition(self, Path(directory))

    def save_pretrained(self, directory: str | Path) -> Path:
        """PEFT's spelling of :meth:`save`: the composition only (``ac.from_pretrained(model, d)``
        or ``ac.load`` reads it). ``composed.model.save_pretrained(d)`` writes the whole model."""
        return self.save(directory)

    def to_peft(
        self,
        name: str,
        directory: str | Path,
        *,
        modules: Sequence[str] | None = None,
        base_model_name_or_path: str | None = None,
        revision: str | None = None,
        task_type: str | None = None,
    ) -> Path:
        """Export adapter ``name`` in PEFT's format, with PEFT's metadata and ``modules`` (``module``
        adapters; by default those acting on every call) as ``modules_to_save``; see
        :func:`adapter_composer.formats.peft.export_peft`."""
        from adapter_composer.formats.peft import export_peft

        return export_peft(
            self, name, Path(directory), modules=modules, base_model_name_or_path=base_model_name_or_path,
            revision=revision, task_type=task_type,
        )

    def __repr__(self) -> str:
        state = "undone" if self._patch.undone else ("merged" if self.merged else "active")
        return f"Composed({type(self.model).__name__}, {len(self.adapters)} adapters, {len(self.plan.sites)} sites, {state})"


def _model_hook(model: nn.Module) -> ModelHook | None:
    for hook in getattr(model, "_forward_pre_hooks", {}).values():
        if isinstance(hook, ModelHook):
            return hook
    return None


def _already_composed(model: nn.Module) -> bool:
    return hasattr(model, CONTAINER_ATTR) or any(getattr(m, "is_composer_site", False) for m in model.modules())
