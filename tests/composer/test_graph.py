"""The composition graph: declaration, JSON round trip, and errors raised while declaring."""

from __future__ import annotations

import json

import pytest

import adapter_composer as ac
from adapter_composer import CompositionError, Graph


def _graph() -> Graph:
    g = Graph()
    a = g.adapter("sst2", "lora", r=8, alpha=16, targets=["attn.q", "attn.v"])
    b = g.adapter("mrpc", "lora", r=4, targets=("attn.q",), layers=[0])
    g.stack(a, b, name="both")
    return g


def test_declaration_builds_a_networkx_graph():
    g = _graph()
    assert list(g.adapters) == ["sst2", "mrpc"]
    assert g.roots() == ["both"]
    assert sorted(g.nx.successors("both")) == ["mrpc", "sst2"]
    spec = g.spec("sst2")
    assert (
        spec.method == "lora"
        and spec.targets == ("attn.q", "attn.v")
        and spec.config == {"r": 8, "alpha": 16}
    )
    assert g.spec("mrpc").layers == (0,)


def test_nodes_returned_are_names_and_nest():
    g = Graph()
    a = g.adapter("a", "lora")
    inner = g.stack(a, g.adapter("b", "lora"))
    outer = g.stack(inner, g.adapter("c", "lora"))
    assert isinstance(inner, str) and inner.startswith("stack_")
    assert g.spec(outer).children == (inner, "c")
    assert g.roots() == [outer]


def test_json_round_trip_is_exact():
    g = _graph()
    text = g.to_json()
    again = Graph.from_json(text)
    assert again.to_dict() == g.to_dict()
    assert json.loads(text)["format"] == "adapter-composer.graph"


def test_tree_rendering_names_everything():
    text = _graph().tree()
    assert "both: stack()" in text and "sst2: lora(r=8, alpha=16)" in text


def test_duplicate_adapter_name_is_refused_at_declaration():
    g = Graph()
    g.adapter("sst2", "lora")
    with pytest.raises(CompositionError) as err:
        g.adapter("sst2", "lora", r=4)
    assert err.value.codes == ["duplicate-name"]
    assert "'sst2' is already used by an adapter of method 'lora'" in str(err.value)
    assert len(g) == 1 and g.spec("sst2").config == {}


def test_duplicate_names_in_json_are_all_reported():
    data = _graph().to_dict()
    data["nodes"].append(dict(data["nodes"][0]))
    data["nodes"].append(dict(data["nodes"][1]))
    with pytest.raises(CompositionError) as err:
        Graph.from_dict(data)
    assert err.value.codes == ["duplicate-name", "duplicate-name"]


def test_bad_names_and_types_are_refused():
    g = Graph()
    with pytest.raises(CompositionError, match="bad-node"):
        g.adapter("has space", "lora")
    with pytest.raises(CompositionError, match="layers"):
        g.adapter("a", "lora", layers=["first"])
    assert len(g) == 0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "does not parse"),
        ('{"format": "something-else"}', "not an adapter-composer graph"),
        (
            '{"format": "adapter-composer.graph", "version": 1, "nodes": [{"type": "widget"}]}',
            "expected 'adapter' or 'operator'",
        ),
        (
            '{"format": "adapter-composer.graph", "version": 1, "nodes": [{"type": "adapter", "name": "a"}]}',
            "method",
        ),
        ('{"format": "adapter-composer.graph", "version": 9, "nodes": []}', "version 9"),
    ],
)
def test_bad_graph_files_are_reported(text, needle):
    with pytest.raises(CompositionError) as err:
        Graph.from_json(text)
    assert "bad-graph-file" in err.value.codes and needle in str(err.value)


def test_forward_references_resolve_at_validation(registry):
    g = Graph()
    g.stack("a", "b", name="s")
    g.adapter("a", "lora")
    g.adapter("b", "lora")
    assert ac.validate(g, registry) == []


def test_remove_leaves_a_visible_dangling_reference(registry):
    g = _graph()
    g.remove("mrpc")
    diags = ac.validate(g, registry)
    assert [d.code for d in diags] == ["unknown-node"] and "'mrpc'" in diags[0].message
