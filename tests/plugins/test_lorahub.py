"""LoraHub (plugins/lorahub.py): the paper's parameter-space composition against a dense
formula, the search's contract (budget, start, bounds, L1 term, determinism), and a tiny task
where the searched weights clearly beat the uniform sum on held-out examples."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adapter_composer as ac
from adapter_composer.plugins import lorahub
from adapter_composer.runtime import CONTAINER_ATTR
from tests.models import inputs, output, tiny_llama

EXPERTS = ("a", "b", "c", "d")


def _library(operator: str, seed: int = 0, **options):
    """A tiny model with four random LoRA experts (the same for every seed) under one node."""
    model = tiny_llama()
    g = ac.Graph()
    for name in EXPERTS:
        g.adapter(name, "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.op(operator, *EXPERTS, name="hub", **options)
    composed = ac.compose(model, g)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in EXPERTS:
            for p in composed.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
    return model, composed.eval()


def _weights(composed):
    return getattr(composed.model, CONTAINER_ATTR).operators["hub"].weights


def test_the_composition_is_the_papers_and_merges_exactly(tmp_path):
    model, composed = _library("lorahub")
    batch = inputs()
    assert torch.equal(output(model, batch), output(tiny_llama(), batch))  # w = 0: the base model
    w = [0.7, -0.3, 0.5, 0.0]
    _weights(composed).copy_(torch.tensor(w))
    site = model.model.layers[1].self_attn.v_proj
    states = [composed.adapters[n].state_dict() for n in EXPERTS]
    a = sum(wi * s["layers.1.attn.v.lora_A"] for wi, s in zip(w, states, strict=True))
    b = sum(wi * s["layers.1.attn.v.lora_B"] for wi, s in zip(w, states, strict=True))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(site(x), site.base(x) + 2.0 * (x @ a.t()) @ b.t(), rtol=0, atol=1e-5)
    out = output(model, batch)
    composed.merge()
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-5)
    composed.unmerge()
    composed.save(tmp_path / "c")
    fresh = tiny_llama()
    loaded = ac.load(fresh, tmp_path / "c")
    assert torch.equal(_weights(loaded), torch.tensor(w)) and torch.equal(output(fresh, batch), out)


def _teacher_task():
    """The unseen task: the experts composed at w* = (0.9, 0, −0.6, 0); examples are the
    teacher's next-token distributions. Five examples to search on, twenty held out."""
    teacher, _ = _library("lorahub", weights=[0.9, 0.0, -0.6, 0.0])
    few, held = inputs(batch=5, length=8, seed=3), inputs(batch=20, length=8, seed=4)
    return output(teacher, few), output(teacher, held), few, held


def _kl(model, batch, target) -> float:
    with torch.no_grad():
        logits = model(**batch).logits
    return float(F.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean"))


def test_search_beats_the_uniform_sum_on_held_out_examples():
    t_few, t_held, few, held = _teacher_task()
    uniform, _ = _library("sum", weights=[0.25] * 4)
    model, composed = _library("lorahub")
    result = lorahub.search(composed, "hub", lambda: _kl(model, few, t_few), budget=40, seed=0)
    searched, baseline = _kl(model, held, t_held), _kl(uniform, held, t_held)
    assert result.evaluations == 40 and result.loss < result.history[0]
    assert searched < 0.25 * baseline, (searched, baseline, result.weights)
    assert torch.equal(_weights(composed), torch.tensor(result.weights))


def test_the_search_contract():
    t_few, _, few, _ = _teacher_task()
    model, composed = _library("lorahub")
    seen = []

    def loss():
        seen.append(_weights(composed).tolist())
        return _kl(model, few, t_few)

    numpy_state = np.random.get_state()[1].copy()
    result = lorahub.search(composed, "hub", loss, budget=17, l1=0.1, bounds=(-1.0, 1.0), seed=5)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # numpy's global RNG untouched
    assert len(seen) == result.evaluations == len(result.history) == 17
    assert seen[0] == [0.0] * 4  # the paper's start, evaluated first
    assert all(-1.0 <= v <= 1.0 for w in seen for v in w)
    best = int(np.argmin(result.history))
    assert result.objective == result.history[best] == min(result.history)
    assert list(result.weights) == seen[best]
    assert abs(result.objective - result.loss - 0.1 * np.mean(np.abs(seen[best]))) < 1e-9
    _weights(composed).zero_()
    seen.clear()
    again = lorahub.search(composed, "hub", loss, budget=17, l1=0.1, bounds=(-1.0, 1.0), seed=5)
    assert again.history == result.history  # deterministic for a seed


def test_search_tunes_a_sum_node_too():
    t_few, t_held, few, held = _teacher_task()
    model, composed = _library("sum", weights=[0.25] * 4)
    start = _kl(model, held, t_held)
    result = lorahub.search(composed, "hub", lambda: _kl(model, few, t_few), budget=24, init=[0.25] * 4)
    assert result.evaluations == 24 and result.objective <= result.history[0]
    assert _kl(model, held, t_held) < start


def test_errors_name_what_is_wrong(monkeypatch):
    model, composed = _library("lorahub")
    with pytest.raises(ac.ComposerError, match=r"'nope' is not a node with composition weights.*\['hub'\]"):
        lorahub.search(composed, "nope", lambda: 0.0)
    with pytest.raises(ac.ComposerError, match="init must hold 4 weights"):
        lorahub.search(composed, "hub", lambda: 0.0, init=[0.0, 2.0, 0.0, 0.0])
    _weights(composed).copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ac.ComposerError, match="returned nan"):
        lorahub.search(composed, "hub", lambda: float("nan"))
    assert _weights(composed).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])  # restored
    monkeypatch.setitem(sys.modules, "cma", None)
    with pytest.raises(ac.ComposerError, match=r"pip install 'adapter-composer\[lorahub\]'"):
        lorahub.search(composed, "hub", lambda: 0.0)


def test_diagnostics():
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    g.adapter("b", "vera", targets=["attn.q"])
    g.adapter("c", "lora", dora=True, targets=["attn.q"])
    g.op("lorahub", "a", "b", name="mixed")
    g.op("lorahub", "a", "c", name="dora")
    g.op("lorahub", "a", "c", weights=[1.0], name="count")
    diags = ac.validate(g, model=model)
    assert sorted(d.code for d in diags) == ["bad-options", "param-mix-children", "param-mix-children", "param-mix-children"]
    assert any("magnitude" in d.message for d in diags)
    with pytest.raises(ac.ComposerError, match="same shapes and settings"):
        g2 = ac.Graph()
        g2.adapter("x", "lora", r=4, targets=["attn.q"])
        g2.adapter("y", "lora", r=8, targets=["attn.q"])
        g2.op("lorahub", "x", "y", name="ranks")
        ac.compose(tiny_llama(), g2)


def test_other_methods_mix_in_parameter_space_safely_from_several_threads():
    """VeRA experts take the generic path (their own forward on mixed parameters, through a
    private copy of the first expert): concurrent calls give the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_llama()
    g = ac.Graph()
    for name in ("a", "b"):
        g.adapter(name, "vera", r=8, targets=["attn.q", "attn.v"])
    g.op("lorahub", "a", "b", weights=[0.8, -0.5], name="hub")
    composed = ac.compose(model, g).eval()
    with torch.no_grad():
        for p in composed.parameters():
            p.normal_(0, 0.5)
    site = model.model.layers[0].self_attn.q_proj
    states = [composed.adapters[n].state_dict() for n in ("a", "b")]
    lam_b = 0.8 * states[0]["layers.0.attn.q.lambda_b"] - 0.5 * states[1]["layers.0.attn.q.lambda_b"]
    lam_d = 0.8 * states[0]["layers.0.attn.q.lambda_d"] - 0.5 * states[1]["layers.0.attn.q.lambda_d"]
    leaf = next(m for m in site.modules() if getattr(m, "adapter", None) == "a" and hasattr(m, "op"))
    a_shared, b_shared = leaf.op.matrices()  # VeRA's frozen shared projections, sliced to the site
    x = torch.randn(3, 64)
    with torch.no_grad():
        dense = (b_shared * lam_b[:, None]) @ (a_shared * lam_d[:, None])  # Λ_b B Λ_d A with mixed λ
        torch.testing.assert_close(site(x), site.base(x) + x @ dense.t(), rtol=0, atol=1e-5)
    batches = [inputs(batch=2, seed=s) for s in range(8)]
    sequential = [output(model, b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda b: output(model, b), batches))
    assert all(torch.equal(s, t) for s, t in zip(sequential, threaded, strict=True))
