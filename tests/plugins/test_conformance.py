"""One conformance battery over every registered method (the example third-party plugin included).

For each method: identity at initialisation (where its capabilities say so), only adapter
parameters train, save → load is bit-identical, undo is exact, merge ≈ unmerged (or a
clear refusal), trainable-parameter count equals the paper's formula, and a few
optimisation steps lower the loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import adapter_composer as ac
from adapter_composer.registry import load_registry
from tests.models import BUILDERS, inputs, output, randomize, same_state, state_copy
from tests.profiles import load_profiles

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "loha_plugin"


def _example_module():
    sys.path.insert(0, str(EXAMPLE_PLUGIN))
    try:
        import composer_loha

        return composer_loha
    finally:
        sys.path.remove(str(EXAMPLE_PLUGIN))


REGISTRY = load_registry(entry_points=False, plugins=[_example_module()])
PROFILES = load_profiles()
METHODS = sorted(REGISTRY.methods)


def test_every_registered_method_has_a_profile():
    missing = sorted(set(METHODS) - set(PROFILES))
    assert not missing, f"methods without a conformance profile in tests/profiles/: {missing}"


def _setup(method: str, seed: int = 0):
    profile = PROFILES[method]
    model = BUILDERS[profile.arch](seed)
    g = ac.Graph()
    g.adapter("a", method, **profile.config)
    return profile, model, g


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method):
    profile, model, g = _setup(method)
    batch = inputs()
    before = output(model, batch)
    composed = ac.compose(model, g, registry=REGISTRY)
    after = output(model, batch)
    if REGISTRY.method(method).capabilities.identity_at_init:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(after[..., -before.shape[1] :, :], before), (
            f"{method} claims no identity at init but is"
        )
    composed.undo()


@pytest.mark.parametrize("method", METHODS)
def test_parameter_count_matches_formula(method):
    profile, model, g = _setup(method)
    expected = profile.expected_params(model)
    composed = ac.compose(model, g, registry=REGISTRY)
    report = composed.trainable_parameters()
    assert report.per_adapter["a"] == expected, (
        f"{method}: {report.per_adapter['a']} != {profile.formula} = {expected}"
    )
    assert report.trainable == expected


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_train(method):
    profile, model, g = _setup(method)
    base = state_copy(model)
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed, std=0.05)
    adapter_before = {k: v.clone() for k, v in composed.adapters["a"].state_dict().items()}
    opt = torch.optim.SGD(composed.parameters(), lr=profile.lr)
    composed.train()
    batch = inputs(batch=4, length=12)
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    composed.eval()
    trained = composed.adapters["a"].state_dict()
    assert any(not torch.equal(adapter_before[k], trained[k]) for k in trained), (
        "no adapter parameter changed"
    )
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    composed.undo()
    assert same_state(model, base), "a base parameter changed during training"


@pytest.mark.parametrize("method", METHODS)
def test_save_load_bit_identical(method, tmp_path):
    profile, model, g = _setup(method)
    batch = inputs()
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed)
    out = output(model, batch)
    composed.save(tmp_path / "c")
    composed.undo()
    fresh = BUILDERS[profile.arch](0)
    loaded = ac.load(fresh, tmp_path / "c", registry=REGISTRY)
    assert torch.equal(output(fresh, batch), out)
    saved, now = composed.adapters["a"].state_dict(), loaded.adapters["a"].state_dict()
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


@pytest.mark.parametrize("method", METHODS)
def test_undo_restores_modules_exactly(method):
    profile, model, g = _setup(method)
    base = state_copy(model)
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed)
    composed.undo()
    assert same_state(model, base)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert set(dict(model.named_modules())) == set(modules)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("method", METHODS)
def test_merge_matches_unmerged_or_refuses(method):
    profile, model, g = _setup(method)
    batch = inputs()
    base = state_copy(model)
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed)
    out = output(model, batch)
    if not REGISTRY.method(method).capabilities.mergeable:
        with pytest.raises(ac.CompositionError) as err:
            composed.merge()
        assert "merge-not-exact" in err.value.codes
        return
    composed.merge()
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-5)
    composed.unmerge()
    assert torch.equal(output(model, batch), out)
    composed.undo()
    assert same_state(model, base)


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss(method):
    profile, model, g = _setup(method)
    composed = ac.compose(model, g, registry=REGISTRY)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(composed.param_groups(lr=profile.lr))
    composed.train()
    batch = inputs(batch=2, length=12, seed=7)
    losses = []
    for _ in range(profile.steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], f"{method}: loss {losses[0]:.3f} → {losses[-1]:.3f}"
