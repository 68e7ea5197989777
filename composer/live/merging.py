"""Merge strategies for a ``sum`` node over low-rank adapters: one update per site.

    linear   ΔW = Σ wᵢ ΔWᵢ                                   exact
    cat      A = [A₁; A₂; ...], B = [w₁s₁B₁, w₂s₂B₂, ...]    exact, rank Σ rᵢ (low-rank children only)
    svd      the best rank-k approximation of Σ wᵢ ΔWᵢ       approximate: reports ‖error‖_F / ‖ΔW‖_F
    ties     trim each wᵢΔWᵢ to its top ``density`` magnitudes, elect the sign of the sum per
             entry, average the entries that agree with it   (Yadav et al. 2023) approximate
    dare     drop each entry with probability p, rescale by 1/(1 − p), then sum
             (Yu et al. 2023; seeded)                        approximate

ΔWᵢ is each adapter's exact update at the site (for DoRA, diag(m/‖W + sBA‖)(W + sBA) − W),
so every strategy is correct for rsLoRA and DoRA; ``cat`` needs plain low-rank children and
refuses DoRA. An approximate strategy is never reported as exact: every result carries the
relative error of its update against the exact sum, per site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.pipeline.graph import Graph, OperatorSpec
from adapter_composer.runtime.linear import Leaf, LinearSite, SiteView
from adapter_composer.runtime.lowrank import lowrank_of

Strategy = Literal["linear", "cat", "svd", "ties", "dare"]
EXACT = {"linear", "cat"}


@dataclass
class MergeResult:
    """Per site (module path): the merged update, its low-rank factors when it has them, and
    its relative error against the exact weighted sum."""

    strategy: str
    exact: bool
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> ΔW [out, in]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # path -> (A, B)
    errors: dict[str, float] = field(default_factory=dict)  # path -> ‖ΔW − Σ wᵢΔWᵢ‖_F / ‖Σ wᵢΔWᵢ‖_F
    source: Any = field(default=None, repr=False)  # the composition merged (its class composes anew)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def lora_factors(self, rank: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A [r, in], B [out, r]) per site with B A = ΔW (truncated to ``rank`` by SVD if given)."""
        out = {}
        for path, delta in self.deltas.items():
            if rank is None and path in self.factors:
                out[path] = self.factors[path]
            else:
                out[path] = svd_factors(delta, rank or min(delta.shape))
        return out

    def compose(self, model: nn.Module, name: str = "merged", rank: int | None = None, registry: Any = None) -> Any:
        """Compose an unpatched ``model`` with one LoRA adapter holding this merged update."""
        factors = self.lora_factors(rank)
        ranks = {path: a.shape[0] for path, (a, _) in factors.items()}
        r = max(ranks.values())
        g = Graph()
        g.adapter(
            name, "lora", targets=sorted(factors), r=r, alpha=float(r),
            rank_pattern={re.escape(p): k for p, k in ranks.items() if k != r},
            alpha_pattern={re.escape(p): float(k) for p, k in ranks.items() if k != r},
        )
        registry = registry if registry is not None else getattr(self.source, "registry", None)
        composed = type(self.source).create(model, g, registry=registry)
        tensors = {}
        for path, (a, b) in factors.items():
            tensors[f"module.{path}.lora_A"] = a
            tensors[f"module.{path}.lora_B"] = b
        composed.adapters[name].load_tensors(tensors)
        return composed


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest."""
    k = int(round(density * t.numel()))
    if k <= 0:
        return torch.zeros_like(t)
    if k >= t.numel():
        return t.clone()
    threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def ties(tensors: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = torch.stack([trim(t, density) for t in tensors])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0).clamp(min=1)
    return (trimmed * agree).sum(0) / count


def dare(tensors: list[torch.Tensor], drop: float, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros_like(tensors[0])
    for t in tensors:
        keep = (torch.rand(t.shape, generator=g) >= drop).to(t.dtype).to(t.device)
        total = total + t * keep / (1.0 - drop)
    return total


def _children_at(site: LinearSite, node: str) -> tuple[list[Leaf], list[float]]:
    for module in site.program.modules():
        if type(module).__name__ == "SumNode" and getattr(module, "shared", None) is not None:
            items = list(module.items)
            if all(isinstance(c, Leaf) for c in items) and getattr(module, "node", node) == node:
                weights = module.shared().weights.detach()
                return items, [float(weights[i]) for i in module.index]
    raise ComposerError(f"sum node {node!r} does not sit directly over adapters at {site.path}")


def merge_sum(
    composed: Any,
    node: str,
    strategy: Strategy = "linear",
    *,
    rank: int | None = None,
    density: float = 0.5,
    drop: float = 0.5,
    seed: int = 0,
) -> MergeResult:
    """Merge the adapters under sum node ``node`` into one update per site (see module doc)."""
    spec = composed.graph.specs.get(node)
    if not isinstance(spec, OperatorSpec) or spec.operator != "sum":
        raise ComposerError(f"{node!r} is not a sum node of this composition")
    if strategy not in ("linear", "cat", "svd", "ties", "dare"):
        raise ComposerError(f"unknown merge strategy {strategy!r}; choose linear, cat, svd, ties or dare")
    if strategy == "svd" and (rank is None or rank < 1):
        raise ComposerError("the svd strategy needs rank >= 1")
    if not 0 < density <= 1 or not 0 <= drop < 1:
        raise ComposerError("density must be in (0, 1] and drop in [0, 1)")
    result = MergeResult(strategy, strategy in EXACT, source=composed)
    at_sites = [
        (path, site, *_children_at(site, node))
        for (path, family), site in composed._rt.sites.items()
        if family == "linear" and node in {n.node for n in _opnodes(composed.plan.site(path, family).program)}
    ]
    for path, _site, leaves, _weights in at_sites:
        _check_deltas(composed, node, path, leaves)
    with torch.no_grad():
        for path, site, leaves, weights in at_sites:
            deltas = [w * _full_delta(leaf, site) for leaf, w in zip(leaves, weights, strict=True)]
            exact = torch.stack(deltas).sum(0)
            if strategy == "linear":
                merged = exact
            elif strategy == "cat":
                parts = [lowrank_of(leaf) for leaf in leaves]
                if any(p is None for p in parts):
                    bad = [leaf.adapter for leaf, p in zip(leaves, parts, strict=True) if p is None]
                    raise ComposerError(f"cat needs plain low-rank adapters; {bad} are not (DoRA, dropout active, or another method)")
                a = torch.cat([p[0] for p in parts], 0)
                b = torch.cat([w * p[1] * p[2] for p, w in zip(parts, weights, strict=True)], 1)
                result.factors[path] = (a.detach().clone(), b.detach().clone())
                merged = b @ a
            elif strategy == "svd":
                a, b = svd_factors(exact, rank)
                result.factors[path] = (a, b)
                merged = b @ a
            elif strategy == "ties":
                merged = ties(deltas, density)
            else:
                merged = dare(deltas, drop, seed)
            result.deltas[path] = merged
            norm = exact.norm()
            result.errors[path] = float((merged - exact).norm() / norm) if norm > 0 else float((merged - exact).norm())
    if not result.deltas:
        raise ComposerError(f"sum node {node!r} acts at no linear site")
    return result


_NOT_A_DELTA = {
    "linear.scale_out": "it scales the layer's output, y ⊙ l",
    "linear.scale_in": "it scales the layer's input, W (x ⊙ l)",
}


def _check_deltas(composed: Any, node: str, path: str, leaves: list[Leaf]) -> None:
    """Every child must be an additive update ΔW (``linear.delta`` with ``delta_weight``)."""
    for leaf in leaves:
        method = composed.adapters[leaf.adapter].method if leaf.adapter in composed.adapters else "?"
        if leaf.kind != "linear.delta":
            why = _NOT_A_DELTA.get(leaf.kind, f"it acts as {leaf.kind}")
            raise ComposerError(
                f"merge_sum({node!r}) cannot merge adapter {leaf.adapter!r} ({method}) at {path}: {why}, which is "
                "not an additive weight update ΔW, so the strategies (which combine Σ wᵢ ΔWᵢ) do not apply to it. "
                "Use composed.merge() to fold the whole composition exactly, or merge a sum of delta adapters "
                "(LoRA, VeRA, AdaLoRA, ...) only."
            )
        if not callable(getattr(leaf.op, "delta_weight", None)):
            raise ComposerError(
                f"merge_sum({node!r}) cannot merge adapter {leaf.adapter!r} ({method}) at {path}: its module "
                f"{type(leaf.op).__name__} implements no delta_weight(site), so its ΔW is unknown"
            )


def _full_delta(leaf: Leaf, site: LinearSite) -> torch.Tensor:
    dw = leaf.op.delta_weight(SiteView(site, leaf.out_slice, None)).float()
    if leaf.out_slice is not None:
        full = torch.zeros(leaf.full_out, dw.shape[1])
        full[leaf.out_slice[0] : leaf.out_slice[1]] = dw
        return full
    return dw


def _opnodes(prog: Any):
    children = getattr(prog, "children", None)
    if children is not None and hasattr(prog, "operator"):
        yield prog
        for c in children:
            yield from _opnodes(c)
