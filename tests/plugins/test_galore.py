"""GaLore: the optimizer against the paper's Algorithm 2 written out densely, its state size,
its projector schedule, the dense-update adapter under composition, and full-parameter
training of a plain model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapter_composer as ac
import adapter_composer.plugins.galore as galore
from adapter_composer import CompositionError, Graph
from adapter_composer.plugins.galore import GaLoreAdamW, galore_param_groups
from adapter_composer.sites import linear_weight
from tests.models import BUILDERS, inputs, output, randomize, same_state, state_copy

TOL = 1e-12  # float64 parity with the reference


# --- the paper's algorithm, written out -----------------------------------------------


def reference_galore_adamw(
    w0, x, y, *, steps, lr, betas, eps, weight_decay, rank, gap, scale, side
):
    """Algorithm 2 of the paper on L(W) = ½‖W X − Y‖², with AdamW's decoupled decay.

    G_t = (W X − Y) Xᵀ;  if t mod T = 0: P_t = U[:, :r] (or Q_t = V[:, :r]) of SVD(G_t);
    R_t = P_tᵀ G_t (or G_t Q_t);  M, V: Adam moments of R with bias correction;
    N_t = M̂ / (√V̂ + ε);  W ← W − η λ W − η α P_t N_t (or N_t Q_tᵀ). Returns W after each step.
    """
    beta1, beta2 = betas
    w, m, v, proj, history = w0.clone(), None, None, None, []
    for t in range(steps):
        g = (w @ x - y) @ x.T
        if t % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            proj = u[:, :rank] if side == "left" else vh[:rank].T
        r = proj.T @ g if side == "left" else g @ proj
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = beta1 * m + (1 - beta1) * r
        v = beta2 * v + (1 - beta2) * r * r
        m_hat, v_hat = m / (1 - beta1 ** (t + 1)), v / (1 - beta2 ** (t + 1))
        n = m_hat / (v_hat.sqrt() + eps)
        g_tilde = scale * (proj @ n if side == "left" else n @ proj.T)
        w = w - lr * weight_decay * w - lr * g_tilde
        history.append(w.clone())
    return history


def _problem(m: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    x = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    y = torch.randn(m, 2 * n, generator=gen, dtype=torch.float64)
    return w0, x, y


@pytest.mark.parametrize(
    "shape, proj_type, side",
    [
        ((12, 20), "std", "left"),
        ((20, 12), "std", "right"),
        ((16, 16), "std", "left"),
        ((20, 12), "left", "left"),
        ((12, 20), "right", "right"),
    ],
)
def test_steps_equal_the_papers_algorithm(shape, proj_type, side):
    opts = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=3, gap=3, scale=0.5)
    steps = 8  # projector computed at t = 0, 3, 6
    w0, x, y = _problem(*shape)
    expected = reference_galore_adamw(w0, x, y, steps=steps, side=side, **opts)

    w = nn.Parameter(w0.clone())
    opt = GaLoreAdamW(
        [w],
        lr=opts["lr"],
        betas=opts["betas"],
        eps=opts["eps"],
        weight_decay=opts["weight_decay"],
        galore=True,
        rank=opts["rank"],
        update_proj_gap=opts["gap"],
        scale=opts["scale"],
        proj_type=proj_type,
    )
    diffs = []
    for t in range(steps):
        opt.zero_grad()
        (0.5 * (w @ x - y).pow(2).sum()).backward()
        opt.step()
        diffs.append((w.detach() - expected[t]).abs().max().item())
    assert max(diffs) < TOL, diffs

    # the refresh at t = 3 and 6 matters: never refreshing gives different weights
    stale = reference_galore_adamw(w0, x, y, steps=steps, side=side, **{**opts, "gap": 10**6})
    assert (stale[-1] - expected[-1]).abs().max() > 1e-4
    assert (expected[-1] - w0).abs().max() > 1e-2  # and the weights did move


# --- state size and projector schedule ------------------------------------------------


@pytest.mark.parametrize("m, n", [(64, 256), (256, 64)])
def test_state_lives_in_the_subspace(m, n):
    r = 8
    w = nn.Parameter(torch.randn(m, n))
    w_ref = nn.Parameter(w.detach().clone())
    opt = GaLoreAdamW([w], galore=True, rank=r)
    reference = torch.optim.AdamW([w_ref])
    w.grad, w_ref.grad = torch.randn(m, n), torch.randn(m, n)
    opt.step()
    reference.step()

    short, long = min(m, n), max(m, n)
    sizes = {k: t.numel() for k, t in opt.state[w].items() if torch.is_tensor(t)}
    # moments R-shaped ([r, n] when m ≤ n, [m, r] otherwise), projector [short, r]
    assert sizes == {"exp_avg": r * long, "exp_avg_sq": r * long, "projector": short * r}
    ours = sum(sizes.values())
    adamw = sum(t.numel() for t in reference.state[w_ref].values() if torch.is_tensor(t))
    assert adamw == 2 * m * n + 1  # two moments and the step counter
    assert ours == 2 * r * long + r * short < adamw


def test_rank_is_clamped_to_the_short_side():
    w = nn.Parameter(torch.randn(3, 5))
    opt = GaLoreAdamW([w], galore=True, rank=8)
    w.grad = torch.randn(3, 5)
    opt.step()
    assert opt.state[w]["projector"].shape == (3, 3)
    assert opt.state[w]["exp_avg"].shape == (3, 5)


def test_projector_is_recomputed_every_T_steps_and_only_then(monkeypatch):
    calls: list[torch.Tensor] = []
    real = galore.top_singular_vectors

    def counting(grad, rank, side):
        calls.append(grad.clone())
        return real(grad, rank, side)

    monkeypatch.setattr(galore, "top_singular_vectors", counting)
    w = nn.Parameter(torch.randn(10, 16))
    opt = GaLoreAdamW([w], lr=1e-2, galore=True, rank=3, update_proj_gap=4)
    gen = torch.Generator().manual_seed(0)
    refreshed = []
    for step in range(1, 14):
        w.grad = torch.randn(10, 16, generator=gen)
        before, previous = len(calls), opt.state[w].get("projector")
        opt.step()
        projector = opt.state[w]["projector"]
        if len(calls) > before:
            refreshed.append(step)
            assert torch.equal(calls[-1], w.grad)  # from the current gradient
            u = torch.linalg.svd(w.grad, full_matrices=False).U[:, :3]
            assert torch.equal(projector, u)  # its top-3 left singular vectors (10 ≤ 16)
        else:
            assert projector is previous
    assert refreshed == [1, 5, 9, 13]


def test_plain_groups_and_non_matrices_are_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (7,)]
    ours = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    bias = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))  # 1-D in a galore group
    theirs = [nn.Parameter(p.detach().clone()) for p in [*ours, bias]]
    opt = GaLoreAdamW(
        [{"params": ours}, {"params": [bias], "galore": True, "rank": 2}],
        lr=0.03,
        betas=(0.8, 0.95),
        weight_decay=0.2,
    )
    reference = torch.optim.AdamW(theirs, lr=0.03, betas=(0.8, 0.95), weight_decay=0.2)
    for _ in range(5):
        for a, b in zip([*ours, bias], theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = a.grad.clone()
        opt.step()
        reference.step()
    for a, b in zip([*ours, bias], theirs, strict=True):
        assert (a - b).abs().max().item() < TOL
    assert "projector" not in opt.state[bias]


@pytest.mark.parametrize(
    "options",
    [{"rank": 0}, {"update_proj_gap": 0}, {"scale": 0.0}, {"proj_type": "diagonal"}, {"lr": -1.0}],
)
def test_optimizer_rejects_bad_options(options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        GaLoreAdamW([nn.Parameter(torch.zeros(2, 2))], galore=True, **options)
    opt = GaLoreAdamW([nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group(
            {"params": [nn.Parameter(torch.zeros(3, 3))], "galore": True, **options}
        )


# --- the adapter under composition ----------------------------------------------------


def _compose(model, registry, **config):
    g = Graph()
    g.adapter("a", "galore", **config)
    return ac.compose(model, g, registry=registry)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_identity_at_init_then_y_equals_w_plus_delta_w(arch, registry):
    """y = (W + ΔW) x at every site; GPT-2's fused, transposed c_attn included."""
    model = BUILDERS[arch]()
    batch = inputs()
    before = output(model, batch)
    composed = _compose(model, registry, rank=2, targets=["attn.q", "attn.v", "mlp.down"])
    assert torch.equal(output(model, batch), before)
    randomize(composed, std=0.05)
    ours = output(model, batch)
    reference = copy.deepcopy(composed.undo())
    for key, module in composed.adapters["a"].modules.items():
        info = composed._rt.infos["a"][key]
        layer = reference.get_submodule(info.path)
        w = linear_weight(layer).detach().clone()
        rows = slice(*info.out_slice) if info.out_slice else slice(None)
        w[rows] += module.delta.detach()
        with torch.no_grad():
            layer.weight.copy_(w if isinstance(layer, nn.Linear) else w.T)
    torch.testing.assert_close(ours, output(reference, batch), rtol=0, atol=1e-5)


def _train(model, opt, steps: int, seed: int = 7) -> list[float]:
    batch = inputs(batch=2, length=12, seed=seed)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_groups_flag_every_delta_and_torch_adamw_accepts_them(registry):
    model = BUILDERS["llama"]()
    composed = _compose(model, registry, rank=4, update_proj_gap=7, scale=0.5, proj_type="left")
    groups = composed.param_groups(lr=1e-3, weight_decay=0.01)
    deltas = [m.delta for m in composed.adapters["a"].modules.values()]
    assert len(groups) == 1 and len(deltas) == 2 * 6  # six default roles, two layers
    group = groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in deltas]
    assert {k: group[k] for k in ("galore", "rank", "update_proj_gap", "scale", "proj_type")} == {
        "galore": True,
        "rank": 4,
        "update_proj_gap": 7,
        "scale": 0.5,
        "proj_type": "left",
    }
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.01 and group["adapter"] == "a"
    composed.train()
    losses = _train(model, torch.optim.AdamW(groups), steps=2)  # extra keys are ignored
    assert all(d.abs().sum() > 0 for d in deltas) and losses[1] < losses[0]


def test_training_with_galore_adamw_merge_save_load(registry, tmp_path):
    model = BUILDERS["llama"]()
    base = state_copy(model)
    r = 4
    composed = _compose(
        model,
        registry,
        rank=r,
        update_proj_gap=4,
        scale=1.0,
        targets=["attn.q", "attn.v", "mlp.down"],
    )
    opt = GaLoreAdamW(composed.param_groups(lr=3e-2))
    delta = composed.adapters["a"].modules["layers.0.attn.q"].delta
    composed.train()
    losses = _train(model, opt, steps=1)
    assert torch.linalg.matrix_rank(delta.detach()) == r  # one step: ΔW = −ηα P N, rank ≤ r
    losses += _train(model, opt, steps=11)  # projectors recomputed at steps 5 and 9
    assert losses[-1] < 0.93 * losses[0], losses
    # each projector period adds at most r directions: the update escapes one rank-r subspace
    assert r < torch.linalg.matrix_rank(delta.detach()) <= 3 * r

    for module in composed.adapters["a"].modules.values():
        m, n = module.delta.shape
        state = opt.state[module.delta]
        assert state["step"] == 12
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == r * max(m, n)
        assert state["projector"].shape == (min(m, n), r)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)

    composed.eval()
    batch = inputs()
    out = output(model, batch)
    composed.merge()
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-5)
    composed.unmerge()
    assert torch.equal(output(model, batch), out)

    composed.save(tmp_path / "c")
    composed.undo()
    assert same_state(model, base)  # the base never trained
    fresh = BUILDERS["llama"]()
    loaded = ac.load(fresh, tmp_path / "c", registry=registry)
    assert torch.equal(output(fresh, batch), out)
    saved, now = composed.adapters["a"].state_dict(), loaded.adapters["a"].state_dict()
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


@pytest.mark.parametrize(
    "config, field",
    [
        ({"rank": 0}, "rank"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"scale": 0.0}, "scale"),
        ({"scale": -1.0}, "scale"),
        ({"proj_type": "diagonal"}, "proj_type"),
        ({"lora_r": 4}, "lora_r"),
    ],
)
def test_bad_config_names_the_field(config, field, registry):
    model = BUILDERS["llama"]()
    before = state_copy(model)
    with pytest.raises(CompositionError) as err:
        _compose(model, registry, **config)
    assert err.value.codes == ["bad-config"]
    assert field in err.value.diagnostics[0].message
    assert same_state(model, before)


# --- full-parameter training of a plain model -----------------------------------------


def test_full_parameter_training_of_a_plain_model():
    model = BUILDERS["llama"]().train()
    r = 4
    groups = galore_param_groups(model, lr=3e-3, rank=r, update_proj_gap=5, scale=1.0)
    linear = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    flagged, plain = groups[0]["params"], groups[1]["params"]
    assert groups[0]["galore"] and not groups[1].get("galore", False)
    assert {id(p) for p in flagged} == {id(w) for w in linear} - {id(model.lm_head.weight)}
    assert len(flagged) + len(plain) == len(list(model.parameters()))
    attention = galore_param_groups(model, lr=3e-3, include=r"self_attn\.")[0]["params"]
    assert len(attention) == 4 * model.config.num_hidden_layers  # q, k, v, o per layer
    opt = GaLoreAdamW(groups)
    batch = inputs(batch=2, length=12, seed=7)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0], losses
    for p in flagged:  # low-rank moments for the projected matrices
        m, n = p.shape
        assert opt.state[p]["exp_avg"].numel() == r * max(m, n) < m * n
    embed = model.model.embed_tokens.weight  # full moments for the rest
    assert opt.state[embed]["exp_avg"].shape == embed.shape
