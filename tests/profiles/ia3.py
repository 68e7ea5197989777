from . import Profile


def _count(model):
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    d_kv = cfg.num_key_value_heads * head_dim  # grouped-query attention: d_k = d_v = H_kv · d_head
    # l_k ∈ R^{d_k}, l_v ∈ R^{d_v} (output scales), l_ff ∈ R^{d_ff} (the down projection's input)
    return cfg.num_hidden_layers * (d_kv + d_kv + cfg.intermediate_size)


PROFILE = Profile(
    method="ia3",
    config={"targets": ["attn.k", "attn.v", "mlp.down"]},
    expected_params=_count,
    # vectors near 1 barely move tiny_llama's near-uniform (std-0.02) logits: loss ×0.95 after
    # 30 steps even at lr 0.1. On the std-0.1 variant lr 3e-2 (LoRA's profile rate; T-Few
    # trains (IA)³ at 3e-3 for 1,000 steps, this toy has 30) gives ×0.65.
    arch="llama_scaled",
    lr=3e-2,
    formula="L · (d_k + d_v + d_ff)",
)
