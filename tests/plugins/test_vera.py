"""VeRA: the formula by hand, PEFT's projections and parity with PEFT in both directions.

    y = W x + λ_b ⊙ B[:out] (λ_d ⊙ A[:, :in] dropout(x)),   ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in]

The module paths below are written out here, not taken from the architecture plugin.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import adapter_composer as ac
from adapter_composer import AdapterFileError, CompositionError, Graph
from tests.models import BUILDERS, inputs, output, randomize, role_paths

TOL = 1e-5

PATHS = role_paths("attn.q", "attn.v", "mlp.down")


def delta_w(lambda_b, lambda_d, a, b) -> torch.Tensor:
    """diag(λ_b) B diag(λ_d) A, written as an explicit sum over the rank: Σ_k λ_b[o] B[o,k] λ_d[k] A[k,i]."""
    return torch.einsum("o,ok,k,ki->oi", lambda_b, b, lambda_d, a)


def _parts(composed, name: str, key: str, fan_in: int, fan_out: int):
    """λ_b, λ_d and the A [:, :in], B [:out] slices a site should use, read from the adapter."""
    handle = composed.adapters[name]
    site = handle.modules[key]
    a, b = handle.shared.vera_A[:, :fan_in], handle.shared.vera_B[:fan_out, :]
    return site.lambda_b.detach(), site.lambda_d.detach(), a, b


def _composed(arch: str, registry, **config):
    model = BUILDERS[arch]()
    g = Graph()
    g.adapter("a", "vera", **config)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


# --- the formula, written out ---------------------------------------------------------


@pytest.mark.parametrize("tokens", [3, 400])  # few tokens: two thin GEMMs; many: ΔW formed once
def test_one_layer_equals_the_formula(tokens, registry):
    base = BUILDERS["llama"]()
    model, composed = _composed("llama", registry, r=128, targets=["attn.v"], layers=[0])
    path = "model.layers.0.self_attn.v_proj"
    w = base.get_submodule(path).weight.detach()
    lb, ld, a, b = _parts(composed, "a", "layers.0.attn.v", 64, 32)
    x = torch.randn(tokens, 64)
    expected = x @ w.T + ((x @ a.T) * ld) @ (b.T * lb[None, :])  # Wx + λ_b ⊙ B(λ_d ⊙ Ax)
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(path)(x), expected, rtol=0, atol=TOL)


def test_dropout_acts_on_the_adapter_input(registry):
    model, composed = _composed("llama", registry, r=8, dropout=0.5, targets=["attn.q"], layers=[0])
    vera = composed.adapters["a"].modules["layers.0.attn.q"]
    lb, ld, a, b = _parts(composed, "a", "layers.0.attn.q", 64, 64)
    x = torch.randn(4, 64)
    composed.train()
    torch.manual_seed(3)
    ours = vera(x, None)
    torch.manual_seed(3)
    h = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(ours, (h @ delta_w(lb, ld, a, b).T).detach(), rtol=0, atol=TOL)
    composed.eval()
    torch.testing.assert_close(vera(x, None), x @ delta_w(lb, ld, a, b).T, rtol=0, atol=TOL)


def _reference_model(base, composed, arch: str) -> torch.nn.Module:
    """A copy of the base with W + ΔW written into every adapted weight (rows for GPT-2 slices)."""
    ref = copy.deepcopy(base)
    for key in composed.adapters["a"].modules:
        _, i, role = key.split(".", 2)
        template, rows = PATHS[arch][role]
        layer = ref.get_submodule(template.format(i=i))
        w = layer.weight.detach().clone()
        w = w if isinstance(layer, torch.nn.Linear) else w.T  # GPT-2's Conv1D is [in, out]
        lo, hi = rows or (0, w.shape[0])
        w[lo:hi] += delta_w(*_parts(composed, "a", key, w.shape[1], hi - lo))
        with torch.no_grad():
            layer.weight.copy_(w if isinstance(layer, torch.nn.Linear) else w.T)
    return ref


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_whole_model_equals_hand_merged_weights(arch, registry):
    batch = inputs()
    base = BUILDERS[arch]()
    model, composed = _composed(arch, registry, r=8, targets=["attn.q", "attn.v", "mlp.down"])
    shared = composed.adapters["a"].shared
    # the largest fan-in is the down projection's (d_ff); every fan-out here is at most d = 64
    assert tuple(shared.vera_A.shape) == (8, 256 if arch == "gpt2" else 96)
    assert tuple(shared.vera_B.shape) == (64, 8)
    reference = output(_reference_model(base, composed, arch), batch)
    assert not torch.allclose(reference, output(base, batch), atol=1e-3)
    torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=TOL)
    composed.merge()
    torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=TOL)
    composed.unmerge()


def test_projections_are_shared_and_frozen(registry):
    model, composed = _composed("llama", registry, r=8)
    handle = composed.adapters["a"]
    buffers = [n for n, _ in model.named_buffers() if n.endswith(("vera_A", "vera_B"))]
    assert len(buffers) == 2  # one A and one B for all four sites
    assert not any(p is handle.shared.vera_A for p in composed.parameters())
    assert {n.split(".")[-1] for n, _ in handle.named_parameters()} == {"lambda_b", "lambda_d"}
    assert {"shared.vera_A", "shared.vera_B"} <= set(handle.state_dict())


def test_without_saved_projection_they_are_rebuilt_from_the_seed(registry, tmp_path):
    batch = inputs()
    model, composed = _composed(
        "llama", registry, r=8, save_projection=False, projection_prng_key=5
    )
    assert not any(k.startswith("shared.") for k in composed.adapters["a"].state_dict())
    out = output(model, batch)
    composed.save(tmp_path / "c")
    composed.undo()
    fresh = BUILDERS["llama"]()
    loaded = ac.load(fresh, tmp_path / "c", registry=registry)
    assert torch.equal(output(fresh, batch), out)
    assert torch.equal(loaded.adapters["a"].shared.vera_A, composed.adapters["a"].shared.vera_A)


# --- parity with PEFT -----------------------------------------------------------------


@pytest.mark.parametrize("r, seed", [(8, 0), (16, 1234)])
def test_projections_are_peft_s(r, seed, registry):
    """Same seed, same A and B as PEFT draws them (what save_projection=False relies on)."""
    targets = ["q_proj", "k_proj", "down_proj"]
    peft_model = get_peft_model(
        BUILDERS["llama"](), VeraConfig(r=r, target_modules=targets, projection_prng_key=seed)
    )
    g = Graph()
    g.adapter("a", "vera", r=r, projection_prng_key=seed, targets=["attn.q", "attn.k", "mlp.down"])
    composed = ac.compose(BUILDERS["llama"](), g, registry=registry)
    ours = composed.adapters["a"].shared
    assert torch.equal(ours.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(ours.vera_B, peft_model.base_model.vera_B["default"])


CASES = [  # (architecture, target_modules, r, save_projection)
    ("llama", ["q_proj", "v_proj"], 8, True),
    (
        "llama",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        16,
        True,
    ),
    ("llama", ["k_proj", "down_proj"], 4, False),
    ("gpt2", ["c_attn"], 8, True),
    ("gpt2", ["c_attn", "c_fc", "c_proj"], 8, False),
    ("bert", ["query", "value"], 8, True),
    ("bert", ["query", "key", "value", "dense"], 16, True),
]


def _peft_model(arch, targets, r, save_projection, seed=11, **extra):
    config = VeraConfig(
        r=r,
        target_modules=targets,
        save_projection=save_projection,
        projection_prng_key=seed,
        vera_dropout=0.1,  # inactive in eval mode, but it must travel through the config
        **extra,
    )
    model = get_peft_model(BUILDERS[arch](), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # λ_b starts at 0 (the identity): give both vectors real values
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("arch, targets, r, save_projection", CASES)
def test_peft_parity_both_directions(arch, targets, r, save_projection, registry, tmp_path):
    batch = inputs()
    peft_model = _peft_model(arch, targets, r, save_projection)
    reference = output(peft_model, batch)
    assert not torch.allclose(reference, output(BUILDERS[arch](), batch), atol=1e-3)
    peft_model.save_pretrained(tmp_path / "peft")

    model = BUILDERS[arch]()
    composed = ac.from_peft(model, tmp_path / "peft", name="task", registry=registry)
    assert (output(model, batch) - reference).abs().max() <= TOL
    assert composed.adapters["task"].config.dropout == 0.1

    composed.to_peft("task", tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in exported) == save_projection
    back = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "export").eval()
    assert (output(back, batch) - reference).abs().max() <= TOL


def test_role_targets_export_to_peft(registry, tmp_path):
    batch = inputs()
    model, composed = _composed("llama", registry, r=8, targets=["attn.q", "mlp.up"])
    ours = output(model, batch)
    composed.to_peft("a", tmp_path / "export")
    back = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "export").eval()
    assert (output(back, batch) - ours).abs().max() <= TOL


def test_saved_projection_wins_over_the_seed(registry, tmp_path):
    """A file's A and B are used as saved (PEFT saves them so that no platform re-draws them)."""
    _peft_model("llama", ["q_proj"], 8, True).save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vera_A"] = 2 * tensors["base_model.vera_A"]
    save_file(tensors, str(weights))
    composed = ac.from_peft(BUILDERS["llama"](), tmp_path / "p", registry=registry)
    assert torch.equal(composed.adapters["default"].shared.vera_A, tensors["base_model.vera_A"])


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [{"r": 0}, {"dropout": 1.0}, {"projection_prng_key": -1}, {"d_initial": "big"}, {"rank": 4}],
)
def test_bad_config_is_refused(config, registry):
    g = Graph()
    g.adapter("a", "vera", **config)
    with pytest.raises(CompositionError) as err:
        ac.compose(BUILDERS["llama"](), g, registry=registry)
    assert err.value.codes == ["bad-config"]


def test_peft_file_errors(registry, tmp_path):
    model = BUILDERS["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _peft_model("llama", ["q_proj", "v_proj"], 8, True).save_pretrained(tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    weights_path = tmp_path / "p" / "adapter_model.safetensors"
    config, tensors = json.loads(config_path.read_text()), load_file(str(weights_path))

    def load_with(cfg=config, ts=tensors):
        config_path.write_text(json.dumps(cfg))
        save_file(ts, str(weights_path))
        return ac.from_peft(model, tmp_path / "p", registry=registry)

    with pytest.raises(AdapterFileError, match=r"unsupported PEFT VeRA options: bias='all'"):
        load_with({**config, "bias": "all"})
    without_a = {k: v for k, v in tensors.items() if k != "base_model.vera_A"}
    with pytest.raises(AdapterFileError, match=r"missing tensors \['shared.vera_A'\]"):
        load_with(ts=without_a)
    with pytest.raises(
        AdapterFileError, match=r"unexpected tensors \['shared.vera_A', 'shared.vera_B'\]"
    ):
        load_with({**config, "save_projection": False})  # the file has them: say so, not ignore
    with pytest.raises(
        AdapterFileError, match=r"lambda_d has shape \(8,\), the model needs \(4,\)"
    ):
        load_with({**config, "r": 4})
    short_b = {**tensors, "base_model.vera_B": tensors["base_model.vera_B"][:-1]}
    with pytest.raises(
        AdapterFileError, match=r"shared.vera_B has shape \(63, 8\), the model needs \(64, 8\)"
    ):
        load_with(ts=short_b)
    with pytest.raises(AdapterFileError, match="is not one this method has"):
        load_with(ts={**tensors, "base_model.model.lm_head.lora_A.weight": torch.ones(2, 64)})
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
