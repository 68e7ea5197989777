"""Saves into directories that hold other files, over earlier crashed saves, and concurrently."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import adapter_composer as ac
import adapter_composer.formats.commit as commit
from adapter_composer.errors import AdapterFileError, SaveConflictError
from adapter_composer.formats.commit import directory_lock
from tests.models import inputs, output, randomize, tiny_llama


def _composed(registry, names=("sst2", "mrpc"), seed=0):
    model = tiny_llama()
    g = ac.Graph()
    for name in names:
        g.adapter(name, "lora", r=2, alpha=4, targets=["attn.q", "attn.v"])
    g.sum(*names, weights=[0.5] * len(names), learnable=True, name="mixer")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, seed=seed)
    return composed


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _loads_as(path, composed, registry):
    model = tiny_llama()
    ac.load(model, path, registry=registry)
    assert torch.equal(output(model, inputs()), output(composed.model, inputs()))


def test_resaving_keeps_the_users_files_and_removes_only_ours(registry, tmp_path):
    composed = _composed(registry)
    path = composed.save(tmp_path / "run")
    (path / "README.md").write_text("notes")
    (path / "eval").mkdir()
    (path / "eval" / "scores.json").write_text("{}")
    (path / "backup.safetensors").write_bytes(b"mine")  # named like weights, but not ours
    randomize(composed, seed=1)
    composed.save(path)
    assert (path / "README.md").read_text() == "notes" and (path / "eval" / "scores.json").exists()
    assert (path / "backup.safetensors").read_bytes() == b"mine"
    manifest = json.loads((path / "composition.json").read_text())
    ours = {e["file"] for e in manifest["adapters"].values()} | {manifest["operators_file"]}
    assert {p.name for p in path.iterdir()} == ours | {"composition.json", "README.md", "eval", "backup.safetensors"}
    _loads_as(path, composed, registry)


def test_an_adapter_dropped_between_saves_loses_its_file(registry, tmp_path):
    path = _composed(registry, names=("a", "b", "c")).save(tmp_path / "run")
    two = _composed(registry, names=("a", "b"), seed=3)
    two.save(path)
    assert sorted(p.name.split(".")[1] for p in path.glob("adapter.*")) == ["a", "b"]
    _loads_as(path, two, registry)


def test_to_peft_over_a_peft_directory_keeps_its_readme(registry, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_dir = tmp_path / "peft"
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(peft_dir)
    readme = (peft_dir / "README.md").read_text()
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("a", "lora", r=2, alpha=4, targets=["attn.q"])
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    composed.to_peft("a", peft_dir)
    assert (peft_dir / "README.md").read_text() == readme
    assert sorted(p.name for p in peft_dir.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(tiny_llama(), peft_dir)
    torch.testing.assert_close(output(reloaded, inputs()), output(model, inputs()), rtol=0, atol=1e-5)


def test_a_directory_that_is_not_a_save_is_refused(registry, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    composed = _composed(registry)
    for call in (lambda: composed.save(tmp_path / "notes"), lambda: composed.to_peft("sst2", tmp_path / "notes")):
        with pytest.raises(AdapterFileError, match="refusing to overwrite"):
            call()
    assert _listing(tmp_path / "notes") == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFileError, match="not a directory"):
        composed.save(tmp_path / "file")


def test_leftovers_of_older_versions_are_cleaned_up_and_nothing_else(registry, tmp_path):
    composed = _composed(registry)
    old_tmp, old_old, foreign = tmp_path / ".run.tmp-abc", tmp_path / ".run.old-1234", tmp_path / ".run.old-5678"
    for d in (old_tmp, old_old, foreign):
        d.mkdir()
    (old_old / "composition.json").write_text("{}")
    (foreign / "diary.txt").write_text("not a save")
    composed.save(tmp_path / "run")
    assert not old_tmp.exists() and not old_old.exists() and (foreign / "diary.txt").exists()


def test_a_save_that_loses_a_race_gets_the_librarys_error_and_writes_nothing(registry, tmp_path):
    composed = _composed(registry)
    path = composed.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with directory_lock(path):  # another writer holds the directory
        with pytest.raises(SaveConflictError, match="another save to .* is in progress"):
            composed.save(path)
        with pytest.raises(SaveConflictError):
            composed.to_peft("sst2", tmp_path / "run")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    composed.save(path)  # the lock is gone with its holder


def test_concurrent_saves_leave_exactly_one_complete_save(registry, tmp_path):
    writers = [_composed(registry, seed=s) for s in range(3)]
    path = tmp_path / "run"
    outcomes: list[str] = []
    barrier = threading.Barrier(len(writers))

    def work(composed):
        for _ in range(4):
            barrier.wait()
            try:
                composed.save(path)
                outcomes.append("saved")
            except SaveConflictError:
                outcomes.append("conflict")
            except Exception as exc:  # noqa: BLE001 - fails the test below
                outcomes.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(c,)) for c in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(outcomes) <= {"saved", "conflict"} and "saved" in outcomes, outcomes
    manifest = json.loads((path / "composition.json").read_text())
    files = {e["file"] for e in manifest["adapters"].values()} | {manifest["operators_file"]}
    assert {p.name for p in path.iterdir()} == files | {"composition.json"}  # nothing stranded
    model = tiny_llama()
    ac.load(model, path, registry=registry)
    assert any(torch.equal(output(model, inputs()), output(w.model, inputs())) for w in writers)


def test_a_failed_peft_write_keeps_the_previous_pair(registry, tmp_path, monkeypatch):
    composed = _composed(registry)
    path = composed.to_peft("sst2", tmp_path / "p")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(commit, "write_new", full)
    randomize(composed, seed=4)
    with pytest.raises(AdapterFileError, match="No space left.*the previous save is unchanged"):
        composed.to_peft("sst2", path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


@pytest.mark.parametrize(
    "names",
    [("operators", "other"), ("A", "a"), ("x" * 150, "x" * 151), ("_operators", "operators")],
)
def test_file_names_never_collide(registry, tmp_path, names):
    """An adapter named ``operators`` (beside a sum's weights), names equal but for case
    (case-insensitive file systems) and very long names each get their own file."""
    composed = _composed(registry, names=names)
    path = composed.save(tmp_path / "run")
    manifest = json.loads((path / "composition.json").read_text())
    files = [e["file"] for e in manifest["adapters"].values()] + [manifest["operators_file"]]
    assert len({f.casefold() for f in files}) == len(files) and all(len(f) < 200 for f in files)
    _loads_as(path, composed, registry)
