"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): attention roles, and refusal of
the experts, which transformers 5 stores as fused 3-D parameters.

transformers 5 keeps a layer's experts in one module (``MixtralExperts``) holding
``gate_up_proj`` [experts, 2·intermediate, hidden] and ``down_proj`` [experts, hidden,
intermediate]; its forward picks each expert's tokens and multiplies them by that expert's
slice. No ``nn.Linear`` ever sees one expert's input, so a linear site (y = W x + Δ(x))
has nothing exact to wrap: ``mlp.gate``/``mlp.up``/``mlp.down`` are refused with that reason
(``role-unsupported``). What works: every attention role, the whole MoE block as the ``mlp``
sublayer (bottleneck adapters on its output), and Qwen2-MoE's always-on shared expert
(``mlp.shared.gate/up/down``), which is an ordinary MLP of linear layers.
"""

from __future__ import annotations

from adapter_composer.plugins.architectures import (
    LINEAR_KINDS,
    LLAMA_ROLES,
    SUBLAYER_KINDS,
    decoder_geometry,
)
from adapter_composer.registry import Module, hookimpl

FUSED = (
    "the experts are fused 3-D parameters (gate_up_proj [experts, 2·intermediate, hidden], "
    "down_proj [experts, hidden, intermediate]) that the experts module multiplies inside its "
    "own forward, per routed token: no linear layer sees an expert's input, so no exact linear "
    "site exists; target the attention roles, the 'mlp' sublayer (the whole MoE block)"
)

MOE_ROLES = {k: v for k, v in LLAMA_ROLES.items() if not k.startswith("mlp.")}
QWEN2_MOE_ROLES = {
    **MOE_ROLES,
    "mlp.shared.gate": Module("layers.{i}.mlp.shared_expert.gate_proj"),
    "mlp.shared.up": Module("layers.{i}.mlp.shared_expert.up_proj"),
    "mlp.shared.down": Module("layers.{i}.mlp.shared_expert.down_proj"),
}


def _unsupported(extra: str = "") -> dict[str, str]:
    reason = FUSED + extra
    return {"mlp.gate": reason, "mlp.up": reason, "mlp.down": reason}


@hookimpl
def register_architectures(register):
    provides = (*LINEAR_KINDS, *SUBLAYER_KINDS, "attention.kv_prefix", "input.embeddings")
    register.architecture(
        "mixtral",
        model_types=["mixtral", "qwen3_moe"],
        roles=MOE_ROLES,
        provides=provides,
        geometry=decoder_geometry,
        unsupported=_unsupported(),
        description="Mixtral / Qwen3-MoE: Llama attention; experts fused (not targetable).",
    )
    register.architecture(
        "qwen2_moe",
        model_types=["qwen2_moe"],
        roles=QWEN2_MOE_ROLES,
        provides=provides,
        geometry=decoder_geometry,
        unsupported=_unsupported(", or the shared expert (mlp.shared.gate/up/down)"),
        description="Qwen2-MoE: Llama attention, a shared expert of linear layers; routed experts fused (not targetable).",
    )


__all__ = ["FUSED", "MOE_ROLES", "QWEN2_MOE_ROLES"]
