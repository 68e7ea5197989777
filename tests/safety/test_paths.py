"""Nothing is read from outside the directory: traversal, absolute paths, links, odd files."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file, save_file

import adapter_composer as ac
from adapter_composer.errors import AdapterFileError, UnsafePathError
from adapter_composer.formats.commit import JOURNAL
from tests.models import output, tiny_llama
from tests.safety.sources import Untouched, manifest, weights_file


def _set_file(path, adapter, name):
    data = manifest(path)
    if adapter is None:
        data["operators_file"] = name
    else:
        data["adapters"][adapter]["file"] = name
    (path / "composition.json").write_text(json.dumps(data))


@pytest.mark.parametrize("adapter", ["sst2", None])
@pytest.mark.parametrize(
    "name", ["../outside/secret.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ".hidden", "a\\..\\b", ""]
)
def test_manifest_file_fields_are_plain_names_inside(registry, tmp_path, adapter, name, composition):
    src = composition
    (tmp_path / "outside").mkdir()
    save_file(load_file(str(weights_file(src.path, "sst2"))), str(tmp_path / "outside" / "secret.safetensors"))
    _set_file(src.path, adapter, name)
    model = tiny_llama()
    with Untouched(model), pytest.raises(UnsafePathError, match="not a plain file name inside"):
        ac.load(model, src.path, registry=registry)


def test_errors_do_not_reveal_whether_outside_paths_exist(registry, tmp_path, composition):
    src = composition
    (tmp_path / "there.safetensors").write_bytes(b"x")
    messages = []
    for name in ("../there.safetensors", "../nowhere.safetensors"):
        _set_file(src.path, "sst2", name)
        with pytest.raises(UnsafePathError) as err:
            ac.load(tiny_llama(), src.path, registry=registry)
        messages.append(str(err.value).replace(name, "NAME"))
    assert messages[0] == messages[1]


def test_links_are_followed_only_inside_the_directory(registry, tmp_path, composition):
    src = composition
    target = weights_file(src.path, "sst2")
    # a link inside the directory to a file inside it: fine
    inner = src.path / "sst2-link.safetensors"
    inner.symlink_to(target.name)
    _set_file(src.path, "sst2", inner.name)
    model = tiny_llama()
    ac.load(model, src.path, registry=registry)
    assert (output(model, src.batch) == src.reference).all()
    # a link to a copy outside: refused before it is opened
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(target.read_bytes())
    inner.unlink()
    inner.symlink_to(outside)
    fresh = tiny_llama()
    with Untouched(fresh), pytest.raises(UnsafePathError, match="symbolic link to a place outside"):
        ac.load(fresh, src.path, registry=registry)
    # the manifest itself as a link to outside
    inner.unlink()
    _set_file(src.path, "sst2", target.name)
    real = tmp_path / "manifest-elsewhere.json"
    os.replace(src.path / "composition.json", real)
    (src.path / "composition.json").symlink_to(real)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        ac.load(tiny_llama(), src.path, registry=registry)


def test_a_fifo_or_a_folder_in_place_of_a_file_is_refused_without_blocking(registry, tmp_path, composition):
    src = composition
    target = weights_file(src.path, "sst2")
    target.unlink()
    os.mkfifo(target)  # opening it for reading would block forever
    with pytest.raises(AdapterFileError, match="missing file"):
        ac.load(tiny_llama(), src.path, registry=registry)
    target.unlink()
    target.mkdir()
    with pytest.raises(AdapterFileError, match="missing file"):
        ac.load(tiny_llama(), src.path, registry=registry)


def test_peft_weights_linked_outside_are_refused(registry, tmp_path, peft_dir):
    src = peft_dir
    weights = src.path / "adapter_model.safetensors"
    outside = tmp_path / "stolen.safetensors"
    os.replace(weights, outside)
    weights.symlink_to(outside)
    model = tiny_llama()
    with Untouched(model), pytest.raises(UnsafePathError, match="outside"):
        ac.from_peft(model, src.path, registry=registry)


def test_the_hub_cache_layout_loads(registry, tmp_path, peft_dir):
    """HF hub snapshots link to ../../blobs/<hash>: those links are followed."""
    src = peft_dir
    repo = tmp_path / "hub" / "models--someone--adapter"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, name in enumerate(("adapter_config.json", "adapter_model.safetensors")):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes((src.path / name).read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    model = tiny_llama()
    ac.from_peft(model, snapshot, registry=registry)
    assert (output(model, src.batch) - src.reference).abs().max() < 1e-5
    # but not a link out of the repository
    (snapshot / "adapter_model.safetensors").unlink()
    (snapshot / "adapter_model.safetensors").symlink_to(src.path / "adapter_model.safetensors")
    with pytest.raises(UnsafePathError):
        ac.from_peft(tiny_llama(), snapshot, registry=registry)


def test_a_forged_commit_journal_cannot_point_outside(registry, tmp_path, peft_dir):
    src = peft_dir
    (tmp_path / "evil.json").write_text('{"peft_type": "LORA"}')
    forged = {"files": {"adapter_config.json": "../evil.json", "adapter_model.safetensors": "/etc/passwd"}}
    (src.path / JOURNAL).write_text(json.dumps(forged))
    model = tiny_llama()
    ac.from_peft(model, src.path, registry=registry)  # the forged entries are ignored
    assert (output(model, src.batch) - src.reference).abs().max() < 1e-5
    # a well-formed temporary name that is a link to outside is refused
    (src.path / ".adapter_config.json.new-x").symlink_to(tmp_path / "evil.json")
    (src.path / JOURNAL).write_text(json.dumps({"files": {"adapter_config.json": ".adapter_config.json.new-x"}}))
    with pytest.raises(UnsafePathError):
        ac.from_peft(tiny_llama(), src.path, registry=registry)


def test_load_adapter_refuses_traversal_and_changes_nothing(registry, tmp_path, composition):
    src = composition
    _set_file(src.path, "sst2", "../../etc/passwd")
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("t0", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.route({"k0": "t0"}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    before = composed.graph.to_dict()
    with pytest.raises(UnsafePathError):
        composed.load_adapter(src.path, name="new", route="tasks", key="k1", adapter="sst2")
    assert composed.graph.to_dict() == before and "new" not in composed.adapters
