"""VeRA (Kopiczko et al. 2023): vector-based random matrix adaptation.

    y = W x + λ_b ⊙ B[:out, :] (λ_d ⊙ A[:, :in] dropout(x))
    ΔW = diag(λ_b) B[:out, :] diag(λ_d) A[:, :in]

A [r, max_in] and B [max_out, r] are frozen random matrices shared by every site of the
adapter (max over its sites), drawn from ``projection_prng_key`` exactly as PEFT draws them
(Kaiming-uniform with a seeded CPU generator, A first), so regenerating them gives PEFT's
matrices. Only the vectors train: λ_b [out] starts at 0 (a fresh adapter is the identity)
and λ_d [r] at ``d_initial``. With ``save_projection`` (the default, as PEFT) A and B are
saved with the adapter; otherwise they are rebuilt from the seed on load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.formats.peft import (
    join_tensors,
    peft_bool,
    peft_float,
    peft_int,
    split_tensors,
    unsupported_options,
)
from adapter_composer.registry import Capabilities, hookimpl


class VeraConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(
        256, ge=1, description="rank of the shared random matrices A [r, in], B [out, r]"
    )
    d_initial: float = Field(0.1, description="initial value of every λ_d entry")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    projection_prng_key: int = Field(
        0, ge=0, description="seed of the generator that draws A and B (PEFT's projection_prng_key)"
    )
    save_projection: bool = Field(
        True, description="save A and B with the adapter (else rebuild them from the seed on load)"
    )


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−√3·√2/√fan_in, +√3·√2/√fan_in), fan_in = shape[1], drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, max_in], B [max_out, r]) as PEFT draws them from ``projection_prng_key``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = kaiming_uniform((r, max_in), generator)
    b = kaiming_uniform((max_out, r), generator)
    return a, b


class VeraProjections(nn.Module):
    """The frozen A [r, max_in] and B [max_out, r] shared by all sites of one adapter."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, persistent: bool):
        super().__init__()
        a, b = projections(r, max_in, max_out, seed)
        self.register_buffer("vera_A", a, persistent=persistent)
        self.register_buffer("vera_B", b, persistent=persistent)

    def extra_repr(self) -> str:
        return f"A: {list(self.vera_A.shape)}, B: {list(self.vera_B.shape)}"


def shared(config: VeraConfig, sites: Sequence[Any]) -> nn.Module:
    max_in = max(s.in_features for s in sites)
    max_out = max(s.out_features for s in sites)
    module = VeraProjections(
        config.r, max_in, max_out, config.projection_prng_key, config.save_projection
    )
    return module.to(device=sites[0].device)


class Vera(nn.Module):
    """Δ(x) = λ_b ⊙ B[:out] (λ_d ⊙ A[:, :in] dropout(x)); A and B come from the shared module."""

    def __init__(
        self, fan_in: int, fan_out: int, r: int, d_initial: float, dropout: float, shared_ref: Any
    ):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.lambda_b = nn.Parameter(torch.zeros(fan_out))
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shared = shared_ref  # a SharedRef (never the module itself): shared() holds A and B

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slices A[:, :in] [r, in] and B[:out, :] [out, r] this site uses."""
        held = self.shared()
        return held.vera_A[:, : self.fan_in], held.vera_B[: self.fan_out, :]

    def forward(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        a, b = self.matrices()
        h = self.dropout(x)
        tokens, r = h.numel() // self.fan_in, a.shape[0]
        # multiply-adds: factored N·r·(in + out); dense r·in·out to form ΔW, then N·in·out
        if tokens * r * (self.fan_in + self.fan_out) <= (tokens + r) * self.fan_in * self.fan_out:
            return self.lambda_b * F.linear(self.lambda_d * F.linear(h, a), b)  # two thin GEMMs
        return F.linear(h, self.delta_weight(site))  # many tokens, small layer: form ΔW once

    def delta_weight(self, site: Any) -> torch.Tensor:
        a, b = self.matrices()
        return (self.lambda_b[:, None] * b) @ (self.lambda_d[:, None] * a)

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(λ_d ⊙ A, λ_b ⊙ B, 1): Δ(x) in low-rank form, for route's and mix's batched kernels."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        a, b = self.matrices()
        return self.lambda_d[:, None] * a, self.lambda_b[:, None] * b, 1.0

    def extra_repr(self) -> str:
        return f"in={self.fan_in}, out={self.fan_out}, r={self.lambda_d.shape[0]}"


def build(config: VeraConfig, site: Any, shared_ref: Any) -> nn.Module:
    return Vera(
        site.in_features, site.out_features, config.r, config.d_initial, config.dropout, shared_ref
    )


# --- PEFT format ----------------------------------------------------------------------

SHARED_KEYS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}


class VeraPeftCodec:
    """Reads and writes PEFT's ``VeraConfig`` files: per-module ``vera_lambda_b`` [out] and
    ``vera_lambda_d`` [r], and (with ``save_projection``) ``base_model.vera_A`` / ``vera_B``."""

    peft_types = ("VERA",)
    tensor_names = {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}
    unsupported = {"modules_to_save": None}

    def from_peft(self, peft: Mapping[str, Any]) -> dict[str, Any]:
        problems = unsupported_options(peft, self.unsupported)
        if problems:
            raise ValueError("unsupported PEFT VeRA options: " + ", ".join(problems))
        return {
            "r": peft_int(peft, "r", 256, minimum=1),
            "d_initial": peft_float(peft, "d_initial", 0.1),
            "dropout": peft_float(peft, "vera_dropout", 0.0, minimum=0.0, below=1.0),
            "projection_prng_key": peft_int(peft, "projection_prng_key", 0),
            "save_projection": peft_bool(peft, "save_projection", True),
        }

    def to_peft(self, config: VeraConfig, sites: list[Any]) -> dict[str, Any]:
        return {
            "peft_type": "VERA",
            "task_type": None,
            "r": config.r,
            "target_modules": sorted(s.path for s in sites),
            "projection_prng_key": config.projection_prng_key,
            "save_projection": config.save_projection,
            "vera_dropout": config.dropout,
            "d_initial": config.d_initial,
            "fan_in_fan_out": any(type(s.module).__name__ == "Conv1D" for s in sites),
            "bias": "none",
            "init_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def split_tensors(self, raw: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Per-module λ's by module path, and A/B (when saved) under ``"shared"``."""
        common = {SHARED_KEYS[k]: v for k, v in raw.items() if k in SHARED_KEYS}
        out = split_tensors(
            {k: v for k, v in raw.items() if k not in SHARED_KEYS}, self.tensor_names
        )
        if common:
            out["shared"] = common
        return out

    def join_tensors(self, handle: Any, sites: list[Any]) -> dict[str, torch.Tensor]:
        tensors = join_tensors(handle, sites, self.tensor_names)
        for peft_key, ours in SHARED_KEYS.items():
            value = handle.shared.state_dict().get(ours)  # absent when not save_projection
            if value is not None:
                tensors[peft_key] = value
        return tensors


@hookimpl
def register_methods(register):
    register.method(
        "vera",
        config=VeraConfig,
        build=build,
        shared=shared,
        points=["linear.delta"],
        capabilities=Capabilities(mergeable=True, identity_at_init=True),
        default_targets=["attn.q", "attn.v"],
        peft=VeraPeftCodec(),
        description="VeRA: frozen shared random A, B with trained scaling vectors λ_b, λ_d.",
    )
