from . import Profile


def _count(model):
    # a copy of the LM head: W ∈ R^{vocab × d_model} (Llama's head has no bias)
    head = model.lm_head
    return head.out_features * head.in_features


PROFILE = Profile(
    method="module",
    config={"targets": ["lm_head"]},
    expected_params=_count,
    lr=1e-2,
    formula="vocab · d_model (the whole head)",
)
