"""Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of
LoRAs"): training-free, token-level routing over a library of existing experts, as an
``arrow`` operator.

At every site, expert e's prototype vₑ is the top right singular vector of its update
ΔWₑ (= Bₑ Aₑ for LoRA; unit norm, its sign irrelevant), computed from the weights, with no
training. A token x is routed to the k experts it aligns with most:

    scoreₑ(x) = |⟨x, vₑ⟩|                            (cosine=True: |⟨x, vₑ⟩| / ‖x‖)
    g(x)      = softmax(top-k scores / τ) on the k best experts, 0 on the others
    Δ(x)      = Σₑ gₑ(x) Δₑ(x)                       (LoRA: Δₑ(x) = sₑ Bₑ Aₑ x)

GenKnowSub (ACL 2025, aclanthology.org/2025.acl-short.54), with ``general=[names]``: the
mean of the general-knowledge LoRAs' factors is subtracted from every expert's factors
before prototypes and routing, Aₑ ← Aₑ − mean_g A_g, Bₑ ← Bₑ − mean_g B_g (the experts'
own weights are left untouched; the general adapters are not routed to).

This is HF PEFT's Arrow (``ArrowConfig(top_k, router_temperature, use_gks)``,
``create_arrow_model``) with the same outputs for the same experts (tested; PEFT finds vₑ
by 15 power iterations from a random start, this module by an exact SVD through a QR of A,
so the two agree once the power iteration has converged). An expert whose update is 0 gets
the prototype 0, as in PEFT. Experts of any ``linear.delta`` method (or stacks and sums of
them) work: their prototype comes from their folded ΔW and their output from their own
forward. Prototypes are cached until an expert's weights change. By default the experts
are frozen (``train_experts=False``); gates can be recorded with ``composed.record_gates()``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.registry import Diagnostic, hookimpl
from adapter_composer.runtime.linear import NF
from adapter_composer.runtime.lowrank import lowrank_of

__all__ = ["ArrowNode", "ArrowOptions", "top_right_singular_vector"]

PLUGIN = "adapter_composer.plugins.arrow"


class ArrowOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    top_k: int = Field(3, ge=1, description="experts per token (at a site with fewer experts: all of them)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature τ over the top-k scores")
    general: list[str] = Field(default_factory=list, description="children that are general-knowledge LoRAs for GenKnowSub (subtracted, not routed)")
    cosine: bool = Field(False, description="score by |cosine| (divide by ‖x‖) instead of PEFT's |⟨x, v⟩|")
    train_experts: bool = Field(False, description="let gradients reach the experts (Arrow itself has nothing to train)")


def top_right_singular_vector(a: torch.Tensor | None = None, b: torch.Tensor | None = None, *, dense: torch.Tensor | None = None) -> torch.Tensor:
    """v₁ of ΔW = B A (A [r, in], B [out, r]) without forming ΔW, or of ``dense`` [out, in];
    in float64; the zero vector when ΔW = 0."""
    if dense is not None:
        _, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
        v = vh[0]
    else:
        q, rr = torch.linalg.qr(a.double().t())  # Aᵀ = Q R, so ΔW = (B Rᵀ) Qᵀ
        _, s, vh = torch.linalg.svd(b.double() @ rr.t(), full_matrices=False)
        v = q @ vh[0]
    return v if float(s[0]) > 0 else torch.zeros_like(v)


class ArrowNode(nn.Module):
    def __init__(self, children: list[nn.Module], options: ArrowOptions, node: str, key: str):
        super().__init__()
        names = [getattr(c, "adapter", None) for c in children]
        self.general = [i for i, n in enumerate(names) if n is not None and n in options.general]
        self.experts = [i for i in range(len(children)) if i not in self.general]
        self.items = nn.ModuleList(children)
        self.options = options
        self.node = node
        self.key = key
        self._cache: tuple[Any, ...] = (None, None, None)  # (signature, held tensors, prototypes)
        if not options.train_experts:
            for p in self.items.parameters():
                p.requires_grad_(False)
        if self.general and self._factors() is None:
            raise ComposerError(
                f"arrow node {node!r}: GenKnowSub subtracts LoRA factors, but at {key} an expert or general adapter "
                "has no plain factors of one shape (use lora adapters of one rank, without dropout or DoRA)"
            )

    # --- experts and prototypes -------------------------------------------------------

    def _factors(self) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
        """The experts' (A, B, s), GenKnowSub applied; None when some expert has no factors."""
        parts = [lowrank_of(self.items[i]) for i in self.experts]
        if any(p is None for p in parts):
            return None
        if not self.general:
            return parts
        gen = [lowrank_of(self.items[i]) for i in self.general]
        if any(g is None for g in gen) or len({(p[0].shape, p[1].shape) for p in parts + gen}) != 1:
            return None
        mean_a = torch.stack([g[0] for g in gen]).mean(0)
        mean_b = torch.stack([g[1] for g in gen]).mean(0)
        return [(a - mean_a, b - mean_b, s) for a, b, s in parts]

    def _signature(self) -> tuple[tuple, tuple]:
        tensors = tuple(t for c in self.items for t in (*c.parameters(), *c.buffers()))
        return tuple((id(t), t._version) for t in tensors), tensors

    def prototypes(self, site: Any, parts: list | None) -> torch.Tensor:
        """vₑ for every expert, [E, in] (float64), recomputed only when a weight changed."""
        signature, held = self._signature()
        if self._cache[0] == signature:
            return self._cache[2]
        with torch.no_grad():
            if parts is not None:
                protos = [top_right_singular_vector(a, b) for a, b, _ in parts]
            else:
                protos = [top_right_singular_vector(dense=self._fold(self.items[i], site)) for i in self.experts]
            protos = torch.stack(protos)
        self._cache = (signature, held, protos)
        return protos

    def _fold(self, child: nn.Module, site: Any) -> torch.Tensor:
        fold = child.linear_fold(site)
        if fold.a is not None or fold.b is not None or fold.e is None:
            raise ComposerError(f"arrow node {self.node!r} routes over updates ΔW; an expert at {self.key} is a scale, not a delta")
        return fold.e

    # --- routing ----------------------------------------------------------------------

    def gates(self, x: torch.Tensor, protos: torch.Tensor, state: Any) -> torch.Tensor:
        """g(x) [..., E] for x [..., in]."""
        p = protos.to(x.dtype)
        scores = (x @ p.t()).abs()
        if self.options.cosine:
            scores = scores / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = min(self.options.top_k, p.shape[0])
        top, index = scores.topk(k, dim=-1)
        g = torch.zeros_like(scores).scatter(-1, index, (top / self.options.temperature).softmax(-1))
        if state is not None and state.record_gates:
            state.gates[f"{self.node}@{self.key}"] = g.detach()
        return g

    def linear_nf(self, x: torch.Tensor, call: Any) -> NF:
        if not self.experts:
            return NF()
        parts = self._factors()
        protos = self.prototypes(call.site, parts)
        if parts is not None:
            dtype = parts[0][0].dtype
            xin = x.to(dtype)
            g = self.gates(xin, protos, call.state)
            a = torch.cat([p[0] for p in parts], 0)  # [Σr, in]
            b = torch.cat([p[1] for p in parts], 1)  # [out, Σr]
            ranks = torch.tensor([p[0].shape[0] for p in parts], device=x.device)
            scale = torch.tensor([p[2] for p in parts], dtype=dtype, device=x.device)
            h = (xin @ a.t()) * torch.repeat_interleave(g * scale, ranks, dim=-1)
            return NF(e=h @ b.t())
        g = self.gates(x, protos, call.state)
        total = None
        for j, i in enumerate(self.experts):
            sub = self.items[i].linear_nf(x, call)
            if sub.a is not None or sub.b is not None:
                raise ComposerError(f"arrow node {self.node!r} routes over deltas; an expert at {self.key} is a scale")
            if sub.e is None:
                continue
            term = g[..., j : j + 1].to(sub.e.dtype) * sub.e
            total = term if total is None else total + term
        return NF(e=total)

    def linear_fold(self, site: Any):
        raise TypeError(f"arrow node {self.node!r} routes every token by its input and cannot be folded into weights")

    def extra_repr(self) -> str:
        o = self.options
        return f"node={self.node!r}, experts={len(self.experts)}, general={len(self.general)}, top_k={o.top_k}, τ={o.temperature}"


def _arrow(children, options: ArrowOptions, keys, shared, ctx):
    where = ctx.info.key if ctx.info is not None else ctx.path
    return ArrowNode(children, options, ctx.node, where)


@hookimpl
def check_graph(graph, registry):
    found = []
    for spec in graph.specs.values():
        if getattr(spec, "operator", None) != "arrow":
            continue
        general = list(spec.options.get("general") or [])
        strangers = [n for n in general if n not in spec.children]
        if strangers:
            found.append(
                Diagnostic(
                    code="arrow-general",
                    message=f"arrow node {spec.name!r}: general adapters {strangers} are not among its children {list(spec.children)}",
                    nodes=(spec.name, *strangers),
                    rule="GenKnowSub subtracts general adapters that the arrow node holds as children",
                    fix="add them as children, or remove them from general=",
                    plugin=PLUGIN,
                )
            )
        if not [c for c in spec.children if c not in general]:
            found.append(
                Diagnostic(
                    code="arrow-general",
                    message=f"arrow node {spec.name!r} has no expert to route to: every child is a general adapter",
                    nodes=(spec.name,),
                    fix="add expert adapters",
                    plugin=PLUGIN,
                )
            )
        if general:
            for child in spec.children:
                method, config = graph.method_of(child), graph.config(child)
                plain = method == "lora" and config is not None and not config.dora and config.dropout == 0
                sliced = [s.key for s in graph.sites(child) if s.out_slice is not None]
                if not plain or sliced:
                    found.append(
                        Diagnostic(
                            code="arrow-general",
                            message=f"arrow node {spec.name!r} uses GenKnowSub, which subtracts LoRA factors, but child {child!r} is "
                            + (f"{method or 'an operator node'}" if not plain else f"on parts of fused layers ({', '.join(sliced[:3])})"),
                            nodes=(spec.name, child),
                            rule="with general=, every child is a plain LoRA (no DoRA, no dropout) of one rank on whole layers",
                            fix="use plain lora adapters, or drop general=",
                            plugin=PLUGIN,
                        )
                    )
    return found


@hookimpl
def register_operators(register):
    register.operator(
        "arrow",
        options=ArrowOptions,
        families={"linear": _arrow},
        min_children=1,
        description="Arrow: training-free token routing to the top-k experts by |⟨x, v⟩|, v the top right singular vector of each ΔW.",
    )


@hookimpl
def register_rules(register):
    for outer in ("route", "stack", "sum"):
        register.nesting(outer, "arrow", allowed=True, reason="a routed mixture of experts is one delta")
    for inner in ("stack", "sum", "lorahub"):
        register.nesting("arrow", inner, allowed=True, reason="an expert may be any fixed composition of deltas")
    for inner in ("mix", "route", "arrow", "poly"):
        register.nesting("arrow", inner, allowed=False, reason="an expert's prototype needs one fixed update ΔW, and this one depends on the input or the row")
    for kind in ("linear.scale_out", "linear.scale_in"):
        register.refuse(
            kind=kind,
            operator="arrow",
            reason="Arrow's prototypes are singular vectors of updates ΔW; a scale vector has none",
            fix="route over delta adapters (LoRA)",
        )
    register.refuse(
        method="loftq",
        operator="arrow",
        reason="a gate would scale only the low-rank part: the quantised base replaces W for every token, whatever the gate",
        fix="declare the LoftQ adapter at the top level of the graph",
    )
