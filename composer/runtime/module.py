"""Module sites: a whole module (a head, an embedding, a norm) replaced by a trainable copy.

    module.replace    y = M'(x)        M' a trainable copy of the module M; M' = M at initialisation

This is what HF PEFT calls ``modules_to_save``. A program at a module site returns the output
of the module for the rows it serves, or ``None`` for "the base module". A route gives each row
its key's copy and rows without a key the base module, so per-task heads are one route over
copies of the head:

    route{a: M_a, b: M_b}(x)[i] = M_{key_i}(x[i])      (M(x[i]) for rows without a key)

Method modules are the copies themselves: ``forward(*args, **kwargs)`` as the base module's.
Merging copies the trained module's tensors back into the base module (bit-identical
outputs); the originals are kept, so ``unmerge()`` and ``undo()`` are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import ComposerError, RoutingError
from adapter_composer.sites import SiteInfo

from .state import CallScope
from .switch import adapters_off


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple):
        for v in value:
            found = _first_tensor(v)
            if found is not None:
                return found
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    return None


def take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` restricted to batch rows ``rows``: every tensor whose first dimension is the batch."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple | list):
        return type(value)(take_rows(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, rows, batch) for k, v in value.items()}
    return value


def put_rows(parts: Sequence[tuple[torch.Tensor, Any]], batch: int, where: str) -> Any:
    """The inverse of :func:`take_rows`: one output of ``batch`` rows from per-group outputs."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        out = first.new_zeros(batch, *first.shape[1:])
        for rows, value in parts:
            out = out.index_copy(0, rows, value.to(out.dtype))
        return out
    if isinstance(first, tuple) and not hasattr(first, "_fields"):
        return tuple(
            put_rows([(rows, value[i]) for rows, value in parts], batch, where) for i in range(len(first))
        )
    raise RoutingError(
        f"module site {where!r} returns {type(first).__name__}; a route over whole modules needs "
        "modules that return a tensor (or a tuple of tensors) with one row per example"
    )


class ModuleCall:
    """One call of a module site: its arguments, the batch size, the per-call state."""

    __slots__ = ("site", "args", "kwargs", "state", "batch", "device")

    def __init__(self, site: ModuleSite, args: tuple, kwargs: dict):
        self.site = site
        self.args = args
        self.kwargs = kwargs
        self.state = None if site.state is None else site.state.current()  # the call's CallState
        first = _first_tensor([args, kwargs])
        self.batch = None if first is None or first.dim() == 0 else int(first.shape[0])
        self.device = None if first is None else first.device

    def rows(self, rows: torch.Tensor) -> ModuleCall:
        """The same call restricted to batch rows ``rows``."""
        sub = ModuleCall.__new__(ModuleCall)
        sub.site, sub.state, sub.device = self.site, self.state, self.device
        sub.args = take_rows(self.args, rows, self.batch)
        sub.kwargs = take_rows(self.kwargs, rows, self.batch)
        sub.batch = int(rows.numel())
        return sub

    def base(self) -> Any:
        return self.site.base(*self.args, **self.kwargs)


def routed_output(call: ModuleCall, slots: torch.Tensor, children: Sequence[nn.Module], node: str) -> Any:
    """Each row through its child (``slots[i]``; ``len(children)``: the base module)."""
    if call.batch is None:
        raise RoutingError(f"route node {node!r}: module site {call.site.path!r} received no batched tensor")
    parts = []
    for i in torch.unique(slots).tolist():
        rows = (slots == i).nonzero().flatten()
        sub = call.rows(rows)
        out = children[i].module_output(sub) if i < len(children) else None
        parts.append((rows, sub.base() if out is None else out))
    return put_rows(parts, call.batch, call.site.path)


class ModuleLeaf(nn.Module):
    """One adapter's copy of the module at a module site."""

    def __init__(self, adapter: str, kind: str, module: nn.Module, info: SiteInfo):
        super().__init__()
        self.adapter = adapter
        self.kind = kind
        self.op = module
        self.key = info.key

    def module_output(self, call: ModuleCall) -> Any:
        return self.op(*call.args, **call.kwargs)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, kind={self.kind}"


class ModuleSite(nn.Module):
    """Replaces a module: ``base`` is the original, ``program`` the copies and operators over them."""

    is_composer_site = True  # lets target resolution see through an applied site

    def __init__(self, base: nn.Module, info: SiteInfo, program: nn.Module):
        super().__init__()
        self.base = base
        self.program = program
        self.path = info.path
        self.state: CallScope | None = None  # the composition's; state.current() is the call's CallState
        self.active = True
        self.merged = False
        self._originals: dict[str, torch.Tensor] | None = None

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped module (``weight``, ``num_embeddings``) stay reachable."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged or not self.active or adapters_off(self.state):
            return self.base(*args, **kwargs)
        out = self.program.module_output(ModuleCall(self, args, kwargs))
        return self.base(*args, **kwargs) if out is None else out

    # --- merging ----------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Copy the trained module into the base module (the program must be one copy)."""
        if self.merged:
            return
        if not isinstance(self.program, ModuleLeaf):
            raise ComposerError(
                f"module site {self.path!r} holds more than one copy (under a route or sum); only a single copy "
                "merges: merge the other adapters and keep the copies unmerged, or compose one copy"
            )
        self._originals = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        targets = self.base.state_dict(keep_vars=True)
        for k, v in self.program.op.state_dict().items():
            targets[k].copy_(v)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        targets = self.base.state_dict(keep_vars=True)
        for k, v in self._originals.items():
            targets[k].copy_(v)
        self._originals = None
        self.merged = False

    def forget_originals(self) -> None:
        """Keep the merged module for good (used by ``merge_and_unload``)."""
        self._originals = None
        self.merged = False
        self.active = False

    def extra_repr(self) -> str:
        return f"path={self.path!r}, merged={self.merged}"


__all__ = ["ModuleCall", "ModuleLeaf", "ModuleSite", "put_rows", "routed_output", "take_rows"]
