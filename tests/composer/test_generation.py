"""generate() and padding: prefix tuning without a KV cache, per-sequence gates over real
tokens only, and route keys expanded for beams and returned sequences."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import adapter_composer as ac
from adapter_composer import Graph
from tests.models import inputs, randomize, tiny_llama_scaled

# the std-0.1 Llama: its logits spread enough that greedy tokens have no near-ties to flip
STEPS = 4
GEN = dict(max_new_tokens=STEPS, pad_token_id=0)


def _alone(composed, name, registry):
    """A fresh model composed with adapter ``name`` only, holding the same weights."""
    model = tiny_llama_scaled()
    spec = composed.graph.spec(name)
    g = Graph()
    g.adapter(name, spec.method, targets=None if spec.targets is None else list(spec.targets), **spec.config)
    single = ac.compose(model, g, registry=registry)
    single.adapters[name].load_tensors(composed.adapters[name].state_dict())
    return model


# --- prefix tuning with use_cache=False ----------------------------------------------------


@torch.no_grad()
def _prefix_greedy(values: torch.Tensor, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding on the plain model, recomputing everything each step with the prefix
    P [n, L, 2, H_kv, hd] as a fresh past (the formula; no cache carried between steps)."""
    model = tiny_llama_scaled()
    seq = ids
    for _ in range(steps):
        cache = DynamicCache(config=model.config)
        for layer in range(values.shape[1]):
            cache.update(values[:, layer, 0].transpose(0, 1)[None], values[:, layer, 1].transpose(0, 1)[None], layer)
        mask = torch.ones(1, values.shape[0] + seq.shape[1], dtype=torch.long)
        logits = model(input_ids=seq, attention_mask=mask, past_key_values=cache).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    return seq


def _prefixed(registry, n: int = 4):
    model = tiny_llama_scaled()
    g = Graph()
    g.adapter("p", "prefix_tuning", num_virtual_tokens=n)
    composed = ac.compose(model, g, registry=registry)
    with torch.no_grad():
        composed.adapters["p"].modules["model"].prefix.mul_(3.0)  # a prefix that changes the tokens
    return model, composed


def test_prefix_generate_without_cache_equals_the_formula(registry):
    model, composed = _prefixed(registry)
    ids = inputs(batch=1, length=5, seed=3)["input_ids"]
    values = composed.adapters["p"].modules["model"]().detach()
    expected = _prefix_greedy(values, ids, STEPS)
    for use_cache in (True, False):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=use_cache, **GEN)
        assert torch.equal(out, expected), f"use_cache={use_cache}"
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert plain.get("cache") is None and plain.get("past_key_values") is None  # as the plain model returns


def test_routed_batch_with_a_prefix_row_generates_without_cache(registry):
    model = tiny_llama_scaled()
    g = Graph()
    g.adapter("p", "prefix_tuning", num_virtual_tokens=4)
    g.adapter("l", "lora", r=4, targets=["attn.q", "attn.v"])
    g.route({"kp": "p", "kl": "l"}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    ids = inputs(batch=3, length=5, seed=4)["input_ids"]
    keys = ["kl", "kp", None]
    references = []
    for row, name in enumerate(["l", "p", None]):
        alone = tiny_llama_scaled() if name is None else _alone(composed, name, registry)
        one = ids[row : row + 1]
        references.append(alone.generate(input_ids=one, attention_mask=torch.ones_like(one), do_sample=False, **GEN))
    for use_cache in (True, False):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=use_cache, route=keys, **GEN)
        for row in range(3):
            assert torch.equal(out[row : row + 1], references[row]), f"row {row}, use_cache={use_cache}"


# --- per-sequence gates pool over real tokens ----------------------------------------------


def _sequence_mix(registry):
    model = tiny_llama_scaled()
    g = Graph()
    for i in range(3):
        g.adapter(f"e{i}", "lora", r=4, targets=["attn.q", "attn.v", "mlp.down"])
    g.mix("e0", "e1", "e2", name="experts", granularity="sequence", aux_loss_weight=1.0)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.5, seed=2)
    return model, composed


def test_padding_changes_neither_sequence_gates_nor_outputs(registry):
    model, composed = _sequence_mix(registry)
    sentence = inputs(batch=1, length=6, seed=5)["input_ids"]
    results = []
    for pad in (0, 2, 5):  # right padding: real tokens keep their positions
        ids = torch.cat([sentence, torch.zeros(1, pad, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, pad, dtype=torch.long)], 1)
        with composed.record_gates() as gates, torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :6]
        results.append((logits, gates["experts@layers.0.attn.q"], composed.aux_loss()))
    for logits, gates, loss in results[1:]:
        torch.testing.assert_close(logits, results[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(gates, results[0][1], rtol=0, atol=1e-6)
        torch.testing.assert_close(loss, results[0][2], rtol=0, atol=1e-6)


def test_pooled_gate_is_the_mean_over_real_tokens(registry):
    """The formula at the first site: g = softmax(router(Σ m_t x_t / Σ m_t)), x the site input."""
    model, composed = _sequence_mix(registry)
    ids = inputs(batch=2, length=7, seed=6)["input_ids"]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    seen = {}
    site = model.model.layers[0].self_attn.q_proj
    handle = site.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with composed.record_gates() as gates, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    x = seen["x"]
    router = next(n for n in site.modules() if type(n).__name__ == "MixNode").router
    for row, n in enumerate([7, 3]):
        pooled = x[row, :n].mean(0)
        expected = torch.softmax(router(pooled), -1)
        torch.testing.assert_close(gates["experts@layers.0.attn.q"][row, 0], expected, rtol=0, atol=1e-6)


def test_batched_generate_equals_per_row_generate(registry):
    model, composed = _sequence_mix(registry)
    with torch.no_grad():  # decisive gates: a gate computed over padding picks other experts
        for node in (n for s in composed.sites().values() for n in s.modules() if type(n).__name__ == "MixNode"):
            node.router.weight.mul_(20.0)
    rows = [inputs(batch=1, length=n, seed=7 + n)["input_ids"][0] for n in (8, 2)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])  # left padding
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows])
    batched = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **GEN)
    for i, r in enumerate(rows):
        one = model.generate(input_ids=r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), do_sample=False, **GEN)
        assert torch.equal(batched[i, width:], one[0, len(r) :]), f"row {i}"


# --- route keys for beams and returned sequences -------------------------------------------


def _routed(registry):
    model = tiny_llama_scaled()
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.q", "attn.v", "mlp.down"])
    g.adapter("b", "lora", r=2, targets=["attn.q", "attn.v"])
    g.route({"ka": "a", "kb": "b"}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.4)
    return model, composed


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=3, do_sample=False),
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, top_k=1, num_return_sequences=2),  # top-1 sampling: greedy, twice per row
    ],
)
@pytest.mark.parametrize("how", ["keyword", "context"])
def test_route_keys_expand_for_beams_and_returned_sequences(registry, options, how):
    model, composed = _routed(registry)
    ids = inputs(batch=3, length=5, seed=8)["input_ids"]
    mask = torch.ones_like(ids)
    keys = ["kb", None, "ka"]
    if how == "keyword":
        out = model.generate(input_ids=ids, attention_mask=mask, route=keys, **options, **GEN)
    else:
        with composed.routing(keys):
            out = model.generate(input_ids=ids, attention_mask=mask, **options, **GEN)
    per_row = options.get("num_return_sequences", 1)
    assert out.shape[0] == 3 * per_row
    for row, name in enumerate(["b", None, "a"]):
        alone = tiny_llama_scaled() if name is None else _alone(composed, name, registry)
        one = ids[row : row + 1]
        expected = alone.generate(input_ids=one, attention_mask=torch.ones_like(one), **options, **GEN)
        assert torch.equal(out[row * per_row : (row + 1) * per_row], expected), f"row {row}"


def test_plain_forward_still_refuses_a_wrong_number_of_keys(registry):
    model, composed = _routed(registry)
    batch = inputs(batch=4)
    with pytest.raises(ac.RoutingError, match="2 keys for a batch of 4 rows"):
        model(**batch, route=["ka", "kb"])


def test_encoder_decoder_generate_routes_its_encoder_run(registry):
    """generate() runs a T5's encoder outside the model's forward; that run gets the keys too,
    in a fresh thread and after an unrelated call alike."""
    import threading

    from tests.models import tiny_t5

    targets = ["attn.q", "attn.v", "xattn.q", "xattn.v", "mlp.down"]
    model = tiny_t5(decoder_layers=2)
    g = Graph()
    for name in ("a", "b"):
        g.adapter(name, "lora", r=4, targets=targets)
    g.route({"ka": "a", "kb": "b"}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.5)
    ids = inputs(batch=3, length=6, seed=9)["input_ids"]
    keys = ["kb", None, "ka"]
    options = dict(num_beams=2, max_new_tokens=4, do_sample=False)
    expected = []
    for row, name in enumerate(["b", None, "a"]):
        alone = tiny_t5(decoder_layers=2)
        if name is not None:
            single = Graph()
            single.adapter(name, "lora", r=4, targets=targets)
            ac.compose(alone, single, registry=registry).adapters[name].load_tensors(composed.adapters[name].state_dict())
        one = ids[row : row + 1]
        expected.append(alone.generate(input_ids=one, attention_mask=torch.ones_like(one), **options))
    results = {}

    def run(where):
        results[where] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), route=keys, **options)

    thread = threading.Thread(target=run, args=("thread",))
    thread.start()
    thread.join()
    with torch.no_grad():
        model(**inputs(batch=3, length=6, seed=1), decoder_input_ids=ids[:, :2], route=["ka", "ka", "ka"])
    run("after a call")
    for where, out in results.items():
        for row in range(3):
            got = out[row : row + 1]
            want = expected[row]
            assert torch.equal(got[:, : want.shape[1]], want) and bool((got[:, want.shape[1] :] == 0).all()), f"{where}, row {row}"
