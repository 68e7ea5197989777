"""Architecture maps: roles → module paths for the transformers model families we support.

Paths are relative to the backbone (``model.base_model``), so the same map serves
``LlamaModel`` and ``LlamaForCausalLM``. ``{i}`` is the layer index.

Roles: ``attn.q attn.k attn.v attn.o`` (attention projections), ``mlp.gate mlp.up mlp.down``
(feed-forward), the sublayers ``attn`` and ``mlp`` (their output before the residual add),
``embed`` (the input embeddings) and ``block`` (a whole layer, whose input a per-layer
router reads). Fused layers add a role for the whole: ``attn.qkv`` (GPT-2's ``c_attn``,
Phi-3's ``qkv_proj``) and ``mlp.gate_up`` (Phi-3). Encoder-decoder models are in
:mod:`adapter_composer.plugins.arch_t5`, mixture-of-experts models in
:mod:`adapter_composer.plugins.arch_moe`.
"""

from __future__ import annotations

from typing import Any

from adapter_composer.registry import AttentionGeometry, Module, Slice, Sublayer, hookimpl

LINEAR_KINDS = ("linear.delta", "linear.scale_out", "linear.scale_in")
SUBLAYER_KINDS = ("sublayer.output", "sublayer.parallel")


def decoder_geometry(config: Any) -> AttentionGeometry:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionGeometry(config.num_hidden_layers, kv, head_dim, heads)


def _gpt2_geometry(config: Any) -> AttentionGeometry:
    return AttentionGeometry(
        config.n_layer, config.n_head, config.n_embd // config.n_head, config.n_head
    )


LLAMA_ROLES = {
    "attn.q": Module("layers.{i}.self_attn.q_proj"),
    "attn.k": Module("layers.{i}.self_attn.k_proj"),
    "attn.v": Module("layers.{i}.self_attn.v_proj"),
    "attn.o": Module("layers.{i}.self_attn.o_proj"),
    "mlp.gate": Module("layers.{i}.mlp.gate_proj"),
    "mlp.up": Module("layers.{i}.mlp.up_proj"),
    "mlp.down": Module("layers.{i}.mlp.down_proj"),
    "attn": Sublayer("layers.{i}.self_attn", "layers.{i}.self_attn"),
    "mlp": Sublayer("layers.{i}.mlp", "layers.{i}.mlp"),
    "embed": Module("embed_tokens"),
    "block": Module("layers.{i}"),
}

GPT2_ROLES = {
    "attn.q": Slice("h.{i}.attn.c_attn", 0, 3),
    "attn.k": Slice("h.{i}.attn.c_attn", 1, 3),
    "attn.v": Slice("h.{i}.attn.c_attn", 2, 3),
    "attn.qkv": Module("h.{i}.attn.c_attn"),
    "attn.o": Module("h.{i}.attn.c_proj"),
    "mlp.up": Module("h.{i}.mlp.c_fc"),
    "mlp.down": Module("h.{i}.mlp.c_proj"),
    "attn": Sublayer("h.{i}.attn", "h.{i}.attn"),
    "mlp": Sublayer("h.{i}.mlp", "h.{i}.mlp"),
    "embed": Module("wte"),
    "block": Module("h.{i}"),
}

# Gemma 2/3 normalise each sublayer's output before the residual add
# (h + post_norm(attn(input_norm(h)))), so a sublayer's result is its post-norm's output
GEMMA2_ROLES = {
    **LLAMA_ROLES,
    "attn": Sublayer("layers.{i}.self_attn", "layers.{i}.post_attention_layernorm"),
    "mlp": Sublayer("layers.{i}.mlp", "layers.{i}.post_feedforward_layernorm"),
}

# Phi-3 fuses q/k/v (sizes in proportion to the query and key/value head counts) and the
# gate and up projections (gate first: up · act(gate) with gate, up = chunk(2))
_QKV = ("num_attention_heads", "num_key_value_heads", "num_key_value_heads")
PHI3_ROLES = {
    **{k: v for k, v in LLAMA_ROLES.items() if not k.startswith(("attn.", "mlp."))},
    "attn.q": Slice("layers.{i}.self_attn.qkv_proj", 0, 3, sizes=_QKV),
    "attn.k": Slice("layers.{i}.self_attn.qkv_proj", 1, 3, sizes=_QKV),
    "attn.v": Slice("layers.{i}.self_attn.qkv_proj", 2, 3, sizes=_QKV),
    "attn.qkv": Module("layers.{i}.self_attn.qkv_proj"),
    "attn.o": Module("layers.{i}.self_attn.o_proj"),
    "mlp.gate": Slice("layers.{i}.mlp.gate_up_proj", 0, 2),
    "mlp.up": Slice("layers.{i}.mlp.gate_up_proj", 1, 2),
    "mlp.gate_up": Module("layers.{i}.mlp.gate_up_proj"),
    "mlp.down": Module("layers.{i}.mlp.down_proj"),
}

BERT_ROLES = {
    "attn.q": Module("encoder.layer.{i}.attention.self.query"),
    "attn.k": Module("encoder.layer.{i}.attention.self.key"),
    "attn.v": Module("encoder.layer.{i}.attention.self.value"),
    "attn.o": Module("encoder.layer.{i}.attention.output.dense"),
    "mlp.up": Module("encoder.layer.{i}.intermediate.dense"),
    "mlp.down": Module("encoder.layer.{i}.output.dense"),
    # post-LN: the sublayer result is the output projection, before dropout + LayerNorm(h + x)
    "attn": Sublayer("encoder.layer.{i}.attention", "encoder.layer.{i}.attention.output.dense"),
    "mlp": Sublayer("encoder.layer.{i}.intermediate", "encoder.layer.{i}.output.dense"),
    "embed": Module("embeddings.word_embeddings"),
    "block": Module("encoder.layer.{i}"),
}


@hookimpl
def register_architectures(register):
    register.architecture(
        "llama",
        model_types=["llama", "mistral", "qwen2", "qwen3"],
        roles=LLAMA_ROLES,
        provides=(*LINEAR_KINDS, *SUBLAYER_KINDS, "attention.kv_prefix", "input.embeddings"),
        geometry=decoder_geometry,
        description="Llama-style decoders (Llama, Mistral, Qwen2/3): separate q/k/v/o, gated MLP.",
    )
    register.architecture(
        "gemma",
        model_types=["gemma"],
        roles=LLAMA_ROLES,
        provides=(*LINEAR_KINDS, *SUBLAYER_KINDS, "attention.kv_prefix", "input.embeddings"),
        geometry=decoder_geometry,
        description="Gemma: Llama's layout (explicit head_dim, scaled embeddings).",
    )
    register.architecture(
        "gemma2",
        model_types=["gemma2", "gemma3_text"],
        roles=GEMMA2_ROLES,
        provides=(*LINEAR_KINDS, *SUBLAYER_KINDS, "attention.kv_prefix", "input.embeddings"),
        geometry=decoder_geometry,
        description="Gemma 2 / Gemma 3 (text): Llama's projections; sublayer results after their post-norms.",
    )
    register.architecture(
        "phi3",
        model_types=["phi3"],
        roles=PHI3_ROLES,
        provides=(*LINEAR_KINDS, *SUBLAYER_KINDS, "attention.kv_prefix", "input.embeddings"),
        geometry=decoder_geometry,
        description="Phi-3: fused qkv_proj (q/k/v are its parts, in head-count proportion) and gate_up_proj.",
    )
    register.architecture(
        "gpt2",
        model_types=["gpt2"],
        roles=GPT2_ROLES,
        num_layers="n_layer",
        provides=(*LINEAR_KINDS, *SUBLAYER_KINDS, "attention.kv_prefix", "input.embeddings"),
        geometry=_gpt2_geometry,
        description="GPT-2: fused c_attn (q/k/v are thirds of its output), Conv1D weights.",
    )
    register.architecture(
        "bert",
        model_types=["bert", "roberta"],
        roles=BERT_ROLES,
        provides=(*LINEAR_KINDS, *SUBLAYER_KINDS, "input.embeddings"),
        description="BERT / RoBERTa encoders (post-LayerNorm).",
    )
