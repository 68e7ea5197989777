"""Validation: every problem gets its own code and a message naming what is wrong and the fix;
all problems are reported at once, and the model is unchanged after a refusal."""

from __future__ import annotations

import pytest

import adapter_composer as ac
from adapter_composer import CompositionError, Graph
from tests.models import inputs, output, same_state, state_copy, tiny_bert, tiny_gpt2, tiny_llama


def _refused(model, g, registry) -> CompositionError:
    modules = dict(model.named_modules())
    before = state_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(CompositionError) as err:
        ac.compose(model, g, registry=registry)
    assert same_state(model, before)
    assert dict(model.named_modules()) == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    return err.value


def test_unknown_method_suggests_the_closest(registry):
    g = Graph()
    g.adapter("a", "lorra", targets=["attn.q"])
    err = _refused(tiny_llama(), g, registry)
    assert err.codes == ["unknown-method"]
    assert (
        "'lorra'" in str(err)
        and "did you mean 'lora'" in str(err)
        and "registered methods" in str(err)
    )


def test_unknown_role_suggests_roles(registry):
    g = Graph()
    g.adapter("a", "lora", targets=["attn.qq"])
    err = _refused(tiny_llama(), g, registry)
    assert err.codes == ["unknown-role"]
    msg = str(err)
    assert (
        "'attn.qq' is neither a known role nor the name of a module" in msg
        and "'attn.q'" in msg
        and "re:" in msg
    )


def test_role_the_model_lacks(registry):
    g = Graph()
    g.adapter("a", "lora", targets=["mlp.gate"])
    err = _refused(tiny_gpt2(), g, registry)
    assert err.codes == ["role-missing"]
    assert "'mlp.gate', which gpt2 models do not have" in str(err) and "roles of gpt2:" in str(err)


def test_sublayer_role_for_a_linear_method(registry):
    g = Graph()
    g.adapter("a", "lora", targets=["attn"])
    err = _refused(tiny_llama(), g, registry)
    assert err.codes == ["target-not-linear"] and "not a linear layer" in str(err)


def test_regex_matching_nothing(registry):
    g = Graph()
    g.adapter("a", "lora", targets=["re:.*nonexistent_proj"])
    err = _refused(tiny_llama(), g, registry)
    assert err.codes == ["pattern-matches-nothing"]


def test_layers_out_of_range(registry):
    g = Graph()
    g.adapter("a", "lora", targets=["attn.q"], layers=[0, 7])
    err = _refused(tiny_llama(), g, registry)
    assert err.codes == ["bad-layers"] and "[7]" in str(err) and "has 2" in str(err)


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"rank": 8}, "rank: Extra inputs are not permitted"),
        ({"r": 0}, "r: Input should be greater than or equal to 1"),
        ({"dropout": 1.5}, "dropout: Input should be less than 1"),
        ({"alpha": "lots"}, "alpha: Input should be a valid number"),
        ({"rank_pattern": {"attn.v": 0}}, "ranks must be >= 1"),
    ],
)
def test_bad_config_names_the_field(registry, config, needle):
    g = Graph()
    g.adapter("a", "lora", targets=["attn.q"], **config)
    err = _refused(tiny_llama(), g, registry)
    assert err.codes == ["bad-config"]
    assert (
        needle in str(err)
        and "adapter 'a' (lora)" in str(err)
        and "accepted fields: r, alpha" in str(err)
    )


def test_cycle_names_the_nodes_on_it(registry):
    g = Graph()
    g.adapter("sst2", "lora", targets=["attn.q"])
    g.adapter("mrpc", "lora", targets=["attn.v"])
    g.stack("inner", "sst2", name="outer")
    g.stack("outer", "mrpc", name="inner")
    err = _refused(tiny_llama(), g, registry)
    assert "cycle" in err.codes
    msg = str(err)
    assert "outer" in msg and "inner" in msg and "adapters under it: mrpc, sst2" in msg
    assert "remove one of the edges" in msg


def test_self_reference_is_a_cycle(registry):
    g = Graph()
    g.adapter("a", "lora")
    g.stack("a", "loop", name="loop")
    assert [d.code for d in ac.validate(g, registry)] == ["cycle"]


def test_unknown_operator_and_bad_options(registry):
    g = Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    g.adapter("b", "lora", targets=["attn.q"])
    g.op("blend", "a", "b", name="x")
    g.sum("a", "b", weights=[1.0], name="y")
    g.sum("a", "b", name="z", mode="fancy")
    codes = sorted(d.code for d in ac.validate(g, registry, tiny_llama()))
    assert codes == ["bad-options", "bad-options", "unknown-operator"]


def test_every_problem_is_reported_at_once(registry):
    model = tiny_gpt2()
    g = Graph()
    g.adapter("a", "lorra")
    g.adapter("b", "lora", targets=["mlp.gate"])
    g.adapter("c", "lora", r=-1, targets=["attn.q"])
    g.adapter("d", "lora", targets=["attn.query"])
    g.stack("a", "ghost", name="s")
    err = _refused(model, g, registry)
    assert sorted(err.codes) == sorted(
        ["unknown-node", "unknown-method", "role-missing", "bad-config", "unknown-role"]
    )
    assert str(err).startswith("5 problem(s) in the composition")


def test_non_commuting_siblings_need_a_declared_order(registry):
    """Two LoRAs commute; a sum defines its own math; nothing here is unordered."""
    g = Graph()
    g.adapter("a", "lora", targets=["attn.q", "attn.v"])
    g.adapter("b", "lora", targets=["attn.v"])
    assert ac.validate(g, registry, tiny_llama()) == []


def test_model_is_untouched_after_refusal_and_usable(registry):
    model = tiny_bert()
    batch = inputs()
    before = output(model, batch)
    g = Graph()
    g.adapter("ok", "lora", targets=["attn.q"])
    g.adapter("bad", "lora", targets=["attn.nope"])
    _refused(model, g, registry)
    assert (output(model, batch) - before).abs().max() == 0
    g.remove("bad")
    composed = ac.compose(model, g, registry=registry)
    assert len(composed.plan.sites) == 2


def test_validate_without_a_model_checks_the_graph_only(registry):
    g = Graph()
    g.adapter("a", "lora", targets=["attn.whatever"])
    assert ac.validate(g, registry) == []
    g.adapter("b", "lora", alpha=-1)
    assert [d.code for d in ac.validate(g, registry)] == ["bad-config"]


def test_sublayer_method_on_a_single_layer_role(registry):
    g = Graph()
    g.adapter("a", "bottleneck", style="houlsby", bottleneck=8, targets=["attn.q", "attn.k"])
    err = _refused(tiny_llama(), g, registry)
    assert err.codes == ["kind-target-mismatch", "kind-target-mismatch"]  # one per role, every layer listed
    assert len(err.diagnostics[0].sites) == 2
    assert "role 'attn.q' is a single layer, not a sublayer" in str(err) and "'attn' or 'mlp'" in str(err)
