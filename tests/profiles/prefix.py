from . import Profile


def _count(model):
    cfg = model.config
    n, layers = 10, cfg.num_hidden_layers
    d_kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # a key and a value of width H_kv · head_dim per layer and virtual position
    return 2 * layers * n * d_kv


PROFILE = Profile(
    method="prefix_tuning",
    config={"num_virtual_tokens": 10},
    expected_params=_count,
    lr=0.3,
    formula="2 · L · n · d_kv,  d_kv = H_kv · head_dim",
)
