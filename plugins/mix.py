"""The mix operator: a learned gate over experts, in one forward pass (mixture of LoRAs).

    linear sites     y = W x + Σₑ gₑ(x) Δₑ(x)          (scales combine as 1 + Σ gₑ (lₑ − 1))
    sublayer sites   h ↦ h + Σₑ gₑ(h) fₑ
    g = softmax(router(x) / τ), per token or per sequence; with top-k, g is the softmax of the
    k largest logits and zero elsewhere, and only the selected experts are computed.

Each site has its own router (an affine map from the site's input to one logit per expert,
zero-initialised so the gate starts uniform), or, with ``router="layer"``, each layer has one
router over the layer's input hidden state, shared by all the mix's sites in that layer. The load-balancing loss of Switch/Mixtral,
E · Σₑ fₑ Pₑ (fₑ: share of tokens whose top-k includes e, Pₑ: mean gate), is recorded per
site for training (``composed.aux_loss()``); gate values can be recorded for analysis
(``composed.record_gates()``). Per-sequence gates are computed at the prefill and kept
for the following ``generate()`` steps, which continue the same KV cache.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.registry import hookimpl
from adapter_composer.runtime.linear import NF, nf_weighted
from adapter_composer.runtime.lowrank import lowrank_of, mixed_delta
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


class LayerRouters(nn.Module):
    """The per-layer routers of one mix node (router="layer"), shared by the sites of a layer."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.routers = nn.ModuleDict()

    def router(self, layer: int, width: int) -> nn.Linear:
        key = str(layer)
        if key not in self.routers:
            linear = nn.Linear(width, self.n_experts)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            self.routers[key] = linear
        return self.routers[key]


class MixNode(nn.Module):
    def __init__(
        self, children: list[nn.Module], options: MixOptions, width: int, node: str, where: str,
        layer_router: Any = None, layer: int | None = None, present: list[int] | None = None,
    ):
        super().__init__()
        self.items = nn.ModuleList(children)
        self.options = options
        self.node = node
        self.where = where
        self.block_layer = layer if layer_router is not None else None  # the host captures this layer's input
        self._layer_router = layer_router  # a SharedRef: the router lives once in the container
        self.present = present  # which of the node's experts act here (the layer router scores all)
        if layer_router is None:
            self.router = nn.Linear(width, len(children))
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)
        if not options.train_experts:
            for p in self.items.parameters():
                p.requires_grad_(False)

    # --- the gate ---------------------------------------------------------------------

    def gates(self, source: torch.Tensor, state: Any) -> torch.Tensor:
        """Gate values [..., E] for ``source`` [B, T, d] (per sequence: [B, 1, E])."""
        opts = self.options
        label = f"{self.node}@{self.where}"
        sticky_key = (id(self), "gates")
        if opts.granularity == "sequence" and state is not None and state.continuing and sticky_key in state.sticky:
            gates = state.sticky[sticky_key]  # computed at the prefill of this generation
        else:
            router = self.router if self._layer_router is None else self._layer_router().router(self.block_layer, 0)
            if self._layer_router is not None:
                if state is None or self.block_layer not in state.block_inputs:
                    raise RuntimeError(f"mix node {self.node!r}: the input of layer {self.block_layer} was not captured")
                source = state.block_inputs[self.block_layer]
            if opts.granularity == "sequence" and source.dim() == 3:
                source = source.mean(dim=1, keepdim=True)
            logits = router(source.to(router.weight.dtype)) / opts.temperature
            if self._layer_router is not None and self.present is not None and len(self.present) < logits.shape[-1]:
                logits = logits[..., self.present]
            probs = logits.softmax(-1)
            if opts.top_k is not None and opts.top_k < probs.shape[-1]:
                top, index = logits.topk(opts.top_k, dim=-1)
                gates = torch.zeros_like(probs).scatter(-1, index, top.softmax(-1))
                chosen = torch.zeros_like(probs).scatter(-1, index, 1.0)
            else:
                gates, chosen = probs, torch.ones_like(probs)
            if state is not None:
                share = chosen.reshape(-1, chosen.shape[-1]).mean(0) / chosen.sum(-1).mean()
                mean_prob = probs.reshape(-1, probs.shape[-1]).mean(0)
                state.aux_losses[label] = opts.aux_loss_weight * probs.shape[-1] * (share * mean_prob).sum()
                if opts.granularity == "sequence":
                    state.sticky[sticky_key] = gates
        if state is not None and state.record_gates:
            state.gates[label] = gates.detach()
        return gates

    # --- linear sites -----------------------------------------------------------------

    def linear_nf(self, x: torch.Tensor, call: Any) -> NF:
        g = self.gates(x, call.state).to(x.dtype)
        parts = [lowrank_of(c) for c in self.items]
        if self.options.top_k is None and all(p is not None for p in parts):
            return NF(e=mixed_delta(x.to(parts[0][0].dtype), parts, g.to(parts[0][0].dtype)))
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
        g = self.gates(h, call.state).to(h.dtype)
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
        shared().router(info.layer, hidden)  # created now, at build time, so the optimizer sees it
        return MixNode(children, options, width, ctx.node, where, layer_router=shared, layer=info.layer, present=list(ctx.present))
    return MixNode(children, options, width, ctx.node, where)


def _shared(options: MixOptions, n_children: int) -> LayerRouters | None:
    return LayerRouters(n_children) if options.router == "layer" else None


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
