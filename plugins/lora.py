"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024) and LoRA+ groups.

    LoRA    y = W x + s · B A dropout(x),         s = α / r   (rsLoRA: s = α / √r)
    DoRA    y = m / ‖W + s B A‖_row ⊙ (W x + s B A x)  (+ bias), the norm detached as in the paper

A is [r, in], B is [out, r]; B starts at zero so a fresh adapter is the identity. Per-site
rank and alpha come from ``rank_pattern`` / ``alpha_pattern``, whose keys are roles
(``attn.v``) or regexes matched against the end of the module path as in PEFT.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from adapter_composer.formats.peft import (
    peft_bool,
    peft_dict,
    peft_float,
    peft_int,
    unsupported_options,
)
from adapter_composer.patterns import compile_pattern, matches_suffix
from adapter_composer.registry import Capabilities, hookimpl
from adapter_composer.runtime.lowrank import bump_epoch


class LoraConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(8, ge=1, description="rank of the update B A")
    alpha: float = Field(
        8.0, gt=0, description="scale numerator: s = alpha / r (alpha / sqrt(r) with rslora)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    dora: bool = Field(
        False, description="weight-decomposed LoRA: learn a magnitude per output row"
    )
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="initialisation of A (B is zero)"
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="per-role or per-module-regex rank"
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="per-role or per-module-regex alpha"
    )
    loraplus_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B's learning rate is this many times A's (param_groups)"
    )

    @field_validator("rank_pattern")
    @classmethod
    def _ranks_positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in v.items() if r < 1}
        if bad:
            raise ValueError(f"ranks must be >= 1, got {bad}")
        return v

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas_positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: a for k, a in v.items() if a <= 0}
        if bad:
            raise ValueError(f"alphas must be > 0, got {bad}")
        return v


def pattern_value(patterns: Mapping[str, Any], site: Any, default: Any) -> Any:
    """The first pattern naming this site's role or key, or matching the end of its path
    (in bounded time: the keys may come from a file, see :mod:`adapter_composer.patterns`)."""
    for key, value in patterns.items():
        if key in (site.role, site.key) or matches_suffix(key, site.path):
            return value
    return default


def site_rank_alpha(config: LoraConfig, site: Any) -> tuple[int, float]:
    return pattern_value(config.rank_pattern, site, config.r), float(
        pattern_value(config.alpha_pattern, site, config.alpha)
    )


def scaling(config: LoraConfig, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.rslora else alpha / r


def _init_pair(
    r: int, fan_in: int, fan_out: int, init: str, dtype: torch.dtype
) -> tuple[nn.Parameter, nn.Parameter]:
    a = torch.empty(r, fan_in, dtype=dtype)
    if init == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    else:
        nn.init.normal_(a, std=1.0 / r)
    return nn.Parameter(a), nn.Parameter(torch.zeros(fan_out, r, dtype=dtype))


_LOWRANK_FIELDS = frozenset({"lora_A", "lora_B", "scale", "dropout", "training"})


class LoRA(nn.Module):
    """Δ(x) = s · B A dropout(x)."""

    # lowrank() returns the module's own parameters and scale; an assignment that could
    # change them (or the mode that decides whether it applies) bumps the banks' epoch, so a
    # route's serving call may skip walking its children (runtime/lowrank.py)
    lowrank_static = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LOWRANK_FIELDS:
            bump_epoch()
        super().__setattr__(name, value)

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        r: int,
        scale: float,
        dropout: float,
        init: str = "kaiming",
        dtype=torch.float32,
    ):
        super().__init__()
        self.lora_A, self.lora_B = _init_pair(r, fan_in, fan_out, init, dtype)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self, site: Any) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) when Δ(x) = s·B A x exactly (not while dropout is active)."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        return self.lora_A, self.lora_B, self.scale

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scale={self.scale:g}"


class DoRA(nn.Module):
    """Δ(x) = (m/‖W + sBA‖ − 1) ⊙ W x + (m/‖W + sBA‖) ⊙ s B A x, the norm per output row, detached."""

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        r: int,
        scale: float,
        dropout: float,
        weight: torch.Tensor,
        init: str = "kaiming",
        dtype=torch.float32,
    ):
        super().__init__()
        self.lora_A, self.lora_B = _init_pair(r, fan_in, fan_out, init, dtype)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            norm = self._norm(weight.to(dtype))
        self.magnitude = nn.Parameter(norm)

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        lora = (self.lora_B @ self.lora_A).detach().to(weight.dtype)
        return torch.linalg.norm(weight + self.scale * lora, dim=1)

    def forward(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        weight = site.weight().to(x.dtype)
        factor = (self.magnitude / self._norm(weight).detach()).to(x.dtype)
        h = self.dropout(x)
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale
        base = site.base_output(x) if h is x else F.linear(h, weight)
        return (factor - 1) * base + factor * lora

    def delta_weight(self, site: Any) -> torch.Tensor:
        weight = site.weight().to(self.lora_A.dtype)
        merged = weight + self.scale * (self.lora_B @ self.lora_A)
        factor = self.magnitude / torch.linalg.norm(merged, dim=1)
        return factor[:, None] * merged - weight

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scale={self.scale:g}, dora"


def build(config: LoraConfig, site: Any) -> nn.Module:
    r, alpha = site_rank_alpha(config, site)
    s = scaling(config, r, alpha)
    if config.dora:
        return DoRA(
            site.in_features,
            site.out_features,
            r,
            s,
            config.dropout,
            site.weight().detach(),
            config.init,
        )
    return LoRA(site.in_features, site.out_features, r, s, config.dropout, config.init)


def param_groups(
    config: LoraConfig, modules: Mapping[str, nn.Module], lr: float
) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al. 2024): B learns ``loraplus_ratio`` times faster than A."""
    if config.loraplus_ratio is None:
        return []
    a_params = [p for m in modules.values() for n, p in m.named_parameters() if n != "lora_B"]
    b_params = [m.lora_B for m in modules.values()]
    return [{"params": a_params, "lr": lr}, {"params": b_params, "lr": lr * config.loraplus_ratio}]


def loraplus_param_groups(
    composed: Any, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """LoRA+ groups for every LoRA-family adapter of ``composed``, whatever their config says;
    other trainable parameters get ``lr``."""
    groups, claimed = [], set()
    for handle in composed.adapters.values():
        if not all(isinstance(m, LoRA | DoRA) for m in handle.modules.values()):
            continue
        b = [m.lora_B for m in handle.modules.values()]
        a = [p for m in handle.modules.values() for n, p in m.named_parameters() if n != "lora_B"]
        claimed.update(id(p) for p in a + b)
        groups += [
            {"params": a, "lr": lr, "weight_decay": weight_decay, "adapter": handle.name},
            {"params": b, "lr": lr * ratio, "weight_decay": weight_decay, "adapter": handle.name},
        ]
    rest = [p for p in composed.parameters() if id(p) not in claimed]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay})
    return groups


# --- PEFT format ----------------------------------------------------------------------


def peft_lora_common(sites: list[Any]) -> dict[str, Any]:
    """adapter_config.json fields every LoRA-family export (LoRA, AdaLoRA) writes the same way."""
    return {
        "fan_in_fan_out": any(type(s.module).__name__ == "Conv1D" for s in sites),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }


class LoraPeftCodec:
    """Reads and writes PEFT's ``LoraConfig`` (LoRA, rsLoRA, DoRA) files."""

    peft_types = ("LORA",)
    tensor_names = {
        "lora_A.weight": "lora_A",
        "lora_B.weight": "lora_B",
        "lora_magnitude_vector": "magnitude",
    }
    # modules_to_save, layers_to_transform and layers_pattern are read by the host for every
    # method (adapter_composer.formats.peft_options); a config that still has them reaches
    # this codec only when called directly, and they are refused then.
    unsupported = {
        "layers_to_transform": None,
        "modules_to_save": None,
        "use_qalora": False,
        "lora_bias": False,
        "megatron_config": None,
        "layer_replication": None,
        "trainable_token_indices": None,
        "target_parameters": None,
        "alora_invocation_tokens": None,
        "arrow_config": None,
    }

    def from_peft(self, peft: Mapping[str, Any]) -> dict[str, Any]:
        """Our config (as keyword arguments) from PEFT's adapter_config.json."""
        problems = unsupported_options(peft, self.unsupported)
        if problems:
            raise ValueError("unsupported PEFT LoRA options: " + ", ".join(problems))
        config = {
            "r": peft_int(peft, "r", 8, minimum=1),
            "alpha": peft_float(peft, "lora_alpha", 8.0),
            "dropout": peft_float(peft, "lora_dropout", 0.0, minimum=0.0, below=1.0),
            "rslora": peft_bool(peft, "use_rslora", False),
            "dora": peft_bool(peft, "use_dora", False),
            "rank_pattern": peft_dict(peft, "rank_pattern", int),
            "alpha_pattern": peft_dict(peft, "alpha_pattern", float),
        }
        for field in ("rank_pattern", "alpha_pattern"):
            for key in config[field]:
                compile_pattern(key, what=f"{field} key")
        return config

    def to_peft(self, config: LoraConfig, sites: list[Any]) -> dict[str, Any]:
        """PEFT's adapter_config.json for this adapter at these sites (paths as targets)."""
        per_site = {s.path: site_rank_alpha(config, s) for s in sites}
        r = Counter(r for r, _ in per_site.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in per_site.values()).most_common(1)[0][0]
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.rslora,
            "use_dora": config.dora,
            "target_modules": sorted(per_site),
            "rank_pattern": {re.escape(p): ra[0] for p, ra in per_site.items() if ra[0] != r},
            "alpha_pattern": {re.escape(p): ra[1] for p, ra in per_site.items() if ra[1] != alpha},
            **peft_lora_common(sites),
        }


@hookimpl
def register_methods(register):
    register.method(
        "lora",
        config=LoraConfig,
        build=build,
        points=["linear.delta"],
        capabilities=Capabilities(mergeable=True, identity_at_init=True),
        default_targets=["attn.q", "attn.v"],
        peft=LoraPeftCodec(),
        param_groups=param_groups,
        description="Low-rank update W + s·BA (rsLoRA, DoRA, per-role rank/alpha, LoRA+ groups).",
    )
