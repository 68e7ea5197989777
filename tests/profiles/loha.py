from . import Profile


def _count(model):
    cfg = model.config
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    r = 2
    # four factors per site: 2·r·(d_in + d_out), at q (d → d) and v (d → kv)
    return cfg.num_hidden_layers * (2 * r * (d + d) + 2 * r * (d + kv))


PROFILE = Profile(
    method="loha",
    config={"r": 2, "alpha": 4, "targets": ["attn.q", "attn.v"]},
    expected_params=_count,
    lr=5e-2,
    formula="L · 2r · ((d_in + d_out)_q + (d_in + d_out)_v)",
)
