"""LoHa: a low-rank Hadamard-product update, as a third-party adapter-composer plugin.

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   s = α / r,   W1a, W2a: [out, r],  W1b, W2b: [r, in]

The effective rank of ΔW can reach r², for the parameters of a rank-2r LoRA. ``W2b`` starts
at zero, so a fresh adapter is the identity. The update is linear in x, so it merges
exactly; the forward pass forms ΔW (it has no cheaper factorised form).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.formats.peft import peft_float, peft_int
from adapter_composer.registry import Capabilities, Diagnostic, hookimpl

__version__ = "0.1.0"


class LohaConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    r: int = Field(4, ge=1, description="rank of each Hadamard factor")
    alpha: float = Field(4.0, gt=0, description="scale numerator: s = alpha / r")


class LoHa(nn.Module):
    """Δ(x) = s · ((W1a W1b) ⊙ (W2a W2b)) x."""

    def __init__(self, fan_in: int, fan_out: int, r: int, scale: float):
        super().__init__()
        self.w1a = nn.Parameter(torch.empty(fan_out, r))
        self.w1b = nn.Parameter(torch.empty(r, fan_in))
        self.w2a = nn.Parameter(torch.empty(fan_out, r))
        self.w2b = nn.Parameter(torch.zeros(r, fan_in))
        for p in (self.w1a, self.w1b, self.w2a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.scale = scale

    def delta_weight(self, site: Any = None) -> torch.Tensor:
        return (self.w1a @ self.w1b) * (self.w2a @ self.w2b) * self.scale

    def forward(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        return F.linear(x, self.delta_weight())


def build(config: LohaConfig, site: Any) -> LoHa:
    return LoHa(site.in_features, site.out_features, config.r, config.alpha / config.r)


class LohaPeftCodec:
    """PEFT's ``LoHaConfig`` files (linear layers, no CP decomposition, no dropout)."""

    peft_types = ("LOHA",)
    tensor_names = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b"}

    def from_peft(self, peft: dict) -> dict:
        unsupported = [
            k
            for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
            if peft.get(k)
        ]
        if (
            peft.get("use_effective_conv2d")
            or peft.get("rank_dropout")
            or peft.get("module_dropout")
        ):
            unsupported.append("conv/rank/module dropout options")
        if unsupported:
            raise ValueError(f"unsupported PEFT LoHa options: {unsupported}")
        return {"r": peft_int(peft, "r", 8, minimum=1), "alpha": peft_float(peft, "alpha", 8.0)}

    def to_peft(self, config: LohaConfig, sites: list) -> dict:
        return {
            "peft_type": "LOHA",
            "task_type": None,
            "r": config.r,
            "alpha": config.alpha,
            "target_modules": sorted(s.path for s in sites),
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "use_effective_conv2d": False,
            "init_weights": True,
            "inference_mode": True,
        }


@hookimpl
def register_methods(register):
    register.method(
        "loha",
        config=LohaConfig,
        build=build,
        points=["linear.delta"],
        capabilities=Capabilities(mergeable=True, identity_at_init=True),
        default_targets=["attn.q", "attn.v"],
        peft=LohaPeftCodec(),
        description="Low-rank Hadamard product update s·(W1a W1b)⊙(W2a W2b) (FedPara / LyCORIS).",
    )


@hookimpl
def check_graph(graph, registry):
    """A LoHa factor's rank cannot exceed the layer's width; larger r only wastes parameters."""
    found = []
    for name, spec in graph.specs.items():
        if getattr(spec, "method", None) != "loha" or graph.config(name) is None:
            continue
        r = graph.config(name).r
        narrow = [s.key for s in graph.sites(name) if r > min(s.in_features, s.out_features)]
        if narrow:
            found.append(
                Diagnostic(
                    code="loha-rank-too-large",
                    message=f"loha adapter {name!r} has r={r}, more than the width of {len(narrow)} site(s)",
                    nodes=(name,),
                    sites=tuple(narrow),
                    rule="each Hadamard factor has rank at most min(in, out)",
                    fix="lower r",
                    plugin="adapter-composer-loha",
                )
            )
    return found
