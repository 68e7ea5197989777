"""Parameter-space mixing of adapters: the kernel shared by Polytropon/MHR and LoraHub.

Children c₁..cₙ of one method at a site, with parameters θᵢ, and weights w give the adapter
whose parameters are the weighted sum (not the sum of the children's outputs):

    Δ_w(x) = f(x; Σᵢ wᵢ θᵢ)

For LoRA (θᵢ = (Aᵢ, Bᵢ), one scale s) this is computed from the factors directly:

    Δ_w(x) = s · (Σᵢ wᵢ Bᵢ)(Σᵢ wᵢ Aᵢ) x              A [r, in], B [out, r]

and with q splits (MHR, Caccia et al. 2023) A's input columns and B's output rows are cut
into q equal heads, head h mixed with its own weights w_h:

    A_w[:, head h] = Σᵢ w_{h,i} Aᵢ[:, head h]        B_w[head h, :] = Σᵢ w_{h,i} Bᵢ[head h, :]

Weights are ``[n]`` or ``[q, n]`` for every row, or ``[rows, q, n]`` per row (two batched
matmuls). Any other ``linear.delta`` method is evaluated with its own forward on the mixed
parameters (``torch.func.functional_call`` on a private, weight-sharing copy of the first
child, under a lock, so no module other threads use is ever reparametrised); its buffers are
the first child's and must equal the others'. Splits need LoRA factors.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.runtime import SharedRef
from adapter_composer.runtime.linear import SiteView

__all__ = ["ParamMixer"]


def _settings(op: nn.Module) -> dict[str, Any]:
    """The plain hyper-parameters a method module keeps as attributes (e.g. LoRA's scale)."""
    plain = (int, float, str, bool, tuple)
    return {
        k: v
        for k, v in vars(op).items()
        if not k.startswith("_") and k != "training" and isinstance(v, plain)
    }


class _Shadow(nn.Module):
    """A weight-sharing copy of one child's method module, called with mixed parameters."""

    def __init__(self, op: nn.Module):
        super().__init__()
        memo: dict[int, Any] = {id(t): t for t in (*op.parameters(), *op.buffers())}
        for module in op.modules():  # modules shared by many sites stay shared
            memo.update({id(v): v for v in vars(module).values() if isinstance(v, SharedRef)})
        self.op = copy.deepcopy(op, memo)

    def forward(self, mode: str, *args: Any) -> torch.Tensor:
        return self.op(*args) if mode == "delta" else self.op.delta_weight(*args)


class ParamMixer:
    """Mixes the parameters of the children (``Leaf`` modules) of one node at one site."""

    def __init__(self, children: Sequence[nn.Module], node: str, operator: str):
        self.node, self.operator = node, operator
        self.leaves = list(children)
        problems = self._check()
        if problems:
            raise ComposerError(
                f"{operator} node {node!r} mixes its children's parameters, so they must be adapters of one "
                "linear.delta method with the same shapes and settings: " + "; ".join(problems)
            )
        first = self.leaves[0]
        self.names = [n for n, _ in first.op.named_parameters()]
        self._shadow = _Shadow(first.op)
        self._lock = threading.Lock()
        self.out_slice, self.full_out = first.out_slice, first.full_out

    # --- checks -----------------------------------------------------------------------

    def _check(self) -> list[str]:
        found = []
        for leaf in self.leaves:
            if getattr(leaf, "kind", None) != "linear.delta" or not hasattr(leaf, "op"):
                what = getattr(leaf, "kind", None) or type(leaf).__name__
                return [f"a child is {what!r}, not one adapter's linear.delta op at this site"]
        ref = self.leaves[0]
        shapes = {n: p.shape for n, p in ref.op.named_parameters()}
        for leaf in self.leaves[1:]:
            who = f"{leaf.adapter!r} vs {ref.adapter!r}"
            if type(leaf.op) is not type(ref.op):
                found.append(f"{who}: {type(leaf.op).__name__} and {type(ref.op).__name__}")
            elif {n: p.shape for n, p in leaf.op.named_parameters()} != shapes:
                found.append(f"{who}: parameter shapes differ at {ref.key}")
            elif _settings(leaf.op) != _settings(ref.op):
                found.append(
                    f"{who}: settings differ at {ref.key} ({_settings(leaf.op)} vs {_settings(ref.op)})"
                )
            elif leaf.out_slice != ref.out_slice:
                found.append(f"{who}: they act on different parts of {ref.key}")
            else:
                mine, theirs = dict(leaf.op.named_buffers()), dict(ref.op.named_buffers())
                if mine.keys() != theirs.keys() or any(
                    not torch.equal(mine[k], theirs[k]) for k in mine
                ):
                    found.append(f"{who}: buffers differ at {ref.key}")
        return found

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
        """Each child's (A, B, s) when every child is LoRA-like now: its ``lowrank()`` factors are
        exactly its parameters (not while dropout is active); otherwise None."""
        parts = []
        for leaf in self.leaves:
            fn = getattr(leaf.op, "lowrank", None)
            part = fn() if fn is not None and leaf.out_slice is None else None
            if part is None:
                return None
            params = {id(p) for p in leaf.op.parameters()}
            if params != {id(part[0]), id(part[1])}:
                return None
            parts.append(part)
        return parts

    # --- mixing -----------------------------------------------------------------------

    def delta(self, x: torch.Tensor, call: Any, weights: torch.Tensor) -> torch.Tensor:
        """Δ_w(x) for x [rows, ..., in]; weights [n], [q, n] or per row [rows, q, n]."""
        parts = self.factors()
        if parts is not None:
            return self._lowrank_delta(x, parts, weights)
        if weights.dim() == 2 and weights.shape[0] > 1:
            raise ComposerError(
                f"{self.operator} node {self.node!r}: splitting into heads needs LoRA factors, but a child "
                f"({self.leaves[0].adapter!r}) has none now (DoRA, dropout while training, or another method)"
            )
        if weights.dim() == 3:  # one mixture per row
            rows = [
                self._generic(x[i : i + 1], call, weights[i].reshape(-1)) for i in range(x.shape[0])
            ]
            return torch.cat(rows, 0)
        return self._generic(x, call, weights.reshape(-1))

    def fold(self, site: Any, weights: torch.Tensor) -> torch.Tensor:
        """ΔW_w [out, in] (the full output of a fused layer, zero outside this op's part)."""
        parts = self.factors()
        if parts is not None:
            a, b = self._mixed_factors(parts, weights.to(parts[0][0].dtype))
            return (b @ a) * parts[0][2]
        if weights.dim() == 2 and weights.shape[0] > 1:
            raise ComposerError(
                f"{self.operator} node {self.node!r}: splitting into heads needs LoRA factors"
            )
        view = SiteView(site, self.out_slice, None)
        dw = self._call(weights.reshape(-1), "fold", view)
        if self.out_slice is not None:
            dw = F.pad(dw, (0, 0, self.out_slice[0], self.full_out - self.out_slice[1]))
        return dw

    @staticmethod
    def _mixed_factors(parts, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_w, B_w): A [..., r, in], B [..., out, r] for w [n], [q, n] or [rows, q, n]."""
        a = torch.stack([p[0] for p in parts])  # [n, r, in]
        b = torch.stack([p[1] for p in parts])  # [n, out, r]
        n, r, fan_in = a.shape
        fan_out = b.shape[1]
        if w.dim() == 1:
            return torch.einsum("n,nri->ri", w, a), torch.einsum("n,nor->or", w, b)
        q = w.shape[-2]
        a4 = a.reshape(n, r, q, fan_in // q)  # head h: input columns h·in/q … (h+1)·in/q
        b4 = b.reshape(n, q, fan_out // q, r)  # head h: output rows h·out/q … (h+1)·out/q
        if w.dim() == 2:
            am = torch.einsum("hn,nrhd->rhd", w, a4).reshape(r, fan_in)
            bm = torch.einsum("hn,nhor->hor", w, b4).reshape(fan_out, r)
            return am, bm
        rows = w.shape[0]
        am = torch.einsum("bhn,nrhd->brhd", w, a4).reshape(rows, r, fan_in)
        bm = torch.einsum("bhn,nhor->bhor", w, b4).reshape(rows, fan_out, r)
        return am, bm

    def _lowrank_delta(self, x: torch.Tensor, parts, weights: torch.Tensor) -> torch.Tensor:
        dtype = parts[0][0].dtype
        a, b = self._mixed_factors(parts, weights.to(dtype))
        s = parts[0][2]
        xin = x.to(dtype)
        if a.dim() == 2:
            return F.linear(F.linear(xin, a), b) * s
        flat = xin.reshape(xin.shape[0], -1, xin.shape[-1])  # [rows, T, in]
        y = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2)) * s
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _generic(self, x: torch.Tensor, call: Any, w: torch.Tensor) -> torch.Tensor:
        dtype = next(iter(self.leaves[0].op.parameters())).dtype
        xin = x if x.dtype == dtype else x.to(dtype)
        view = SiteView(call.site, self.out_slice, call if xin is x else None)
        e = self._call(w.to(dtype), "delta", xin, view)
        if self.out_slice is not None:
            e = F.pad(e, (self.out_slice[0], self.full_out - self.out_slice[1]))
        return e

    def _call(self, w: torch.Tensor, mode: str, *args: Any) -> torch.Tensor:
        params = {}
        for name in self.names:
            tensors = [dict(leaf.op.named_parameters())[name] for leaf in self.leaves]
            params[f"op.{name}"] = sum(
                wi * t for wi, t in zip(w.to(tensors[0].dtype), tensors, strict=True)
            )
        params.update({f"op.{k}": v for k, v in self.leaves[0].op.named_buffers()})
        with self._lock:
            self._shadow.train(self.leaves[0].op.training)
            return torch.func.functional_call(self._shadow, params, (mode, *args), strict=True)


def register_parameter_mix_rules(register: Any, operator: str, unit: str) -> None:
    """The nesting and refusal rules every parameter-space mixing operator shares: it may sit
    under route/stack/sum (its result is one delta), holds plain adapters only, and mixes delta
    adapters, never scale vectors or LoftQ's quantised base. ``unit`` names its children."""
    for outer in ("route", "stack", "sum"):
        register.nesting(outer, operator, allowed=True, reason=f"a mixture of {unit}s is one delta")
    for inner in ("stack", "sum", "mix", "route", operator):
        register.nesting(
            operator,
            inner,
            allowed=False,
            reason=f"{operator} mixes its {unit}s' parameters, so each {unit} is one adapter",
        )
    for kind in ("linear.scale_out", "linear.scale_in"):
        register.refuse(
            kind=kind,
            operator=operator,
            reason=f"{operator} mixes the parameters of delta adapters (Δ(x) added to W x), not of scale vectors",
            fix=f"use LoRA {unit}s",
        )
    register.refuse(
        method="loftq",
        operator=operator,
        reason="a mixture of adapters' parameters would still run on LoftQ's quantised base, which replaces W unweighted",
        fix="declare the LoftQ adapter at the top level of the graph",
    )
