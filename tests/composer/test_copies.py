"""Copies of a composed model: ``copy.deepcopy`` gives an independent, fully working
composition (forward, generate with route=, save, hot swap, undo), the registry is shared,
and pickling is refused with the library's error (loading a pickle would run code)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import adapter_composer as ac
from adapter_composer import ComposerError, Graph
from adapter_composer.live.hf import composition_dir
from tests.models import inputs, output, randomize, same_state, state_copy, tiny_llama


def _routed(registry):
    model = tiny_llama()
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.q", "attn.v"])
    g.adapter("b", "lora", r=2, targets=["attn.q", "mlp.down"])
    g.adapter("p", "prefix_tuning", num_virtual_tokens=3)
    g.route({"ka": "a", "kb": "b", "kp": "p"}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


KEYS = ["ka", "kp", "kb"]


def _generate(model, ids, **kwargs):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs)


def _greedy(model, ids, steps, keys):
    """Greedy decoding by full forward passes (no cache): an independent reference for generate."""
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False, route=keys).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    return seq


def test_deepcopy_of_the_model_is_an_independent_composition(registry, tmp_path):
    model, composed = _routed(registry)
    batch = inputs(batch=3)
    ids = inputs(batch=3, length=5, seed=2)["input_ids"]
    before = state_copy(model)
    logits = output_routed = model(**batch, route=KEYS).logits.detach()
    tokens = _generate(model, ids, route=KEYS)

    twin = copy.deepcopy(model)
    assert torch.equal(twin(**batch, route=KEYS).logits, logits)
    assert torch.equal(_generate(twin, ids, route=KEYS), tokens)
    copied = ac.Composed.of(twin)
    assert copied is not composed and copied.model is twin and ac.Composed.of(model) is composed

    # the copy's weights are its own: changing them changes the copy's generate only
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(3.0)
    changed = _generate(twin, ids, route=KEYS)
    assert torch.equal(changed, _greedy(twin, ids, 4, KEYS))
    assert not torch.equal(changed, tokens)
    assert torch.equal(_generate(model, ids, route=KEYS), tokens) and same_state(model, before)
    with copied.routing(KEYS):
        assert torch.equal(_generate(twin, ids), changed)

    # save (ours and transformers' save_pretrained), hot swap and undo on the copy leave the original untouched
    twin.save_pretrained(tmp_path / "hf")
    from_hf = tiny_llama()
    ac.load(from_hf, composition_dir(tmp_path / "hf"), registry=registry)
    assert torch.equal(from_hf(**batch, route=KEYS).logits, twin(**batch, route=KEYS).logits)
    copied.save(tmp_path / "copy")
    reloaded_model = tiny_llama()
    reloaded = ac.load(reloaded_model, tmp_path / "copy", registry=registry)
    assert torch.equal(reloaded_model(**batch, route=KEYS).logits, twin(**batch, route=KEYS).logits)
    copied.remove_adapter("b")
    assert "b" in composed.adapters and "b" not in copied.adapters
    copied.undo()
    with torch.no_grad():
        assert torch.equal(output(twin, batch), output(tiny_llama(), batch))
    assert torch.equal(model(**batch, route=KEYS).logits, output_routed)
    assert torch.equal(_generate(model, ids, route=KEYS), tokens)
    reloaded.undo()
    composed.undo()
    assert same_state(model, state_copy(tiny_llama()))


def test_deepcopy_of_the_handle_shares_the_registry_only(registry):
    model, composed = _routed(registry)
    batch = inputs(batch=3)
    logits = model(**batch, route=KEYS).logits.detach()
    twin = copy.deepcopy(composed)
    assert twin.registry is composed.registry
    assert twin.model is not model and ac.Composed.of(twin.model) is twin
    assert torch.equal(twin.model(**batch, route=KEYS).logits, logits)
    assert {id(p) for p in twin.parameters()}.isdisjoint(id(p) for p in composed.parameters())
    twin.add_adapter("c", "lora", route="tasks", key="kc", r=2, targets=["attn.q"])
    assert "c" not in composed.adapters
    with pytest.raises(ac.RoutingError, match="unknown route keys"):
        model(**batch, route=["kc", None, None])
    twin.undo()
    assert torch.equal(model(**batch, route=KEYS).logits, logits)


def test_copies_keep_their_own_call_state(registry):
    """A copy's calls do not touch the original's balancing loss (separate per-call state)."""
    model = tiny_llama()
    g = Graph()
    for name in ("e0", "e1"):
        g.adapter(name, "lora", r=2, targets=["attn.q"])
    g.mix("e0", "e1", name="experts", top_k=1)  # top-1: the loss depends on the inputs
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.5)
    model(**inputs(seed=1))
    loss = composed.aux_loss()
    twin = copy.deepcopy(composed)
    twin.model(**inputs(seed=2, batch=4))
    assert torch.equal(composed.aux_loss(), loss)
    twin_loss = twin.aux_loss()
    assert not torch.equal(twin_loss, loss)
    model(**inputs(seed=2, batch=4))
    assert torch.equal(composed.aux_loss(), twin_loss)


def test_pickling_is_refused_with_the_librarys_error(registry):
    model, composed = _routed(registry)
    for target in (model, composed, model.model.layers[0]):
        with pytest.raises(ComposerError, match="cannot be pickled.*composed.save"):
            torch.save(target, io.BytesIO())
        with pytest.raises(ComposerError, match="never unpickles"):
            pickle.dumps(target)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # tensors only: fine (and torch.load(weights_only=True) reads it)
    buffer.seek(0)
    assert set(torch.load(buffer, weights_only=True)) == set(model.state_dict())
    composed.undo()
    torch.save(model, io.BytesIO())  # the plain model pickles as before
