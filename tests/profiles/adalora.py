from . import Profile

R = 4


def _count(model):
    cfg = model.config
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # per site: Q [r, in] + P [out, r] + Λ [r]; q: d → d, v: d → kv
    return cfg.num_hidden_layers * (R * (d + d) + R + R * (d + kv) + R)


PROFILE = Profile(
    method="adalora",
    config={
        "init_r": R,
        "target_r": 2,
        "total_step": 30,
        "alpha": 8,
        "targets": ["attn.q", "attn.v"],
    },
    expected_params=_count,
    lr=3e-2,
    formula="L · Σ_{q,v} (r · (d_in + d_out) + r)",
)
