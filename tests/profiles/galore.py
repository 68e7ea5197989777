from . import Profile


def _count(model):
    cfg = model.config
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # a dense ΔW [out, in] per site: q is d × d, v is kv × d, per layer
    return cfg.num_hidden_layers * (d * d + kv * d)


PROFILE = Profile(
    method="galore",
    config={"rank": 4, "update_proj_gap": 10, "targets": ["attn.q", "attn.v"]},
    expected_params=_count,
    lr=1e-2,
    formula="Σ_sites d_in · d_out = L · (d·d + d_kv·d)",
)
