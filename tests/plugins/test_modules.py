"""The ``module`` method: trainable copies of whole modules (heads, embeddings, norms).

References are written from the formula y = M'(x): the base model's own computation with the
copy's tensors put in place by hand (``_with_tensors``), never the library's runtime.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import adapter_composer as ac
from adapter_composer import CompositionError, Graph
from tests.hf.helpers import tiny_bert_classifier
from tests.models import inputs, output, randomize, same_state, state_copy, tiny_gpt2, tiny_llama


def _with_tensors(model, path, tensors):
    """A deep copy of ``model`` whose module at ``path`` holds ``tensors`` (the reference)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in tensors.items():
            ref.get_submodule(path).get_parameter(k).copy_(v)
    return ref


def _copy_tensors(composed, adapter, key):
    return {k: v.detach().clone() for k, v in composed.adapters[adapter].modules[key].state_dict().items()}


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


def test_default_targets_the_classification_head_and_trains_only_the_copy(registry):
    model = tiny_bert_classifier()
    base = state_copy(model)
    batch = inputs(batch=4)
    before = _logits(model, batch)
    g = Graph()
    g.adapter("head", "module")  # no targets: classifier or score, as PEFT's SEQ_CLS
    composed = ac.compose(model, g, registry=registry)
    assert [s.path for s in composed.plan.sites] == ["classifier"]
    assert torch.equal(_logits(model, batch), before)  # the copy is the identity at init
    assert composed.trainable_parameters().per_adapter["head"] == 64 * 2 + 2
    opt = torch.optim.SGD(composed.parameters(), lr=0.5)
    composed.train()
    labels = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    composed.eval()
    tensors = _copy_tensors(composed, "head", "module.classifier")
    assert not torch.equal(tensors["weight"], base["classifier.weight"])
    composed.undo()
    assert same_state(model, base)  # the base head never moved
    pooled = model.bert(**batch).pooler_output.detach()
    expected = F.linear(pooled, tensors["weight"], tensors["bias"])  # y = W' h + b'
    composed = ac.compose(model, g, registry=registry)
    composed.adapters["head"].load_tensors({f"module.classifier.{k}": v for k, v in tensors.items()})
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=1e-6)


def test_route_gives_per_task_heads(registry):
    model = tiny_bert_classifier()
    base_model = copy.deepcopy(model)
    g = Graph()
    for task in ("sst2", "mrpc"):
        g.adapter(f"head_{task}", "module", targets=["classifier"])
    g.route({"sst2": "head_sst2", "mrpc": "head_mrpc"}, name="heads")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.5)
    batch = inputs(batch=3)
    routed = _logits(model, batch, route=["mrpc", None, "sst2"])
    for row, task in enumerate(["mrpc", None, "sst2"]):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        if task is None:
            reference = base_model
        else:
            reference = _with_tensors(base_model, "classifier", _copy_tensors(composed, f"head_{task}", "module.classifier"))
        torch.testing.assert_close(routed[row : row + 1], _logits(reference, one), rtol=0, atol=1e-6)
    with pytest.raises(CompositionError) as err:
        composed.merge()
    assert "merge-not-exact" in err.value.codes


def test_stack_with_adapters_elsewhere_orders_with_the_rest(registry):
    model = tiny_llama()
    g = Graph()
    g.adapter("lora", "lora", r=4, targets=["attn.q", "attn.v"])
    g.adapter("head", "module", targets=["lm_head"])
    g.stack("lora", "head", name="both")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.2)
    batch = inputs()
    out = output(model, batch)
    lora_only = tiny_llama()
    g1 = Graph()
    g1.adapter("lora", "lora", r=4, targets=["attn.q", "attn.v"])
    ac.compose(lora_only, g1, registry=registry).adapters["lora"].load_tensors(composed.adapters["lora"].state_dict())
    with torch.no_grad():
        hidden = lora_only.model(**batch).last_hidden_state
    weight = _copy_tensors(composed, "head", "module.lm_head")["weight"]
    torch.testing.assert_close(out, hidden @ weight.T, rtol=0, atol=1e-5)  # lm_head' (LoRA'd decoder)


def test_embedding_and_norm_copies_follow_the_formula(registry):
    model = tiny_llama()
    g = Graph()
    g.adapter("emb", "module", targets=["embed"])  # a role works: the embedding module
    g.adapter("norm", "module", targets=["model.norm"])
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.1)
    batch = inputs()
    reference = _with_tensors(tiny_llama(), "model.embed_tokens", _copy_tensors(composed, "emb", "embed"))
    reference = _with_tensors(reference, "model.norm", _copy_tensors(composed, "norm", "module.model.norm"))
    torch.testing.assert_close(output(model, batch), output(reference, batch), rtol=0, atol=1e-6)


def test_merge_copies_back_exactly_and_unmerge_restores(registry):
    model = tiny_bert_classifier()
    base = state_copy(model)
    g = Graph()
    g.adapter("lora", "lora", r=4, targets=["attn.q"])
    g.adapter("head", "module")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    batch = inputs()
    out = _logits(model, batch)
    composed.merge()
    assert torch.equal(model.classifier.base.weight, composed.adapters["head"].modules["module.classifier"].weight)
    torch.testing.assert_close(_logits(model, batch), out, rtol=0, atol=1e-5)
    composed.unmerge()
    assert torch.equal(_logits(model, batch), out)
    composed.undo()
    assert same_state(model, base)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    out = _logits(model, batch)
    head = _copy_tensors(composed, "head", "module.classifier")
    plain = composed.merge_and_unload()
    assert type(plain.classifier) is torch.nn.Linear and torch.equal(plain.classifier.weight, head["weight"])
    torch.testing.assert_close(_logits(plain, batch), out, rtol=0, atol=1e-5)


def test_save_load_and_hot_swap_of_a_head(registry, tmp_path):
    model = tiny_bert_classifier()
    g = Graph()
    g.adapter("h0", "module", targets=["classifier"])
    g.route({"t0": "h0"}, name="heads")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.5)
    batch = inputs(batch=2)
    composed.save(tmp_path / "c")
    fresh = tiny_bert_classifier()
    loaded = ac.load(fresh, tmp_path / "c", registry=registry)
    assert torch.equal(_logits(fresh, batch, route=["t0", None]), _logits(model, batch, route=["t0", None]))
    handle = loaded.add_adapter("h1", "module", route="heads", key="t1", targets=["classifier"])
    with torch.no_grad():
        handle.modules["module.classifier"].weight.mul_(-1.0)
    reference = _with_tensors(tiny_bert_classifier(), "classifier", _copy_tensors(loaded, "h1", "module.classifier"))
    torch.testing.assert_close(_logits(fresh, batch, route=["t1", "t1"]), _logits(reference, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("operator", ["stack", "sum", "mix"])
def test_two_copies_of_one_module_outside_a_route_are_refused(registry, operator):
    model = tiny_bert_classifier()
    before = state_copy(model)
    g = Graph()
    g.adapter("a", "module")
    g.adapter("b", "module")
    g.op(operator, "a", "b", name="node")
    with pytest.raises(CompositionError) as err:
        ac.compose(model, g, registry=registry)
    assert "unsupported-operator" in err.value.codes and "module-replaced-twice" in err.value.codes
    assert same_state(model, before)


def test_a_copy_next_to_another_adapter_at_the_same_module_is_refused(registry):
    g = Graph()
    g.adapter("copy", "module", targets=["attn.q"])
    g.adapter("lora", "lora", targets=["attn.q"])
    with pytest.raises(CompositionError) as err:
        ac.compose(tiny_llama(), g, registry=registry)
    overlap = [d for d in err.value.diagnostics if d.code == "module-overlap"]
    assert len(overlap) == 1 and set(overlap[0].nodes) == {"copy", "lora"} and len(overlap[0].sites) == 2
    g = Graph()
    g.adapter("copy", "module", targets=["model.layers.0.mlp"])  # a LoRA inside the copied module
    g.adapter("lora", "lora", targets=["mlp.down"], layers=[0])
    with pytest.raises(CompositionError, match="module-overlap"):
        ac.compose(tiny_llama(), g, registry=registry)


def test_tied_parameterless_and_partial_modules_are_refused(registry):
    cases = [
        (tiny_gpt2(), ["wte"], "module-tied"),  # GPT-2 ties wte to lm_head
        (tiny_llama(), ["model.layers.0.mlp.act_fn"], "module-not-trainable"),
        (tiny_gpt2(), ["attn.q"], "kind-target-mismatch"),  # a third of the fused c_attn
        (tiny_llama(), ["attn"], "kind-target-mismatch"),  # a sublayer role
        (tiny_llama(), None, "pattern-matches-nothing"),  # no classification head to default to
    ]
    for model, targets, code in cases:
        g = Graph()
        g.adapter("copy", "module", targets=targets)
        with pytest.raises(CompositionError) as err:
            ac.compose(model, g, registry=registry)
        assert code in err.value.codes, (targets, err.value.codes)
