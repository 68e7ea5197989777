"""LoraHub (Huang et al. 2023): compose a library of LoRAs for an unseen task with weights
found by a gradient-free search on a few examples.

    lorahub[w](e₁ … eₙ)    Δ(x) = s · (Σᵢ wᵢ Bᵢ)(Σᵢ wᵢ Aᵢ) x      the paper's m̂ = (Σ wᵢAᵢ)(Σ wᵢBᵢ)

    search                 w* = argmin_{w ∈ [−1.5, 1.5]ⁿ}  L(w) + λ · (1/n) Σᵢ |wᵢ|,   λ = 0.05, w₀ = 0

The composition mixes the experts' *parameters* (as the paper and its code do: the weighted
sum of the LoRA state dicts), so it has cross terms wᵢwⱼ BᵢAⱼ; the host's ``sum`` node is the
output-space alternative Σ wᵢ Δᵢ(x), and :func:`search` tunes either. ``L(w)`` is any loss on
the few examples with the composition at ``w``; the search is CMA-ES (pycma, the optional
dependency ``adapter-composer[lorahub]``; the paper's code calls Nevergrad's NGOpt with the
same bounds, start and budget: 40 evaluations of L). Experts of another ``linear.delta``
method are mixed in parameter space by their own forward (see
:mod:`adapter_composer.plugins.param_mix`). The weights start at 0 (the base model) and are
saved with the composition; a lorahub node merges exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.plugins.param_mix import ParamMixer, register_parameter_mix_rules
from adapter_composer.registry import Diagnostic, hookimpl
from adapter_composer.runtime import CONTAINER_ATTR
from adapter_composer.runtime.linear import NF, Fold

__all__ = ["LoraHubNode", "LoraHubOptions", "LoraHubWeights", "SearchResult", "search"]

PLUGIN = "adapter_composer.plugins.lorahub"
EXTRA = "pip install 'adapter-composer[lorahub]'  (or: pip install cma)"


class LoraHubOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    weights: list[float] | None = Field(None, description="one weight per expert; None: all 0 (the paper's start, the base model)")


class LoraHubWeights(nn.Module):
    """The weights w of one lorahub node, shared by all its sites (what :func:`search` sets)."""

    def __init__(self, weights: Sequence[float]):
        super().__init__()
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))


class LoraHubNode(nn.Module):
    def __init__(self, children: list[nn.Module], shared: Any, present: Sequence[int], node: str):
        super().__init__()
        self.items = nn.ModuleList(children)
        self.mixer = ParamMixer(children, node, "lorahub")
        self.shared = shared  # a SharedRef to the node's LoraHubWeights
        self.present = list(present)
        self.node = node

    def _w(self) -> torch.Tensor:
        return self.shared().weights[self.present]

    def linear_nf(self, x: torch.Tensor, call: Any) -> NF:
        return NF(e=self.mixer.delta(x, call, self._w()))

    def linear_fold(self, site: Any) -> Fold:
        return Fold(e=self.mixer.fold(site, self._w()))

    def extra_repr(self) -> str:
        return f"node={self.node!r}, experts={len(self.items)}"


def _lorahub(children, options: LoraHubOptions, keys, shared, ctx):
    return LoraHubNode(children, shared, ctx.present, ctx.node)


def _shared(options: LoraHubOptions, n_children: int) -> LoraHubWeights:
    return LoraHubWeights(options.weights if options.weights is not None else [0.0] * n_children)


def _check(options: LoraHubOptions, n_children: int, keys: Any) -> list[str]:
    if options.weights is not None and len(options.weights) != n_children:
        return [f"lorahub has {n_children} experts but {len(options.weights)} weights"]
    return []


# --- the search -------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` found; the node holds ``weights`` afterwards."""

    weights: tuple[float, ...]
    objective: float  # L(w*) + λ · mean |w*|
    loss: float  # L(w*)
    evaluations: int
    history: tuple[float, ...]  # the objective of every evaluation, in order


def _cma() -> Any:
    try:
        import cma
    except ImportError:
        raise ComposerError(f"LoraHub's search uses the CMA-ES library pycma, which is not installed: {EXTRA}") from None
    return cma


def _weights_of(composed: Any, node: str) -> torch.Tensor:
    container = getattr(composed.model, CONTAINER_ATTR, None)
    operators = container.operators if container is not None else {}
    tunable = sorted(k for k in operators if isinstance(getattr(operators[k], "weights", None), torch.Tensor))
    if node not in tunable:
        raise ComposerError(f"{node!r} is not a node with composition weights here; nodes with weights: {tunable} (lorahub and sum nodes)")
    return operators[node].weights


@torch.no_grad()
def search(
    composed: Any,
    node: str,
    loss: Callable[[], float | torch.Tensor],
    *,
    budget: int = 40,
    l1: float = 0.05,
    bounds: tuple[float, float] = (-1.5, 1.5),
    init: Sequence[float] | None = None,
    sigma0: float = 0.5,
    seed: int = 0,
) -> SearchResult:
    """Find the weights of lorahub (or sum) node ``node`` minimising ``loss() + l1 · mean |w|``
    with CMA-ES in ``budget`` evaluations of ``loss`` (a callable that runs the composed model
    on the few examples and returns a number; call ``composed.eval()`` first). The first
    evaluation is ``init`` (default: zeros), so the result is never worse than the start. The
    best weights found are left in the node; numpy's global RNG is not touched."""
    import numpy as np

    cma = _cma()
    weights = _weights_of(composed, node)
    n = weights.numel()
    lo, hi = float(bounds[0]), float(bounds[1])
    x0 = [0.0] * n if init is None else [float(v) for v in init]
    if len(x0) != n or not lo <= min(x0) <= max(x0) <= hi:
        raise ComposerError(f"search: init must hold {n} weights within {bounds}, got {list(x0)}")
    if budget < 1 or sigma0 <= 0:
        raise ComposerError(f"search: budget must be ≥ 1 and sigma0 > 0, got {budget} and {sigma0}")
    original = weights.clone()
    rng = np.random.default_rng(seed)
    history: list[float] = []
    best: tuple[float, float, list[float]] = (math.inf, math.inf, x0)

    def evaluate(x: Sequence[float]) -> float:
        nonlocal best
        weights.copy_(torch.tensor(list(x), dtype=weights.dtype))
        value = float(loss())
        if not math.isfinite(value):
            raise ComposerError(f"search: loss() returned {value} at weights {list(x)}")
        w = weights.tolist()
        objective = value + l1 * sum(abs(v) for v in w) / n
        history.append(objective)
        if objective < best[0]:
            best = (objective, value, w)
        return objective

    try:
        evaluate(x0)
        if n > 1 or budget > 1:
            options = {
                "bounds": [lo, hi], "seed": float("nan"), "verbose": -9, "verb_log": 0, "verb_disp": 0,
                "randn": lambda lam, dim: rng.standard_normal((lam, dim)),
                "tolfun": 0.0, "tolflatfitness": 10**9, "tolx": 0.0, "tolstagnation": 10**9,
            }
            es = cma.CMAEvolutionStrategy(x0, sigma0, options)
            while len(history) < budget:
                xs = es.ask()
                room = budget - len(history)
                values = [evaluate(x) for x in xs[:room]]
                if len(values) < len(xs):
                    break
                es.tell(xs, values)
    except BaseException:
        weights.copy_(original)
        raise
    weights.copy_(torch.tensor(best[2], dtype=weights.dtype))
    return SearchResult(tuple(best[2]), best[0], best[1], len(history), tuple(history))


# --- hooks ------------------------------------------------------------------------------


@hookimpl
def check_graph(graph, registry):
    found = []
    for spec in graph.specs.values():
        if getattr(spec, "operator", None) != "lorahub":
            continue
        methods = {c: graph.method_of(c) for c in spec.children if graph.method_of(c) is not None}
        if len(set(methods.values())) > 1:
            found.append(
                Diagnostic(
                    code="param-mix-children",
                    message=f"lorahub node {spec.name!r} mixes its experts' parameters, but they use different methods: {methods}",
                    nodes=(spec.name, *methods),
                    rule="the experts of a lorahub node are adapters of one method with the same settings",
                    fix="make every expert the same method and configuration",
                    plugin=PLUGIN,
                )
            )
        for child, method in methods.items():
            config = graph.config(child)
            if method == "lora" and config is not None and config.dora:
                found.append(
                    Diagnostic(
                        code="param-mix-children",
                        message=f"lorahub node {spec.name!r}: expert {child!r} is DoRA, whose magnitude vector is not an additive update "
                        "(weights that do not sum to 1 would rescale the base layer)",
                        nodes=(spec.name, child),
                        rule="lorahub mixes parameters with free weights, so every parameter must be an update that is zero at 0",
                        fix="use plain LoRA experts, or a sum node (output space)",
                        plugin=PLUGIN,
                    )
                )
    return found


@hookimpl
def register_operators(register):
    register.operator(
        "lorahub",
        options=LoraHubOptions,
        families={"linear": _lorahub},
        min_children=1,
        exact_merge=True,
        check=_check,
        shared=_shared,
        description="LoraHub: experts mixed in parameter space, s·(Σ wᵢBᵢ)(Σ wᵢAᵢ) x, weights found by lorahub.search (CMA-ES).",
    )


@hookimpl
def register_rules(register):
    register_parameter_mix_rules(register, "lorahub", "expert")
