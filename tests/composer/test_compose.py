"""compose → plan → apply, merge, undo, training mode and parameter tables."""

from __future__ import annotations

import json

import pytest
import torch

import adapter_composer as ac
from adapter_composer import ComposerError, Graph
from adapter_composer.runtime.linear import LinearSite
from tests.models import (
    BUILDERS,
    inputs,
    output,
    randomize,
    same_state,
    state_copy,
    tiny_gpt2,
    tiny_llama,
)


def _two_loras() -> Graph:
    g = Graph()
    g.adapter("sst2", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.adapter("mrpc", "lora", r=2, alpha=4, targets=["attn.v", "mlp.down"], dora=True)
    return g


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_identity_at_init_and_exact_undo(arch, registry):
    model = BUILDERS[arch]()
    batch = inputs()
    before, state = output(model, batch), state_copy(model)
    modules = dict(model.named_modules())
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.q", "attn.v", "attn.o", "mlp.down"])
    composed = ac.compose(model, g, registry=registry)
    assert composed.model is model
    assert torch.equal(output(model, batch), before)
    randomize(composed)
    assert not torch.allclose(output(model, batch), before)
    composed.undo()
    assert same_state(model, state)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert torch.equal(output(model, batch), before)


def test_plan_is_frozen_json_and_explained(registry):
    model = tiny_llama()
    composed = ac.compose(model, _two_loras(), registry=registry)
    plan = composed.plan
    assert [s.path for s in plan.sites] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    ]
    v = plan.site("model.layers.0.self_attn.v_proj")
    assert v.program.render() == "+(sst2:lora, mrpc:lora)" and (v.in_features, v.out_features) == (
        64,
        32,
    )
    with pytest.raises(AttributeError):
        plan.sites = ()  # frozen
    data = json.loads(plan.to_json())
    assert data["adapters"][1]["config"]["dora"] is True and len(data["sites"]) == 6
    text = plan.explain()
    assert (
        "model.layers.1.mlp.down_proj" in text and "mrpc: lora (r=2, alpha=4.0, dora=True" in text
    )
    assert ac.plan(tiny_llama(), _two_loras(), registry=registry).to_dict() == plan.to_dict()


def test_plan_stage_does_not_touch_the_model(registry):
    model = tiny_llama()
    before = state_copy(model)
    ac.plan(model, _two_loras(), registry=registry)
    assert same_state(model, before) and not any(isinstance(m, LinearSite) for m in model.modules())


def test_merge_matches_unmerged_and_unmerge_is_exact(registry):
    model = tiny_llama()
    batch = inputs()
    base = state_copy(model)
    composed = ac.compose(model, _two_loras(), registry=registry)
    randomize(composed)
    out = output(model, batch)
    composed.merge()
    assert composed.merged
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-5)
    composed.unmerge()
    assert torch.equal(output(model, batch), out)
    composed.merge()
    composed.undo()  # undo unmerges first
    assert same_state(model, base)


def test_merge_and_unload_returns_a_plain_model(registry):
    model = tiny_gpt2()
    batch = inputs()
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.qkv", "mlp.up"])
    g.adapter("b", "lora", r=4, targets=["attn.q", "attn.v"], dora=True)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    out = output(model, batch)
    plain = composed.merge_and_unload()
    assert plain is model and not any(isinstance(m, LinearSite) for m in model.modules())
    assert "adapter_composer" not in dict(model.named_modules())
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-5)
    assert not composed.active


def test_composing_twice_is_refused(registry):
    model = tiny_llama()
    ac.compose(model, _two_loras(), registry=registry)
    with pytest.raises(ComposerError, match="already has a composition"):
        ac.compose(model, _two_loras(), registry=registry)


def test_training_changes_only_adapters_and_lowers_the_loss(registry):
    model = tiny_llama()
    base = state_copy(model)
    composed = ac.compose(model, _two_loras(), registry=registry)
    assert all(
        not p.requires_grad for n, p in model.named_parameters() if ".base." in n or "embed" in n
    )
    opt = torch.optim.AdamW(composed.parameters(), lr=3e-2)
    composed.train()
    assert model.training
    batch = inputs(batch=2, length=12, seed=3)
    losses = []
    for _ in range(25):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]
    composed.eval()
    assert not model.training
    composed.undo()
    assert same_state(model, base)


def test_trainable_parameter_table(registry):
    model = tiny_llama()
    composed = ac.compose(model, _two_loras(), registry=registry)
    report = composed.trainable_parameters()
    d, kv, ff, L = 64, 32, 96, 2
    sst2 = L * (4 * (d + d) + 4 * (d + kv))
    mrpc = L * (2 * (d + kv) + kv + 2 * (ff + d) + d)  # DoRA adds a magnitude per output row
    assert report.per_adapter == {"sst2": sst2, "mrpc": mrpc}
    assert report.trainable == sst2 + mrpc
    assert report.base == sum(p.numel() for p in tiny_llama().parameters())
    text = str(report)
    assert "adapter sst2" in text and f"{sst2:,}" in text and "trainable total" in text


def test_per_role_rank_and_alpha_overrides(registry):
    model = tiny_llama()
    g = Graph()
    g.adapter(
        "a",
        "lora",
        r=4,
        alpha=8,
        targets=["attn.q", "attn.v"],
        rank_pattern={"attn.v": 2},
        alpha_pattern={"q_proj": 3},
    )
    composed = ac.compose(model, g, registry=registry)
    mods = composed.adapters["a"].modules
    assert (
        mods["layers.0.attn.q"].lora_A.shape == (4, 64) and mods["layers.0.attn.q"].scale == 3 / 4
    )
    assert (
        mods["layers.1.attn.v"].lora_A.shape == (2, 64) and mods["layers.1.attn.v"].scale == 8 / 2
    )


def test_gpt2_role_slices_touch_only_their_part(registry):
    model = tiny_gpt2()
    x = torch.randn(2, 5, 64)
    c_attn = model.transformer.h[0].attn.c_attn
    before = c_attn(x)
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.v"], layers=[0])
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    after = model.transformer.h[0].attn.c_attn(x)
    assert torch.equal(after[..., :128], before[..., :128])
    lora = composed.adapters["a"].modules["layers.0.attn.v"]
    expected = before[..., 128:] + x @ (lora.lora_B @ lora.lora_A).T * lora.scale
    torch.testing.assert_close(after[..., 128:], expected, rtol=0, atol=1e-5)


def test_sum_weights_scale_each_delta(registry):
    model = tiny_llama()
    x = torch.randn(2, 3, 64)
    q = model.model.layers[0].self_attn.q_proj
    base = q(x)
    g = Graph()
    g.adapter("a", "lora", r=2, targets=["attn.q"])
    g.adapter("b", "lora", r=3, targets=["attn.q"])
    g.sum("a", "b", weights=[0.25, -1.5])
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    a, b = (composed.adapters[n].modules["layers.0.attn.q"] for n in "ab")
    delta = lambda m: x @ (m.lora_B @ m.lora_A).T * m.scale  # noqa: E731
    expected = base + 0.25 * delta(a) - 1.5 * delta(b)
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj(x), expected, rtol=0, atol=1e-5
    )


def test_param_groups_default_and_loraplus(registry):
    from adapter_composer.plugins.lora import loraplus_param_groups

    model = tiny_llama()
    g = Graph()
    g.adapter("plus", "lora", r=4, targets=["attn.q"], loraplus_ratio=8)
    g.adapter("plain", "lora", r=4, targets=["attn.v"])
    composed = ac.compose(model, g, registry=registry)
    groups = composed.param_groups(lr=1e-3)
    by_lr = {}
    for group in groups:
        by_lr.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    bs = {id(m.lora_B) for m in composed.adapters["plus"].modules.values()}
    assert by_lr[8e-3] == bs
    assert sum(len(gr["params"]) for gr in groups) == len(composed.parameters())
    helper = loraplus_param_groups(composed, lr=1e-3, ratio=16)
    assert {id(p) for gr in helper if gr["lr"] == 16e-3 for p in gr["params"]} == {
        id(m.lora_B) for h in composed.adapters.values() for m in h.modules.values()
    }
    torch.optim.AdamW(groups)  # the groups are accepted as they are


def test_dropout_is_active_only_in_training(registry):
    model = tiny_llama()
    batch = inputs()
    g = Graph()
    g.adapter("a", "lora", r=4, dropout=0.5, targets=["attn.q"])
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    eval_out = output(model, batch)
    assert torch.equal(output(model, batch), eval_out)
    composed.train()
    torch.manual_seed(0)
    train_out = output(model, batch)
    assert not torch.allclose(train_out, eval_out)
