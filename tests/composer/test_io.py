"""Saving and loading compositions: round trips, atomic writes, and every way a file can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapter_composer as ac
from adapter_composer import AdapterFileError, Graph
from tests.models import inputs, output, randomize, same_state, state_copy, tiny_gpt2, tiny_llama


def _composed(registry, model=None):
    model = model or tiny_llama()
    g = Graph()
    g.adapter("sst2", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.adapter("mrpc", "lora", r=2, dora=True, rslora=True, targets=["mlp.down"])
    g.sum("sst2", "mrpc", weights=[0.5, 2.0], learnable=True)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    return composed


def _file(path, adapter):
    """The weights file of ``adapter`` in a saved composition (its name changes every save)."""
    manifest = json.loads((path / "composition.json").read_text())
    name = manifest["operators_file"] if adapter is None else manifest["adapters"][adapter]["file"]
    return path / name


def test_round_trip_is_bit_identical(registry, tmp_path):
    composed = _composed(registry)
    batch = inputs()
    out = output(composed.model, batch)
    path = composed.save(tmp_path / "run")
    manifest = json.loads((path / "composition.json").read_text())
    token = manifest["operators_file"].split(".")[1]
    assert sorted(p.name for p in path.iterdir()) == [
        f"adapter.mrpc.{token}.safetensors",
        f"adapter.sst2.{token}.safetensors",
        "composition.json",
        f"operators.{token}.safetensors",
    ]
    assert manifest["methods"]["lora"]["plugin"] == "adapter_composer.plugins.lora"
    assert manifest["base_model"]["model_type"] == "llama"
    keys = sorted(load_file(str(_file(path, "sst2"))))
    assert keys[:2] == [
        "layers.0.attn.q.lora_A",
        "layers.0.attn.q.lora_B",
    ]  # architecture-neutral names
    fresh = tiny_llama()
    loaded = ac.load(fresh, path, registry=registry)
    assert torch.equal(output(fresh, batch), out)
    for name, handle in composed.adapters.items():
        a, b = handle.state_dict(), loaded.adapters[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.graph.to_dict() == composed.graph.to_dict()


def test_saving_replaces_a_previous_save_atomically(registry, tmp_path):
    composed = _composed(registry)
    target = tmp_path / "run"
    composed.save(target)
    randomize(composed, seed=5)
    composed.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary leftovers
    fresh = tiny_llama()
    ac.load(fresh, target, registry=registry)
    assert torch.equal(output(fresh, inputs()), output(composed.model, inputs()))


def test_save_refuses_to_overwrite_an_unrelated_directory(registry, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(AdapterFileError, match="refusing to overwrite"):
        _composed(registry).save(tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


def test_failed_write_leaves_the_previous_save(registry, tmp_path, monkeypatch):
    composed = _composed(registry)
    target = composed.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import adapter_composer.formats.commit as commit

    real, calls = commit.write_new, []

    def broken(path, data):
        calls.append(path.name)
        if len(calls) == 3:  # the journal and one weights file went through
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(commit, "write_new", broken)
    with pytest.raises(AdapterFileError, match="disk full.*the previous save is unchanged"):
        composed.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _assert_untouched_after(model, fn):
    state = state_copy(model)
    modules = dict(model.named_modules())
    fn()
    assert same_state(model, state) and dict(model.named_modules()) == modules


def test_truncated_safetensors(registry, tmp_path):
    path = _composed(registry).save(tmp_path / "run")
    data = _file(path, "sst2").read_bytes()
    _file(path, "sst2").write_bytes(data[: len(data) // 2])
    model = tiny_llama()

    def attempt():
        with pytest.raises(
            AdapterFileError, match=r"sst2\.\w+\.safetensors is not a readable safetensors file"
        ):
            ac.load(model, path, registry=registry)

    _assert_untouched_after(model, attempt)


def test_garbage_header(registry, tmp_path):
    path = _composed(registry).save(tmp_path / "run")
    _file(path, "mrpc").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterFileError, match=r"adapter\.mrpc\.\w+\.safetensors"):
        ac.load(tiny_llama(), path, registry=registry)


def test_wrong_shape_tensor_is_named(registry, tmp_path):
    path = _composed(registry).save(tmp_path / "run")
    tensors = load_file(str(_file(path, "sst2")))
    tensors["layers.1.attn.v.lora_B"] = torch.zeros(32, 5)
    save_file(tensors, str(_file(path, "sst2")))
    model = tiny_llama()

    def attempt():
        with pytest.raises(AdapterFileError) as err:
            ac.load(model, path, registry=registry)
        assert "tensor layers.1.attn.v.lora_B has shape (32, 5), the model needs (32, 4)" in str(
            err.value
        )

    _assert_untouched_after(model, attempt)


def test_missing_and_unexpected_tensors_are_listed(registry, tmp_path):
    path = _composed(registry).save(tmp_path / "run")
    tensors = load_file(str(_file(path, "mrpc")))
    tensors.pop("layers.0.mlp.down.magnitude")
    tensors["layers.9.mlp.down.lora_A"] = torch.zeros(1)
    save_file(tensors, str(_file(path, "mrpc")))
    with pytest.raises(AdapterFileError) as err:
        ac.load(tiny_llama(), path, registry=registry)
    assert "missing tensors ['layers.0.mlp.down.magnitude']" in str(err.value)
    assert "unexpected tensors ['layers.9.mlp.down.lora_A']" in str(err.value)


def test_loading_onto_a_different_base_model_says_what_differs(registry, tmp_path):
    path = _composed(registry).save(tmp_path / "run")
    bigger = tiny_llama(layers=3)
    gpt2 = tiny_gpt2()

    def attempt():
        with pytest.raises(AdapterFileError) as err:
            ac.load(bigger, path, registry=registry)
        assert "parameter(s) here were not in the saved base" in str(err.value)
        assert "model.layers.2" in str(err.value)

    _assert_untouched_after(bigger, attempt)
    with pytest.raises(
        AdapterFileError, match="model type: saved on 'llama', this model is 'gpt2'"
    ):
        ac.load(gpt2, path, registry=registry)


def test_check_base_false_still_checks_tensor_shapes(registry, tmp_path):
    path = _composed(registry).save(tmp_path / "run")
    bigger = tiny_llama(layers=3)  # layer 2 gets adapters the file does not have
    with pytest.raises(AdapterFileError, match="missing tensors"):
        ac.load(bigger, path, registry=registry, check_base=False)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.unlink(), "holds no composition.json"),
        (lambda d: d.write_text("{oops"), "not valid JSON"),
        (
            lambda d: d.write_text(json.dumps({"format": "x"})),
            "not an adapter-composer composition",
        ),
        (
            lambda d: d.write_text(json.dumps({**json.loads(d.read_text()), "version": 99})),
            "format version 99",
        ),
    ],
)
def test_bad_manifest(registry, tmp_path, edit, needle):
    path = _composed(registry).save(tmp_path / "run")
    edit(path / "composition.json")
    with pytest.raises(AdapterFileError, match=needle):
        ac.load(tiny_llama(), path, registry=registry)


def test_manifest_with_an_invalid_graph(registry, tmp_path):
    path = _composed(registry).save(tmp_path / "run")
    manifest = json.loads((path / "composition.json").read_text())
    manifest["graph"]["nodes"][0]["method"] = 42
    (path / "composition.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterFileError, match="invalid graph"):
        ac.load(tiny_llama(), path, registry=registry)


def test_no_pickle_anywhere():
    import importlib
    import pathlib

    packages = [importlib.import_module(f"adapter_composer.{sub}") for sub in ("plugins", "registry")] + [ac]
    sources = [p for m in packages for p in pathlib.Path(m.__file__).parent.rglob("*.py")]
    assert sources
    for p in sources:
        text = p.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, p
