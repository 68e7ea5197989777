"""Route and mix at run time: keys per call, generate() with the KV cache, gates and losses, hot swap."""

from __future__ import annotations

import pytest
import torch

import adapter_composer as ac
import adapter_composer.plugins.route as route_plugin
from adapter_composer import ComposerError, Graph, RoutingError
from tests.models import inputs, output, randomize, tiny_llama


def _routed(registry, n: int = 3, dora_last: bool = False, **route_options):
    model = tiny_llama()
    g = Graph()
    for i in range(n):
        g.adapter(f"t{i}", "lora", r=2 + i, alpha=4, targets=["attn.q", "attn.v", "mlp.down"], dora=dora_last and i == n - 1)
    g.route({f"k{i}": f"t{i}" for i in range(n)}, name="tasks", **route_options)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


def _alone(composed, name, registry):
    model = tiny_llama()
    spec = composed.graph.spec(name)
    g = Graph()
    g.adapter(name, spec.method, targets=list(spec.targets), **spec.config)
    single = ac.compose(model, g, registry=registry)
    single.adapters[name].load_tensors(composed.adapters[name].state_dict())
    return model


def test_context_manager_equals_keyword(registry):
    model, composed = _routed(registry)
    batch = inputs(batch=3)
    with torch.no_grad():
        by_kwarg = model(**batch, route=["k2", None, "k0"]).logits
        with composed.routing(["k2", None, "k0"]):
            by_context = model(**batch).logits
        plain = model(**batch).logits
    assert torch.equal(by_kwarg, by_context)
    torch.testing.assert_close(plain, output(tiny_llama(), batch), rtol=0, atol=1e-6)  # no keys: the base


def test_default_key_serves_unrouted_rows(registry):
    model, composed = _routed(registry, default="k1")
    batch = inputs(batch=2)
    with torch.no_grad():
        out = model(**batch, route=[None, "k1"]).logits
    assert torch.equal(out[0], out[1]) is False  # different inputs
    reference = output(_alone(composed, "t1", registry), batch)
    torch.testing.assert_close(out, reference, rtol=0, atol=2e-5)


def test_bad_routing_is_refused(registry):
    model, composed = _routed(registry)
    batch = inputs(batch=2)
    with pytest.raises(RoutingError, match="3 keys for a batch of 2"):
        model(**batch, route=["k0", "k1", "k2"])
    with pytest.raises(RoutingError, match=r"unknown route keys \['sst2'\]"):
        model(**batch, route=["sst2", "k1"])
    plain = tiny_llama()
    g = Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    ac.compose(plain, g, registry=registry)
    with pytest.raises(RoutingError, match="no route node"):
        plain(**batch, route=["x", "y"])


def test_batched_kernel_equals_grouped_path(registry, monkeypatch):
    model, composed = _routed(registry, n=4)
    batch = inputs(batch=5)
    keys = ["k3", "k0", None, "k3", "k1"]
    with torch.no_grad():
        fast = model(**batch, route=keys).logits
        monkeypatch.setattr(route_plugin, "lowrank_of", lambda leaf: None)
        slow = model(**batch, route=keys).logits
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_switching_keys_rebuilds_nothing(registry):
    model, composed = _routed(registry)
    plan, modules = composed.plan, list(model.modules())
    batch = inputs(batch=3)
    with torch.no_grad():
        for keys in (["k0", "k1", "k2"], ["k2", "k2", None], [None, None, None]):
            model(**batch, route=keys)
    assert composed.plan is plan and list(model.modules()) == modules


def _greedy(model, ids, steps):
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    return seq


def test_generate_with_routing_keeps_the_cache(registry):
    model, composed = _routed(registry)
    ids = inputs(batch=3, length=5)["input_ids"]
    lengths = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    with composed.routing(["k0", "k2", None]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    hook.remove()
    assert lengths == [5, 1, 1, 1]  # one prefill, then one token per step: the KV cache is used
    for row, name in enumerate(["t0", "t2", None]):
        reference_model = tiny_llama() if name is None else _alone(composed, name, registry)
        assert torch.equal(out[row : row + 1], _greedy(reference_model, ids[row : row + 1], 4))


def test_generate_accepts_route_as_an_argument(registry):
    model, composed = _routed(registry)
    ids = inputs(batch=2, length=5)["input_ids"]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    with composed.routing(["k1", "k0"]):
        expected = model.generate(**kwargs)
    assert torch.equal(model.generate(**kwargs, route=["k1", "k0"]), expected)


# --- mix ------------------------------------------------------------------------------


def _mixed(registry, **options):
    model = tiny_llama()
    g = Graph()
    for i in range(3):
        g.adapter(f"e{i}", "lora", r=2, alpha=4, targets=["attn.q", "mlp.down"])
    g.mix("e0", "e1", "e2", name="experts", **options)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


def _mix_nodes(composed):
    return [m for s in composed.sites().values() for m in s.modules() if type(m).__name__ == "MixNode"]


def test_gates_are_recorded_and_the_balancing_loss_follows_its_formula(registry):
    model, composed = _mixed(registry)
    for node in _mix_nodes(composed):
        torch.nn.init.normal_(node.router.weight, std=0.3)
    batch = inputs()
    with composed.record_gates() as gates, torch.no_grad():
        model(**batch)
    assert sorted(gates) == sorted(f"experts@layers.{i}.{r}" for i in range(2) for r in ("attn.q", "mlp.down"))
    g = gates["experts@layers.0.attn.q"]
    assert g.shape == (2, 9, 3) and torch.allclose(g.sum(-1), torch.ones(2, 9))
    # dense gate: every expert is "chosen", so f_e = 1/E and the loss is w·E·Σ (1/E)·P_e = w
    assert composed.aux_loss().item() == pytest.approx(0.01 * 4, rel=1e-5)


def test_top_k_computes_only_the_selected_experts(registry, monkeypatch):
    import adapter_composer.plugins.mix as mix_plugin

    monkeypatch.setattr(mix_plugin, "_dense_is_cheaper", lambda parts, k: False)  # many or wide experts
    model, composed = _mixed(registry, top_k=1)
    seen = {i: 0 for i in range(3)}
    node = _mix_nodes(composed)[0]
    with torch.no_grad():
        node.router.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    for i, child in enumerate(node.items):
        child.op.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, seen[i] + a[0].shape[0]))
    with torch.no_grad():
        model(**inputs())
    assert seen == {0: 0, 1: 18, 2: 0}


def test_top_k_over_few_narrow_experts_runs_dense_with_the_same_output(registry, monkeypatch):
    """Top-k over a few low-rank experts is cheaper computed dense (the unselected gates are
    exact zeros): same output as computing only the selected experts, token by token."""
    import adapter_composer.plugins.mix as mix_plugin

    model, composed = _mixed(registry, top_k=2)
    for node in _mix_nodes(composed):
        torch.nn.init.normal_(node.router.weight, std=0.5)
    assert mix_plugin._dense_is_cheaper([(torch.zeros(2, 4), None, 1.0)] * 3, 2)
    batch = inputs()
    with torch.no_grad():
        dense = output(model, batch)
        monkeypatch.setattr(mix_plugin, "_dense_is_cheaper", lambda parts, k: False)
        sparse = output(model, batch)
    assert torch.allclose(dense, sparse, atol=1e-5)


def test_sequence_gates_are_kept_through_generate(registry):
    model, composed = _mixed(registry, granularity="sequence")
    for node in _mix_nodes(composed):
        torch.nn.init.normal_(node.router.weight, std=0.5)
    ids = inputs(batch=1, length=6)["input_ids"]
    recorded = []
    with composed.record_gates() as gates:
        # after every forward call of generate(): the gates that call used
        handle = model.register_forward_hook(lambda m, a, o: recorded.append(gates["experts@layers.0.attn.q"].clone()))
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
        handle.remove()
    assert len(recorded) == 3 and all(torch.equal(r, recorded[0]) for r in recorded)
    assert recorded[0].shape == (1, 1, 3)


def test_frozen_experts_train_only_the_routers(registry):
    model, composed = _mixed(registry, train_experts=False)
    trainable = composed.parameters()
    routers = [p for n in _mix_nodes(composed) for p in n.router.parameters()]
    assert {id(p) for p in trainable} == {id(p) for p in routers}
    loss = model(**inputs(), labels=inputs()["input_ids"]).loss + composed.aux_loss()
    loss.backward()
    assert all(p.grad is not None for p in routers)


# --- hot swap -------------------------------------------------------------------------


def test_hot_swap_adds_replaces_and_removes_without_touching_the_others(registry, tmp_path):
    model, composed = _routed(registry, n=3)
    others = {n: dict(composed.adapters[n].modules) for n in ("t0", "t2")}
    sites = composed.sites()
    batch = inputs(batch=3)
    with torch.no_grad():
        before = model(**batch, route=["k0", "k1", "k2"]).logits
    source_model, source = _routed(registry, n=3)  # another tenant's weights, saved to disk
    source.save(tmp_path / "tenant")
    composed.load_adapter(tmp_path / "tenant", name="new", route="tasks", key="k1", adapter="t1")
    assert "t1" not in composed.adapters and "new" in composed.adapters
    assert composed.sites() == sites  # no site was re-applied
    assert all(dict(composed.adapters[n].modules) == mods for n, mods in others.items())
    with torch.no_grad():
        after = model(**batch, route=["k0", "k1", "k2"]).logits
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    reference = output(_alone(source, "t1", registry), {k: v[1:2] for k, v in batch.items()})
    torch.testing.assert_close(after[1:2], reference, rtol=0, atol=2e-5)
    assert "k1→new:lora" in composed.plan.site("model.layers.0.self_attn.q_proj").program.render()

    zeros = {k: torch.zeros_like(v) for k, v in composed.adapters["new"].state_dict().items()}
    composed.replace_weights("new", zeros)  # in place: the k1 rows now see the base model
    with torch.no_grad():
        swapped = model(**batch, route=["k1", "k1", "k0"]).logits
    torch.testing.assert_close(swapped[:2], output(tiny_llama(), batch)[:2], rtol=0, atol=1e-6)

    composed.remove_adapter("new")
    with pytest.raises(RoutingError, match="unknown route keys"):
        model(**batch, route=["k1", "k0", "k2"])
    composed.add_adapter("again", "lora", route="tasks", key="k1", r=3, alpha=4, targets=["attn.q", "attn.v", "mlp.down"])
    with torch.no_grad():
        fresh = model(**batch, route=["k0", "k1", "k2"]).logits
    torch.testing.assert_close(fresh[1:2], output(tiny_llama(), {k: v[1:2] for k, v in batch.items()}), rtol=0, atol=1e-6)


def test_hot_swap_refusals(registry):
    model, composed = _routed(registry)
    with pytest.raises(ComposerError, match="not a route node"):
        composed.add_adapter("x", "lora", route="t0", key="k9", targets=["attn.q"])
    with pytest.raises(ComposerError, match="where route 'tasks' does not act"):
        composed.add_adapter("x", "lora", route="tasks", key="k9", targets=["attn.o"])
    with pytest.raises(ac.CompositionError, match="unknown-role"):
        composed.add_adapter("x", "lora", route="tasks", key="k9", targets=["attn.oops"])
    with pytest.raises(ComposerError, match="do not fit"):
        composed.replace_weights("t0", {"layers.0.attn.q.lora_A": torch.zeros(1)})
    assert "x" not in composed.adapters and "x" not in composed.graph


# --- nesting --------------------------------------------------------------------------


def test_route_over_stacks_equals_each_stack_alone(registry):
    model = tiny_llama()
    g = Graph()
    g.adapter("shared", "lora", r=2, targets=["attn.q", "attn.v"])
    g.adapter("x", "lora", r=3, targets=["attn.v", "mlp.down"])
    g.adapter("y", "lora", r=2, dora=True, targets=["attn.q"])
    g.route({"kx": g.stack("shared", "x"), "ky": g.stack("shared", "y")}, name="r")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    batch = inputs(batch=3)
    with torch.no_grad():
        routed = model(**batch, route=["ky", "kx", None]).logits
    for row, members in enumerate([("shared", "y"), ("shared", "x"), ()]):
        reference = tiny_llama()
        if members:
            g2 = Graph()
            for name in members:
                spec = g.spec(name)
                g2.adapter(name, "lora", targets=list(spec.targets), **spec.config)
            alone = ac.compose(reference, g2, registry=registry)
            for name in members:
                alone.adapters[name].load_tensors(composed.adapters[name].state_dict())
        torch.testing.assert_close(routed[row : row + 1], output(reference, {k: v[row : row + 1] for k, v in batch.items()}), rtol=0, atol=2e-5)


def test_mix_inside_a_stack(registry):
    model = tiny_llama()
    g = Graph()
    for name in ("e0", "e1", "c"):
        g.adapter(name, "lora", r=2, targets=["attn.q"])
    g.stack(g.mix("e0", "e1", top_k=1, name="m"), "c")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    for node in _mix_nodes(composed):
        with torch.no_grad():
            node.router.bias.copy_(torch.tensor([0.0, 1e3]))
    reference = tiny_llama()
    g2 = Graph()
    for name in ("e1", "c"):
        g2.adapter(name, "lora", r=2, targets=["attn.q"])
    alone = ac.compose(reference, g2, registry=registry)
    for name in ("e1", "c"):
        alone.adapters[name].load_tensors(composed.adapters[name].state_dict())
    batch = inputs()
    torch.testing.assert_close(output(model, batch), output(reference, batch), rtol=0, atol=2e-5)


def test_forbidden_nesting_prints_the_allowed_table(registry):
    g = Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    g.adapter("b", "lora", targets=["attn.q"])
    inner = g.route({"x": "a"}, name="inner")
    g.route({"y": inner, "z": "b"}, name="outer")
    g.mix(g.route({"w": "a"}, name="r2"), "b", name="m")
    diags = ac.validate(g, registry, tiny_llama())
    nesting = [d for d in diags if d.code == "forbidden-nesting"]
    assert len(nesting) == 2
    assert "nested routes would need two keys per row" in nesting[0].message + nesting[1].message
    assert "route ⊃ stack" in nesting[0].rule and "stack ⊃ mix" in nesting[0].rule


def test_per_layer_router_reads_the_layer_input_and_is_shared(registry):
    model, composed = _mixed(registry, router="layer")
    nodes = _mix_nodes(composed)
    assert all(not hasattr(n, "router") for n in nodes)
    routers = composed._rt.shared["experts"].routers
    assert sorted(routers) == ["0", "1"]  # one per layer, shared by attn.q and mlp.down
    for router in routers.values():
        torch.nn.init.normal_(router.weight, std=0.5)
    captured = {}
    def grab(module, args, kwargs):
        captured.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = model.model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    with composed.record_gates() as gates, torch.no_grad():
        model(**inputs())
    handle.remove()
    expected = torch.softmax(routers["1"](captured["x"]), -1)
    torch.testing.assert_close(gates["experts@layers.1.attn.q"], expected)
    torch.testing.assert_close(gates["experts@layers.1.mlp.down"], expected)
    assert {id(p) for p in routers.parameters()} <= {id(p) for p in composed.parameters()}


@pytest.mark.parametrize("method, config", [("vera", {"r": 8}), ("adalora", {"init_r": 4, "target_r": 2, "total_step": 10})])
def test_batched_kernel_for_other_low_rank_methods(registry, monkeypatch, method, config):
    model = tiny_llama()
    g = Graph()
    for name in ("a", "b"):
        g.adapter(name, method, targets=["attn.q", "attn.v"], **config)
    g.route({"ka": "a", "kb": "b"})
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    batch = inputs(batch=3)
    with torch.no_grad():
        fast = model(**batch, route=["kb", None, "ka"]).logits
        again = model(**batch, route=["kb", None, "ka"]).logits  # served from the bank's cache or not: same
        monkeypatch.setattr(route_plugin, "lowrank_of", lambda leaf: None)
        slow = model(**batch, route=["kb", None, "ka"]).logits
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert torch.equal(fast, again)
