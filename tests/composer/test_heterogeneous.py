"""A heterogeneous stack (prefix + LoRA + IA3 + bottleneck) in one model: trains jointly,
saves and loads as one artifact, undoes exactly."""

from __future__ import annotations

import torch

import adapter_composer as ac
from adapter_composer import Graph
from tests.models import inputs, output, randomize, same_state, state_copy, tiny_llama


def _graph() -> Graph:
    g = Graph()
    g.adapter("prefix", "prefix_tuning", num_virtual_tokens=3)
    g.adapter("lora", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.adapter("ia3", "ia3", targets=["attn.k", "attn.v", "mlp.down"])
    g.adapter("adapter", "bottleneck", style="houlsby", targets=["attn", "mlp"], bottleneck=8)
    g.stack("prefix", "lora", "ia3", "adapter", name="all")
    return g


def test_heterogeneous_stack_trains_saves_loads_and_undoes(registry, tmp_path):
    model = tiny_llama()
    base = state_copy(model)
    composed = ac.compose(model, _graph(), registry=registry)
    v = composed.plan.site("model.layers.0.self_attn.v_proj").program.render()
    assert v == "stack(lora:lora, ia3:ia3)"  # ordered: (W x + s B A x) ⊙ l
    before = {n: {k: t.clone() for k, t in h.state_dict().items()} for n, h in composed.adapters.items()}
    opt = torch.optim.AdamW(composed.param_groups(lr=1e-2))
    composed.train()
    batch = inputs(batch=2, length=12, seed=9)
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    composed.eval()
    assert losses[-1] < losses[0]
    for name, handle in composed.adapters.items():
        now = handle.state_dict()
        assert any(not torch.equal(before[name][k], now[k]) for k in now), f"{name} did not train"
    out = output(model, inputs())
    composed.save(tmp_path / "all")
    names = sorted(p.name.split(".")[1] for p in (tmp_path / "all").iterdir() if p.suffix == ".safetensors")
    assert names == ["adapter", "ia3", "lora", "prefix"]  # adapter.<name>.<token>.safetensors
    fresh = tiny_llama()
    ac.load(fresh, tmp_path / "all", registry=registry)
    assert torch.equal(output(fresh, inputs()), out)
    composed.undo()
    assert same_state(model, base)


def test_ia3_and_lora_on_one_site_need_an_order(registry):
    g = Graph()
    g.adapter("scale", "ia3", targets=["attn.k"])
    g.adapter("delta", "lora", targets=["attn.k"])
    diags = ac.validate(g, registry, tiny_llama())
    assert [d.code for d in diags] == ["no-declared-order"]
    assert "'scale' and 'delta'" in diags[0].message and "g.stack('scale', 'delta')" in diags[0].fix


def test_stack_order_of_scale_and_delta_matters(registry):
    outs = []
    for order in (("scale", "delta"), ("delta", "scale")):
        model = tiny_llama()
        g = Graph()
        g.adapter("scale", "ia3", targets=["attn.k"])
        g.adapter("delta", "lora", targets=["attn.k"])
        g.stack(*order)
        composed = ac.compose(model, g, registry=registry)
        randomize(composed, std=0.3, seed=1)
        outs.append(output(model, inputs()))
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)
