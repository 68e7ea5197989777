"""Any change of adapter weights, by any means, is what the next routed or mixed call serves.

Route and mix read low-rank adapters from a per-site bank (adapter_composer.runtime.lowrank)
whose slots the adapters' parameters are views of. Each test warms the fast path with a
no-grad call, changes the weights in one way, and compares the next no-grad call with a
reference computed from the weights as they are then: the same composition with the batched
kernels switched off, so every adapter runs its own forward on its own parameters.
"""

from __future__ import annotations

import pytest
import torch

import adapter_composer as ac
import adapter_composer.plugins.mix as mix_plugin
import adapter_composer.plugins.route as route_plugin
from adapter_composer import Graph
from adapter_composer.runtime.lowrank import LowRankBank
from tests.models import inputs, randomize, tiny_llama

KEYS = ["k1", "k0", None, "k2"]
TARGETS = ["attn.q", "attn.v", "mlp.down"]


def _routed(registry, ranks=(4, 4, 4)):
    model = tiny_llama()
    g = Graph()
    for i, r in enumerate(ranks):
        g.adapter(f"t{i}", "lora", r=r, alpha=8, targets=TARGETS)
    g.route({f"k{i}": f"t{i}" for i in range(len(ranks))}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


def _mixed(registry, **options):
    model = tiny_llama()
    g = Graph()
    for i in range(3):
        g.adapter(f"e{i}", "lora", r=4, alpha=8, targets=TARGETS)
    g.mix("e0", "e1", "e2", name="experts", **options)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    with torch.no_grad():
        for m in composed.model.modules():
            if type(m).__name__ == "MixNode":
                torch.nn.init.normal_(m.router.weight, std=0.5)
    return model, composed


def _served(model, **call):
    with torch.no_grad():
        return model(**inputs(batch=4), **call).logits


def _reference(model, monkeypatch, **call):
    """The same call with the batched kernels off: each adapter's own forward on its parameters."""
    with monkeypatch.context() as m:
        m.setattr(LowRankBank, "fast", lambda self: None)
        m.setattr(route_plugin, "lowrank_of", lambda leaf: None)
        m.setattr(mix_plugin, "lowrank_of", lambda leaf: None)
        return _served(model, **call)


def _lora(composed, name):
    return list(composed.adapters[name].modules.values())


def _assert_serves_current(model, monkeypatch, **call):
    got, want = _served(model, **call), _reference(model, monkeypatch, **call)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def _doubled_b(composed, name):
    for op in _lora(composed, name):
        op.lora_B.data.mul_(2)


def _copied_into_a(composed, name):
    g = torch.Generator().manual_seed(7)
    for op in _lora(composed, name):
        op.lora_A.data.copy_(torch.randn(op.lora_A.shape, generator=g))


def _rebound(composed, name):
    g = torch.Generator().manual_seed(8)
    for op in _lora(composed, name):
        op.lora_A.data = torch.randn(op.lora_A.shape, generator=g)
        op.lora_B.data = torch.randn(op.lora_B.shape, generator=g) * 0.3


def _loaded_state_dict(composed, name):
    state = composed.model.state_dict()
    changed = {k: v * -1.5 for k, v in state.items() if f".{name}." in k or k.endswith(f".{name}")}
    changed = changed or {k: v * -1.5 for k, v in state.items() if "lora_B" in k}
    composed.model.load_state_dict({**state, **changed})


def _rescaled(composed, name):
    for op in _lora(composed, name):
        op.scale = op.scale * 3.0


def _reassigned(composed, name):
    g = torch.Generator().manual_seed(9)
    for op in _lora(composed, name):
        op.lora_B = torch.nn.Parameter(torch.randn(op.lora_B.shape, generator=g) * 0.3)


CHANGES = {"p.data.mul_": _doubled_b, "p.data.copy_": _copied_into_a, "p.data = t": _rebound, "load_state_dict": _loaded_state_dict,
           "op.scale =": _rescaled, "op.lora_B = Parameter": _reassigned}


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 3, 4)], ids=["one rank", "mixed ranks"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_route_serves_weights_changed_through_data(registry, monkeypatch, change, ranks):
    model, composed = _routed(registry, ranks)
    before = _served(model, route=KEYS)
    _assert_serves_current(model, monkeypatch, route=KEYS)
    CHANGES[change](composed, "t1")
    after = _served(model, route=KEYS)
    assert not torch.allclose(after[0], before[0], atol=1e-3)  # row 0 serves t1: it changed
    _assert_serves_current(model, monkeypatch, route=KEYS)


def test_route_serves_weights_after_an_optimizer_step(registry, monkeypatch):
    model, composed = _routed(registry)
    _served(model, route=KEYS)
    optimizer = torch.optim.AdamW([p for p in composed.parameters() if p.requires_grad], lr=0.05)
    out = model(**inputs(batch=4), route=KEYS).logits
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for op in _lora(composed, "t1") for p in (op.lora_A, op.lora_B))
    optimizer.step()
    _assert_serves_current(model, monkeypatch, route=KEYS)


def test_route_gradients_equal_the_per_adapter_reference(registry, monkeypatch):
    model, composed = _routed(registry, (2, 3, 4))
    _served(model, route=KEYS)  # the bank exists; training must still reach the parameters
    params = [p for p in composed.parameters() if p.requires_grad]

    def grads():
        for p in params:
            p.grad = None
        model(**inputs(batch=4), route=KEYS).logits.square().mean().backward()
        return [p.grad.clone() for p in params]

    fast = grads()
    with monkeypatch.context() as m:
        m.setattr(LowRankBank, "fast", lambda self: None)
        m.setattr(route_plugin, "lowrank_of", lambda leaf: None)
        slow = grads()
    assert all(torch.allclose(f, s, atol=1e-6) for f, s in zip(fast, slow, strict=True))


def test_route_serves_a_hot_swapped_adapter(registry, monkeypatch):
    model, composed = _routed(registry)
    _served(model, route=KEYS)
    tensors = {k: v * 2 + 0.1 for k, v in composed.adapters["t1"].state_dict().items()}
    composed.add_adapter("t1b", "lora", route="tasks", key="k1", targets=TARGETS, tensors=tensors, r=4, alpha=8)
    _assert_serves_current(model, monkeypatch, route=KEYS)
    composed.add_adapter("t3", "lora", route="tasks", key="k3", targets=TARGETS, tensors=tensors, r=4, alpha=8)
    _assert_serves_current(model, monkeypatch, route=["k3", "k1", None, "k0"])
    _doubled_b(composed, "t3")  # the added adapter's parameters are live too
    _assert_serves_current(model, monkeypatch, route=["k3", "k1", None, "k0"])


def test_route_parameters_are_views_of_the_bank(registry):
    """Serving copies nothing per call: the adapters' parameters live in the bank's slots."""
    model, composed = _routed(registry)
    _served(model, route=KEYS)
    node = next(m for m in composed.model.modules() if type(m).__name__ == "RouteNode")
    bank_a = node.bank.a
    _served(model, route=KEYS)
    assert node.bank.a is bank_a
    for i, child in enumerate(node.items):
        assert child.op.lora_A.data_ptr() == bank_a[i].data_ptr()
        assert child.op.lora_B.data_ptr() == node.bank.b[i].data_ptr()


@pytest.mark.parametrize("options", [{}, {"top_k": 2}], ids=["dense", "top-2"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_mix_serves_weights_changed_through_data(registry, monkeypatch, change, options):
    model, composed = _mixed(registry, **options)
    _assert_serves_current(model, monkeypatch)
    CHANGES[change](composed, "e1")
    _assert_serves_current(model, monkeypatch)


def test_an_adapter_replaced_by_hot_swap_keeps_its_weights(registry):
    """Its bank slot is reused for the new adapter: the old one must not see the new weights."""
    model, composed = _routed(registry)
    _served(model, route=KEYS)
    old = {k: v.clone() for k, v in composed.adapters["t1"].state_dict().items()}
    ops = _lora(composed, "t1")
    tensors = {k: v * 2 + 0.1 for k, v in old.items()}
    composed.add_adapter("t1b", "lora", route="tasks", key="k1", targets=TARGETS, tensors=tensors, r=4, alpha=8)
    kept = {k: v for op in ops for k, v in (("A", op.lora_A), ("B", op.lora_B))}
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in kept.values())
    now = [t for op in ops for t in (op.lora_A, op.lora_B)]
    assert sum(t.numel() for t in now) == sum(v.numel() for v in old.values())
    assert all(any(torch.equal(t, v) for v in old.values()) for t in now)


def test_a_bank_built_under_inference_mode_leaves_the_parameters_trainable(registry, monkeypatch):
    model, composed = _routed(registry)
    _rebound(composed, "t1")  # the next call re-banks, here inside inference_mode
    with torch.inference_mode():
        model(**inputs(batch=4), route=KEYS)
    optimizer = torch.optim.AdamW([p for p in composed.parameters() if p.requires_grad], lr=0.05)
    model(**inputs(batch=4), route=KEYS).logits.square().mean().backward()
    optimizer.step()
    _assert_serves_current(model, monkeypatch, route=KEYS)


def test_a_serving_call_skips_the_children_once_the_bank_is_vouched_for(registry, monkeypatch):
    """After one no-grad call, the next reads the bank without walking the children (O(1) in
    the number of adapters); a hot swap, a mode change or a call with gradients walks again."""
    model, composed = _routed(registry)
    first = _served(model, route=KEYS)
    walked = []
    real = route_plugin.lowrank_of
    monkeypatch.setattr(route_plugin, "lowrank_of", lambda leaf: walked.append(leaf) or real(leaf))
    assert torch.equal(_served(model, route=KEYS), first) and walked == []
    model.train()
    model.eval()  # a mode change: one full walk, then the shortcut again
    _served(model, route=KEYS)
    assert walked
    walked.clear()
    _served(model, route=KEYS)
    assert walked == []
    with torch.enable_grad():
        model(**inputs(batch=4), route=KEYS)
    assert walked  # a call that may need gradients always takes the full path
    _served(model, route=KEYS)
    walked.clear()
    composed.add_adapter("t9", "lora", route="tasks", key="k9", r=4, alpha=8, targets=TARGETS)
    randomize(composed, std=0.3, seed=4)
    _served(model, route=["k9", *KEYS[1:]])
    assert walked  # membership changed: the full path, which sees the new adapter
    _assert_serves_current(model, monkeypatch, route=["k9", *KEYS[1:]])
