from . import Profile

R = 16


def _count(model):
    cfg = model.config
    d = cfg.hidden_size
    d_kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    # per site λ_b ∈ R^{d_out} and λ_d ∈ R^r; A and B are frozen buffers shared by all sites
    return cfg.num_hidden_layers * ((d + R) + (d_kv + R))  # sites: attn.q (d_out = d), attn.v


PROFILE = Profile(
    method="vera",
    config={"r": R, "targets": ["attn.q", "attn.v"]},
    expected_params=_count,
    # as for (IA)³: scaling vectors move tiny_llama's near-uniform logits slowly (×0.90 after
    # 30 steps at lr 0.1); on the std-0.1 variant lr 3e-2 gives ×0.69
    arch="llama_scaled",
    lr=3e-2,
    formula="Σ_sites (d_out + r)",
)
