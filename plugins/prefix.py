"""Prefix tuning (Li & Liang 2021): n trainable key/value positions in every attention layer.

    layer l:  K' = [P_l^K; K],  V' = [P_l^V; V],   P_l^K, P_l^V ∈ R^{n × H_kv × hd}

The host's model hook (``adapter_composer.runtime.model``) puts P in a fresh ``DynamicCache`` before
the first real token and prepends n ones to the attention mask, so real tokens take the
positions n, n+1, ... (HF PEFT's convention). With grouped-query attention the prefix has the
KV-head geometry ``site.geometry`` (H_kv heads of width hd), not the query heads'.

Two parameterisations of the same values, both flattened to P [n, L·2·H_kv·hd]:

    direct     P = prefix                                    (n · L · 2 · d_kv parameters)
    projected  P = W₂ tanh(W₁ E + b₁) + b₂,   E [n, d_kv],  W₁ [h, d_kv],  W₂ [L·2·d_kv, h]

with d_kv = H_kv · hd. The projection is the paper's reparameterisation for stable training
(PEFT's ``prefix_projection``; its input width is d_kv and h defaults to d_kv, as in PEFT).
Row i of P viewed as [L, 2, H_kv, hd] holds layer l's key (index 0) and value (index 1) at
virtual position i. That is PEFT's layout: it views P as (n, 2L, H_kv, hd) and layer l uses
P[:, 2l] as keys and P[:, 2l+1] as values.

Initialisation: E and the direct P are N(0, 1) and the MLP has torch's ``nn.Linear``
default, drawn in PEFT's order, so under one ``torch.manual_seed`` a fresh adapter equals
PEFT's (``seed=None``); an integer seed uses a private generator. Parameters stay fp32.

Saving and loading the two forms:

* ``composed.save`` writes the parameters of the form in use: ``model.prefix`` (direct), or
  ``model.embedding`` and ``model.mlp.*`` (projected), so training resumes exactly.
* :func:`freeze_projection` (inference) replaces the MLP by the values it computes, making the
  adapter direct with identical outputs; it also sets ``projection=False`` in the
  composition's graph and the adapter's config, so a later save/load keeps the direct form.
* PEFT files hold only the projected values: ``prompt_embeddings`` [n, L·2·H_kv·hd] (PEFT
  never saves the MLP). Import builds a direct adapter whatever ``prefix_projection`` says;
  export writes P (computed through the MLP when projected) with ``prefix_projection=false``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from adapter_composer.plugins.prompt import (
    PEFT_TENSOR,
    check_peft_prompt_learning,
    model_tensor,
    peft_model_fields,
    seeded,
)
from adapter_composer.registry import AttentionGeometry, Capabilities, hookimpl

METHOD = "prefix_tuning"


class PrefixConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_virtual_tokens: int = Field(
        20, gt=0, description="n, the number of virtual key/value positions per layer"
    )
    projection: bool = Field(
        False,
        description="reparameterise P = MLP(E) for training (PEFT's prefix_projection); "
        "freeze_projection() drops the MLP for inference",
    )
    projection_hidden: int | None = Field(
        None, gt=0, description="hidden width h of the MLP; None: H_kv · head_dim"
    )
    seed: int | None = Field(
        None, description="seed of the initialisation; None: torch's global generator"
    )

    @model_validator(mode="after")
    def _hidden_needs_projection(self) -> PrefixConfig:
        if self.projection_hidden is not None and not self.projection:
            raise ValueError(
                "projection_hidden would be ignored with projection=False; "
                "set projection=True or remove it"
            )
        return self


class Prefix(nn.Module):
    """P [n, L·2·H_kv·hd], direct or through an MLP; ``forward()`` returns it as [n, L, 2, H_kv, hd]."""

    def __init__(
        self,
        num_virtual_tokens: int,
        geometry: AttentionGeometry,
        projection_hidden: int | None = None,
    ):
        super().__init__()
        self.kv_shape = (geometry.num_layers, 2, geometry.num_kv_heads, geometry.head_dim)
        width = math.prod(self.kv_shape)  # L · 2 · d_kv
        d_kv = geometry.num_kv_heads * geometry.head_dim
        self.register_parameter("prefix", None)
        self.register_parameter("embedding", None)
        self.mlp: nn.Sequential | None = None
        if projection_hidden is None:
            self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, width))
        else:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, d_kv))
            self.mlp = nn.Sequential(
                nn.Linear(d_kv, projection_hidden),
                nn.Tanh(),
                nn.Linear(projection_hidden, width),
            )

    @property
    def projected(self) -> bool:
        return self.mlp is not None

    def values(self) -> torch.Tensor:
        """P flattened, [n, L·2·H_kv·hd] (PEFT's ``prompt_embeddings``)."""
        if self.mlp is not None:
            return self.mlp(self.embedding)
        return self.prefix

    def forward(self) -> torch.Tensor:
        values = self.values()
        return values.view(values.shape[0], *self.kv_shape)  # [n, L, 2, H_kv, hd]

    @torch.no_grad()
    def freeze_projection(self) -> None:
        """Replace the MLP by the values it computes (same outputs); a no-op when direct."""
        if self.mlp is None:
            return
        trainable = self.embedding.requires_grad
        values = self.values().detach().clone()
        self.mlp = None
        self.embedding = None
        self.prefix = nn.Parameter(values, requires_grad=trainable)

    def extra_repr(self) -> str:
        n = self.values().shape[0]
        layers, _, heads, head_dim = self.kv_shape
        form = f"projected(hidden={self.mlp[0].out_features})" if self.mlp is not None else "direct"
        return f"num_virtual_tokens={n}, layers={layers}, kv_heads={heads}, head_dim={head_dim}, {form}"


def build(config: PrefixConfig, site: Any) -> nn.Module:
    geometry: AttentionGeometry = site.geometry
    hidden = None
    if config.projection:
        hidden = config.projection_hidden or geometry.num_kv_heads * geometry.head_dim
    with seeded(config.seed):
        return Prefix(config.num_virtual_tokens, geometry, hidden)


def freeze_projection(composed: Any, name: str) -> None:
    """Drop adapter ``name``'s MLP for inference: P is kept as computed, outputs are unchanged.

    Also records ``projection=False`` in ``composed.graph`` and the adapter's config, so
    ``composed.save`` then writes (and ``adapter_composer.load`` rebuilds) the direct form. Build
    optimizers after calling this: the MLP's parameters are gone.
    """
    handle = composed.adapters[name]
    if handle.method != METHOD:
        raise ValueError(f"adapter {name!r} is {handle.method}, not {METHOD}")
    handle.modules["model"].freeze_projection()
    direct = {"projection": False, "projection_hidden": None}
    handle.config = handle.config.model_copy(update=direct)
    spec = composed.graph.spec(name)
    config = {k: v for k, v in spec.config.items() if k not in direct}
    composed.graph.replace(spec.model_copy(update={"config": {**config, "projection": False}}))


# --- PEFT format ----------------------------------------------------------------------


class PrefixPeftCodec:
    """Reads and writes PEFT's ``PrefixTuningConfig`` files (decoder-only models)."""

    peft_types = ("PREFIX_TUNING",)

    def from_peft(self, peft: Mapping[str, Any]) -> dict[str, Any]:
        # the saved tensor is P itself (projected or not), so the adapter is direct
        return {"num_virtual_tokens": check_peft_prompt_learning(peft)}

    def to_peft(self, config: PrefixConfig, sites: list[Any]) -> dict[str, Any]:
        site = sites[0]
        geometry: AttentionGeometry = site.geometry
        d_kv = geometry.num_kv_heads * geometry.head_dim
        return {
            "peft_type": "PREFIX_TUNING",
            **peft_model_fields(site.module),
            "num_layers": geometry.num_layers,
            "num_attention_heads": geometry.num_kv_heads,
            "token_dim": d_kv,
            "num_virtual_tokens": config.num_virtual_tokens,
            "prefix_projection": False,
            "encoder_hidden_size": d_kv,
            "init_weights": None,
        }

    def split_tensors(self, raw: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return model_tensor(raw, "prefix")

    def join_tensors(self, handle: Any, sites: list[Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {PEFT_TENSOR: handle.modules["model"].values().detach()}


@hookimpl
def register_methods(register):
    register.method(
        METHOD,
        config=PrefixConfig,
        build=build,
        points=["attention.kv_prefix"],
        capabilities=Capabilities(mergeable=False, identity_at_init=False),
        peft=PrefixPeftCodec(),
        description="Trainable key/value prefixes in every attention layer (optional MLP "
        "reparameterisation, dropped by freeze_projection for inference).",
    )


__all__ = ["Prefix", "PrefixConfig", "PrefixPeftCodec", "build", "freeze_projection"]
