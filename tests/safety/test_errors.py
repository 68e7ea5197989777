"""One error hierarchy: public calls given bad input raise the library's errors (which are
``KeyError``/``ValueError`` too where callers would catch those), never raw ones."""

from __future__ import annotations

import inspect

import pytest
import torch

import adapter_composer as ac
import adapter_composer.errors as errors
from tests.models import inputs, tiny_llama


def test_every_error_is_a_composer_error_and_documented():
    classes = [getattr(errors, n) for n in errors.__all__]
    assert all(issubclass(c, errors.ComposerError) for c in classes)
    doc = errors.__doc__
    for c in classes:
        assert c.__name__ in doc, f"{c.__name__} is not in the hierarchy of adapter_composer.errors"
        assert getattr(ac, c.__name__) is c  # importable as ac.<Name>
    assert issubclass(errors.UnknownAdapterError, KeyError) and issubclass(errors.CompositionError, ValueError)
    assert issubclass(ac.registry.PluginError, errors.ComposerError)


def test_unknown_names_are_key_errors_with_readable_messages():
    err = errors.UnknownAdapterError("no adapter 'x'; adapters: ['a']")
    assert str(err) == "no adapter 'x'; adapters: ['a']"  # not KeyError's quoted repr


def _composed(registry):
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("t0", "lora", r=2, targets=["attn.q"])
    g.route({"k0": "t0"}, name="tasks")
    return model, ac.compose(model, g, registry=registry)


CALLS = {
    "replace_weights unknown": (lambda m, c, tmp: c.replace_weights("nope", {}), errors.UnknownAdapterError),
    "remove_adapter unknown": (lambda m, c, tmp: c.remove_adapter("nope"), errors.UnknownAdapterError),
    "to_peft unknown": (lambda m, c, tmp: c.to_peft("nope", tmp / "x"), errors.UnknownAdapterError),
    "add_adapter bad name": (
        lambda m, c, tmp: c.add_adapter("no spaces", "lora", route="tasks", key="k1"),
        errors.CompositionError,
    ),
    "add_adapter bad targets": (
        lambda m, c, tmp: c.add_adapter("x", "lora", route="tasks", key="k1", targets=5),
        errors.CompositionError,
    ),
    "route=5": (lambda m, c, tmp: m(**inputs(), route=5), errors.RoutingError),
    "route={}": (lambda m, c, tmp: m(**inputs(), route={"a": 1}), errors.RoutingError),
    "routing(5)": (lambda m, c, tmp: c.routing(5).__enter__(), errors.RoutingError),
    "generate(route=5)": (lambda m, c, tmp: m.generate(**inputs(), route=5, max_new_tokens=1), errors.RoutingError),
    "load missing": (lambda m, c, tmp: ac.load(tiny_llama(), tmp / "missing"), errors.AdapterFileError),
    "from_peft missing": (lambda m, c, tmp: ac.from_peft(tiny_llama(), tmp / "missing"), errors.AdapterFileError),
    "read_peft file": (lambda m, c, tmp: ac.read_peft(__file__), errors.AdapterFileError),
    "save into a file": (lambda m, c, tmp: c.save(__file__), errors.AdapterFileError),
    "Graph.remove": (lambda m, c, tmp: ac.Graph().remove("x"), errors.UnknownNodeError),
    "Graph.spec": (lambda m, c, tmp: ac.Graph().spec("x"), errors.UnknownNodeError),
    "Graph.spec([])": (lambda m, c, tmp: ac.Graph().spec([]), errors.UnknownNodeError),
    "Graph.stack(5)": (lambda m, c, tmp: ac.Graph().stack(5), errors.CompositionError),
    "Graph.route(5)": (lambda m, c, tmp: ac.Graph().route(5), errors.CompositionError),
    "Graph.adapter layers=5": (lambda m, c, tmp: ac.Graph().adapter("a", "lora", layers=5), errors.CompositionError),
    "Graph.from_json(None)": (lambda m, c, tmp: ac.Graph.from_json(None), errors.CompositionError),
    "Graph.from_dict([])": (lambda m, c, tmp: ac.Graph.from_dict([]), errors.CompositionError),
    "registry.method": (lambda m, c, tmp: c.registry.method("nope"), errors.RegistryError),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_public_calls_raise_the_librarys_errors(registry, tmp_path, name):
    call, expected = CALLS[name]
    model, composed = _composed(registry)
    with pytest.raises(errors.ComposerError) as err, torch.no_grad():
        call(model, composed, tmp_path)
    assert isinstance(err.value, expected), f"{name}: {type(err.value).__name__}: {err.value}"


def test_hierarchy_is_listed_in_the_readme():
    from pathlib import Path

    readme = (Path(inspect.getfile(ac)).resolve().parents[1] / "README.md").read_text()
    safety = readme.split("## Safety", 1)[1].split("\n## ", 1)[0]
    for name in ("ComposerError", "AdapterFileError", "UnsafePathError", "SaveConflictError", "PluginContractError", "UnknownAdapterError"):
        assert name in safety


def test_arguments_of_the_wrong_kind_are_argument_errors_saying_what_to_pass():
    g = ac.Graph()
    g.adapter("a", "lora", r=2, targets=["attn.q"])
    with pytest.raises(errors.ArgumentError, match="needs a torch nn.Module.*got str"):
        ac.compose("meta-llama/Llama-3-8B", g)
    with pytest.raises(errors.ArgumentError, match="needs an adapter_composer.Graph.*ac.Graph"):
        ac.compose(tiny_llama(), {"a": "lora"})
    composed = ac.compose(tiny_llama(), g)
    with pytest.raises(errors.UnknownSiteError, match="no site at 'nope'.*its sites: \\['model.layers.0"):
        composed.plan.site("nope")
    prompts = ac.Graph()
    prompts.adapter("p", "prompt_tuning", num_virtual_tokens=2)
    prompted = ac.compose(tiny_llama(), prompts)
    ids = inputs()["input_ids"]
    with pytest.raises(TypeError, match="keyword arguments"):  # an ArgumentError is a TypeError too
        prompted.model(ids, torch.ones_like(ids))

