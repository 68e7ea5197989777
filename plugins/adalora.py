"""AdaLoRA (Zhang et al. 2023): an SVD-shaped low-rank update whose rank is allocated in training.

    y = W x + s · P (Λ ⊙ Q) dropout(x),     s = α / (r₀ + 1e-5),     ΔW = s · P diag(Λ) Q

P = ``lora_B`` [out, r], Λ = ``lora_E`` [r, 1], Q = ``lora_A`` [r, in], r₀ = ``init_r`` (PEFT's
``ranknum``: the scale keeps r₀ even where a finished allocation left fewer singular values).
Λ starts at zero, so a fresh adapter is the identity; P and Q start as N(0, 0.02²), as in PEFT.
The delta is linear in x, so it merges exactly.

Training needs :class:`AdaLoraController` (in :mod:`plugins.adalora_allocator`, re-exported
here): its ``regularization()`` is the orthogonality loss to add, its ``step(t)`` updates the
importance scores and masks singular values to the cubic budget schedule, and
``as_trainer_callback()`` does both inside the Hugging Face ``Trainer``.

``rank_pattern`` holds the masks of a finished allocation (PEFT saves them, and saves only the
kept singular values): a site named there is built with rank = the number of kept entries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from adapter_composer.formats.peft import (
    peft_dict,
    peft_float,
    peft_int,
    unsupported_options,
)
from adapter_composer.plugins.adalora_allocator import AdaLoraController, Allocation, budget_at
from adapter_composer.plugins.lora import peft_lora_common
from adapter_composer.registry import Capabilities, hookimpl

__all__ = [
    "AdaLoRA",
    "AdaLoraConfig",
    "AdaLoraController",
    "AdaLoraPeftCodec",
    "Allocation",
    "budget_at",
    "build",
]


class AdaLoraConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    init_r: int = Field(12, ge=1, description="initial rank r₀ of every site (and the scale's r)")
    target_r: int = Field(
        8, ge=0, description="average rank per site after allocation: budget target_r · sites"
    )
    tinit: int = Field(0, ge=0, description="warm-up steps before the budget starts to decrease")
    tfinal: int = Field(
        0, ge=0, description="final steps with the allocation fixed (last total_step - tfinal)"
    )
    deltaT: int = Field(1, ge=1, description="steps between two allocations while the budget falls")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity |w·∇w|")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty |I − Ī|")
    orth_reg_weight: float = Field(
        0.5, ge=0, description="weight of the orthogonality loss ‖PᵀP − I‖ + ‖QQᵀ − I‖"
    )
    total_step: int = Field(gt=0, description="total training steps (required by the schedule)")
    alpha: float = Field(8.0, gt=0, description="scale numerator: s = alpha / (init_r + 1e-5)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    rank_pattern: dict[str, list[bool]] = Field(
        default_factory=dict,
        description="masks kept by a finished allocation (PEFT's rank_pattern), keyed by module "
        "path, site key or role; each has init_r entries, and the site gets rank = kept entries",
    )

    @model_validator(mode="after")
    def _schedule_is_possible(self) -> AdaLoraConfig:
        problems = []
        if self.tinit + self.tfinal >= self.total_step:
            problems.append(
                f"tinit + tfinal ({self.tinit} + {self.tfinal}) must be below total_step "
                f"({self.total_step}), or no step is left for the budget to decrease"
            )
        if self.target_r > self.init_r:
            problems.append(
                f"target_r ({self.target_r}) exceeds init_r ({self.init_r}): AdaLoRA only "
                "removes ranks, so start with init_r >= target_r"
            )
        bad = {k: len(v) for k, v in self.rank_pattern.items() if len(v) != self.init_r}
        if bad:
            problems.append(
                f"rank_pattern masks must have init_r ({self.init_r}) entries; lengths: {bad}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def site_mask(config: AdaLoraConfig, site: Any) -> list[bool] | None:
    """The ``rank_pattern`` mask naming this site (module path, site key or role), if any."""
    for key, mask in config.rank_pattern.items():
        if key in (site.path, site.key, site.role):
            return mask
    return None


class AdaLoRA(nn.Module):
    """Δ(x) = α / (r₀ + 1e-5) · dropout(x) (Q ⊙ Λ)ᵀ Pᵀ, with Q = lora_A, Λ = lora_E, P = lora_B."""

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        r: int,
        init_r: int,
        alpha: float,
        dropout: float,
        path: str = "",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, fan_in, dtype=dtype).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(fan_out, r, dtype=dtype).normal_(0.0, 0.02))
        self.alpha = alpha
        self.ranknum = float(init_r)
        self.path = path  # the module path, for PEFT-style rank patterns
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        h = self.dropout(x)  # [..., in]
        return (h @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scale  # [..., out]

    def delta_weight(self, site: Any) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale  # [out, in]

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A ⊙ E, B, α/(r₀+1e-5)): Δ(x) in low-rank form, for route's and mix's batched kernels."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        return self.lora_A * self.lora_E, self.lora_B, self.scale

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, init_r={self.ranknum:g}, scale={self.scale:g}"


def build(config: AdaLoraConfig, site: Any) -> AdaLoRA:
    mask = site_mask(config, site)
    r = config.init_r if mask is None else sum(mask)
    return AdaLoRA(
        site.in_features,
        site.out_features,
        r,
        config.init_r,
        config.alpha,
        config.dropout,
        path=site.path,
    )


# --- PEFT format ----------------------------------------------------------------------

_PEFT_MASK_KEY = re.compile(r"^(?P<path>.+)\.lora_E(\.[^.]+)?$")


class AdaLoraPeftCodec:
    """Reads and writes PEFT's ``AdaLoraConfig`` files (tensors ``lora_A``, ``lora_B``,
    ``lora_E``, without ``.weight``). A saved ``rank_pattern`` is applied: each named module
    is built with the kept rank, which is how PEFT saved its tensors."""

    peft_types = ("ADALORA",)
    tensor_names = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}
    unsupported = {
        "modules_to_save": None,
        "use_dora": False,
        "loftq_config": {},
        "lora_bias": False,
        "use_qalora": False,
        "megatron_config": None,
        "layer_replication": None,
        "trainable_token_indices": None,
        "target_parameters": None,
        "alora_invocation_tokens": None,
        "arrow_config": None,
    }
    fields = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2")

    def from_peft(self, peft: Mapping[str, Any]) -> dict[str, Any]:
        """Our config (as keyword arguments) from PEFT's adapter_config.json."""
        problems = unsupported_options(peft, self.unsupported)
        alpha = peft_float(peft, "lora_alpha", 8.0)
        if alpha <= 0:  # PEFT then scales each site by its own rank
            problems.append(f"lora_alpha={alpha!r} (give a positive lora_alpha)")
        if problems:
            raise ValueError("unsupported PEFT AdaLoRA options: " + ", ".join(problems))
        ints = ("init_r", "target_r", "tinit", "tfinal", "deltaT")
        config: dict[str, Any] = {f: peft_int(peft, f, None, nullable=True) for f in ints}
        config.update({f: peft_float(peft, f, None, nullable=True) for f in ("beta1", "beta2")})
        config = {k: v for k, v in config.items() if v is not None}
        config.update(
            orth_reg_weight=peft_float(peft, "orth_reg_weight", 0.5),
            total_step=peft_int(peft, "total_step", None, minimum=1, nullable=True),
            alpha=alpha,
            dropout=peft_float(peft, "lora_dropout", 0.0, minimum=0.0, below=1.0),
        )
        pattern = {}
        for key, mask in peft_dict(peft, "rank_pattern", list).items():
            found = _PEFT_MASK_KEY.match(key)
            if found is None:
                raise ValueError(f"rank_pattern key {key!r:.80} does not name a module's lora_E")
            if not all(type(v) is bool for v in mask):
                raise ValueError(f"rank_pattern[{key!r:.80}] must be a list of true/false")
            pattern[found["path"]] = list(mask)
        config["rank_pattern"] = pattern
        return config

    def to_peft(self, config: AdaLoraConfig, sites: list[Any]) -> dict[str, Any]:
        """PEFT's adapter_config.json for this adapter at these sites (paths as targets)."""
        masks = {s.path: site_mask(config, s) for s in sites}
        pattern = {f"{p}.lora_E": m for p, m in masks.items() if m is not None}
        return {
            "peft_type": "ADALORA",
            "task_type": None,
            **{f: getattr(config, f) for f in self.fields},
            "orth_reg_weight": config.orth_reg_weight,
            "total_step": config.total_step,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": sorted(masks),
            "rank_pattern": pattern or None,
            **peft_lora_common(sites),
        }


@hookimpl
def register_methods(register):
    register.method(
        "adalora",
        config=AdaLoraConfig,
        build=build,
        points=["linear.delta"],
        capabilities=Capabilities(mergeable=True, identity_at_init=True),
        default_targets=["attn.q", "attn.v"],
        peft=AdaLoraPeftCodec(),
        description="SVD-shaped update P Λ Q with importance-driven rank allocation (AdaLoraController).",
    )
