"""A failed hot swap leaves the model serving exactly what it served before."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapter_composer as ac
from adapter_composer.errors import AdapterFileError, CompositionError, HotSwapError, WeightsError
from tests.models import inputs, randomize, tiny_gpt2, tiny_llama
from tests.safety.sources import peft_lora, weights_file


def _serving(registry):
    model = tiny_llama()
    g = ac.Graph()
    for i in range(2):
        g.adapter(f"t{i}", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.route({"k0": "t0", "k1": "t1"}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    return model, composed


def _snapshot(model, composed):
    batch = inputs(batch=3)
    with torch.no_grad():
        logits = model(**batch, route=["k0", "k1", None]).logits
    return {
        "logits": logits,
        "graph": composed.graph.to_dict(),
        "plan": composed.plan.to_dict() if hasattr(composed.plan, "to_dict") else repr(composed.plan),
        "adapters": {n: (h, dict(h.modules)) for n, h in composed.adapters.items()},
        "weights": {n: {k: v.clone() for k, v in h.state_dict().items()} for n, h in composed.adapters.items()},
        "keys": composed._patch.model_hook.route_keys,
        "methods": dict(composed._rt.container.methods),
    }


def _assert_same(model, composed, before):
    now = _snapshot(model, composed)
    assert torch.equal(now["logits"], before["logits"])  # serving exactly what it served
    assert now["graph"] == before["graph"] and now["plan"] == before["plan"] and now["keys"] == before["keys"]
    assert now["adapters"].keys() == before["adapters"].keys()
    for name, (handle, modules) in before["adapters"].items():
        assert composed.adapters[name] is handle and now["adapters"][name][1] == modules
        assert all(torch.equal(v, now["weights"][name][k]) for k, v in before["weights"][name].items())
    assert dict(composed._rt.container.methods) == before["methods"]
    assert set(composed._analysis.methods) == set(before["adapters"])


def test_a_peft_dir_whose_config_lies_about_the_rank(registry, tmp_path):
    """The issue's case: config r=4, tensors r=8; the key used to serve a fresh adapter."""
    src = peft_lora(tmp_path, r=8)
    cfg = json.loads((src.path / "adapter_config.json").read_text())
    (src.path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    model, composed = _serving(registry)
    before = _snapshot(model, composed)
    with pytest.raises(AdapterFileError, match=r"has shape \(8, 64\), the model needs \(4, 64\)"):
        composed.load_adapter(src.path, name="new", route="tasks", key="k1")
    _assert_same(model, composed, before)
    # the same directory, fixed, then swaps in
    (src.path / "adapter_config.json").write_text(json.dumps(cfg))
    composed.load_adapter(src.path, name="new", route="tasks", key="k1")
    assert "t1" not in composed.adapters and "new" in composed.adapters


def test_non_finite_weights_in_a_swap(registry, tmp_path):
    src = peft_lora(tmp_path)
    path = src.path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(iter(tensors))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path))
    model, composed = _serving(registry)
    before = _snapshot(model, composed)
    with pytest.raises(AdapterFileError, match="NaN or infinite"):
        composed.load_adapter(src.path, name="new", route="tasks", key="k1")
    _assert_same(model, composed, before)


def test_a_saved_composition_that_does_not_fit(registry, tmp_path):
    model, composed = _serving(registry)
    _, source = _serving(registry)
    path = source.save(tmp_path / "tenant")
    tensors = load_file(str(weights_file(path, "t1")))
    tensors["layers.0.attn.q.lora_A"] = torch.zeros(4, 65)
    save_file(tensors, str(weights_file(path, "t1")))
    before = _snapshot(model, composed)
    with pytest.raises(AdapterFileError, match=r"layers.0.attn.q.lora_A has shape \(4, 65\)"):
        composed.load_adapter(path, name="new", route="tasks", key="k1", adapter="t1")
    _assert_same(model, composed, before)


def test_a_composition_saved_on_another_base(registry, tmp_path):
    g = ac.Graph()
    g.adapter("t1", "lora", r=4, targets=["attn.q"])
    other = ac.compose(tiny_gpt2(), g, registry=registry)
    path = other.save(tmp_path / "gpt2")
    model, composed = _serving(registry)
    before = _snapshot(model, composed)
    with pytest.raises(AdapterFileError, match="different base model"):
        composed.load_adapter(path, name="new", route="tasks", key="k1")
    _assert_same(model, composed, before)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda c: c.add_adapter("bad name!", "lora", route="tasks", key="k1", targets=["attn.q"]), CompositionError),
        (lambda c: c.add_adapter("t0", "lora", route="tasks", key="k1", targets=["attn.q"]), CompositionError),
        (lambda c: c.add_adapter("x", "nope", route="tasks", key="k1"), CompositionError),
        (lambda c: c.add_adapter("x", "lora", route="tasks", key="k1", r=0), CompositionError),
        (lambda c: c.add_adapter("x", "lora", route="tasks", key="k1", alpha=float("inf")), CompositionError),
        (lambda c: c.add_adapter("x", "lora", route="t0", key="k1"), HotSwapError),
        (lambda c: c.add_adapter("x", "lora", route="tasks", key=5), HotSwapError),
        (lambda c: c.add_adapter("x", "lora", route="tasks", key="k1", targets=["mlp.up"]), HotSwapError),
        (
            lambda c: c.add_adapter(
                "x", "lora", route="tasks", key="k1", r=2, targets=["attn.q"], tensors={"layers.0.attn.q.lora_A": torch.zeros(2, 64)}
            ),
            WeightsError,
        ),
        (lambda c: c.load_adapter("/nonexistent/dir", name="x", route="tasks", key="k1"), AdapterFileError),
        (lambda c: c.remove_adapter("nobody"), KeyError),
        (lambda c: c.replace_weights("nobody", {}), KeyError),
    ],
)
def test_refused_swaps_change_nothing(registry, call, error):
    model, composed = _serving(registry)
    before = _snapshot(model, composed)
    with pytest.raises(error) as err:
        call(composed)
    assert isinstance(err.value, ac.ComposerError)
    _assert_same(model, composed, before)
