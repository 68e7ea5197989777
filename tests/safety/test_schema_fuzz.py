"""Mutation fuzz of ``composition.json`` and ``adapter_config.json`` (hypothesis).

Each example changes a real file in a way that must never silently change the model — a
value replaced by one of another JSON type (``"false"`` for ``false``, a list for a number,
``null``), an unknown key, a whole document of the wrong shape — and loads it. Either the
load succeeds and the outputs are *identical* to the unmutated file's, or it raises one of
the library's errors and the model is untouched. A raw ``TypeError``/``AttributeError``/
``RecursionError`` fails the test, and so does a model that loads with other outputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapter_composer as ac
from tests.models import output, tiny_llama
from tests.safety.sources import Untouched

LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
VALUE = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6
)
SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def _positions(doc, prefix=()):
    """Every (path, value) in a JSON document, containers included."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _positions(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _positions(v, (*prefix, i))


def _set(doc, path, value):
    if not path:
        return value
    out = copy.deepcopy(doc)
    node = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


@st.composite
def mutations(draw, doc, extra_keys_into):
    """A mutated copy of ``doc`` and what was done (for the failure report)."""
    how = draw(st.sampled_from(["retype", "retype", "retype", "extra key", "document"]))
    if how == "document":
        value = draw(VALUE.filter(lambda v: not isinstance(v, dict) or "format" not in v))
        return value, f"document -> {value!r}"
    positions = list(_positions(doc))
    if how == "extra key":
        dicts = [p for p, v in positions if isinstance(v, dict) and extra_keys_into(p)]
        path = draw(st.sampled_from(dicts))
        key = draw(st.text(min_size=1, max_size=8))
        node = doc
        for step in path:
            node = node[step]
        if key in node:
            key = key + "_extra"
        value = draw(VALUE)
        return _set(doc, (*path, key), value), f"{'.'.join(map(str, path))} += {key!r}: {value!r}"
    path, old = draw(st.sampled_from([(p, v) for p, v in positions if p]))
    value = draw(VALUE.filter(lambda v: _kind(v) != _kind(old)))
    return _set(doc, path, value), f"{'.'.join(map(str, path))}: {old!r:.40} -> {value!r:.60}"


def _outcome(model, load, batch, expected, what):
    """Load; either the library's error with the model untouched, or identical outputs."""
    with Untouched(model):
        try:
            composed = load()
        except ac.ComposerError:
            return "refused"
        except Exception as exc:  # noqa: BLE001 - what this test exists to catch
            pytest.fail(f"{what}: raw {type(exc).__name__}: {exc}")
        else:
            got = output(model, batch)
            composed.undo()
            assert torch.equal(got, expected), f"{what}: loaded with different outputs"
            return "loaded"


def test_manifest_mutations(registry, composition):
    manifest_path = composition.path / "composition.json"
    original = json.loads(manifest_path.read_text())
    model = tiny_llama()
    seen = set()

    @SETTINGS
    @given(mutations(original, extra_keys_into=lambda path: True))
    def run(mutation):
        doc, what = mutation
        manifest_path.write_text(json.dumps(doc))
        seen.add(_outcome(model, lambda: ac.load(model, composition.path, registry=registry), composition.batch, composition.reference, what))

    run()
    assert "refused" in seen  # (and, usually, some harmless mutations that load)


def test_peft_config_mutations(registry, peft_dir):
    config_path = peft_dir.path / "adapter_config.json"
    original = json.loads(config_path.read_text())
    model = tiny_llama()
    baseline = ac.from_peft(model, peft_dir.path, registry=registry)
    expected = output(model, peft_dir.batch)
    baseline.undo()
    seen = set()

    @SETTINGS
    @given(mutations(original, extra_keys_into=lambda path: path == ()))  # (a new rank_pattern key is a new model)
    def run(mutation):
        doc, what = mutation
        config_path.write_text(json.dumps(doc))
        seen.add(_outcome(model, lambda: ac.from_peft(model, peft_dir.path, registry=registry), peft_dir.batch, expected, what))

    run()
    assert seen == {"refused", "loaded"}  # PEFT writes many fields our codec ignores


@pytest.mark.parametrize("what", ["composition", "peft"])
def test_truncated_json(registry, composition, peft_dir, what):
    src, name, load = (
        (composition, "composition.json", ac.load) if what == "composition" else (peft_dir, "adapter_config.json", ac.from_peft)
    )
    text = (src.path / name).read_text()
    model = tiny_llama()
    for cut in range(0, len(text), max(1, len(text) // 25)):
        (src.path / name).write_text(text[:cut])
        with Untouched(model), pytest.raises(ac.AdapterFileError):
            load(model, src.path, registry=registry)


@pytest.mark.parametrize(
    "field, value",
    [("use_rslora", "false"), ("use_rslora", -1), ("use_rslora", 1), ("use_dora", "true"), ("r", 4.0), ("r", True),
     ("r", 1e308), ("r", [4]), ("lora_alpha", "8"), ("lora_alpha", True), ("rank_pattern", []), ("rank_pattern", {"q_proj": "4"}),
     ("alpha_pattern", {"q_proj": None}), ("lora_dropout", [0.0])],
)
def test_the_issues_peft_coercions_are_refused(registry, peft_dir, field, value):
    path = peft_dir.path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    model = tiny_llama()
    with Untouched(model), pytest.raises(ac.AdapterFileError, match=field):
        ac.from_peft(model, peft_dir.path, registry=registry)


@pytest.mark.parametrize("document", [[], "LORA", 5, None, {"peft_type": ["LORA"]}, {"peft_type": "NOPE"}])
def test_peft_documents_of_the_wrong_shape(registry, peft_dir, document):
    (peft_dir.path / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(ac.AdapterFileError):
        ac.from_peft(tiny_llama(), peft_dir.path, registry=registry)


@pytest.mark.parametrize(
    "text",
    ['{"format": "adapter-composer.graph", "version": 1, "nodes": 5}',
     '{"format": "adapter-composer.graph", "version": 1, "nodes": [{"type": "adapter", "name": "a", "method": "lora", "layers": ["1"]}]}',
     '{"format": "adapter-composer.graph", "version": 1, "nodes": [{"type": "adapter", "name": "a", "method": "lora", "layers": [true]}]}',
     '{"format": "adapter-composer.graph", "version": 1, "nodes": [{"type": "adapter", "name": "a", "method": "lora", "targets": "attn.q"}]}',
     '{"format": "adapter-composer.graph", "version": 1, "nodes": [], "extra": 1}',
     '{"format": "adapter-composer.graph", "version": 1, "nodes": [{"type": "operator", "name": "s", "operator": "sum", "children": "ab"}]}',
     '[' * 100000 + ']' * 100000, '{"format": "adapter-composer.graph", "version": 1, "nodes": [7, null, []]}'],
)
def test_graph_json_is_read_strictly(text):
    with pytest.raises(ac.CompositionError) as err:
        ac.Graph.from_json(text)
    assert set(err.value.codes) <= {"bad-graph-file"}
