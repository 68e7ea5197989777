"""LoftQ (Li et al. 2023): a LoRA fitted to the error of a quantised base, QLoRA-style.

At a site with weight W [out, in], rank r and scale s = α/r (α/√r with rslora), LoftQ
alternates, starting from B A = 0, for ``iters`` steps:

    Q      ← quant(W − s·B A)                       block-wise normal float (plugins.quantize)
    U S Vᵀ ← svd(W − deq(Q))
    B ← U_r √S_r / √s,   A ← √S_r V_rᵀ / √s          so that  s·B A = U_r S_r V_rᵀ

and the model then runs on the quantised base plus the adapter:

    y = deq(Q) x + b + s · B A dropout(x)

Only A and B train; Q is frozen. For s = 1 (α = r, the default) this is exactly PEFT's
``loftq_init`` (lora_A = R, lora_B = L of ``_low_rank_decomposition``); PEFT ignores s in
the initialisation, so for s ≠ 1 its s·B A no longer approximates W − deq(Q): we fold 1/√s
into both factors instead (A = R/√s, B = L/√s).

Runtime: the method module (:class:`LoftQ`) holds the packed codes and block absmax of Q as
buffers, computed once at build time; this plugin's ``build_site`` then gives the site a
:class:`QuantizedLinear` base that reads those same buffers, so the weight the LoRA was
fitted to is the weight the model runs on. ``undo()`` puts the original layer back untouched.
Save/load: the codes and absmax are part of the adapter's tensors, so a load copies them
over the fresh initialisation and reproduces the saved model bit for bit without depending
on the SVD being deterministic.

Composition: LoftQ defines the base of its sites, so

* at most one LoftQ adapter acts on any output row of a site (``loftq-shared-site``);
  on GPT-2's fused ``c_attn`` different slices may each have their own, the rows no LoftQ
  adapter targets keep their full-precision weight;
* other deltas declared beside it at the top level (LoRA, VeRA, AdaLoRA) add to the quantised
  base; a delta reading the base weight (DoRA's row norm) reads deq(Q) at run time (DoRA's
  magnitude is still initialised from W: adapters are built before their sites);
* LoftQ is refused under stack, sum, mix and route (and any other operator, ``loftq-not-root``):
  a weight, gate or route would act on the low-rank part only, never on the base
  replacement, so W x + Σ wᵢ Δᵢ(x) would not hold; scales (IA3) cannot share its sites.

Merge is refused (``mergeable=False``): folding s·B A into a 2/4/8-bit weight is not exact.

bitsandbytes bases: refused (``loftq-quantized-base``). LoftQ is an alternative to loading a
model in 4-bit, not a layer on top of it: its B A is fitted to W − deq(Q(W)), so it needs the
full-precision W, which a ``Linear4bit`` / ``Linear8bitLt`` no longer holds (fitting to its
W_deq leaves almost no residual at 4 bits: NF4 of an NF4 weight is itself).
Compose LoftQ on the full-precision model, or plain LoRA on the quantised one (QLoRA).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from adapter_composer.plugins.loftq_modules import (
    LoftQ,
    LoftqInit,
    QuantizedLinear,
    QuantizedLinearSite,
    loftq_init,
    low_rank_split,
)
from adapter_composer.registry import Capabilities, Diagnostic, hookimpl
from adapter_composer.runtime.linear import Leaf
from adapter_composer.sites import is_linear, quantization

METHOD = "loftq"
PLUGIN = "adapter_composer.plugins.loftq"


class LoftqConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(8, ge=1, description="rank of the update B A")
    alpha: float | None = Field(
        None,
        gt=0,
        description="scale numerator: s = alpha / r (alpha / sqrt(r) with rslora); None means alpha = r",
    )
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    bits: Literal[2, 4, 8] = Field(
        4, description="normal-float bits of the quantised base (4: QLoRA's NF4)"
    )
    iters: int = Field(
        1, ge=1, le=100, description="alternating quantise / SVD steps (PEFT's loftq_iter)"
    )
    block_size: int = Field(
        64,
        ge=8,
        le=4096,
        description="values per absmax block; a multiple of 8 dividing every targeted weight",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")

    @field_validator("block_size")
    @classmethod
    def _whole_bytes(cls, v: int) -> int:
        if v % 8:
            raise ValueError(
                f"block_size must be a multiple of 8 (blocks pack into whole bytes), got {v}"
            )
        return v

    def scale(self) -> float:
        alpha = float(self.r) if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.rslora else alpha / self.r


# --- building ---------------------------------------------------------------------------


def build(config: LoftqConfig, site: Any) -> nn.Module:
    scale = config.scale()
    init = loftq_init(site.weight(), config.bits, config.r, config.iters, config.block_size, scale)
    return LoftQ(init, scale, config.bits, config.block_size, config.dropout)


def _rows(leaf: Any) -> tuple[float, float]:
    return leaf.out_slice if leaf.out_slice is not None else (0, math.inf)


def _shared_site(path: str, program: Any) -> list[tuple[tuple[str, ...], str]]:
    leaves = [lf for lf in program.leaves() if lf.method == METHOD]
    clashes = set()
    for i, a in enumerate(leaves):
        for b in leaves[i + 1 :]:
            (a0, a1), (b0, b1) = _rows(a), _rows(b)
            if a0 < b1 and b0 < a1:
                clashes.add(tuple(sorted({a.adapter, b.adapter})))
    return [(names, path) for names in sorted(clashes)]


def _under_operator(
    program: Any, registry: Any, ancestors: tuple = ()
) -> list[tuple[str, str, str]]:
    """(adapter, node, operator) for LoftQ leaves under an explicit operator no rule refuses."""
    if not hasattr(program, "children"):
        refused = {r.operator for r in registry.rules.refusals if r.method == METHOD}
        return [
            (program.adapter, node.node, node.operator)
            for node in ancestors
            if program.method == METHOD and not node.implicit and node.operator not in refused
        ]
    return [
        hit for c in program.children for hit in _under_operator(c, registry, (*ancestors, program))
    ]


def _shape_problems(name: str, config: LoftqConfig, sites: list[Any]) -> list[Diagnostic]:
    blocks = [s for s in sites if (s.in_features * s.out_features) % config.block_size]
    small = [s for s in sites if config.r > min(s.in_features, s.out_features)]
    out = []
    if blocks:
        shapes = sorted({f"{s.out_features}×{s.in_features}" for s in blocks})
        out.append(
            Diagnostic(
                code="bad-config",
                message=f"adapter {name!r} ({METHOD}): block_size {config.block_size} does not divide "
                f"the {', '.join(shapes)} weight(s) of {len(blocks)} site(s)",
                nodes=(name,),
                sites=tuple(s.key for s in blocks),
                rule="block-wise quantisation cuts each weight (out·in values) into equal blocks",
                fix="choose a block_size (a multiple of 8) dividing out·in of every target, e.g. 64",
                plugin=PLUGIN,
            )
        )
    if small:
        out.append(
            Diagnostic(
                code="bad-config",
                message=f"adapter {name!r} ({METHOD}): rank r={config.r} exceeds the smaller side of "
                f"the weight at {len(small)} site(s)",
                nodes=(name,),
                sites=tuple(s.key for s in small),
                fix=f"choose r ≤ {min(min(s.in_features, s.out_features) for s in small)}",
                plugin=PLUGIN,
            )
        )
    return out


def _quantized_base(name: str, sites: list[Any]) -> list[Diagnostic]:
    """LoftQ needs the full-precision W: it fits B A to W − deq(Q(W)) and quantises W itself."""
    hits = [s for s in sites if s.module is not None and quantization(s.module) is not None]
    if not hits:
        return []
    kinds = sorted({quantization(s.module) for s in hits})
    return [
        Diagnostic(
            code="loftq-quantized-base",
            message=f"adapter {name!r} ({METHOD}) targets {len(hits)} layer(s) that are already "
            f"quantised ({', '.join(kinds)}): LoftQ fits its B A to the error W − deq(Q(W)) of "
            "quantising the full-precision W, which a quantised model no longer holds",
            nodes=(name,),
            sites=tuple(s.key for s in hits),
            rule="LoftQ quantises the base itself (block-wise NF2/NF4/NF8) and needs the original weights",
            fix="compose LoftQ on the full-precision model (it then runs on its own NF4 base), "
            "or use plain LoRA on the bitsandbytes model (QLoRA)",
            plugin=PLUGIN,
        )
    ]


# --- hooks ------------------------------------------------------------------------------

_ROOT_FIX = "declare the LoftQ adapter at the top level of the graph; deltas declared beside it add to its quantised base"

_REFUSALS = {
    "stack": "LoftQ replaces its sites' base weight by Q(W); the other ops of a site act on that base, so it cannot be ordered inside a stack",
    "sum": "a sum weight would scale only the low-rank part: the quantised base replaces W unweighted, so W x + Σ wᵢ Δᵢ(x) would not hold",
    "mix": "a gate would scale only the low-rank part: the quantised base replaces W for every token, whatever the gate",
    "route": "rows routed to another adapter, or to none, would still run on the quantised base instead of W",
}


@hookimpl
def check_graph(graph, registry):
    names = [n for n in graph.specs if graph.method_of(n) == METHOD]
    if not names:
        return []
    found: list[Diagnostic] = []
    for name in names:
        config = graph.config(name)
        if isinstance(config, LoftqConfig):  # otherwise bad-config was already reported
            found += _shape_problems(name, config, graph.sites(name))
        found += _quantized_base(name, graph.sites(name))
    shared: dict[tuple[str, ...], list[str]] = {}
    under: dict[tuple[str, str, str], list[str]] = {}
    for (path, family), program in graph.programs.items():
        if family != "linear":
            continue
        for names_here, where in _shared_site(path, program):
            shared.setdefault(names_here, []).append(where)
        for hit in _under_operator(program, registry):
            under.setdefault(hit, []).append(path)
    for adapters, where in shared.items():
        who = " and ".join(repr(a) for a in adapters)
        found.append(
            Diagnostic(
                code="loftq-shared-site",
                message=f"LoftQ adapter(s) {who} quantise the same rows of a layer more than once",
                nodes=adapters,
                sites=tuple(where),
                rule="a layer has one base weight; each LoftQ adapter replaces it by its own Q(W), fitted to its own B A",
                fix="give each LoftQ adapter different targets, or keep one LoftQ adapter there and add plain LoRA adapters beside it",
                plugin=PLUGIN,
            )
        )
    for (adapter, node, operator), where in under.items():
        found.append(
            Diagnostic(
                code="loftq-not-root",
                message=f"LoftQ adapter {adapter!r} sits under {operator} node {node!r}, which would act on its low-rank part only, not on its quantised base",
                nodes=(node, adapter),
                sites=tuple(where),
                rule="LoftQ replaces the base weight of its sites; only the top level of the graph applies to every input unweighted",
                fix=_ROOT_FIX,
                plugin=PLUGIN,
            )
        )
    return found


@hookimpl(tryfirst=True)
def build_site(base, family, site):
    """A :class:`QuantizedLinearSite` where the program holds a LoftQ op; otherwise ``None``."""
    if family != "linear" or not is_linear(base):
        return None
    leaves = [m for m in site.program.modules() if isinstance(m, Leaf) and isinstance(m.op, LoftQ)]
    if not leaves:
        return None
    quantized = QuantizedLinear(base, [(leaf.out_slice, leaf.op) for leaf in leaves])
    built = QuantizedLinearSite(
        quantized, site.info, site.program, has_scale_in="linear.scale_in" in site.kinds
    )
    built.state = site.state
    return built


@hookimpl
def register_rules(register):
    for operator, reason in _REFUSALS.items():
        register.refuse(operator=operator, method=METHOD, reason=reason, fix=_ROOT_FIX)


@hookimpl
def register_methods(register):
    register.method(
        METHOD,
        config=LoftqConfig,
        build=build,
        points=["linear.delta"],
        capabilities=Capabilities(mergeable=False, identity_at_init=False),
        default_targets=["attn.q", "attn.v"],
        description="LoRA fitted to the error of a block-wise NF2/NF4/NF8 quantised base, which "
        "the model then runs on: deq(Q) x + s·BA x (QLoRA-style, not mergeable).",
    )


__all__ = [
    "LoftQ",
    "LoftqConfig",
    "LoftqInit",
    "QuantizedLinear",
    "QuantizedLinearSite",
    "build",
    "loftq_init",
    "low_rank_split",
]
