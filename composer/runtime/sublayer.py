"""Sublayer sites: adapters on a sublayer's result (attention or feed-forward), before the residual add.

A sublayer site wraps the module whose output is the sublayer's result (``output`` in the
architecture's ``Sublayer`` role) and sees the sublayer's input x (the ``input`` module's
first argument). Every op is residual:

    sublayer.output    h ↦ h + f(h)       (Houlsby / Pfeiffer bottleneck adapters)
    sublayer.parallel  h ↦ h + f(x)       (He et al. parallel adapter)

A program returns the *total residual* r, and the site returns h + r. Stack chains its
children (each sees the previous one's result; the residuals add up), and weighted
operators combine residuals: h + Σ cᵢ rᵢ.

Method modules implement ``forward(source) -> f(source)``, the residual of one op, where the
site passes ``h`` (the current value) for ``sublayer.output`` and ``x`` (the sublayer's input)
for ``sublayer.parallel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from adapter_composer.sites import SiteInfo

from .state import CallScope, CallState
from .switch import adapters_off


class SublayerCall:
    """Per-forward scratch of a sublayer site: the sublayer input, the state of the call in
    progress, and the rows of the call's batch it covers (None: all; see :meth:`narrow`)."""

    __slots__ = ("x", "state", "site", "rows")

    def __init__(self, site: SublayerSite, x: torch.Tensor | None, state: CallState | None = None, rows: torch.Tensor | None = None):
        self.site = site
        self.x = x
        self.rows = rows
        if state is None and site.state is not None:
            state = site.state.current()
        self.state = state

    def narrow(self, rows: torch.Tensor) -> SublayerCall:
        """The scratch of the sub-batch ``rows`` (of this scratch's rows), same call state."""
        x = None if self.x is None else self.x.index_select(0, rows)
        return SublayerCall(self.site, x, self.state, rows if self.rows is None else self.rows.index_select(0, rows))


def residual_stack(children: Sequence[nn.Module], h: torch.Tensor, call: SublayerCall) -> torch.Tensor | None:
    """Children in order, each on the previous one's result; the sum of their residuals."""
    total = None
    current = h
    for child in children:
        r = child.sublayer_residual(current, call)
        if r is None:
            continue
        current = current + r
        total = r if total is None else total + r
    return total


def residual_weighted(coefs: Sequence[Any], residuals: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    total = None
    for c, r in zip(coefs, residuals, strict=True):
        if r is not None:
            total = c * r if total is None else total + c * r
    return total


class SublayerLeaf(nn.Module):
    """One adapter's op at a sublayer site."""

    def __init__(self, adapter: str, kind: str, module: nn.Module, info: SiteInfo):
        super().__init__()
        self.adapter = adapter
        self.kind = kind
        self.op = module
        self.key = info.key

    def sublayer_residual(self, h: torch.Tensor, call: SublayerCall) -> torch.Tensor:
        if self.kind == "sublayer.parallel":
            if call.x is None:
                raise RuntimeError(f"sublayer site {call.site.path!r} did not receive its input")
            source = call.x
        else:
            source = h
        dtype = next(self.op.parameters()).dtype
        out = self.op(source.to(dtype))
        return out.to(h.dtype)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, kind={self.kind}"


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


class SublayerSite(nn.Module):
    """Wraps the module producing a sublayer's result; adds the program's residual to it."""

    is_composer_site = True  # lets target resolution see through an applied site

    def __init__(self, base: nn.Module, info: SiteInfo, program: nn.Module):
        super().__init__()
        self.base = base
        self.program = program
        self.path = info.path
        self.input_path = info.input_path or info.path
        self.state: CallScope | None = None  # the composition's; state.current() is the call's CallState
        self.active = True
        self._pending: torch.Tensor | None = None  # the sublayer input when no call state is current

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

    @property
    def own_input(self) -> bool:
        return self.input_path == self.path

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the input module (when it is not this module): the input is
        kept in the call's state, so concurrent calls never read each other's."""
        state = None if self.state is None else self.state.current()
        x = _first_arg(args, kwargs)
        if state is None:
            self._pending = x
        else:
            state.cache[(id(self), "input")] = x

    def _take_input(self, state: CallState | None) -> torch.Tensor | None:
        if state is None:
            x, self._pending = self._pending, None
            return x
        return state.cache.pop((id(self), "input"), None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        state = None if self.state is None else self.state.current()
        if not self.active or adapters_off(self.state):
            if not self.own_input:
                self._take_input(state)
            return out
        x = _first_arg(args, kwargs) if self.own_input else self._take_input(state)
        h = out[0] if isinstance(out, tuple) else out
        r = self.program.sublayer_residual(h, SublayerCall(self, x, state))
        if r is None:
            return out
        h = h + r
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def extra_repr(self) -> str:
        where = "" if self.own_input else f", input from {self.input_path!r}"
        return f"path={self.path!r}{where}"
