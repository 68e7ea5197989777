"""Every cell of the method × operator table, checked against a reference computed independently.

verified cells:
  route  row by row, the routed batch equals each adapter run alone (rows without a key: the base)
  mix    with a one-hot gate (top-1, router biased), the mixture equals the chosen expert alone
  sum    at a site, y = y₀ + Σ wᵢ (yᵢ − y₀), each yᵢ from a model composed with adapter i alone
  stack  deltas add (y_a + y_b − y₀); scales multiply (y₀ ⊙ l_a ⊙ l_b, from the parameters);
         sublayer adapters chain (h_a + f_b(h_a)); prompts and prefixes concatenate ([P_a; P_b])
refused cells raise CompositionError with code "unsupported-operator".
"""

from __future__ import annotations

import copy

import pytest
import torch

import adapter_composer as ac
from adapter_composer import CompositionError, Graph
from adapter_composer.runtime.linear import LinearSite
from adapter_composer.tables import cell, table_markdown
from tests.models import BUILDERS, inputs, output, randomize
from tests.plugins.routing_checks import ROUTING_CHECKS  # arrow, poly, lorahub
from tests.plugins.test_conformance import PROFILES, REGISTRY

METHODS = sorted(REGISTRY.methods)
OPERATORS = sorted(REGISTRY.operators)
CELLS = [(m, o) for m in METHODS for o in OPERATORS]
ATOL = 2e-5


def _graph(method: str, operator: str) -> Graph:
    g = Graph()
    for name in ("a", "b"):
        g.adapter(name, method, **PROFILES[method].config)
    if operator == "route":
        g.route({"ka": "a", "kb": "b"}, name="node")
    elif operator == "mix":
        g.mix("a", "b", name="node", top_k=1)
    elif operator == "sum":
        g.sum("a", "b", weights=[0.6, -0.4], name="node")
    else:
        g.op(operator, "a", "b", name="node")
    return g


def _alone(method: str, composed, name: str):
    """A fresh model composed with adapter ``name`` only, holding the same weights."""
    model = BUILDERS[PROFILES[method].arch](0)
    g = Graph()
    g.adapter(name, method, **PROFILES[method].config)
    single = ac.compose(model, g, registry=REGISTRY)
    single.adapters[name].load_tensors(composed.adapters[name].state_dict())
    return model, single


def _setup(method: str, operator: str):
    model = BUILDERS[PROFILES[method].arch](0)
    composed = ac.compose(model, _graph(method, operator), registry=REGISTRY)
    randomize(composed, std=0.2, seed=3)
    return model, composed


def _capture(model, path: str, batch, **extra):
    store = {}

    def hook(module, args, kwargs, out):
        store.setdefault("io", (args, kwargs, out))

    handle = model.get_submodule(path).register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**batch, **extra)
    handle.remove()
    return store["io"]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _site_paths(composed):
    return [(s.path, s.family) for s in composed.plan.sites if s.family in ("linear", "sublayer")]


# --- the checks -------------------------------------------------------------------------


def check_route(method, model, composed):
    batch = inputs(batch=3)
    keys = ["ka", "kb", None]
    with torch.no_grad():
        routed = model(**batch, route=keys).logits
    length = batch["input_ids"].shape[1]
    for row, name in enumerate(["a", "b", None]):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        if name is None:
            reference = output(BUILDERS[PROFILES[method].arch](0), one)
        else:
            alone, _ = _alone(method, composed, name)
            reference = output(alone, one)
        torch.testing.assert_close(routed[row : row + 1, -length:], reference[:, -length:], rtol=0, atol=ATOL)


def check_mix(method, model, composed):
    for site in composed.sites().values():
        for node in site.modules():
            if type(node).__name__ == "MixNode":
                with torch.no_grad():
                    node.router.bias.copy_(torch.tensor([1e3, 0.0]))
    batch = inputs()
    alone, _ = _alone(method, composed, "a")
    torch.testing.assert_close(output(model, batch), output(alone, batch), rtol=0, atol=ATOL)


def check_sum(method, model, composed):
    batch = inputs()
    weights = [0.6, -0.4]
    singles = [_alone(method, composed, n)[0] for n in ("a", "b")]
    base = BUILDERS[PROFILES[method].arch](0)
    for path, _family in _site_paths(composed)[:3]:
        args, kwargs, out = _capture(model, path, batch)
        with torch.no_grad():
            y0 = _first(base.get_submodule(path)(*args, **kwargs))
            ys = [_first(s.get_submodule(path)(*args, **kwargs)) for s in singles]
        expected = y0 + sum(w * (y - y0) for w, y in zip(weights, ys, strict=True))
        torch.testing.assert_close(_first(out), expected, rtol=0, atol=ATOL)


def _leaf(composed, name, path, family):
    site = composed.sites()[(path, family)]
    return next(m for m in site.modules() if getattr(m, "adapter", None) == name and hasattr(m, "kind"))


def check_stack(method, model, composed):
    batch = inputs()
    families = {f for _, f in _site_paths(composed)}
    if not families:  # prompts and prefixes: one adapter holding [P_a; P_b]
        return check_concatenated(method, model, composed, batch)
    singles = {n: _alone(method, composed, n)[0] for n in ("a", "b")}
    base = BUILDERS[PROFILES[method].arch](0)
    for path, family in _site_paths(composed)[:4]:
        args, kwargs, out = _capture(model, path, batch)
        leaf_a, leaf_b = _leaf(composed, "a", path, family), _leaf(composed, "b", path, family)
        with torch.no_grad():
            y0 = _first(base.get_submodule(path)(*args, **kwargs))
            ya, yb = (_first(singles[n].get_submodule(path)(*args, **kwargs)) for n in ("a", "b"))
            if leaf_a.kind in ("linear.delta", "sublayer.parallel"):
                expected = ya + yb - y0
            elif leaf_a.kind == "linear.scale_out":
                expected = y0 * leaf_a.op.scale() * leaf_b.op.scale()
            elif leaf_a.kind == "linear.scale_in":
                x = args[0] if args else kwargs["input"]
                expected = base.get_submodule(path)(x * leaf_a.op.scale() * leaf_b.op.scale())
            else:  # sublayer.output: b(a(h)) = h_a + f_b(h_a)
                expected = ya + leaf_b.op(ya.to(next(leaf_b.op.parameters()).dtype)).to(ya.dtype)
        torch.testing.assert_close(_first(out), expected, rtol=0, atol=ATOL)


def check_concatenated(method, model, composed, batch):
    tokens = {n: composed.adapters[n].modules["model"]().detach() for n in ("a", "b")}
    alone, single = _alone(method, composed, "a")
    module = single.adapters["a"].modules["model"]
    joined = torch.cat([tokens["a"], tokens["b"]], dim=0)
    module.forward = lambda: joined  # the reference: one adapter whose tokens are [P_a; P_b]
    torch.testing.assert_close(output(model, batch), output(alone, batch), rtol=0, atol=ATOL)


CHECKS = {"route": check_route, "mix": check_mix, "sum": check_sum, "stack": check_stack, **ROUTING_CHECKS}


@pytest.mark.parametrize("method, operator", CELLS)
def test_every_cell(method, operator):
    verified, reason = cell(REGISTRY, method, operator)
    if not verified:
        model = BUILDERS[PROFILES[method].arch](0)
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(CompositionError) as err:
            ac.compose(model, _graph(method, operator), registry=REGISTRY)
        assert "unsupported-operator" in err.value.codes
        assert reason in str(err.value) or operator in str(err.value)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        return
    assert operator in CHECKS, f"no numeric check for operator {operator!r}: add one"
    model, composed = _setup(method, operator)
    CHECKS[operator](method, model, composed)


def test_every_method_and_operator_has_a_row_and_column():
    text = table_markdown(REGISTRY)
    for m in METHODS:
        assert f"| `{m}` |" in text
    header = text.splitlines()[0]
    assert all(o in header for o in OPERATORS)


def test_readme_table_is_current():
    from pathlib import Path

    from adapter_composer.registry import load_registry
    from adapter_composer.tables import END, START

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == table_markdown(load_registry(entry_points=False)), "run: python -m adapter_composer.tables --write README.md"


def test_merge_inside_route_or_mix_is_refused():
    model, composed = _setup("lora", "route")
    with pytest.raises(CompositionError) as err:
        composed.merge()
    assert err.value.codes == ["merge-not-exact"] * len(err.value.diagnostics)
    assert "inside route node 'node'" in str(err.value)
    assert not any(isinstance(s, LinearSite) and s.merged for s in composed.sites().values())
