"""Polytropon / MHR (plugins/poly.py): HF PEFT's PolyModel with the same weights and task ids
gives the same outputs (eval, and training with the same RNG); identity at init; save/load;
training; merge; the parameter-space formula for non-LoRA skills; diagnostics."""

from __future__ import annotations

import pytest
import torch

import adapter_composer as ac
from adapter_composer.plugins import poly
from adapter_composer.runtime import CONTAINER_ATTR
from tests.models import ROLE_PATHS, inputs, output, randomize, same_state, state_copy, tiny_llama

TASKS = ["t0", "t1", "t2"]
ROLES = {"q_proj": "attn.q", "v_proj": "attn.v"}


def _ours(model, skills=3, n_splits=1, r=4, tasks=TASKS):
    g = ac.Graph()
    poly.declare(g, "mt", tasks, skills=skills, n_splits=n_splits, r=r, targets=["attn.q", "attn.v"])
    return ac.compose(model, g)


def _allocation(composed, task):
    return getattr(composed.model, CONTAINER_ATTR).operators[f"mt_{task}"]


@torch.no_grad()
def _copy_from_peft(peft_model, composed, skills, n_splits, tasks=TASKS):
    """PEFT's poly_lora_A [q, S, in/q, r], poly_lora_B [q, S, r, out/q], module_logits [T, q·S]
    into our skills (A [r, in], B [out, r]) and each task node's Z [q, S]."""
    params = dict(peft_model.named_parameters())
    for layer in range(2):
        for role in ROLES.values():
            path = ROLE_PATHS["llama"][role][0].format(i=layer)
            key = f"layers.{layer}.{role}"
            pa = params[f"base_model.model.{path}.poly_lora_A.default"]
            pb = params[f"base_model.model.{path}.poly_lora_B.default"]
            for s in range(skills):
                a = torch.cat([pa[h, s].t() for h in range(n_splits)], dim=1)  # [r, in]
                b = torch.cat([pb[h, s].t() for h in range(n_splits)], dim=0)  # [out, r]
                composed.adapters[f"mt_skill{s}"].load_tensors({f"{key}.lora_A": a, f"{key}.lora_B": b})
            logits = params[f"base_model.model.{path}.poly_router.default.module_logits"]
            for t, task in enumerate(tasks):
                _allocation(composed, task).logits[poly.site_name(key)].copy_(logits[t].view(n_splits, skills))


def _peft(skills, n_splits, r=4, seed=0):
    from peft import PolyConfig, get_peft_model

    torch.manual_seed(seed)
    config = PolyConfig(r=r, target_modules=list(ROLES), n_tasks=len(TASKS), n_skills=skills, n_splits=n_splits, init_weights=False)
    peft_model = get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "module_logits" in name:
                p.normal_(0, 1.5)  # an allocation far from uniform
    return peft_model


@pytest.mark.parametrize("n_splits", [1, 2, 4])
def test_matches_peft_poly_in_eval(n_splits):
    skills = 3
    peft_model = _peft(skills, n_splits)
    model = tiny_llama()
    composed = _ours(model, skills, n_splits)
    _copy_from_peft(peft_model, composed, skills, n_splits)
    batch = inputs(batch=4)
    task_ids = [2, 0, 1, 0]
    with torch.no_grad():
        reference = peft_model.base_model(**batch, task_ids=torch.tensor(task_ids)).logits
        ours = model(**batch, route=[TASKS[t] for t in task_ids]).logits
    assert (reference - output(tiny_llama(), batch)).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)


def test_matches_peft_poly_while_training_with_the_same_noise():
    """One relaxed-Bernoulli draw per row and site, in forward order: with one task per batch
    the draws are PEFT's, so the training forward and its gradients agree."""
    skills, n_splits = 3, 2
    peft_model = _peft(skills, n_splits)
    model = tiny_llama()
    composed = _ours(model, skills, n_splits)
    _copy_from_peft(peft_model, composed, skills, n_splits)
    peft_model.train()
    composed.train()
    batch = inputs(batch=3)
    torch.manual_seed(11)
    reference = peft_model.base_model(**batch, task_ids=torch.tensor([1, 1, 1])).logits
    torch.manual_seed(11)
    ours = model(**batch, route=["t1"] * 3).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)
    torch.manual_seed(12)
    again = model(**batch, route=["t1"] * 3).logits
    assert (again - ours).abs().max() > 1e-4  # the noise is live
    ours.square().sum().backward()
    reference.square().sum().backward()
    path = ROLE_PATHS["llama"]["attn.q"][0].format(i=1)
    peft_grad = dict(peft_model.named_parameters())[f"base_model.model.{path}.poly_router.default.module_logits"].grad
    our_grad = _allocation(composed, "t1").logits["layers/1/attn/q"].grad
    torch.testing.assert_close(our_grad, peft_grad[1].view(n_splits, skills), rtol=1e-4, atol=1e-7)


def test_identity_at_init_and_undo_exact():
    model = tiny_llama()
    base, state = output(model, inputs()), state_copy(model)
    composed = _ours(model, n_splits=2)
    assert torch.equal(model(**inputs(), route=["t0", "t2"]).logits, base)
    z = _allocation(composed, "t0").logits["layers/0/attn/q"]
    assert z.shape == (2, 3) and z.abs().max() <= 1e-3  # PEFT's U(−1e−3, 1e−3)
    randomize(composed)
    assert not torch.allclose(model(**inputs(), route=["t0", "t2"]).logits, base)
    composed.undo()
    assert same_state(model, state)


def test_trainable_parameters_are_the_skills_and_the_allocations():
    model = tiny_llama()
    composed = _ours(model, skills=3, n_splits=2, r=4)
    d, kv = 64, 32
    sites = 2 * 2
    skills = 3 * 2 * (4 * (d + d) + 4 * (d + kv))  # S LoRAs on q and v, 2 layers
    allocation = len(TASKS) * sites * 2 * 3  # T · sites · q · S, as PEFT's module_logits
    report = composed.trainable_parameters()
    assert report.trainable == skills + allocation
    assert report.per_operator == {f"mt_{t}": sites * 2 * 3 for t in TASKS}


def test_rows_get_their_own_task_and_generate_keeps_it():
    model = tiny_llama()
    composed = _ours(model, n_splits=2)
    randomize(composed, std=0.5)
    batch = inputs(batch=3)
    keys = ["t2", None, "t0"]
    mixed = model(**batch, route=keys).logits
    for row, key in enumerate(keys):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        alone = model(**one, route=[key]).logits if key else output(tiny_llama(), one)
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=0, atol=2e-6)
    prompts = inputs(batch=2, length=5)
    together = model.generate(**prompts, route=["t1", "t2"], max_new_tokens=4, do_sample=False)
    for row, key in enumerate(["t1", "t2"]):
        one = {k: v[row : row + 1] for k, v in prompts.items()}
        alone = model.generate(**one, route=[key], max_new_tokens=4, do_sample=False)
        assert torch.equal(together[row : row + 1], alone)


def test_save_load_is_bit_identical(tmp_path):
    model = tiny_llama()
    composed = _ours(model, n_splits=2)
    randomize(composed)
    batch = inputs(batch=3)
    keys = ["t0", "t1", "t2"]
    out = model(**batch, route=keys).logits
    composed.save(tmp_path / "c")
    fresh = tiny_llama()
    loaded = ac.load(fresh, tmp_path / "c")
    assert torch.equal(fresh(**batch, route=keys).logits, out)
    for t in TASKS:
        saved, now = _allocation(composed, t).state_dict(), _allocation(loaded, t).state_dict()
        assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


def test_training_learns_task_specific_allocations():
    model = tiny_llama()
    composed = _ours(model, n_splits=2)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(composed.parameters(), lr=1e-1)  # skills at PEFT's scale 1/r
    composed.train()
    batch = inputs(batch=4, length=12, seed=7)
    keys = ["t0", "t1", "t2", "t0"]
    first = last = None
    for _ in range(30):
        loss = model(**batch, route=keys, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.9 * first
    z0 = _allocation(composed, "t0").logits["layers/0/attn/q"]
    z1 = _allocation(composed, "t1").logits["layers/0/attn/q"]
    assert (z0 - z1).abs().max() > 1e-2  # each task moved its own allocation


def test_gumbel_weights_are_a_distribution_per_head_and_row():
    model = tiny_llama()
    composed = _ours(model, n_splits=2)
    node = next(m for s in composed.sites().values() for m in s.modules() if isinstance(m, poly.PolyNode))
    node.train()
    w = node.weights(5)
    assert w.shape == (5, 2, 3) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 2))
    assert (w[0] - w[1]).abs().max() > 0  # one draw per row
    node.eval()
    z = node.shared().at(node.key)
    torch.testing.assert_close(node.weights(5), torch.sigmoid(z) / torch.sigmoid(z).sum(-1, keepdim=True))


def test_lora_and_generic_paths_agree_per_row():
    """The parameter-space path every other method takes gives LoRA's batched result."""
    from adapter_composer.runtime.linear import LinearCall

    model = tiny_llama()
    composed = _ours(model, n_splits=1)
    randomize(composed)
    site = composed.sites()[("model.layers.0.self_attn.v_proj", "linear")]
    node = next(m for m in site.modules() if isinstance(m, poly.PolyNode))
    x = torch.randn(3, 5, 64)
    w = torch.softmax(torch.randn(3, 1, 3), -1)
    call = LinearCall(site, x)
    fast = node.mixer.delta(x, call, w)
    generic = torch.cat([node.mixer._generic(x[i : i + 1], call, w[i, 0]) for i in range(3)])
    torch.testing.assert_close(fast, generic, rtol=0, atol=1e-6)


def test_a_single_task_mixture_merges_exactly_and_a_routed_one_refuses():
    model = tiny_llama()
    g = ac.Graph()
    for s in range(3):
        g.adapter(f"s{s}", "lora", r=4, alpha=1, targets=["attn.q", "attn.v"])
    g.op("poly", "s0", "s1", "s2", n_splits=2, name="task")
    composed = ac.compose(model, g)
    randomize(composed)
    batch = inputs()
    out = output(model, batch)
    composed.merge()
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-5)
    composed.unmerge()
    assert torch.equal(output(model, batch), out)
    composed.undo()
    routed = _ours(tiny_llama())
    with pytest.raises(ac.CompositionError) as err:
        routed.merge()
    assert set(err.value.codes) == {"merge-not-exact"}


def test_diagnostics():
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("a", "lora", r=4, targets=["attn.q"])
    g.adapter("b", "vera", r=4, targets=["attn.q"])
    g.adapter("c", "lora", r=4, dora=True, targets=["attn.q"])
    g.op("poly", "a", "b", name="mixed")
    g.op("poly", "a", "c", n_splits=2, name="heads")
    g.op("poly", "a", n_splits=3, name="indivisible")
    diags = ac.validate(g, model=model)
    codes = sorted(d.code for d in diags)
    assert codes == ["param-mix-children", "poly-splits", "poly-splits"], codes
    assert any("DoRA" in d.message and d.nodes == ("heads", "c") for d in diags)
    assert any("layers.0.attn.q" in d.sites for d in diags if d.nodes == ("indivisible", "a"))
    nested = ac.Graph()
    nested.adapter("a", "lora", targets=["attn.q"])
    nested.adapter("b", "lora", targets=["attn.q"])
    nested.op("poly", nested.sum("a", "b", name="inner"), "a", name="outer")
    assert [d.code for d in ac.validate(nested, model=model)] == ["forbidden-nesting"]
