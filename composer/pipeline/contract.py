"""The runtime contract of a method's modules, checked when composing, and shape planning.

**Building.** :func:`build_module` calls a method's ``build`` for one site: an exception
becomes an :class:`AdapterBuildError` naming the adapter, method, plugin and site (the
cause chained), and a result that is not an ``nn.Module`` a :class:`PluginContractError`.

**Probing.** The host relies on each kind's protocol (``adapter_composer.runtime``). A
third-party module that breaks it would compose and then fail every forward call with an
error naming nothing, or, worse, broadcast silently: a Δ of width 1 added to every output.
:func:`probe_adapter` therefore calls each module of a method from outside the package once,
right after it is built, on a tiny input (batch 1, 2 tokens, fixed values, ``no_grad``, eval
mode, the global RNG untouched), and checks what comes back:

    linear.delta        forward(x, site) -> [1, 2, out] floating;  delta_weight(site) -> [out, in] (mergeable)
    linear.scale_out    scale() -> [out];   linear.scale_in  scale() -> [in]
    sublayer.*          forward(h) -> [1, 2, width] (the shape of its input)
    input.embeddings    forward() -> [n, d_model]
    attention.kv_prefix forward() -> [n, num_layers, 2, num_kv_heads, head_dim]

Shapes must be equal, not broadcastable. A failure raises :class:`PluginContractError`
naming the plugin, the method, the adapter and the site. Built-in methods are covered by
the conformance battery instead (``force=True`` probes them too).

Shapes planned without building anything are in :mod:`adapter_composer.pipeline.shapes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapter_composer.errors import AdapterBuildError, ComposerError, PluginContractError
from adapter_composer.registry import BUILTIN_PLUGINS, MethodRecord
from adapter_composer.runtime.state import CallState
from adapter_composer.sites import SiteInfo

PROBE_TOKENS = 2


def _where(method: MethodRecord, adapter: str, info: SiteInfo) -> str:
    return f"method {method.name!r} (plugin {method.plugin!r}), adapter {adapter!r}, site {info.key}"


def build_module(
    method: MethodRecord, adapter: str, config: Any, info: SiteInfo, shared: Any = None
) -> nn.Module:
    """``method.build(config, info[, shared])``, with its failures named (module docstring)."""
    try:
        module = method.build(config, info) if shared is None else method.build(config, info, shared)
    except ComposerError:
        raise
    except Exception as exc:
        raise AdapterBuildError(
            f"building {_where(method, adapter, info)} ({info.path or 'the model'}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise PluginContractError(
            f"{_where(method, adapter, info)}: build() returned {type(module).__name__}, not an "
            "nn.Module; build(config, site) returns the module implementing the kind's protocol"
        )
    return module


def build_shared(method: MethodRecord, adapter: str, config: Any, infos: list[SiteInfo]) -> nn.Module:
    """``method.shared(config, infos)``, with its failures named."""
    try:
        module = method.shared(config, infos)
    except ComposerError:
        raise
    except Exception as exc:
        raise AdapterBuildError(
            f"building the shared module of method {method.name!r} (plugin {method.plugin!r}), "
            f"adapter {adapter!r}, failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise PluginContractError(
            f"method {method.name!r} (plugin {method.plugin!r}), adapter {adapter!r}: shared() "
            f"returned {type(module).__name__}, not an nn.Module"
        )
    return module


# --- probing ----------------------------------------------------------------------------


class _ProbeView:
    """A stand-in for :class:`adapter_composer.runtime.linear.SiteView` before the site exists."""

    def __init__(self, info: SiteInfo):
        self._info = info
        self.state = CallState()

    def weight(self) -> torch.Tensor:
        """The base weight [out, in]; a zero stand-in where the layer stores it otherwise
        (a quantised base, whose dequantised weight only the site computes)."""
        info = self._info
        try:
            w = info.weight().detach()
        except Exception:  # noqa: BLE001 - any layer the host cannot read directly
            w = None
        if w is None or not w.is_floating_point() or tuple(w.shape) != (info.out_features, info.in_features):
            dtype = info.dtype if info.dtype.is_floating_point else torch.float32
            w = torch.zeros(info.out_features, info.in_features, dtype=dtype, device=info.device)
        return w

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


def _dtype_device(module: nn.Module, info: SiteInfo) -> tuple[torch.dtype, torch.device]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return info.dtype, info.device


def _probe_input(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, PROBE_TOKENS, width, generator=g).to(dtype=dtype, device=device)


def _expect(value: Any, shape: tuple[int, ...], what: str) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"{what} returned {type(value).__name__}, not a tensor"
    if not value.is_floating_point():
        return f"{what} returned a {value.dtype} tensor, not a floating-point one"
    if tuple(value.shape) != shape:
        return f"{what} returned shape {tuple(value.shape)}; the contract needs exactly {shape} (no broadcasting)"
    return None


def _leading(value: Any) -> int:
    """The number of virtual tokens a model-level module returned (any is allowed)."""
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() >= 1 else -1


def _check_one(method: MethodRecord, module: nn.Module, info: SiteInfo) -> str | None:
    dtype, device = _dtype_device(module, info)
    kind = info.kind
    if kind == "linear.delta":
        x = _probe_input(info.in_features, dtype, device)
        out = (1, PROBE_TOKENS, info.out_features)
        problem = _expect(module(x, _ProbeView(info)), out, f"forward(x [1, {PROBE_TOKENS}, {info.in_features}], site)")
        if problem is None and method.capabilities.mergeable:
            problem = _expect(module.delta_weight(_ProbeView(info)), (info.out_features, info.in_features), "delta_weight(site)")
        return problem
    if kind in ("linear.scale_out", "linear.scale_in"):
        size = info.out_features if kind == "linear.scale_out" else info.in_features
        return _expect(module.scale(), (size,), "scale()")
    if kind in ("sublayer.output", "sublayer.parallel"):
        x = _probe_input(info.in_features, dtype, device)
        return _expect(module(x), tuple(x.shape), f"forward(h [1, {PROBE_TOKENS}, {info.in_features}])")
    if kind == "input.embeddings":
        tokens = module()
        d = int(info.module.get_input_embeddings().weight.shape[1])
        return _expect(tokens, (_leading(tokens), d), "forward()")
    if kind == "attention.kv_prefix":
        values = module()
        geo = info.geometry
        shape = (_leading(values), geo.num_layers, 2, geo.num_kv_heads, geo.head_dim)
        return _expect(values, shape, "forward()")
    return None


def probe_adapter(
    method: MethodRecord,
    adapter: str,
    infos: list[SiteInfo],
    modules: Mapping[str, nn.Module],
    *,
    force: bool = False,
) -> None:
    """Check every module of ``adapter`` against its kind's protocol (see the module docstring);
    only for methods from outside the package unless ``force``."""
    if method.plugin in BUILTIN_PLUGINS and not force:
        return
    for info in infos:
        module = modules[info.key]
        if info.device.type == "meta":
            continue
        was = [(m, m.training) for m in module.modules()]
        module.eval()
        devices = [info.device.index or 0] if info.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                problem = _check_one(method, module, info)
        except ComposerError:
            raise
        except Exception as exc:
            problem = f"raised {type(exc).__name__}: {exc}"
        finally:
            for m, mode in was:
                m.training = mode
        if problem is not None:
            raise PluginContractError(
                f"{_where(method, adapter, info)}: on a probe input its {info.kind} module {problem}. "
                f"See adapter_composer.runtime for the {info.kind} protocol; report this to the "
                f"authors of {method.plugin!r}"
            )


__all__ = ["build_module", "build_shared", "probe_adapter"]
