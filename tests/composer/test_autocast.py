"""Mixed precision through the adapters: under ``torch.autocast`` an adapter's branch takes
the activations in the autocast's precision (no up-cast copy), outputs stay close to fp32
and gradients still reach the fp32 adapter weights; without autocast, an input of another
dtype is still cast to the adapter's."""

from __future__ import annotations

import pytest
import torch

import adapter_composer as ac
from adapter_composer import Graph
from adapter_composer.plugins.lora import LoRA
from tests.models import randomize, tiny_bert


def _composed(method: str = "lora"):
    model = tiny_bert()
    options = {"r": 4, "alpha": 8, "targets": ["attn.q", "attn.v", "mlp.up", "mlp.down"]} if method == "lora" else {}
    graph = Graph()
    graph.adapter("a", method, **options)
    composed = ac.compose(model, graph)
    randomize(composed, std=0.2, seed=1)
    return model, composed


def _inputs():
    return torch.randint(5, 90, (3, 9), generator=torch.Generator().manual_seed(0))


def test_lora_takes_bf16_activations_under_autocast_and_stays_close_to_fp32(monkeypatch):
    model, composed = _composed()
    model.eval()
    seen = []
    real = LoRA.forward
    monkeypatch.setattr(LoRA, "forward", lambda self, x, site: seen.append(x.dtype) or real(self, x, site))
    arrived = []
    for m in model.modules():
        if type(m).__name__ == "LinearSite":
            m.register_forward_pre_hook(lambda mod, args: arrived.append(args[0].dtype))
    ids = _inputs()
    with torch.no_grad():
        full = model(input_ids=ids).last_hidden_state
        assert set(seen) == {torch.float32}
        seen.clear(), arrived.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(input_ids=ids).last_hidden_state
    # each adapter saw its site's input as it came (layer-norm outputs fp32, the GELU's
    # output bf16 at mlp.down): nothing was up-cast
    assert seen == arrived and torch.bfloat16 in seen
    err = (half.float() - full).abs().max().item()
    assert err < 0.05 * full.abs().max().item()
    # and the adapters matter at this precision (not lost in the rounding)
    with torch.no_grad(), composed.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids).last_hidden_state
    assert (plain.float() - half.float()).abs().max().item() > 10 * err


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_gradients_under_autocast_reach_the_fp32_adapter_weights(method):
    model, composed = _composed(method)
    model.eval()  # no dropout: both passes see the same function
    ids = _inputs()
    probe = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a loss with real gradients (a layer-normed output's
        loss = (model(input_ids=ids).last_hidden_state.float() @ probe).square().mean()  # norm is constant)
    loss.backward()
    grads = [p.grad for p in composed.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in composed.parameters())
    # the fp32 gradient, to bf16 accuracy
    for p in composed.parameters():
        p.grad = None
    loss32 = (model(input_ids=ids).last_hidden_state @ probe).square().mean()
    loss32.backward()
    ref = [p.grad for p in composed.parameters() if p.requires_grad]
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref]), dim=0)
    assert cos > 0.98


def test_without_autocast_an_input_of_another_dtype_is_cast_to_the_adapter():
    model, composed = _composed()
    site = next(m for m in model.modules() if type(m).__name__ == "LinearSite")
    x = torch.randn(2, 5, site.base.in_features)
    with torch.no_grad():
        full = site(x)
        site.base.to(torch.bfloat16)
        out = site(x.bfloat16())  # bf16 base, fp32 LoRA: the branch runs in fp32
    assert out.dtype == torch.bfloat16
    assert (out.float() - full).abs().max().item() < 0.05 * full.abs().max().item()
