"""The route operator: per-example selection of a child by key, in one batch.

    route{sst2: a, mrpc: b}     row i gets child[key_i]; rows without a key get the base model

Behind a route, copies of a whole module (the ``module`` method) give per-task heads: row i
runs the copy of its key, rows without a key the base module.

Keys come with the call: ``model(**batch, route=["sst2", "mrpc", None, ...])`` or
``with composed.routing(keys): ...``. Each site computes its children on their own rows
only (grouped), or, when every child is a plain low-rank delta, gathers one A/B pair per
row and runs two batched matmuls whatever the number of adapters. Prompt and prefix
adapters are routed too: rows are left-padded with masked virtual slots to the longest
child, and positions are computed per row, so every row sees exactly what its adapter
alone would give (the output has the longest child's number of extra positions).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.errors import RoutingError
from adapter_composer.registry import hookimpl
from adapter_composer.runtime.linear import NF
from adapter_composer.runtime.lowrank import (
    LowRankBank,
    bank_of,
    in_place_target,
    lowrank_of,
    routed_delta,
    wants_grad,
)
from adapter_composer.runtime.model import SegmentCall, Segments
from adapter_composer.runtime.module import ModuleCall, routed_output
from adapter_composer.runtime.sublayer import SublayerCall


class RouteOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    default: str | None = Field(None, description="key used for rows given no key (None: those rows use the base model)")


class RouteNode(nn.Module):
    def __init__(self, children: list[nn.Module], keys: tuple[str, ...], default: str | None, node: str):
        super().__init__()
        self.items = nn.ModuleList(children)
        self.keys = list(keys)
        self.default = default
        self.node = node
        self._keyset = (tuple(self.keys), default)  # names the row→slot decision shared by all sites
        self.bank = LowRankBank()
        self._bank_now()

    # --- membership (hot swap) --------------------------------------------------------

    def set_child(self, key: str, child: nn.Module) -> None:
        """Add or replace the child for ``key`` (hot swap); O(1) in the number of children.

        The new low-rank adapter is written into its bank slot in place (its parameters become
        views of the slot; an added one takes a free slot, or the site re-banks with room for
        more); the adapter it replaces gets its own storage back."""
        self.bank.forget()
        if key in self.keys:
            i = self.keys.index(key)
            self.bank.release(self.items[i])  # the adapter leaving keeps its weights
            self.items[i] = child
            part = lowrank_of(child)
            if part is not None:
                self.bank.adopt(i, part)
        else:
            self.items.append(child)
            self.keys.append(key)
            self._keyset = (tuple(self.keys), self.default)
            part = lowrank_of(child)
            if part is not None and not self.bank.adopt(len(self.keys) - 1, part):
                self._bank_now(spare=len(self.keys) // 2)  # room for more: amortised O(1) per swap

    def remove_child(self, key: str) -> None:
        self.bank.forget()
        i = self.keys.index(key)
        self.bank.release(self.items[i])
        del self.items[i]
        del self.keys[i]
        self._keyset = (tuple(self.keys), self.default)
        self._bank_now()

    def _bank_now(self, spare: int = 0) -> None:
        """Bank the low-rank children now (so the adapters' own storage is the bank from the
        start); calls re-bank later whenever a parameter has moved out of its slot."""
        parts = [lowrank_of(c) for c in self.items]
        if not parts or any(p is None for p in parts) or parts[0][0].device.type == "meta":
            self.bank = LowRankBank()
            return
        self.bank.rebuild(parts, spare)

    # --- which row goes where ---------------------------------------------------------

    def _slots(self, call: Any, batch: int, device: torch.device) -> torch.Tensor | None:
        """Child index per row (len(children) = no adapter), computed once per call for all the
        sites whose route nodes have the same keys (memoised in the call's state)."""
        state = call.state
        route = state.route if state is not None else None
        if route is None and self.default is None:
            return None
        memo = (self._keyset, device, batch)
        cached = state.cache.get(memo) if state is not None else None
        if cached is not None:
            return cached
        if route is None:
            route = (None,) * batch
        if len(route) != batch:
            raise RoutingError(f"route node {self.node!r}: {len(route)} keys for a batch of {batch} rows")
        index = {k: i for i, k in enumerate(self.keys)}
        none = len(self.keys)
        slots = torch.tensor([index.get(self.default if k is None else k, none) for k in route], device=device)
        if state is not None:
            state.cache[memo] = slots
        return slots

    def _groups(self, slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        present = torch.unique(slots).tolist()
        return [(i, (slots == i).nonzero().flatten()) for i in present if i < len(self.keys)]

    # --- linear sites -----------------------------------------------------------------

    def linear_nf(self, x: torch.Tensor, call: Any) -> NF:
        slots = self._slots(call, x.shape[0], x.device)
        if slots is None or not self.keys:
            return NF()
        banked = None if torch.is_grad_enabled() else self.bank.fast()  # serving: O(1) in the children
        grad = False
        if banked is None:
            parts = [lowrank_of(c) for c in self.items]
            if not all(p is not None for p in parts):
                return self._grouped_nf(x, call, slots)
            grad = wants_grad(parts)
            banked = bank_of(self.bank, parts)
            if not grad:
                self.bank.remember(self.items, parts)
        a, b, scale = banked
        into = in_place_target(call, self, a.dtype, grad)
        if into is not None:  # the base output gets the deltas in place: nothing else to add
            routed_delta(x.to(a.dtype), a, b, scale, slots, into=into)
            return NF()
        return NF(e=routed_delta(x.to(a.dtype), a, b, scale, slots))

    def _grouped_nf(self, x: torch.Tensor, call: Any, slots: torch.Tensor) -> NF:
        out = NF()
        batch = x.shape[0]
        for i, rows in self._groups(slots):
            sub = self.items[i].linear_nf(x.index_select(0, rows), call.narrow(rows))
            for name in ("a", "b", "e"):
                value = getattr(sub, name)
                if value is None:
                    continue
                if name == "e":
                    full = getattr(out, name)
                    if full is None:
                        full = value.new_zeros(batch, *value.shape[1:])
                    setattr(out, name, full.index_copy(0, rows, value))
                else:
                    rows_value = value.expand(len(rows), *([1] * (x.dim() - 2)), value.shape[-1]) if value.dim() == 1 else value
                    full = getattr(out, name)
                    if full is None:
                        full = rows_value.new_ones(batch, *rows_value.shape[1:])
                    setattr(out, name, full.index_copy(0, rows, rows_value))
        return out

    def linear_fold(self, site):
        raise TypeError(f"route node {self.node!r} depends on the input and cannot be folded into weights")

    # --- sublayer sites ---------------------------------------------------------------

    def sublayer_residual(self, h: torch.Tensor, call: SublayerCall) -> torch.Tensor | None:
        slots = self._slots(call, h.shape[0], h.device)
        if slots is None:
            return None
        total = None
        for i, rows in self._groups(slots):
            sub_call = call.narrow(rows)
            r = self.items[i].sublayer_residual(h.index_select(0, rows), sub_call)
            if r is None:
                continue
            total = h.new_zeros(h.shape) if total is None else total
            total = total.index_copy(0, rows, r.to(total.dtype))
        return total

    # --- module sites (per-key copies of a whole module, e.g. per-task heads) ----------

    def module_output(self, call: ModuleCall) -> Any:
        if call.batch is None:
            raise RoutingError(f"route node {self.node!r}: module site {call.site.path!r} received no batched tensor")
        slots = self._slots(call, call.batch, call.device)
        if slots is None or not self.keys:
            return None
        return routed_output(call, slots, list(self.items), self.node)

    # --- prompt and prefix sites ------------------------------------------------------

    def segments(self, call: SegmentCall) -> Segments | None:
        slots = self._slots(call, call.batch, call.device)
        if slots is None:
            return None
        one = SegmentCall(1, call.state, call.dtype, call.device)
        per_child = [c.segments(one) for c in self.items]
        longest = max((s.length for s in per_child if s is not None), default=0)
        if longest == 0:
            return None
        template = next(s.values for s in per_child if s is not None)
        rows, valid = [], []
        for slot in slots.tolist():
            seg = per_child[slot] if slot < len(per_child) else None
            n = 0 if seg is None else seg.length
            pad = template.new_zeros(longest - n, *template.shape[2:])
            rows.append(pad if seg is None else torch.cat([pad, seg.values[0]], 0))
            valid.append(torch.arange(longest, device=call.device) >= longest - n)
        return Segments(torch.stack(rows), torch.stack(valid))

    def extra_repr(self) -> str:
        return f"node={self.node!r}, keys={self.keys}, default={self.default!r}"


def _route(children, options: RouteOptions, keys, shared, ctx):
    return RouteNode(children, keys, options.default, ctx.node)


def _check(options: RouteOptions, n_children: int, keys) -> list[str]:
    if options.default is not None and keys is not None and options.default not in keys:
        return [f"default key {options.default!r} is not one of the route's keys {list(keys)}"]
    return []


@hookimpl
def register_operators(register):
    register.operator(
        "route",
        options=RouteOptions,
        families={"linear": _route, "sublayer": _route, "prompt": _route, "prefix": _route, "module": _route},
        keyed=True,
        check=_check,
        description="Per-example selection by key in one batch; rows without a key use the base model.",
    )


@hookimpl
def register_rules(register):
    for inner in ("stack", "sum", "mix"):
        register.nesting("route", inner, allowed=True, reason="each route branch may be any composition")
    for outer in ("stack", "sum"):
        register.nesting(outer, "route", allowed=True, reason="a routed part inside an ordered or summed composition")
    register.nesting("route", "route", allowed=False, reason="nested routes would need two keys per row")
