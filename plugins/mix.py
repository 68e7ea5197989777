"""The mix operator: a learned gate over experts, in one forward pass (mixture of LoRAs).

    linear sites     y = W x + Σₑ gₑ(x) Δₑ(x)          (scales combine as 1 + Σ gₑ (lₑ − 1))
    sublayer sites   h ↦ h + Σₑ gₑ(h) fₑ
    g = softmax(router(x) / τ), per token or per sequence; with top-k, g is the softmax of the
    k largest logits and zero elsewhere, and only the selected experts are computed.

Each site has its own router (an affine map from the site's input to one logit per expert,
zero-initialised so the gate starts uniform), or, with ``router="layer"``, each layer has one
router over the layer's input hidden state, shared by all the mix's sites in that layer. Either
way the routers live in the node's :class:`MixRouters`, in the model's container, so saving and
loading a composition (and training checkpoints) carry them.

Per-sequence gates pool over the real tokens of each row (the call's attention mask):

    g_seq = softmax(router(Σ_t m_t x_t / Σ_t m_t) / τ),   m_t = 1 for real tokens, 0 for padding

and the load-balancing loss of Switch/Mixtral, E · Σₑ fₑ Pₑ (fₑ: share of the routing
choices that picked e, Pₑ: mean gate), averages over real tokens (or sequences) only, so the
amount of padding changes neither outputs nor loss. The loss is recorded per site for
training (``composed.aux_loss()``); gate values can be recorded for analysis
(``composed.record_gates()``). Per-sequence gates are computed at the prefill and kept for
the following ``generate()`` steps, which continue the same KV cache.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.registry import hookimpl
from adapter_composer.runtime.linear import NF, nf_weighted
from adapter_composer.runtime.lowrank import (
    LowRankBank,
    bank_of,
    in_place_target,
    lowrank_of,
    mixed_delta,
    wants_grad,
)
from adapter_composer.runtime.sublayer import residual_weighted


class MixOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    top_k: int | None = Field(None, ge=1, description="route each token to its k best experts only (None: all, dense)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature τ of the gate")
    granularity: Literal["token", "sequence"] = Field("token", description="one gate per token or per sequence")
    aux_loss_weight: float = Field(0.01, ge=0, description="coefficient of the load-balancing loss")
    train_experts: bool = Field(True, description="train the experts jointly with the routers (False: routers only)")
    router: Literal["site", "layer"] = Field(
        "site", description="one router per site over its input, or one per layer over the layer's input (shared by its sites)"
    )


class MixRouters(nn.Module):
    """The routers of one mix node, shared by its sites: one per site (router="site", keyed by
    the site's name) or one per layer (router="layer", keyed by the layer index, shared by the
    layer's sites). They live once in the model's ``adapter_composer`` container, so
    ``composed.save``/``adapter_composer.load`` (``operators.safetensors``) and training
    checkpoints carry them like every operator weight."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.routers = nn.ModuleDict()

    @staticmethod
    def name_of(where: str | int) -> str:
        """The key of a site's (or a layer's) router: ``layers.0.attn.q`` → ``layers:0:attn:q``."""
        return str(where).replace(".", ":")

    def router(self, where: str | int, width: int, device: torch.device | None = None) -> nn.Linear:
        key = self.name_of(where)
        if key not in self.routers:
            linear = nn.Linear(width, self.n_experts, device=device)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            self.routers[key] = linear
        return self.routers[key]


def _pool(source: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of each sequence: [B, T, d] → [B, 1, d] (padding excluded)."""
    if real is None:
        return source.mean(dim=1, keepdim=True)
    weights = real.to(source.dtype).unsqueeze(-1)  # [B, T, 1]
    count = weights.sum(dim=1, keepdim=True).clamp(min=1)
    return (source * weights).sum(dim=1, keepdim=True) / count


def balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """E · Σₑ fₑ Pₑ over the gated units that are real (tokens, or sequences with a real token):
    fₑ = share of the routing choices that picked e, Pₑ = mean gate of e."""
    flat_p = probs.reshape(-1, probs.shape[-1])
    flat_c = chosen.reshape(-1, chosen.shape[-1])
    if real is None:
        share = flat_c.mean(0) / flat_c.sum(-1).mean()
        mean_prob = flat_p.mean(0)
    else:
        w = real.reshape(-1, 1).to(flat_p.dtype)
        share = (flat_c * w).sum(0) / (flat_c.sum(-1, keepdim=True) * w).sum().clamp(min=1e-12)
        mean_prob = (flat_p * w).sum(0) / w.sum().clamp(min=1)
    return probs.shape[-1] * (share * mean_prob).sum()


GATHER_COST = 32  # a token's gather + scatter at one expert, in units of one rank column of GEMM work


def _dense_is_cheaper(parts: list, top_k: int) -> bool:
    """Top-k over low-rank experts: computing every expert (E·r columns, one GEMM each way) beats
    computing only the selected ones per token (k·r columns plus gathering and scattering each
    token's input and output k times) unless the experts are many or wide:

        dense  ∝ E · r        sparse ∝ k · (r + GATHER_COST)
    """
    r = max(a.shape[0] for a, _, _ in parts)
    return len(parts) * r <= top_k * (r + GATHER_COST)


class MixNode(nn.Module):
    def __init__(
        self, children: list[nn.Module], options: MixOptions, node: str, where: str,
        routers: Any, router_key: str | int, layer: int | None = None, present: list[int] | None = None,
    ):
        super().__init__()
        self.items = nn.ModuleList(children)
        self.options = options
        self.node = node
        self.where = where
        self.block_layer = layer  # per-layer router: the host captures this layer's input
        self._routers = routers  # a SharedRef to the node's MixRouters (in the container)
        self._router_key = MixRouters.name_of(router_key)
        self.present = present  # which of the node's experts act here (a layer router scores all)
        self.bank = LowRankBank()  # the low-rank experts' A and B; their parameters are views of it
        if not options.train_experts:
            for p in self.items.parameters():
                p.requires_grad_(False)

    @property
    def router(self) -> nn.Linear:
        """This site's router (router="site"; a per-layer router is shared, see MixRouters)."""
        if self.block_layer is not None:
            raise AttributeError(f"mix node {self.node!r} uses per-layer routers: composed._rt.shared[{self.node!r}].routers")
        return self._routers().routers[self._router_key]

    # --- the gate ---------------------------------------------------------------------

    def gates(self, source: torch.Tensor, call: Any) -> torch.Tensor:
        """Gate values [..., E] for ``source`` [B, T, d] (per sequence: [B, 1, E]).

        Per-sequence gates pool over the call's real tokens (its attention mask), and the
        balancing loss counts real tokens (or sequences) only, so padding changes nothing."""
        opts = self.options
        state = call.state
        rows = getattr(call, "rows", None)
        label = f"{self.node}@{self.where}"
        sticky_key = None
        if opts.granularity == "sequence":  # kept for the generate() steps that continue this call's cache
            sticky_key = (id(self), "gates") if rows is None else (id(self), "gates", tuple(rows.tolist()))
        if sticky_key is not None and state is not None and state.continuing and sticky_key in state.sticky:
            gates = state.sticky[sticky_key]  # computed at the prefill of this generation
        else:
            router = self._routers().routers[self._router_key]
            if self.block_layer is not None:
                if state is None or self.block_layer not in state.block_inputs:
                    raise RuntimeError(f"mix node {self.node!r}: the input of layer {self.block_layer} was not captured")
                source = state.block_inputs[self.block_layer]
                if rows is not None:
                    source = source.index_select(0, rows)
            real = None
            if state is not None and source.dim() == 3:
                real = state.real_tokens(rows, source.shape[0], source.shape[1])
            if opts.granularity == "sequence" and source.dim() == 3:
                source = _pool(source, real)
                real = None if real is None else real.any(dim=1, keepdim=True)
            logits = router(source.to(router.weight.dtype)) / opts.temperature
            if self.block_layer is not None and self.present is not None and len(self.present) < logits.shape[-1]:
                logits = logits[..., self.present]
            probs = logits.softmax(-1)
            if opts.top_k is not None and opts.top_k < probs.shape[-1]:
                top, index = logits.topk(opts.top_k, dim=-1)
                gates = torch.zeros_like(probs).scatter(-1, index, top.softmax(-1))
                chosen = torch.zeros_like(probs).scatter(-1, index, 1.0)
            else:
                gates, chosen = probs, torch.ones_like(probs)
            if state is not None:
                state.aux_losses[label] = opts.aux_loss_weight * balancing_loss(probs, chosen, real)
                if sticky_key is not None:
                    state.sticky[sticky_key] = gates
        if state is not None and state.record_gates:
            state.gates[label] = gates.detach()
        return gates

    # --- linear sites -----------------------------------------------------------------

    def linear_nf(self, x: torch.Tensor, call: Any) -> NF:
        g = self.gates(x, call).to(x.dtype)
        parts = [lowrank_of(c) for c in self.items]
        if all(p is not None for p in parts) and (self.options.top_k is None or _dense_is_cheaper(parts, self.options.top_k)):
            a, b, scale = bank_of(self.bank, parts)  # top-k: the unselected experts' gates are exact zeros
            into = in_place_target(call, self, a.dtype, wants_grad(parts) or g.requires_grad)
            if into is not None:
                mixed_delta(x.to(a.dtype), a, b, scale, g.to(a.dtype), into=into)
                return NF()
            return NF(e=mixed_delta(x.to(a.dtype), a, b, scale, g.to(a.dtype)))
        if self.options.top_k is not None:
            sparse = self._sparse_nf(x, call, g)
            if sparse is not None:
                return sparse
        return nf_weighted([g[..., i : i + 1] for i in range(len(self.items))], [c.linear_nf(x, call) for c in self.items])

    def _sparse_nf(self, x: torch.Tensor, call: Any, g: torch.Tensor) -> NF | None:
        """Only the selected experts, each on the tokens that selected it (deltas only)."""
        flat_x = x.reshape(-1, x.shape[-1])
        flat_g = g.expand(*x.shape[:-1], g.shape[-1]).reshape(-1, g.shape[-1])
        total = None
        for i, child in enumerate(self.items):
            tokens = (flat_g[:, i] > 0).nonzero().flatten()
            if tokens.numel() == 0:
                continue
            sub = child.linear_nf(flat_x.index_select(0, tokens), call)
            if sub.a is not None or sub.b is not None:
                return None  # scales need every token: use the dense path
            if sub.e is None:
                continue
            contribution = sub.e * flat_g.index_select(0, tokens)[:, i : i + 1].to(sub.e.dtype)
            total = contribution.new_zeros(flat_x.shape[0], contribution.shape[-1]) if total is None else total
            total = total.index_add(0, tokens, contribution)
        if total is None:
            return NF()
        return NF(e=total.reshape(*x.shape[:-1], total.shape[-1]))

    def linear_fold(self, site):
        raise TypeError(f"mix node {self.node!r} depends on the input and cannot be folded into weights")

    # --- sublayer sites ---------------------------------------------------------------

    def sublayer_residual(self, h: torch.Tensor, call: Any) -> torch.Tensor | None:
        g = self.gates(h, call).to(h.dtype)
        return residual_weighted([g[..., i : i + 1] for i in range(len(self.items))], [c.sublayer_residual(h, call) for c in self.items])

    def extra_repr(self) -> str:
        o = self.options
        return f"node={self.node!r}, experts={len(self.items)}, top_k={o.top_k}, τ={o.temperature}, {o.granularity}"


def _mix(children, options: MixOptions, keys, shared, ctx):
    info = ctx.info
    width = info.in_features if ctx.family == "linear" else info.out_features
    where = info.key if ctx.family == "linear" else ctx.path
    if options.router == "layer":
        if info.layer is None:
            raise ValueError(f"mix node {ctx.node!r}: router='layer' needs role targets with a layer index, not {where!r}")
        cfg = info.model_config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or cfg.d_model
        shared().router(info.layer, hidden, info.device)  # created now, at build time, so the optimizer sees it
        return MixNode(children, options, ctx.node, where, shared, info.layer, layer=info.layer, present=list(ctx.present))
    shared().router(where, width, info.device)
    return MixNode(children, options, ctx.node, where, shared, where)


def _shared(options: MixOptions, n_children: int) -> MixRouters:
    return MixRouters(n_children)


def _check(options: MixOptions, n_children: int, keys: Any) -> list[str]:
    if options.top_k is not None and options.top_k > n_children:
        return [f"top_k={options.top_k} is larger than the number of experts ({n_children})"]
    return []


@hookimpl
def register_operators(register):
    register.operator(
        "mix",
        options=MixOptions,
        families={"linear": _mix, "sublayer": _mix},
        min_children=2,
        check=_check,
        shared=_shared,
        description="Learned gate over experts: W x + Σ gₑ(x) Δₑ(x), per token or sequence, optional top-k.",
    )


@hookimpl
def register_rules(register):
    for inner in ("stack", "sum"):
        register.nesting("mix", inner, allowed=True, reason="an expert may be any ordered or summed composition")
    register.nesting("stack", "mix", allowed=True, reason="a mixture inside an ordered composition")
    register.nesting("sum", "mix", allowed=True, reason="a mixture inside a weighted sum")
    register.nesting("mix", "mix", allowed=False, reason="nested gates are not supported; flatten the experts into one mix")
    register.nesting("mix", "route", allowed=False, reason="a gate over routed experts is undefined for unrouted rows; put the mix inside the route")
    for kind, what in (("attention.kv_prefix", "key/value prefixes"), ("input.embeddings", "virtual prompt tokens")):
        register.refuse(
            kind=kind,
            operator="mix",
            reason=f"{what} are concatenated to the sequence, not added, so a per-token gate over them is undefined",
            fix="route them per example or stack them",
        )
