from . import Profile


def _count(model):
    cfg = model.config
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    r = 4
    # only A [r, in] and B [out, r] train (the quantised codes are frozen buffers):
    # q: r·(d + d); v: r·(d + kv), per layer
    return cfg.num_hidden_layers * (r * (d + d) + r * (d + kv))


PROFILE = Profile(
    method="loftq",
    config={"r": 4, "bits": 4, "iters": 2, "targets": ["attn.q", "attn.v"]},
    expected_params=_count,
    lr=3e-2,
    formula="L · r · ((d_in + d_out)_q + (d_in + d_out)_v)",
)
