"""Gradient checkpointing and torch.compile with compositions."""

from __future__ import annotations

import torch

import adapter_composer as ac
from adapter_composer import Graph
from tests.models import inputs, randomize, tiny_llama


def _routed(registry):
    model = tiny_llama()
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.q", "attn.v", "mlp.down"])
    g.adapter("b", "lora", r=2, dora=True, targets=["attn.q", "mlp.up"])
    g.route({"ka": "a", "kb": "b"})
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.2)
    return model, composed


def test_gradient_checkpointing_gives_the_same_gradients(registry):
    batch = inputs(batch=2, length=10)
    grads = []
    for checkpointing in (False, True):
        model, composed = _routed(registry)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        composed.train()
        model(**batch, labels=batch["input_ids"], route=["kb", "ka"]).loss.backward()
        grads.append({id_: p.grad.clone() for id_, p in enumerate(composed.parameters())})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_torch_compile_matches_eager(registry):
    model, composed = _routed(registry)
    batch = inputs(batch=2, length=8)
    with torch.no_grad():
        eager = model(**batch, route=["ka", "kb"]).logits
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(**batch, route=["ka", "kb"]).logits
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
