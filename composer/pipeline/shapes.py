"""Shapes planned without building anything: a composition's tensors, built on the meta device.

:func:`planned_shapes` builds every adapter and operator module of an analysis on the
*meta* device (shapes without memory), with a meta stand-in for each base linear layer,
so that a loader can compare the tensors a file declares with what the composition would
build *before* building anything: a manifest declaring ``r=2**40`` costs nothing. A
method whose ``build`` cannot run on the meta device makes it return ``None``; the loader
then checks the real modules after building them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapter_composer.pipeline.apply import Runtime, build_adapter, build_node
from adapter_composer.pipeline.plan import make_plan
from adapter_composer.runtime.state import CallState
from adapter_composer.sites import SiteInfo, is_linear, linear_shape


@dataclass(frozen=True)
class PlannedShapes:
    """The tensors a composition would have, by adapter (``<site key>.<param>``,
    ``shared.<param>``) and for the operators (``<node>.<param>``)."""

    adapters: Mapping[str, Mapping[str, tuple[int, ...]]]
    operators: Mapping[str, tuple[int, ...]]
    adapter_dtypes: Mapping[str, Mapping[str, torch.dtype]]
    operator_dtypes: Mapping[str, torch.dtype]


def adapter_tensors(modules: Mapping[str, nn.Module], shared: nn.Module | None) -> dict[str, torch.Tensor]:
    """``<site key>.<param>`` (and ``shared.<param>``) -> tensor, as an adapter's tensors are named."""
    out = {f"{key}.{k}": v for key, m in modules.items() for k, v in m.state_dict().items()}
    if shared is not None:
        out.update({f"shared.{k}": v for k, v in shared.state_dict().items()})
    return out


def meta_site(info: SiteInfo) -> SiteInfo:
    """``info`` on the meta device, its base linear layer replaced by a meta stand-in of the
    same shape (so that ``site.weight()`` costs nothing)."""
    module = info.module
    if info.family == "linear" and module is not None and is_linear(module):
        fan_in, fan_out = linear_shape(module)
        bias = getattr(module, "bias", None) is not None
        module = nn.Linear(fan_in, fan_out, bias=bias, device="meta")
    return dataclasses.replace(info, module=module, device=torch.device("meta"))


def planned_shapes(analysis: Any, names: list[str] | None = None) -> PlannedShapes | None:
    """Build ``analysis``'s adapters (``names``, default all, then the operators too) on the
    meta device and return their tensors' shapes; ``None`` when some build cannot run there."""
    everything = names is None
    names = list(analysis.sites) if names is None else list(names)
    meta = dataclasses.replace(
        analysis, sites={n: [meta_site(i) for i in analysis.sites[n]] for n in names}
    )
    rt = Runtime()
    try:
        with torch.device("meta"):
            for name in names:
                build_adapter(meta, name, rt)
            if everything:
                first: dict[tuple[str, str], SiteInfo] = {}
                for infos in meta.sites.values():
                    for i in infos:
                        first.setdefault((i.path, i.family), i)
                for sp in make_plan(analysis).sites:
                    info = first.get((sp.path, sp.family))
                    build_node(meta, rt, sp.program, sp, CallState(), info)
    except Exception:  # not meta-friendly: the caller checks the real modules after building
        return None
    adapters = {n: adapter_tensors(rt.adapters[n], rt.method_shared.get(n)) for n in names}
    operators = {f"{node}.{k}": v for node, m in rt.shared.items() for k, v in m.state_dict().items()}
    return PlannedShapes(
        {n: {k: tuple(v.shape) for k, v in t.items()} for n, t in adapters.items()},
        {k: tuple(v.shape) for k, v in operators.items()},
        {n: {k: v.dtype for k, v in t.items()} for n, t in adapters.items()},
        {k: v.dtype for k, v in operators.items()},
    )


__all__ = ["PlannedShapes", "adapter_tensors", "meta_site", "planned_shapes"]
