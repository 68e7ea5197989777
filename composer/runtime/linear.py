"""Linear sites: one module replacing a linear layer, holding the base layer and a compiled program.

Every op at a linear site transforms the layer function f (initially the base layer):

    delta Δ       f'(x) = f(x) + Δ(x)            (LoRA, DoRA, VeRA, AdaLoRA)
    scale_out l   f'(x) = f(x) ⊙ l               (IA3 on keys/values)
    scale_in  l   f'(x) = f(x ⊙ l)               (IA3 on the feed-forward input)

A program is a tree of ops and operators (stack, sum, ...). Evaluating it yields a normal
form ``NF(a, b, e)`` meaning ``y = base(x ⊙ a) ⊙ b + e``, so the base layer runs exactly
once per call whatever the program. Stack (the later op wraps the earlier) composes as

    outer (A, B, E) ∘ inner (a, b, e)  =  (A ⊙ a,  b ⊙ B,  E + e(x ⊙ A) ⊙ B)

and a weighted combination Σ cᵢ·childᵢ (sum, mix, route) as

    a = 1 + Σ cᵢ (aᵢ − 1),   b = 1 + Σ cᵢ (bᵢ − 1),   e = Σ cᵢ eᵢ

which is exact when the children do not mix input and output scales (validation refuses
that, except where the coefficients are one-hot per row, as in route). Merging folds the
same algebra over weight matrices instead of activations.

Method modules implement one protocol per kind:

    linear.delta       forward(x, site) -> Δ(x) [..., out];   delta_weight(site) -> ΔW [out, in]
    linear.scale_*     scale() -> l [n]

``site`` is a :class:`SiteView`: ``site.weight()`` is the base weight [out, in] (sliced to
the op's part of a fused layer) and ``site.base_output(x)`` is W x without bias, reused
from the base call when possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapter_composer.sites import SiteInfo, linear_weight

from .state import CallScope, CallState
from .switch import adapters_off


@dataclass
class NF:
    """y = base(x ⊙ a) ⊙ b + e; ``None`` stands for the identity (a = b = 1, e = 0)."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    e: torch.Tensor | None = None


def _mul(p: torch.Tensor | None, q: torch.Tensor | None) -> torch.Tensor | None:
    if p is None:
        return q
    if q is None:
        return p
    return p * q


def _add(p: torch.Tensor | None, q: torch.Tensor | None) -> torch.Tensor | None:
    if p is None:
        return q
    if q is None:
        return p
    return p + q


def nf_stack(children: Sequence[nn.Module], x: torch.Tensor, call: LinearCall) -> NF:
    """Apply ``children`` in order (the last one outermost) and return the combined form."""
    acc = NF()
    xin = x
    for child in reversed(children):
        inner = child.linear_nf(xin, call)
        if inner.e is not None:
            acc.e = _add(acc.e, inner.e if acc.b is None else inner.e * acc.b)
        acc.b = _mul(inner.b, acc.b)
        if inner.a is not None:
            acc.a = _mul(acc.a, inner.a)
            xin = xin * inner.a
    return acc


def nf_weighted(coefs: Sequence[Any], nfs: Sequence[NF]) -> NF:
    """Σ cᵢ·childᵢ: coefficients are floats or tensors broadcastable against activations."""
    out = NF()
    for c, nf in zip(coefs, nfs, strict=True):
        if nf.a is not None:
            out.a = _add(out.a, c * (nf.a - 1))
        if nf.b is not None:
            out.b = _add(out.b, c * (nf.b - 1))
        if nf.e is not None:
            out.e = _add(out.e, c * nf.e)
    if out.a is not None:
        out.a = out.a + 1
    if out.b is not None:
        out.b = out.b + 1
    return out


@dataclass
class Fold:
    """The effect of a program on the weights: W' = diag(b) W diag(a) + e, bias' = b ⊙ bias."""

    a: torch.Tensor | None = None  # [in]
    b: torch.Tensor | None = None  # [out]
    e: torch.Tensor | None = None  # [out, in]


def fold_stack(children: Sequence[nn.Module], site: LinearSite) -> Fold:
    acc = Fold()
    for child in reversed(children):
        inner = child.linear_fold(site)
        if inner.e is not None:
            e = inner.e
            if acc.a is not None:
                e = e * acc.a[None, :]
            if acc.b is not None:
                e = e * acc.b[:, None]
            acc.e = _add(acc.e, e)
        acc.b = _mul(inner.b, acc.b)
        acc.a = _mul(acc.a, inner.a)
    return acc


def fold_weighted(coefs: Sequence[float], folds: Sequence[Fold]) -> Fold:
    return Fold(**vars(nf_weighted(coefs, [NF(f.a, f.b, f.e) for f in folds])))


class SiteView:
    """What a method module sees of its site during a call or a merge."""

    __slots__ = ("_site", "_slice", "_call")

    def __init__(
        self, site: LinearSite, out_slice: tuple[int, int] | None, call: LinearCall | None
    ):
        self._site = site
        self._slice = out_slice
        self._call = call

    def weight(self) -> torch.Tensor:
        w = self._site.original_weight()
        return w if self._slice is None else w[self._slice[0] : self._slice[1]]

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """W x (no bias) for this op's slice; reuses the base call's output when x is its input."""
        call = self._call
        if call is not None and call.y is not None and x is call.x:
            y = call.y_nobias()
            if y.dtype == x.dtype:
                return y if self._slice is None else y[..., self._slice[0] : self._slice[1]]
        return F.linear(x, self.weight().to(x.dtype))

    @property
    def state(self) -> CallState | None:
        """The state of the call in progress (routing keys, gates)."""
        if self._call is not None:
            return self._call.state
        scope = self._site.state
        return None if scope is None else scope.current()


class LinearCall:
    """Per-forward scratch of one linear site (its input, and the base output once computed).

    ``state`` is the state of the call in progress; ``rows`` the rows of the call's batch this
    scratch covers (None: all; set by :meth:`narrow` when an operator splits the batch)."""

    __slots__ = ("site", "x", "y", "_y_nobias", "state", "rows")

    def __init__(self, site: LinearSite, x: torch.Tensor | None, state: CallState | None = None, rows: torch.Tensor | None = None):
        self.site = site
        self.x = x
        self.y: torch.Tensor | None = None
        self._y_nobias: torch.Tensor | None = None
        self.rows = rows
        if state is None and site.state is not None:
            state = site.state.current()
        self.state = state

    def narrow(self, rows: torch.Tensor) -> LinearCall:
        """The scratch of the sub-batch ``rows`` (of this scratch's rows), same call state."""
        return LinearCall(self.site, None, self.state, rows if self.rows is None else self.rows.index_select(0, rows))

    def y_nobias(self) -> torch.Tensor:
        if self._y_nobias is None:
            bias = getattr(self.site.base, "bias", None)
            self._y_nobias = self.y if bias is None else self.y - bias
        return self._y_nobias


class Leaf(nn.Module):
    """One adapter's op at one site: the method's module plus where its output goes."""

    def __init__(self, adapter: str, kind: str, module: nn.Module, info: SiteInfo, full_out: int):
        super().__init__()
        self.adapter = adapter
        self.kind = kind
        self.op = module
        self.key = info.key
        self.out_slice = info.out_slice
        self.full_out = full_out
        self.in_features = info.in_features
        self.site: LinearSite | None = None  # set by the site; not a submodule (no cycle)

    def _pad(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        if self.out_slice is None:
            return t
        start, stop = self.out_slice
        return F.pad(t, (start, self.full_out - stop), value=fill)

    def _param_dtype(self) -> torch.dtype | None:
        return next((p.dtype for p in self.op.parameters()), None)

    def linear_nf(self, x: torch.Tensor, call: LinearCall) -> NF:
        if self.kind == "linear.delta":
            dtype = self._param_dtype()
            # under autocast, x already in its low precision stays there (the method's matmuls
            # autocast anyway: an up-cast here would only be cast back, two copies per call)
            keep = dtype is None or x.dtype == dtype or (
                torch.is_autocast_enabled(x.device.type) and x.dtype == torch.get_autocast_dtype(x.device.type))
            xin = x if keep else x.to(dtype)
            view = SiteView(call.site, self.out_slice, call if xin is x else None)
            return NF(e=self._pad(self.op(xin, view), 0.0))
        scale = self.op.scale()
        if self.kind == "linear.scale_out":
            return NF(b=self._pad(scale, 1.0).to(x.dtype))
        return NF(a=scale.to(x.dtype))

    def linear_fold(self, site: LinearSite) -> Fold:
        if self.kind == "linear.delta":
            dw = self.op.delta_weight(SiteView(site, self.out_slice, None))
            if self.out_slice is not None:
                start, stop = self.out_slice
                dw = F.pad(dw, (0, 0, start, self.full_out - stop))
            return Fold(e=dw)
        scale = self.op.scale()
        if self.kind == "linear.scale_out":
            return Fold(b=self._pad(scale, 1.0))
        return Fold(a=scale)

    def extra_repr(self) -> str:
        where = "" if self.out_slice is None else f", out[{self.out_slice[0]}:{self.out_slice[1]}]"
        return f"adapter={self.adapter!r}, kind={self.kind}{where}"


class LinearSite(nn.Module):
    """Replaces a linear layer: ``base`` is the original module, ``program`` the compiled ops."""

    is_composer_site = True  # lets target resolution see through an applied site

    def __init__(self, base: nn.Module, info: SiteInfo, program: nn.Module, has_scale_in: bool):
        super().__init__()
        self.base = base
        self.program = program
        self.path = info.path
        self.has_scale_in = has_scale_in
        self.merged = False
        self.active = True
        self.state: CallScope | None = None  # the composition's; state.current() is the call's CallState
        self._originals: tuple[torch.Tensor, torch.Tensor | None] | None = None
        for leaf in self.leaves():
            object.__setattr__(leaf, "site", self)  # a back-reference, not a submodule

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapped module has (``weight``, ``layer_idx``, child modules) stay
        reachable through the site, so model code and module paths keep working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def leaves(self) -> list[Leaf]:
        return [m for m in self.program.modules() if isinstance(m, Leaf)]

    def original_weight(self) -> torch.Tensor:
        """The base weight as [out, in], as it was before any merge."""
        if self._originals is not None:
            w = self._originals[0]
            return w if isinstance(self.base, nn.Linear) else w.t()
        return linear_weight(self.base)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged or not self.active or adapters_off(self.state):
            return self.base(x, *args, **kwargs)
        call = LinearCall(self, x)
        if not self.has_scale_in:
            call.y = self.base(x, *args, **kwargs)
            nf = self.program.linear_nf(x, call)
            y = call.y
        else:
            nf = self.program.linear_nf(x, call)
            y = self.base(x if nf.a is None else x * nf.a, *args, **kwargs)
        if nf.b is not None:
            y = y * nf.b
        if nf.e is not None:
            y = y + nf.e if nf.e.dtype == y.dtype else (y.to(nf.e.dtype) + nf.e).to(y.dtype)
        return y

    # --- merging ----------------------------------------------------------------------

    @torch.no_grad()
    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', bias') with the program folded in; W' as [out, in], computed in float32."""
        fold = self.program.linear_fold(self)
        w = self.original_weight().float()
        if fold.a is not None:
            w = w * fold.a.float()[None, :]
        if fold.b is not None:
            w = w * fold.b.float()[:, None]
        if fold.e is not None:
            w = w + fold.e.float()
        bias = getattr(self.base, "bias", None)
        if self._originals is not None:
            bias = self._originals[1]
        if bias is not None and fold.b is not None:
            bias = bias.float() * fold.b.float()
        return w, bias

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w, bias = self.merged_weights()
        weight = self.base.weight
        self._originals = (
            weight.data.clone(),
            None if self.base.bias is None else self.base.bias.data.clone(),
        )
        target = w if isinstance(self.base, nn.Linear) else w.t()
        weight.copy_(target.to(weight.dtype))
        if bias is not None and self.base.bias is not None:
            self.base.bias.copy_(bias.to(self.base.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w, b = self._originals
        self.base.weight.copy_(w)
        if b is not None:
            self.base.bias.copy_(b)
        self._originals = None
        self.merged = False

    def forget_originals(self) -> None:
        """Keep the merged weights for good (used by ``merge_and_unload``)."""
        self._originals = None
        self.merged = False
        self.active = False

    def unloaded(self) -> nn.Module | None:
        """The module ``merge_and_unload`` puts at this path instead of the original one, or
        ``None`` to keep the original (here: its weights were merged in place). Sites that
        merge into a new layer (a quantised base, see ``plugins.bnb``) return that layer."""
        return None

    def extra_repr(self) -> str:
        return f"path={self.path!r}, merged={self.merged}"
