"""Polytropon (Ponti et al. 2022) and Multi-Head Routing, MHR (Caccia et al. 2023): a pool
of LoRA *skills* and a learned task × skill allocation, as a ``poly`` operator.

    route{t₁: poly_t₁(s₁ … s_S), t₂: poly_t₂(s₁ … s_S), …}     one poly node per task, same skills

The route gives each row its task (``model(**batch, route=task_names)``); the task's node
holds, at every site, allocation logits Z [q, S] (q heads; q = 1 is Polytropon, q > 1 MHR):

    training   Ẑ = RelaxedBernoulli(τ, logits=Z).rsample(), one draw per row (Gumbel-sigmoid)
    eval       Ẑ = σ(Z)
    w_h,s = Ẑ_h,s / (Σ_s' Ẑ_h,s' + 1e-12)                     per head h, over the whole pool
    A_t[:, head h] = Σ_s w_h,s A_s[:, head h],   B_t[head h, :] = Σ_s w_h,s B_s[head h, :]
    Δ_t(x) = s · B_t A_t x                                       s = α/r (α = 1: PEFT's 1/r)

(heads cut A's input columns and B's output rows into q equal parts; see
:mod:`adapter_composer.plugins.param_mix`). This is HF PEFT's ``PolyModel`` (``poly_type="poly"``,
``n_skills = S``, ``n_splits = q``, ``task_ids`` = the index of the row's task), with the same
outputs for the same weights (tested in eval and, with the same RNG, in training). Z starts
in U(−10⁻³, 10⁻³) and the skills' B at zero, so a fresh composition is the identity. Skills
of another ``linear.delta`` method are mixed in parameter space by their own forward (q = 1).

:func:`declare` writes the whole graph. A poly node outside a route is one task's fixed
mixture, which merges exactly (with the eval weights σ(Z)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from adapter_composer.errors import ComposerError
from adapter_composer.plugins.param_mix import ParamMixer, register_parameter_mix_rules
from adapter_composer.registry import Diagnostic, hookimpl
from adapter_composer.runtime.linear import NF, Fold

__all__ = ["PolyAllocation", "PolyNode", "PolyOptions", "declare"]

PLUGIN = "adapter_composer.plugins.poly"
EPS = 1e-12  # as PEFT's PolyRouter


class PolyOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    n_splits: int = Field(1, ge=1, description="heads per skill (q): 1 is Polytropon, more is Multi-Head Routing")
    temperature: float = Field(1.0, gt=0, description="temperature τ of the relaxed Bernoulli (Gumbel-sigmoid) while training")


def site_name(key: str) -> str:
    """A site key as a parameter name (``layers.0.attn.q`` → ``layers/0/attn/q``)."""
    return key.replace(".", "/")


class PolyAllocation(nn.Module):
    """One task's allocation logits Z [q, S] per site, shared by the node's sites (saved with
    the composition as operator weights)."""

    def __init__(self, n_skills: int, n_splits: int):
        super().__init__()
        self.n_skills, self.n_splits = n_skills, n_splits
        self.logits = nn.ParameterDict()

    def at(self, key: str) -> nn.Parameter:
        name = site_name(key)
        if name not in self.logits:
            z = torch.empty(self.n_splits, self.n_skills)
            nn.init.uniform_(z, -1e-3, 1e-3)
            self.logits[name] = nn.Parameter(z)
        return self.logits[name]


class PolyNode(nn.Module):
    def __init__(self, children: list[nn.Module], options: PolyOptions, shared: Any, key: str, present: Sequence[int], node: str):
        super().__init__()
        self.items = nn.ModuleList(children)
        self.mixer = ParamMixer(children, node, "poly")
        self.options = options
        self.shared = shared  # a SharedRef to the node's PolyAllocation
        self.key = key
        self.present = list(present)
        self.node = node
        shared().at(key)  # created now, so that the optimizer sees it

    def weights(self, rows: int | None) -> torch.Tensor:
        """w [q, S_here] (eval), or one draw per row [rows, q, S_here] (training)."""
        z = self.shared().at(self.key)
        if self.training and rows is not None:
            zhat = RelaxedBernoulli(torch.tensor(self.options.temperature), logits=z.expand(rows, *z.shape)).rsample()
        else:
            zhat = torch.sigmoid(z)
        w = zhat / (zhat.sum(dim=-1, keepdim=True) + EPS)
        return w[..., self.present]

    def linear_nf(self, x: torch.Tensor, call: Any) -> NF:
        w = self.weights(x.shape[0])
        state = call.state
        if state is not None and state.record_gates:
            state.gates[f"{self.node}@{self.key}"] = w.detach()
        return NF(e=self.mixer.delta(x, call, w))

    def linear_fold(self, site: Any) -> Fold:
        return Fold(e=self.mixer.fold(site, self.weights(None)))

    def extra_repr(self) -> str:
        return f"node={self.node!r}, skills={len(self.items)}, n_splits={self.options.n_splits}"


def _poly(children, options: PolyOptions, keys, shared, ctx):
    info = ctx.info
    q = options.n_splits
    if q > 1 and (info.in_features % q or info.out_features % q):
        raise ComposerError(f"poly node {ctx.node!r}: n_splits={q} does not divide {info.key}'s sizes ({info.in_features} → {info.out_features})")
    node = PolyNode(children, options, shared, info.key, ctx.present, ctx.node)
    if q > 1 and node.mixer.factors() is None:
        raise ComposerError(
            f"poly node {ctx.node!r}: n_splits={q} (MHR) cuts LoRA factors into heads; the skills at {info.key} "
            "have no plain factors (use lora skills without dropout or DoRA)"
        )
    return node


def _shared(options: PolyOptions, n_children: int) -> PolyAllocation:
    return PolyAllocation(n_children, options.n_splits)


def declare(
    graph: Any,
    name: str,
    tasks: Sequence[str],
    *,
    skills: int = 4,
    n_splits: int = 1,
    r: int = 8,
    alpha: float = 1.0,
    targets: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    temperature: float = 1.0,
    **lora: Any,
) -> str:
    """Declare Polytropon (MHR with ``n_splits > 1``) in ``graph``: ``skills`` LoRA adapters
    ``{name}_skill{i}``, one poly node ``{name}_{task}`` per task and a route ``name`` keyed by
    task. ``alpha=1`` gives PEFT's scale 1/r. Returns the route's name."""
    pool = [
        graph.adapter(f"{name}_skill{i}", "lora", r=r, alpha=alpha, targets=targets, layers=layers, **lora)
        for i in range(skills)
    ]
    nodes = {t: graph.op("poly", *pool, name=f"{name}_{t}", n_splits=n_splits, temperature=temperature) for t in tasks}
    return graph.route(nodes, name=name)


def _diagnostics(graph) -> list[Diagnostic]:
    found = []
    for spec in graph.specs.values():
        if getattr(spec, "operator", None) != "poly":
            continue
        methods = {c: graph.method_of(c) for c in spec.children if graph.method_of(c) is not None}
        if len(set(methods.values())) > 1:
            found.append(
                Diagnostic(
                    code="param-mix-children",
                    message=f"poly node {spec.name!r} mixes the parameters of its skills, which use different methods: {methods}",
                    nodes=(spec.name, *methods),
                    rule="the skills of a poly node are adapters of one method with the same settings",
                    fix="make every skill the same method and configuration",
                    plugin=PLUGIN,
                )
            )
        q = spec.options.get("n_splits", 1)
        if isinstance(q, int) and q > 1:
            for child, method in methods.items():
                config = graph.config(child)
                lora_plain = method == "lora" and config is not None and not config.dora and config.dropout == 0
                if not lora_plain:
                    found.append(
                        Diagnostic(
                            code="poly-splits",
                            message=f"poly node {spec.name!r} has n_splits={q} (MHR), which cuts LoRA factors into heads, but skill {child!r} is {method}"
                            + ("" if method != "lora" else " with DoRA or dropout"),
                            nodes=(spec.name, child),
                            rule="MHR heads need plain LoRA skills (no DoRA, no dropout)",
                            fix="use lora skills without dora/dropout, or n_splits=1",
                            plugin=PLUGIN,
                        )
                    )
                    continue
                bad = [s.key for s in graph.sites(child) if s.in_features % q or s.out_features % q]
                if bad:
                    found.append(
                        Diagnostic(
                            code="poly-splits",
                            message=f"poly node {spec.name!r}: n_splits={q} does not divide the sizes of {len(bad)} site(s) of skill {child!r}",
                            nodes=(spec.name, child),
                            sites=tuple(bad),
                            rule="every head has in/q input columns and out/q output rows",
                            fix="choose n_splits dividing every targeted layer's input and output sizes",
                            plugin=PLUGIN,
                        )
                    )
    return found


@hookimpl
def check_graph(graph, registry):
    return _diagnostics(graph)


@hookimpl
def register_operators(register):
    register.operator(
        "poly",
        options=PolyOptions,
        families={"linear": _poly},
        min_children=1,
        exact_merge=True,
        shared=_shared,
        description="Polytropon/MHR: one task's learned mixture of a pool of LoRA skills, mixed in parameter space (put one per task under a route).",
    )


@hookimpl
def register_rules(register):
    register_parameter_mix_rules(register, "poly", "skill")
