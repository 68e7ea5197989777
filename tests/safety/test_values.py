"""Non-finite and wrong-typed values: refused with the tensor or field named (NaN/Inf weights
load only with an explicit opt-in)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapter_composer as ac
from adapter_composer.errors import AdapterFileError, CompositionError, WeightsError
from tests.models import inputs, output, tiny_llama
from tests.safety.sources import Untouched, manifest, weights_file


def _poison(path, key, value):
    tensors = load_file(str(path))
    tensors[key] = value(tensors[key])
    save_file(tensors, str(path))


def _nan_first(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize("poison", [_nan_first, lambda t: torch.full_like(t, math.inf)])
def test_non_finite_weights_are_refused_unless_asked_for(registry, composition, poison):
    path = weights_file(composition.path, "sst2")
    _poison(path, "layers.1.attn.v.lora_B", poison)
    model = tiny_llama()
    with Untouched(model), pytest.raises(AdapterFileError) as err:
        ac.load(model, composition.path, registry=registry)
    assert "layers.1.attn.v.lora_B" in str(err.value) and "NaN or infinite" in str(err.value)
    assert "allow_nonfinite=True" in str(err.value)
    loaded = ac.load(model, composition.path, registry=registry, allow_nonfinite=True)
    value = loaded.adapters["sst2"].state_dict()["layers.1.attn.v.lora_B"]
    assert torch.equal(value.isfinite(), poison(torch.ones_like(value)).isfinite())


def test_non_finite_operator_weights_are_refused(registry, composition):
    path = composition.path / manifest(composition.path)["operators_file"]
    _poison(path, "sum_1.weights", lambda t: torch.tensor([float("nan"), 1.0]))
    with pytest.raises(AdapterFileError, match=r"sum_1\.weights \(1 of 2 values\)"):
        ac.load(tiny_llama(), composition.path, registry=registry)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_integer_and_bool_tensors_are_not_cast_silently(registry, composition, dtype):
    path = weights_file(composition.path, "sst2")
    _poison(path, "layers.0.attn.q.lora_A", lambda t: t.to(dtype))
    model = tiny_llama()
    with Untouched(model), pytest.raises(AdapterFileError) as err:
        ac.load(model, composition.path, registry=registry)
    assert "layers.0.attn.q.lora_A" in str(err.value) and "not floating point" in str(err.value)


def test_non_finite_and_integer_peft_weights(registry, peft_dir):
    path = peft_dir.path / "adapter_model.safetensors"
    key = next(k for k in load_file(str(path)) if k.endswith("lora_A.weight"))
    original = load_file(str(path))
    _poison(path, key, _nan_first)
    model = tiny_llama()
    with Untouched(model), pytest.raises(AdapterFileError, match="(?s)NaN or infinite.*allow_nonfinite=True"):
        ac.from_peft(model, peft_dir.path, registry=registry)
    ac.from_peft(model, peft_dir.path, registry=registry, allow_nonfinite=True).undo()
    save_file({**original, key: original[key].to(torch.int32)}, str(path))
    with pytest.raises(AdapterFileError, match="not floating point"):
        ac.from_peft(model, peft_dir.path, registry=registry)


def test_non_finite_config_values_are_refused_when_declared():
    g = ac.Graph()
    with pytest.raises(CompositionError) as err:
        g.adapter("a", "lora", alpha=math.inf)
    assert err.value.codes == ["bad-config"] and "alpha is inf" in str(err.value)
    g.adapter("x", "lora")
    g.adapter("y", "lora")
    with pytest.raises(CompositionError) as err:
        g.sum("x", "y", weights=[math.nan, 1.0])
    assert err.value.codes == ["bad-options"] and "weights[0] is nan" in str(err.value)
    with pytest.raises(CompositionError) as err:
        deep: list = [1]
        for _ in range(20):
            deep = [deep]
        g.adapter("b", "lora", rank_pattern={"q_proj": deep})
    assert "nests more than" in str(err.value)


@pytest.mark.parametrize("text", ["Infinity", "NaN", "-Infinity", "1e400"])
def test_non_finite_numbers_in_a_manifest(registry, composition, text):
    raw = (composition.path / "composition.json").read_text()
    edited = re.sub(r'"alpha": [0-9.]+', f'"alpha": {text}', raw, count=1)
    assert edited != raw
    (composition.path / "composition.json").write_text(edited)
    with pytest.raises(AdapterFileError) as err:
        ac.load(tiny_llama(), composition.path, registry=registry)
    assert "not a number JSON allows" in str(err.value) or "must be finite" in str(err.value)


@pytest.mark.parametrize("text", ["Infinity", "1e400", "NaN"])
def test_non_finite_numbers_in_a_peft_config(registry, peft_dir, text):
    path = peft_dir.path / "adapter_config.json"
    raw = path.read_text()
    edited = re.sub(r'"lora_alpha": [0-9.]+', f'"lora_alpha": {text}', raw, count=1)
    assert edited != raw
    path.write_text(edited)
    with pytest.raises(AdapterFileError, match="lora_alpha must be a finite number|not a number JSON allows"):
        ac.from_peft(tiny_llama(), peft_dir.path, registry=registry)


def _routed(registry):
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("t0", "lora", r=2, targets=["attn.q"])
    g.route({"k0": "t0"}, name="tasks")
    return model, ac.compose(model, g, registry=registry)


@pytest.mark.parametrize(
    "bad, needle",
    [
        (lambda t: {k: _nan_first(v) for k, v in t.items()}, "NaN or infinite"),
        (lambda t: {k: v.to(torch.int64) for k, v in t.items()}, "not floating point"),
        (lambda t: {k: v.tolist() for k, v in t.items()}, "mapping of names to torch tensors"),
        (lambda t: [1, 2], "mapping of names to torch tensors"),
    ],
)
def test_in_memory_weights_are_checked_before_anything_changes(registry, bad, needle):
    model, composed = _routed(registry)
    handle = composed.adapters["t0"]
    before = {k: v.clone() for k, v in handle.state_dict().items()}
    with pytest.raises(WeightsError, match=needle):
        composed.replace_weights("t0", bad(before))
    assert all(torch.equal(before[k], v) for k, v in handle.state_dict().items())
    with pytest.raises(WeightsError, match=needle):
        composed.add_adapter("t1", "lora", route="tasks", key="k1", r=2, targets=["attn.q"], tensors=bad(before))
    assert "t1" not in composed.adapters and "t1" not in composed.graph
    with torch.no_grad():
        model(**inputs(), route=["k0", "k0"])  # still serving
    assert torch.isfinite(output(model, inputs())).all()


def test_json_numbers_keep_their_json_types(registry, composition):
    """``"learnable": "false"`` (a string) is not a bool: refused, never read as True."""
    data = manifest(composition.path)
    data["graph"]["nodes"][2]["options"]["learnable"] = "false"
    (composition.path / "composition.json").write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match="learnable: Input should be a valid boolean"):
        ac.load(tiny_llama(), composition.path, registry=registry)
