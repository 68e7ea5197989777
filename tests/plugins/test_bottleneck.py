"""Bottleneck adapters (plugins/bottleneck.py) against dense references written from the papers.

    f(u) = s · (W_up act(W_down u + b_down) + b_up)
    houlsby   h ↦ h + f(h) after attention and after the FFN        (Houlsby et al. 2019)
    pfeiffer  h ↦ h + f(h) after the FFN only                        (Pfeiffer et al. 2021)
    parallel  h ↦ h + f(x), x the sublayer's input, s = 4 by default (He et al. 2022)

h is the sublayer's result before the residual add (BERT: the output projection, before
dropout + LayerNorm). The references below read the adapters' parameters and apply the
formula by hand; the sublayer paths are written here, not taken from the architecture plugin.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import adapter_composer as ac
from adapter_composer import ComposerError, CompositionError, Graph
from adapter_composer.plugins.bottleneck import BottleneckAdapter, BottleneckConfig
from adapter_composer.registry import load_registry
from tests.models import BUILDERS, inputs, output, randomize, same_state, state_copy

REGISTRY = load_registry(entry_points=False)
ATOL = 1e-5
LAYERS = 2  # the tiny models' depth
WIDTH = 64  # the tiny models' hidden size

ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda z: z.clamp_min(0),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "swish": lambda z: z * torch.sigmoid(z),
    "tanh": torch.tanh,
}

# role -> (input module, output module): where the sublayer's input enters, and the module
# whose output is the sublayer's result before the residual add
SUBLAYERS = {
    "llama": {
        "attn": ("model.layers.{i}.self_attn", "model.layers.{i}.self_attn"),
        "mlp": ("model.layers.{i}.mlp", "model.layers.{i}.mlp"),
    },
    "gpt2": {
        "attn": ("transformer.h.{i}.attn", "transformer.h.{i}.attn"),
        "mlp": ("transformer.h.{i}.mlp", "transformer.h.{i}.mlp"),
    },
    "bert": {
        "attn": ("encoder.layer.{i}.attention", "encoder.layer.{i}.attention.output.dense"),
        "mlp": ("encoder.layer.{i}.intermediate", "encoder.layer.{i}.output.dense"),
    },
}
# BERT's post-LN blocks: forward(hidden_states, input_tensor) = LN(dropout(dense(hs)) + input_tensor)
BERT_BLOCKS = {"attn": "encoder.layer.{i}.attention.output", "mlp": "encoder.layer.{i}.output"}

# style, explicit targets, non-linearity (one case per activation), the roles that must be adapted
CASES = [
    ("houlsby", ["attn", "mlp"], "swish", ("attn", "mlp")),
    ("pfeiffer", None, "gelu", ("mlp",)),
    ("parallel", None, "tanh", ("mlp",)),
    ("parallel", ["attn", "mlp"], "relu", ("attn", "mlp")),
]


def dense_f(module: BottleneckAdapter, u: torch.Tensor, act: str, s: float) -> torch.Tensor:
    """s · (W_up act(W_down u + b_down) + b_up), from the module's parameters."""
    z = ACT[act](u @ module.down.weight.T + module.down.bias)
    return s * (z @ module.up.weight.T + module.up.bias)


def expected_scale(style: str, scaling: float | None = None) -> float:
    if scaling is not None:
        return scaling
    return 4.0 if style == "parallel" else 1.0


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _main(out):
    return out[0] if isinstance(out, tuple) else out


def _graph(style: str, targets=None, name: str = "a", **config) -> Graph:
    config.setdefault("bottleneck", 8)
    g = Graph()
    g.adapter(name, "bottleneck", style=style, targets=targets, **config)
    return g


def _originals(model, arch: str) -> dict[tuple[str, int], tuple]:
    """(role, layer) -> (input module, output module, output path), taken before composing."""
    out = {}
    for role, (inp, outp) in SUBLAYERS[arch].items():
        for i in range(LAYERS):
            path = outp.format(i=i)
            out[(role, i)] = (model.get_submodule(inp.format(i=i)), model.get_submodule(path), path)
    return out


def _capture(model, originals, batch) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """One forward pass; per sublayer: x (its input, at the original input module), h (the
    original output module's result) and y (what the module now at that path returned)."""
    store: dict[tuple[str, int], dict[str, torch.Tensor]] = {k: {} for k in originals}
    handles = []
    for key, (inp, out_mod, path) in originals.items():
        slot = store[key]
        handles += [
            inp.register_forward_pre_hook(
                lambda m, a, kw, s=slot: s.__setitem__("x", _first(a, kw)), with_kwargs=True
            ),
            out_mod.register_forward_hook(lambda m, a, o, s=slot: s.__setitem__("h", _main(o))),
            model.get_submodule(path).register_forward_hook(
                lambda m, a, o, s=slot: s.__setitem__("y", _main(o))
            ),
        ]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return store


# --- the module -------------------------------------------------------------------------


@pytest.mark.parametrize("act", sorted(ACT))
def test_module_is_the_formula(act):
    torch.manual_seed(0)
    module = BottleneckAdapter(16, 4, act, scale=1.5, init="kaiming")
    assert module.down.weight.shape == (4, 16) and module.up.weight.shape == (16, 4)
    assert not module.up.weight.any() and not module.up.bias.any()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    u = torch.randn(3, 5, 16)
    torch.testing.assert_close(module(u), dense_f(module, u, act, 1.5), rtol=0, atol=ATOL)


def test_dropout_acts_on_the_bottleneck_activations_in_training_only():
    torch.manual_seed(0)
    module = BottleneckAdapter(16, 8, "relu", scale=2.0, dropout=0.5)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    u = torch.randn(4, 16)
    module.train()
    torch.manual_seed(1)
    got = module(u)
    torch.manual_seed(1)
    z = F.dropout(ACT["relu"](u @ module.down.weight.T + module.down.bias), 0.5, training=True)
    torch.testing.assert_close(
        got, 2.0 * (z @ module.up.weight.T + module.up.bias), rtol=0, atol=ATOL
    )
    module.eval()
    torch.testing.assert_close(module(u), dense_f(module, u, "relu", 2.0), rtol=0, atol=ATOL)


# --- every sublayer of Llama, GPT-2 and BERT against the formula ------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("style, targets, act, adapted", CASES)
def test_each_sublayer_matches_the_formula(arch, style, targets, act, adapted):
    model = BUILDERS[arch](0)
    originals = _originals(model, arch)
    composed = ac.compose(model, _graph(style, targets, non_linearity=act), registry=REGISTRY)
    randomize(composed, std=0.2)
    modules = composed.adapters["a"].modules
    assert set(modules) == {f"layers.{i}.{r}" for r in adapted for i in range(LAYERS)}
    s = expected_scale(style)
    for (role, i), seen in _capture(model, originals, inputs()).items():
        h, x, y = seen["h"], seen["x"], seen["y"]
        if role not in adapted:  # pfeiffer / parallel leave attention alone
            assert model.get_submodule(originals[(role, i)][2]) is originals[(role, i)][1]
            assert torch.equal(y, h)
            continue
        module = modules[f"layers.{i}.{role}"]
        u = x if style == "parallel" else h
        with torch.no_grad():
            f = dense_f(module, u, act, s)
        torch.testing.assert_close(y, h + f, rtol=0, atol=ATOL)
        if style == "parallel":  # the residual is f(x), visibly not f(h)
            with torch.no_grad():
                wrong = dense_f(module, h, act, s)
            assert (y - h - wrong).abs().max() > 100 * ATOL


def test_kinds_and_default_scaling_follow_the_style():
    for style, kind in (
        ("houlsby", "sublayer.output"),
        ("pfeiffer", "sublayer.output"),
        ("parallel", "sublayer.parallel"),
    ):
        for scaling in (None, 2.5):
            model = BUILDERS["gpt2"](0)
            targets = ["attn", "mlp"] if style == "houlsby" else None
            composed = ac.compose(
                model, _graph(style, targets, scaling=scaling), registry=REGISTRY
            )
            leaves = [leaf for sp in composed.plan.sites for leaf in sp.program.leaves()]
            assert leaves and {leaf.kind for leaf in leaves} == {kind}
            scales = {m.scale for m in composed.adapters["a"].modules.values()}
            assert scales == {expected_scale(style, scaling)}
            composed.undo()


@pytest.mark.parametrize("factor", [16, 3, 1.5])
def test_reduction_factor_sets_the_width_and_the_parameter_count(factor):
    model = BUILDERS["llama"](0)
    g = Graph()
    g.adapter("a", "bottleneck", reduction_factor=factor)
    composed = ac.compose(model, g, registry=REGISTRY)
    d, m = WIDTH, int(WIDTH // factor)
    for module in composed.adapters["a"].modules.values():
        assert module.down.weight.shape == (m, d)
    assert composed.trainable_parameters().per_adapter["a"] == LAYERS * (d * m + m + m * d + d)


# --- whole model: adapters inserted by hand into a copy of the original -----------------


def _pre_ln_forward(original: Callable, f: Callable, parallel: bool) -> Callable:
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        h = _main(out)
        y = h + f(_first(args, kwargs) if parallel else h)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return forward


def _post_ln_forward(block, f: Callable, parallel: bool) -> Callable:
    def forward(hidden_states, input_tensor):
        h = block.dense(hidden_states)
        h = h + f(input_tensor if parallel else h)  # the sublayer's input is the skip input
        return block.LayerNorm(block.dropout(h) + input_tensor)

    return forward


def _insert_by_hand(reference, arch: str, composed, style: str, act: str) -> None:
    parallel, s = style == "parallel", expected_scale(style)
    for key, module in composed.adapters["a"].modules.items():
        _, i, role = key.split(".")
        frozen = copy.deepcopy(module)  # the reference keeps its own copy of the weights

        def f(u, w=frozen):
            return dense_f(w, u, act, s)

        if arch == "bert":
            block = reference.get_submodule(BERT_BLOCKS[role].format(i=i))
            block.forward = _post_ln_forward(block, f, parallel)
        else:
            sub = reference.get_submodule(SUBLAYERS[arch][role][1].format(i=i))
            sub.forward = _pre_ln_forward(sub.forward, f, parallel)


@pytest.mark.parametrize(
    "arch, style",
    [("llama", "houlsby"), ("gpt2", "parallel"), ("bert", "houlsby"), ("bert", "parallel")],
)
def test_whole_model_matches_adapters_inserted_by_hand(arch, style):
    model, reference = BUILDERS[arch](0), BUILDERS[arch](0)
    batch = inputs()
    assert torch.equal(output(model, batch), output(reference, batch))
    g = _graph(style, ["attn", "mlp"], non_linearity="gelu")
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed, std=0.2)
    _insert_by_hand(reference, arch, composed, style, "gelu")
    got, want = output(model, batch), output(reference, batch)
    assert (got - output(BUILDERS[arch](0), batch)).abs().max() > 1e-2  # the adapters do act
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


# --- identity, training, merge, files ----------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer", "parallel"])
def test_identity_at_init(arch, style):
    model = BUILDERS[arch](0)
    batch = inputs()
    before = output(model, batch)
    targets = ["attn", "mlp"] if style == "houlsby" else None
    ac.compose(model, _graph(style, targets, init="kaiming"), registry=REGISTRY)
    assert torch.equal(output(model, batch), before)


def test_parallel_adapter_trains_and_only_its_parameters_change():
    model = BUILDERS["llama_scaled"](0)
    base = state_copy(model)
    composed = ac.compose(model, _graph("parallel", ["attn", "mlp"]), registry=REGISTRY)
    start = {k: v.clone() for k, v in composed.adapters["a"].state_dict().items()}
    opt = torch.optim.AdamW(composed.param_groups(lr=1e-2))
    composed.train()
    batch = inputs(batch=2, length=12, seed=7)
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    now = composed.adapters["a"].state_dict()
    assert all(not torch.equal(now[k], start[k]) for k in now if k.endswith("up.weight"))
    composed.undo()
    assert same_state(model, base)


@pytest.mark.parametrize("style", ["pfeiffer", "parallel"])
def test_merge_is_refused_and_partial_merge_leaves_the_adapter_active(style):
    model = BUILDERS["gpt2"](0)
    composed = ac.compose(model, _graph(style), registry=REGISTRY)
    randomize(composed)
    batch = inputs()
    out = output(model, batch)
    with pytest.raises(CompositionError) as err:
        composed.merge()
    assert err.value.codes == ["merge-not-exact"] and "'a'" in str(err.value)
    assert composed.merge(partial=True) == ["a"]
    assert torch.equal(output(model, batch), out)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_save_load_parallel_is_bit_identical(arch, tmp_path):
    g = _graph(
        "parallel",
        ["attn", "mlp"],
        reduction_factor=8,
        bottleneck=None,
        scaling=2.0,
        non_linearity="swish",
    )
    composed = ac.compose(BUILDERS[arch](0), g, registry=REGISTRY)
    randomize(composed)
    batch = inputs()
    out = output(composed.model, batch)
    composed.save(tmp_path / "c")
    fresh = BUILDERS[arch](0)
    loaded = ac.load(fresh, tmp_path / "c", registry=REGISTRY)
    assert torch.equal(output(fresh, batch), out)
    assert loaded.adapters["a"].config == composed.adapters["a"].config
    saved, now = composed.adapters["a"].state_dict(), loaded.adapters["a"].state_dict()
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


# --- composition ---------------------------------------------------------------------------


def _two(first: dict, second: dict) -> Graph:
    g = Graph()
    g.adapter("a", "bottleneck", **first)
    g.adapter("b", "bottleneck", **second)
    return g


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("second", ["pfeiffer", "parallel"])
def test_stack_chains_the_adapters(arch, second):
    """stack[a, b]: b(a(h)) = h_a + f_b(h_a), h_a = h + f_a(h); a parallel b adds f_b(x)."""
    model = BUILDERS[arch](0)
    originals = _originals(model, arch)
    g = _two({"bottleneck": 8}, {"style": second, "bottleneck": 4, "non_linearity": "tanh"})
    g.stack("a", "b")
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed, std=0.2, seed=3)
    a, b = composed.adapters["a"].modules, composed.adapters["b"].modules
    for (role, i), seen in _capture(model, originals, inputs()).items():
        if role != "mlp":
            continue
        key = f"layers.{i}.mlp"
        with torch.no_grad():
            h_a = seen["h"] + dense_f(a[key], seen["h"], "relu", 1.0)
            u = seen["x"] if second == "parallel" else h_a
            expected = h_a + dense_f(b[key], u, "tanh", expected_scale(second))
        torch.testing.assert_close(seen["y"], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_weighted_sum_adds_the_weighted_residuals(arch):
    """sum[w](a, b): h + Σ wᵢ fᵢ(h), both on the same h."""
    model = BUILDERS[arch](0)
    originals = _originals(model, arch)
    g = _two({"bottleneck": 8}, {"bottleneck": 16, "non_linearity": "gelu"})
    g.sum("a", "b", weights=[0.7, -0.3])
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed, std=0.2, seed=4)
    a, b = composed.adapters["a"].modules, composed.adapters["b"].modules
    for (role, i), seen in _capture(model, originals, inputs()).items():
        if role != "mlp":
            continue
        key, h = f"layers.{i}.mlp", seen["h"]
        with torch.no_grad():
            expected = (
                h + 0.7 * dense_f(a[key], h, "relu", 1.0) - 0.3 * dense_f(b[key], h, "gelu", 1.0)
            )
        torch.testing.assert_close(seen["y"], expected, rtol=0, atol=ATOL)


def test_two_parallel_adapters_commute_and_two_sequential_ones_need_an_order():
    model = BUILDERS["llama"](0)
    originals = _originals(model, "llama")
    composed = ac.compose(
        model,
        _two({"style": "parallel", "bottleneck": 8}, {"style": "parallel", "bottleneck": 4}),
        registry=REGISTRY,
    )
    randomize(composed, std=0.2)
    a, b = composed.adapters["a"].modules, composed.adapters["b"].modules
    seen = _capture(model, originals, inputs())[("mlp", 1)]
    with torch.no_grad():
        expected = (
            seen["h"]
            + dense_f(a["layers.1.mlp"], seen["x"], "relu", 4.0)
            + dense_f(b["layers.1.mlp"], seen["x"], "relu", 4.0)
        )
    torch.testing.assert_close(seen["y"], expected, rtol=0, atol=ATOL)
    with pytest.raises(CompositionError) as err:
        ac.compose(
            BUILDERS["llama"](0), _two({"bottleneck": 8}, {"bottleneck": 4}), registry=REGISTRY
        )
    assert set(err.value.codes) == {"no-declared-order"}


def test_route_over_parallel_adapters_on_bert_equals_each_adapter_alone():
    """route: row r uses its key's adapter (f on that row's own input x); no key: the base."""
    g = _two({"style": "parallel", "bottleneck": 8}, {"style": "parallel", "bottleneck": 4})
    g.route({"ka": "a", "kb": "b"})
    model = BUILDERS["bert"](0)
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed, std=0.2, seed=5)
    batch = inputs(batch=3)
    with composed.routing(["ka", "kb", None]):
        routed = output(model, batch)
    assert (routed[:2] - output(BUILDERS["bert"](0), batch)[:2]).abs().max() > 1e-2
    for row, (name, size) in enumerate([("a", 8), ("b", 4), (None, 0)]):
        alone = BUILDERS["bert"](0)
        if name is not None:
            g = _graph("parallel", name=name, bottleneck=size)
            single = ac.compose(alone, g, registry=REGISTRY)
            single.adapters[name].load_tensors(composed.adapters[name].state_dict())
        one = {k: v[row : row + 1] for k, v in batch.items()}
        torch.testing.assert_close(routed[row : row + 1], output(alone, one), rtol=0, atol=ATOL)


# --- bad input ------------------------------------------------------------------------------


def _refused(g: Graph, arch: str = "llama") -> CompositionError:
    model = BUILDERS[arch](0)
    before, modules = state_copy(model), dict(model.named_modules())
    with pytest.raises(CompositionError) as err:
        ac.compose(model, g, registry=REGISTRY)
    assert same_state(model, before) and dict(model.named_modules()) == modules
    return err.value


@pytest.mark.parametrize(
    "size", [{"bottleneck": WIDTH + 1}, {"bottleneck": 4 * WIDTH}, {"reduction_factor": 0.5}]
)
def test_bottleneck_wider_than_the_model_is_refused(size):
    err = _refused(_graph("houlsby", ["attn", "mlp"], name="wide", **{"bottleneck": None, **size}))
    assert err.codes == ["bottleneck-too-wide"]
    d = err.diagnostics[0]
    assert d.nodes == ("wide",) and "'wide'" in d.message and f"width {WIDTH}" in d.message
    assert set(d.sites) == {f"layers.{i}.{r}" for r in ("attn", "mlp") for i in range(LAYERS)}
    assert f"bottleneck ≤ {WIDTH}" in d.fix and d.plugin == "adapter_composer.plugins.bottleneck"


def test_reduction_factor_above_the_width_is_refused():
    err = _refused(_graph("pfeiffer", bottleneck=None, reduction_factor=WIDTH + 1))
    assert err.codes == ["bottleneck-empty"] and "reduction_factor" in err.diagnostics[0].fix


@pytest.mark.parametrize(
    "config, words",
    [
        ({"bottleneck": 8, "reduction_factor": 4}, "got both"),
        ({"bottleneck": None}, "got neither"),
        ({"non_linearity": "sigmoid"}, "non_linearity"),
        ({"style": "sequential"}, "style"),
        ({"adapter_size": 8}, "adapter_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"scaling": float("inf")}, "scaling"),
    ],
)
def test_bad_config_is_refused(config, words):
    try:
        graph = _graph(**{"style": "pfeiffer", **config})
    except CompositionError as exc:  # non-finite values are refused as soon as they are declared
        err = exc
    else:
        err = _refused(graph)
    assert err.codes == ["bad-config"] and words in str(err)


def test_houlsby_without_targets_is_refused_not_silently_ffn_only():
    err = _refused(_graph("houlsby", name="h"))
    assert err.codes == ["houlsby-needs-targets"]
    assert "targets=['attn', 'mlp']" in err.diagnostics[0].fix


def test_every_problem_is_reported_at_once():
    g = Graph()
    g.adapter("wide", "bottleneck", targets=["attn", "mlp"], layers=[1], bottleneck=WIDTH * 2)
    g.adapter("both", "bottleneck", bottleneck=8, reduction_factor=8)
    g.adapter("h", "bottleneck", style="houlsby", layers=[0], bottleneck=8)
    assert sorted(d.code for d in ac.validate(g, REGISTRY, BUILDERS["gpt2"](0))) == [
        "bad-config",
        "bottleneck-too-wide",
        "houlsby-needs-targets",
    ]
    assert BottleneckConfig(bottleneck=8).style == "pfeiffer"  # the default preset: FFN only


# --- host bugs ------------------------------------------------------------------------------


def test_a_second_compose_on_a_sublayer_only_composition_is_refused():
    model = BUILDERS["llama"](0)
    ac.compose(model, _graph("pfeiffer"), registry=REGISTRY)
    with pytest.raises(ComposerError):
        ac.compose(model, _graph("pfeiffer", name="b"), registry=REGISTRY)
