"""Merge strategies of a sum node: exact ones match the running sum, approximate ones say so."""

from __future__ import annotations

import pytest
import torch

import adapter_composer as ac
from adapter_composer import ComposerError, Graph
from adapter_composer.live.merging import dare, ties, trim
from tests.models import inputs, output, randomize, tiny_llama


def _summed(registry, dora: bool = False):
    model = tiny_llama()
    g = Graph()
    g.adapter("a", "lora", r=4, alpha=8, rslora=True, targets=["attn.q", "attn.v", "mlp.down"])
    g.adapter("b", "lora", r=2, alpha=4, dora=dora, targets=["attn.q", "attn.v"])
    g.sum("a", "b", weights=[0.7, -0.3], name="s")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


@pytest.mark.parametrize("strategy", ["linear", "cat"])
def test_exact_strategies_match_the_running_sum(registry, strategy):
    model, composed = _summed(registry)
    batch = inputs()
    reference = output(model, batch)
    result = composed.merge_sum("s", strategy)
    assert result.exact and result.max_error < 1e-5
    fresh = tiny_llama()
    result.compose(fresh, registry=registry)
    assert (output(fresh, batch) - reference).abs().max() <= 1e-5
    if strategy == "cat":  # exact with rank r_a + r_b where both act
        a, _ = result.factors["model.layers.0.self_attn.q_proj"]
        assert a.shape[0] == 6


def test_linear_handles_dora_and_cat_refuses_it(registry):
    model, composed = _summed(registry, dora=True)
    batch = inputs()
    reference = output(model, batch)
    result = composed.merge_sum("s", "linear")
    fresh = tiny_llama()
    result.compose(fresh, registry=registry)
    assert (output(fresh, batch) - reference).abs().max() <= 1e-5
    with pytest.raises(ComposerError, match=r"cat needs plain low-rank adapters; \['b'\]"):
        composed.merge_sum("s", "cat")


def test_svd_error_decreases_with_rank_and_is_reported(registry):
    _, composed = _summed(registry)
    errors = [composed.merge_sum("s", "svd", rank=k).max_error for k in (1, 2, 4, 6)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-5  # rank 6 = r_a + r_b holds the sum exactly
    result = composed.merge_sum("s", "svd", rank=2)
    assert not result.exact and result.errors["model.layers.0.self_attn.q_proj"] > 0.01


def test_ties_follows_the_paper_on_a_hand_made_example():
    t1 = torch.tensor([[3.0, -1.0, 0.5], [2.0, 0.1, -4.0]])
    t2 = torch.tensor([[1.5, 2.0, -0.2], [-3.0, 0.3, -1.0]])
    # trim to the top half by magnitude: t1 keeps 3, 2, -4; t2 keeps 1.5, 2, -3
    assert torch.equal(trim(t1, 0.5), torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, -4.0]]))
    merged = ties([t1, t2], density=0.5)
    # elected signs (of the trimmed sum [[4.5, 2, 0], [-1, 0, -4]]): [+, +, 0], [-, 0, -];
    # each entry is the mean of the trimmed values that agree with its sign
    expected = torch.tensor([[(3.0 + 1.5) / 2, 2.0, 0.0], [-3.0, 0.0, -4.0]])
    assert torch.equal(merged, expected)


def test_dare_drops_and_rescales_with_a_seed():
    t = torch.ones(4, 50)
    merged = dare([t], drop=0.5, seed=7)
    values = set(merged.unique().tolist())
    assert values <= {0.0, 2.0} and 0.3 < (merged == 0).float().mean() < 0.7
    assert torch.equal(merged, dare([t], drop=0.5, seed=7))
    assert not torch.equal(merged, dare([t], drop=0.5, seed=8))
    big = torch.ones(200, 200)
    assert abs(dare([big], drop=0.3, seed=0).mean().item() - 1.0) < 0.02  # unbiased


def test_approximate_strategies_report_their_error(registry):
    _, composed = _summed(registry)
    for strategy, options in (("ties", {"density": 0.3}), ("dare", {"drop": 0.5, "seed": 1})):
        result = composed.merge_sum("s", strategy, **options)
        assert not result.exact and result.max_error > 0.01


def test_bad_merge_requests(registry):
    _, composed = _summed(registry)
    with pytest.raises(ComposerError, match="not a sum node"):
        composed.merge_sum("a")
    with pytest.raises(ComposerError, match="unknown merge strategy"):
        composed.merge_sum("s", "average")
    with pytest.raises(ComposerError, match="needs rank"):
        composed.merge_sum("s", "svd")


@pytest.mark.parametrize("targets, why", [(["attn.v"], "scales the layer's output"), (["mlp.down"], "scales the layer's input")])
def test_a_sum_holding_a_scale_is_refused_naming_the_adapter(registry, targets, why):
    model = tiny_llama()
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.v", "mlp.down"])
    g.adapter("i", "ia3", targets=targets)  # mlp.down is a feed-forward site: its input is scaled
    g.sum("a", "i", weights=[0.5, 0.5], name="s")
    composed = ac.compose(model, g, registry=registry)
    for strategy in ("linear", "svd"):
        with pytest.raises(ComposerError, match=rf"adapter 'i' \(ia3\) at .*: it {why}.*not an additive weight update"):
            composed.merge_sum("s", strategy, rank=2)
