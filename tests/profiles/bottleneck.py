from . import Profile

BOTTLENECK = 8


def _count(model):
    cfg = model.config
    d, m = cfg.hidden_size, BOTTLENECK
    # per site: W_down d·m + b_down m + W_up m·d + b_up d; houlsby: attn and mlp in every layer
    return cfg.num_hidden_layers * 2 * (d * m + m + m * d + d)


PROFILE = Profile(
    method="bottleneck",
    config={"style": "houlsby", "bottleneck": BOTTLENECK, "targets": ["attn", "mlp"]},
    expected_params=_count,
    # tiny_llama's std-0.02 weights give near-uniform logits, which a residual adapter moves
    # only slowly (loss ×0.89 in 30 steps); with std-0.1 weights it drops to ×0.28 at lr 1e-2
    arch="llama_scaled",
    lr=1e-2,
    formula="L · 2 sublayers · (d·m + m + m·d + d)",
)
