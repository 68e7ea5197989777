"""Property-based: random graphs either compose and run, or raise CompositionError — never
another exception — and a refused graph leaves the model exactly as it was."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapter_composer as ac
from adapter_composer import CompositionError, Graph
from tests.models import inputs, same_state, state_copy, tiny_gpt2, tiny_llama
from tests.plugins.test_conformance import PROFILES, REGISTRY

METHODS = sorted(m for m in REGISTRY.methods if PROFILES[m].arch.startswith("llama"))
ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "mlp.gate", "attn.zz", "attn", "mlp"]
OPERATORS = ["stack", "sum", "mix", "route", "blend"]


@st.composite
def graphs(draw):
    n = draw(st.integers(1, 4))
    names = [f"a{i}" for i in range(n)]
    specs = []
    for name in names:
        method = draw(st.sampled_from(METHODS + ["nope"]))
        config = dict(PROFILES[method].config) if method in PROFILES else {}
        mutation = draw(st.sampled_from(["none", "none", "none", "targets", "bad-key", "bad-value"]))
        if mutation == "targets":
            config["targets"] = draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True))
        elif mutation == "bad-key":
            config["surprise"] = 1
        elif mutation == "bad-value" and "r" in config:
            config["r"] = -1
        specs.append(("adapter", name, method, config))
    pool = list(names)
    for j in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(OPERATORS))
        children = draw(st.lists(st.sampled_from(pool + ["ghost"]), min_size=1, max_size=3))
        node = f"n{j}"
        if draw(st.booleans()) and j > 0:
            children.append(f"n{j}")  # a cycle through itself
        specs.append(("op", node, op, children))
        pool.append(node)
    return specs


def _build(specs) -> Graph:
    g = Graph()
    for kind, name, what, extra in specs:
        if kind == "adapter":
            g.adapter(name, what, **extra)
        elif what == "route":
            g.route({f"k{i}": c for i, c in enumerate(extra)}, name=name)
        elif what == "sum":
            g.sum(*extra, weights=[0.5] * len(extra), name=name)
        else:
            g.op(what, *extra, name=name)
    return g


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.sampled_from(["llama", "gpt2"]))
def test_compose_runs_or_refuses_cleanly(specs, arch):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    before = state_copy(model)
    modules = dict(model.named_modules())
    try:
        g = _build(specs)
    except CompositionError:
        return  # refused while declaring (e.g. a duplicate name)
    try:
        composed = ac.compose(model, g, registry=REGISTRY)
    except CompositionError as err:
        assert err.diagnostics and all(d.code and d.message for d in err.diagnostics)
        assert same_state(model, before) and dict(model.named_modules()) == modules
        return
    batch = inputs(batch=2, length=6)
    keys = sorted({k for s in g.specs.values() if getattr(s, "keys", None) for k in s.keys})
    extra = {"route": [keys[0], None]} if keys else {}
    with torch.no_grad():
        logits = model(**batch, **extra).logits
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    composed.undo()
    assert same_state(model, before)
    assert math.isfinite(float(composed.aux_loss()))
