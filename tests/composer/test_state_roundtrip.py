"""Every tensor a composition holds survives ``save`` → ``load`` bit for bit, for every
registered method under every registered operator (and alone).

Each cell composes two adapters under the operator, gives every parameter and every
persistent buffer the composition added (adapters, operator weights, routers, ...) a random
value, saves, loads onto a fresh base model, and compares outputs and the whole model state.
Non-persistent buffers are derived state: after loading they must equal the original's
without being randomised. So a new method or operator that keeps state ``save`` forgets
fails here. Cells the method × operator table refuses must be refused at compose time.
"""

from __future__ import annotations

import pytest
import torch

import adapter_composer as ac
from adapter_composer import CompositionError, Graph
from tests.models import BUILDERS, inputs
from tests.plugins.test_conformance import PROFILES, REGISTRY

METHODS = sorted(REGISTRY.methods)
OPERATORS = ["alone", *sorted(REGISTRY.operators)]
# option variants whose state lives elsewhere: (method, operator, method config, operator options)
VARIANTS = [
    ("lora", "mix", {}, {"router": "layer"}),
    ("lora", "mix", {}, {"top_k": 1, "granularity": "sequence"}),
    ("lora", "sum", {}, {"learnable": True}),
    ("lora", "stack", {"dora": True}, {}),
    ("prefix_tuning", "alone", {"projection": True}, {}),
    ("vera", "route", {"save_projection": False}, {}),
]
CELLS = [(m, o, {}, {}) for m in METHODS for o in OPERATORS] + VARIANTS
CELL_IDS = [
    "-".join([m, o, *(f"{k}={v}" for k, v in {**c, **opts}.items())]) for m, o, c, opts in CELLS
]
KEYS = ["ka", "kb", None]


def _graph(method: str, operator: str, config: dict, options: dict) -> Graph:
    g = Graph()
    names = ["a"] if operator == "alone" else ["a", "b"]
    for name in names:
        g.adapter(name, method, **{**PROFILES[method].config, **config})
    if operator != "alone":
        keyed = REGISTRY.operator(operator).keyed
        g.op(operator, *names, name="node", keys=["ka", "kb"] if keyed else None, **options)
    return g


def _call(model, batch, keyed: bool):
    with torch.no_grad():
        out = model(**batch, route=KEYS) if keyed else model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@torch.no_grad()
def _randomize_state(model, base_ids: set[int], seed: int = 0) -> int:
    """Random values for every parameter and persistent buffer that is not the base model's."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in base_ids or t.numel() == 0:
            continue
        if t.is_floating_point():
            t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.2)
        elif t.dtype == torch.bool:
            t.copy_(torch.rand(t.shape, generator=g) < 0.5)
        else:
            low, high = int(t.min()), int(t.max())
            t.copy_(torch.randint(low, max(high, low + 1) + 1, t.shape, generator=g).to(t.dtype))
        count += 1
    return count


def _non_persistent(model) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict())
    return {n: b.detach().clone() for n, b in model.named_buffers() if n not in persistent}


@pytest.mark.parametrize("method, operator, config, options", CELLS, ids=CELL_IDS)
def test_every_tensor_round_trips(method, operator, config, options, tmp_path):
    profile = PROFILES[method]
    model = BUILDERS[profile.arch](0)
    base_ids = {id(t) for t in (*model.parameters(), *model.buffers())}
    graph = _graph(method, operator, config, options)
    try:
        composed = ac.compose(model, graph, registry=REGISTRY)
    except CompositionError as exc:
        assert "unsupported-operator" in exc.codes, f"{method} × {operator} failed to compose: {exc}"
        return
    keyed = operator != "alone" and REGISTRY.operator(operator).keyed
    assert _randomize_state(model, base_ids) > 0
    derived = _non_persistent(model)
    batch = inputs(batch=3)
    expected = _call(model, batch, keyed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    composed.save(tmp_path / "c")

    fresh = BUILDERS[profile.arch](0)
    ac.load(fresh, tmp_path / "c", registry=REGISTRY)
    assert torch.equal(_call(fresh, batch, keyed), expected)
    loaded = fresh.state_dict()
    assert loaded.keys() == state.keys()
    differ = [k for k in state if not torch.equal(loaded[k], state[k])]
    assert not differ, f"not restored by save/load: {differ[:5]}"
    now = _non_persistent(fresh)
    assert now.keys() == derived.keys() and all(torch.equal(now[k], derived[k]) for k in derived)


def test_mix_routers_are_saved(registry, tmp_path):
    """The default per-site routers (router="site") round-trip, as trained routers must."""
    model = BUILDERS["llama"](0)
    g = Graph()
    for name in ("a", "b"):
        g.adapter(name, "lora", r=2, targets=["attn.q", "mlp.down"])
    g.mix("a", "b", name="gate")
    composed = ac.compose(model, g, registry=registry)
    routers = composed._rt.shared["gate"].routers
    assert sorted(routers) == sorted(f"layers:{i}:{r}" for i in range(2) for r in ("attn:q", "mlp:down"))
    with torch.no_grad():
        for p in composed.parameters():
            p.normal_(0, 0.5)
    batch = inputs()
    expected = _call(model, batch, False)
    composed.save(tmp_path / "c")
    fresh = BUILDERS["llama"](0)
    again = ac.load(fresh, tmp_path / "c", registry=registry)
    assert torch.equal(_call(fresh, batch, False), expected)
    assert all(torch.equal(a, b) for a, b in zip(again._rt.shared["gate"].state_dict().values(), composed._rt.shared["gate"].state_dict().values(), strict=True))


def test_interrupted_mix_run_resumes_with_its_routers(registry, tmp_path):
    """Training checkpoints hold the composition through save/load: a mix run (routers and
    experts training) resumed after a crash ends where the uninterrupted run ends, bit for bit."""
    from adapter_composer.workflow.heads import TaskHeads
    from adapter_composer.workflow.training import TrainConfig, train
    from tests.composer.test_training import WORDS, _interrupt_at, _tasks
    from tests.models import tiny_bert, tiny_tokenizer

    def setup():
        g = Graph()
        for name in ("x", "y"):
            g.adapter(name, "lora", r=2, targets=["attn.q", "attn.v"])
        g.mix("x", "y", name="gate")
        composed = ac.compose(tiny_bert(), g, registry=registry)
        tasks = _tasks()
        heads = TaskHeads({k: t.spec for k, t in tasks.items()}, hidden=64, dropout=0.0)
        return composed, heads, tasks, tiny_tokenizer(WORDS)

    config = TrainConfig(steps=6, batch_size=4, lr=5e-2, checkpoint_every=3, progress=False, seed=3)
    composed, heads, tasks, tok = setup()
    train(composed, heads, tasks, tok, config, out_dir=tmp_path / "full")
    reference = {k: v.clone() for k, v in composed.model.state_dict().items()}
    assert any("router" in k and bool(v.any()) for k, v in reference.items())  # the routers trained

    composed, heads, tasks, tok = setup()
    crash, boom = _interrupt_at(4)
    with pytest.raises(boom):
        train(composed, heads, tasks, tok, config, out_dir=tmp_path / "run", callbacks=[crash])
    composed, heads, tasks, tok = setup()  # a new process: fresh (zero) routers
    train(composed, heads, tasks, tok, config, out_dir=tmp_path / "run", resume=True)
    now = composed.model.state_dict()
    differ = [k for k, v in reference.items() if not torch.equal(v, now[k])]
    assert not differ, f"differ after resuming: {differ[:5]}"
