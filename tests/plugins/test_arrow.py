"""Arrow (plugins/arrow.py): HF PEFT's create_arrow_model on the same experts gives the same
outputs (with and without GenKnowSub); prototypes are the top right singular vectors of ΔW;
the routing formula at a site; caching; composition with route, stack, save/load, generate."""

from __future__ import annotations

import pytest
import torch

import adapter_composer as ac
from adapter_composer.plugins.arrow import ArrowNode, top_right_singular_vector
from adapter_composer.runtime.linear import LinearCall
from tests.models import inputs, output, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _peft_expert(directory, seed, scale=1.0):
    """A PEFT LoRA with random factors whose first rank dominates (so PEFT's 15 power
    iterations converge to the exact singular vector), saved to ``directory``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3 * scale)
                if "lora_A" in name:
                    p[0] *= 6
    peft_model.save_pretrained(directory)
    return directory


def _ours(dirs, general_dirs=(), **options):
    model = tiny_llama()
    g = ac.Graph()
    adapters = {}
    for i, d in enumerate([*dirs, *general_dirs]):
        name = f"e{i}" if i < len(dirs) else f"g{i - len(dirs)}"
        adapters[name] = ac.read_peft(d)
        adapters[name].declare(g, name)
    general = [n for n in adapters if n.startswith("g")]
    g.op("arrow", *adapters, name="arrow", general=general, **options)
    composed = ac.compose(model, g)
    for name, adapter in adapters.items():
        adapter.load_into(composed, name)
    return model, composed


def _arrow_nodes(composed):
    return [m for s in composed.sites().values() for m in s.modules() if isinstance(m, ArrowNode)]


@pytest.mark.parametrize("gks", [False, True])
def test_matches_peft_create_arrow_model(tmp_path, gks):
    from peft import ArrowConfig, create_arrow_model

    experts = [_peft_expert(tmp_path / f"e{i}", seed=i) for i in range(3)]
    general = [_peft_expert(tmp_path / f"g{i}", seed=10 + i, scale=0.2) for i in range(2)] if gks else []
    config = ArrowConfig(top_k=2, router_temperature=0.5, use_gks=gks, rng_seed=3)
    reference_model = create_arrow_model(tiny_llama(), [str(d) for d in experts], config, general_adapter_paths=[str(d) for d in general] or None).eval()
    batch = inputs(batch=3)
    with torch.no_grad():
        reference = reference_model(**batch).logits
    model, composed = _ours(experts, general, top_k=2, temperature=0.5)
    ours = output(model, batch)
    assert (reference - output(tiny_llama(), batch)).abs().max() > 1e-2
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5)
    if gks:  # GenKnowSub is applied virtually: the experts' own weights are unchanged
        for i, d in enumerate(experts):
            saved = ac.read_peft(d).tensors
            handle = composed.adapters[f"e{i}"]
            ours_a = next(v for k, v in handle.state_dict().items() if "layers.0.self_attn.q_proj" in k and k.endswith("lora_A"))
            assert torch.equal(ours_a, saved["model.layers.0.self_attn.q_proj"]["lora_A"])


def test_prototypes_are_top_right_singular_vectors():
    torch.manual_seed(0)
    a, b = torch.randn(4, 64), torch.randn(32, 4)
    v = top_right_singular_vector(a, b)
    _, s, vh = torch.linalg.svd((b @ a).double())
    assert abs(float(v.norm()) - 1) < 1e-12
    assert torch.allclose(v.abs(), vh[0].abs(), atol=1e-10)  # the same vector, up to sign
    assert abs(float(((b @ a).double() @ v).norm() - s[0])) < 1e-9  # ‖ΔW v‖ = σ₁
    assert torch.equal(top_right_singular_vector(a, torch.zeros(32, 4)), torch.zeros(64, dtype=torch.float64))
    assert torch.allclose(top_right_singular_vector(dense=b @ a).abs(), v.abs(), atol=1e-10)


def _three_loras(**options):
    model = tiny_llama()
    g = ac.Graph()
    for name in ("a", "b", "c"):
        g.adapter(name, "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.op("arrow", "a", "b", "c", name="arrow", **options)
    composed = ac.compose(model, g)
    g_ = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for handle in composed.adapters.values():
            for p in handle.parameters():
                p.add_(torch.randn(p.shape, generator=g_) * 0.3)
    return model, composed


@pytest.mark.parametrize("cosine", [False, True])
def test_the_routing_formula_at_a_site(cosine):
    model, composed = _three_loras(top_k=2, temperature=0.7, cosine=cosine)
    site = model.model.layers[1].self_attn.v_proj
    x = torch.randn(2, 5, 64)
    deltas, protos = [], []
    for name in ("a", "b", "c"):
        state = composed.adapters[name].state_dict()
        dw = 2.0 * state["layers.1.attn.v.lora_B"] @ state["layers.1.attn.v.lora_A"]  # s = α/r = 2
        deltas.append(x @ dw.t())
        protos.append(torch.linalg.svd(dw.double())[2][0].float())
    scores = (x @ torch.stack(protos).t()).abs()
    if cosine:
        scores = scores / x.norm(dim=-1, keepdim=True)
    top, index = scores.topk(2, dim=-1)
    gates = torch.zeros_like(scores).scatter(-1, index, (top / 0.7).softmax(-1))
    expected = site.base(x) + sum(gates[..., e : e + 1] * deltas[e] for e in range(3))
    with torch.no_grad():
        torch.testing.assert_close(site(x), expected, rtol=0, atol=1e-5)
    with composed.record_gates() as recorded:
        model(**inputs())
    g = recorded["arrow@layers.1.attn.v"]
    assert g.shape == (2, 9, 3) and torch.equal((g > 0).sum(-1), torch.full((2, 9), 2))


def test_prototypes_are_cached_until_a_weight_changes():
    model, composed = _three_loras(top_k=1)
    batch = inputs()
    out = output(model, batch)
    node = _arrow_nodes(composed)[0]
    cached = node._cache[2]
    output(model, batch)
    assert node._cache[2] is cached  # no recomputation while nothing changed
    state = composed.adapters["b"].state_dict()
    composed.replace_weights("b", {k: torch.randn_like(v) * 0.5 for k, v in state.items()})
    changed = output(model, batch)
    assert node._cache[2] is not cached and not torch.allclose(changed, out)


def test_experts_are_frozen_unless_asked():
    _, frozen = _three_loras()
    assert frozen.parameters() == [] and frozen.trainable_parameters().trainable == 0
    model, trainable = _three_loras(train_experts=True)
    trainable.train()
    batch = inputs(batch=2, length=6)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in trainable.adapters["a"].parameters())


def test_composes_under_route_in_a_stack_saves_loads_and_generates(tmp_path):
    model = tiny_llama()
    g = ac.Graph()
    for name in ("a", "b", "c", "extra"):
        g.adapter(name, "lora", r=4, targets=["attn.q", "attn.v"])
    g.stack(g.op("arrow", "a", "b", "c", top_k=2, name="arrow"), "extra", name="stacked")
    g.route({"zero-shot": "stacked"}, name="tasks")
    composed = ac.compose(model, g)
    with torch.no_grad():
        for handle in composed.adapters.values():
            for p in handle.parameters():
                p.normal_(0, 0.3)
    batch = inputs(batch=2)
    routed = model(**batch, route=["zero-shot", None]).logits
    torch.testing.assert_close(routed[1:], output(tiny_llama(), {k: v[1:] for k, v in batch.items()}), rtol=0, atol=1e-6)
    # the stack adds the extra LoRA to Arrow's output
    site = model.model.layers[0].self_attn.q_proj
    node = next(m for m in site.modules() if isinstance(m, ArrowNode))
    x = torch.randn(1, 4, 64)
    extra = composed.adapters["extra"].state_dict()
    with torch.no_grad():
        model(**inputs(batch=1), route="zero-shot")  # the keys the site below sees
        arrow_only = node.linear_nf(x, LinearCall(site, x)).e
        lora = (x @ extra["layers.0.attn.q.lora_A"].t() @ extra["layers.0.attn.q.lora_B"].t()) * 2.0
        torch.testing.assert_close(site(x), site.base(x) + arrow_only + lora, rtol=0, atol=1e-5)
    composed.save(tmp_path / "c")
    fresh = tiny_llama()
    ac.load(fresh, tmp_path / "c")
    assert torch.equal(fresh(**batch, route=["zero-shot", None]).logits, routed)
    tokens = model.generate(**inputs(batch=2, length=4), route=["zero-shot", "zero-shot"], max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, 7)
    with pytest.raises(ac.CompositionError) as err:
        composed.merge()
    assert set(err.value.codes) == {"merge-not-exact"}


def test_other_delta_methods_route_through_their_folded_update():
    """VeRA experts: prototypes from ΔW = delta_weight, outputs from their own forward."""
    model = tiny_llama()
    g = ac.Graph()
    for name in ("a", "b"):
        g.adapter(name, "vera", r=8, targets=["attn.q"])
    g.op("arrow", "a", "b", top_k=1, name="arrow")
    composed = ac.compose(model, g)
    with torch.no_grad():
        for handle in composed.adapters.values():
            for p in handle.parameters():
                p.normal_(0, 0.5)
    site = model.model.layers[0].self_attn.q_proj
    leaves = {m.adapter: m for m in site.modules() if hasattr(m, "adapter") and hasattr(m, "op")}
    dws = [leaves[n].linear_fold(site).e for n in ("a", "b")]
    x = torch.randn(3, 64)
    scores = torch.stack([(x @ torch.linalg.svd(dw.double())[2][0].float()).abs() for dw in dws], -1)
    pick = scores.argmax(-1)
    with torch.no_grad():
        expected = site.base(x) + torch.stack([x[i] @ dws[int(pick[i])].t() for i in range(3)])
        torch.testing.assert_close(site(x), expected, rtol=0, atol=1e-5)


def test_diagnostics():
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    g.adapter("b", "vera", targets=["attn.q"])
    g.op("arrow", "a", "b", general=["b", "nobody"], name="bad")
    g.op("arrow", "a", general=["a"], name="empty")
    diags = ac.validate(g, model=model)
    assert [(d.code, d.nodes) for d in diags] == [
        ("arrow-general", ("bad", "nobody")),  # not a child
        ("arrow-general", ("bad", "b")),  # GenKnowSub needs LoRA factors, b is VeRA
        ("arrow-general", ("empty",)),  # nothing left to route to
    ]
    g2 = ac.Graph()
    g2.adapter("a", "lora", targets=["attn.q"])
    g2.adapter("b", "lora", targets=["attn.q"])
    g2.op("arrow", g2.mix("a", "b", name="m"), "a", name="outer")
    assert [d.code for d in ac.validate(g2, model=model)] == ["forbidden-nesting"]
    g3 = ac.Graph()
    g3.adapter("s", "ia3", targets=["attn.k"])
    g3.adapter("t", "ia3", targets=["attn.k"])
    g3.op("arrow", "s", "t", name="scales")
    assert "unsupported-operator" in [d.code for d in ac.validate(g3, model=model)]

