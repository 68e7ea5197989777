"""Built-in composition operators: stack and sum (mix and route live in their own modules).

    stack[a, b]      ops applied in order at each site; the later wraps the earlier
    sum[w](a, b)     W x + Σ wᵢ Δᵢ(x); scales combine as 1 + Σ wᵢ (lᵢ − 1)

The math of each site family lives with the family's runtime (adapter_composer.runtime.*); the
nodes here only say how their children combine.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.registry import hookimpl
from adapter_composer.runtime.linear import fold_stack, fold_weighted, nf_stack, nf_weighted
from adapter_composer.runtime.model import segments_stack
from adapter_composer.runtime.sublayer import residual_stack, residual_weighted


class StackOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SumOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    weights: list[float] | None = Field(None, description="one weight per child; None: all 1.0")
    learnable: bool = Field(False, description="train the weights with the adapters")


class StackNode(nn.Module):
    def __init__(self, children: list[nn.Module]):
        super().__init__()
        self.items = nn.ModuleList(children)

    def linear_nf(self, x, call):
        return nf_stack(list(self.items), x, call)

    def linear_fold(self, site):
        return fold_stack(list(self.items), site)

    def sublayer_residual(self, h, call):
        return residual_stack(list(self.items), h, call)

    def segments(self, call):
        return segments_stack([c.segments(call) for c in self.items])


class SumWeights(nn.Module):
    """The weights of one sum node, shared by every site the node reaches."""

    def __init__(self, weights: list[float], learnable: bool):
        super().__init__()
        value = torch.tensor(weights, dtype=torch.float32)
        if learnable:
            self.weights = nn.Parameter(value)
        else:
            self.register_buffer("weights", value)


class SumNode(nn.Module):
    def __init__(self, children: list[nn.Module], weights: Any, index: list[int], node: str = ""):
        super().__init__()
        self.node = node
        self.items = nn.ModuleList(children)
        self.shared = weights  # a SharedRef to the node's SumWeights
        self.index = index  # which of the node's weights each present child uses

    def _coefs(self, dtype: torch.dtype) -> list[torch.Tensor]:
        w = self.shared().weights.to(dtype)
        return [w[i] for i in self.index]

    def linear_nf(self, x, call):
        return nf_weighted(self._coefs(x.dtype), [c.linear_nf(x, call) for c in self.items])

    def linear_fold(self, site):
        return fold_weighted(self._coefs(torch.float32), [c.linear_fold(site) for c in self.items])

    def sublayer_residual(self, h, call):
        return residual_weighted(self._coefs(h.dtype), [c.sublayer_residual(h, call) for c in self.items])


def _stack(children, options, keys, shared, ctx):
    return StackNode(children)


def _sum(children, options, keys, shared, ctx):
    return SumNode(children, shared, list(ctx.present), ctx.node)


def _sum_shared(options: SumOptions, n_children: int) -> SumWeights:
    weights = options.weights if options.weights is not None else [1.0] * n_children
    return SumWeights(list(weights), options.learnable)


def _sum_check(options: SumOptions, n_children: int, keys: Any) -> list[str]:
    if options.weights is not None and len(options.weights) != n_children:
        return [f"sum has {n_children} children but {len(options.weights)} weights"]
    return []


@hookimpl
def register_operators(register):
    register.operator(
        "stack",
        options=StackOptions,
        families={"linear": _stack, "sublayer": _stack, "prompt": _stack, "prefix": _stack},
        exact_merge=True,
        description="Apply children in order at every site they share; the later wraps the earlier.",
    )
    register.operator(
        "sum",
        options=SumOptions,
        families={"linear": _sum, "sublayer": _sum},
        exact_merge=True,
        min_children=1,
        check=_sum_check,
        shared=_sum_shared,
        description="Weighted sum of the children's effects: W x + Σ wᵢ Δᵢ(x).",
    )


@hookimpl
def register_rules(register):
    # Nesting: stack and sum combine freely (both are exact linear combinations).
    for outer in ("stack", "sum"):
        for inner in ("stack", "sum"):
            register.nesting(outer, inner, allowed=True)
    for kind, what in (("attention.kv_prefix", "key/value prefixes"), ("input.embeddings", "virtual prompt tokens")):
        register.refuse(
            kind=kind,
            operator="sum",
            reason=f"a weighted sum of {what} has no defined meaning (they are concatenated, not added)",
            fix="stack them (concatenation in order) or route them (one per example)",
        )
