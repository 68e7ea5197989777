"""LoRA, rsLoRA and DoRA: the formulas by hand, and parity with HF PEFT in both directions."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import adapter_composer as ac
from adapter_composer import AdapterFileError, Graph
from adapter_composer.sites import linear_weight
from tests.models import BUILDERS, inputs, output, randomize

TOL = 1e-5


# --- the formula, written out ---------------------------------------------------------


def _reference_model(model, composed, name):
    """A copy of the base model with every site's weight replaced by the formula's result."""
    ref = copy.deepcopy(composed.undo())
    composer_sites = composed.adapters[name]
    cfg = composer_sites.config
    for key, module in composer_sites.modules.items():
        info = composed._rt.infos[name][key]
        layer = ref.get_submodule(info.path)
        w = linear_weight(layer).detach().clone()
        rows = slice(*info.out_slice) if info.out_slice else slice(None)
        r = module.lora_A.shape[0]
        s = module.scale
        assert (
            s == pytest.approx(cfg.alpha / (math.sqrt(r) if cfg.rslora else r))
            or cfg.alpha_pattern
            or cfg.rank_pattern
        )
        update = s * module.lora_B @ module.lora_A
        new = w[rows] + update
        if cfg.dora:
            new = (module.magnitude / new.norm(dim=1))[:, None] * new
        w[rows] = new
        with torch.no_grad():
            layer.weight.copy_(w if isinstance(layer, torch.nn.Linear) else w.T)
    return ref


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize(
    "variant", [{}, {"rslora": True}, {"dora": True}, {"dora": True, "rslora": True}]
)
def test_outputs_equal_the_formula(arch, variant, registry):
    model = BUILDERS[arch]()
    batch = inputs()
    g = Graph()
    g.adapter("a", "lora", r=4, alpha=6, targets=["attn.q", "attn.v", "mlp.down"], **variant)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    out = output(model, batch)
    reference = _reference_model(model, composed, "a")
    torch.testing.assert_close(out, output(reference, batch), rtol=0, atol=TOL)


def test_dora_gradient_treats_the_norm_as_constant(registry):
    """DoRA §4.3: ‖W + sBA‖ is detached, so the magnitude's gradient is (1/‖·‖)·(W + sBA)x ⋅ grad."""
    model = BUILDERS["llama"]()
    g = Graph()
    g.adapter("a", "lora", r=2, dora=True, targets=["attn.q"], layers=[0])
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    dora = composed.adapters["a"].modules["layers.0.attn.q"]
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    q(x).sum().backward()
    w = q.base.weight.detach()
    merged = w + dora.scale * (dora.lora_B @ dora.lora_A).detach()
    expected = (x @ merged.T).sum(0) / merged.norm(dim=1)
    torch.testing.assert_close(dora.magnitude.grad, expected, rtol=1e-5, atol=1e-6)


# --- parity with PEFT -----------------------------------------------------------------

TARGETS = {
    "llama": [
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ],
    "gpt2": [["c_attn"], ["c_attn", "c_proj", "c_fc"]],
    "bert": [["query", "value"], ["query", "key", "value", "dense"]],
}
CASES = [
    (arch, i, r, alpha, variant)
    for arch in TARGETS
    for i in range(2)
    for (r, alpha) in [(2, 4), (8, 16)]
    for variant in ("lora", "rslora", "dora")
    if (i + r + len(variant)) % 2 == 0 or variant == "dora"
]


def _peft_model(arch, targets, r, alpha, variant, **extra):
    torch.manual_seed(11)
    model = get_peft_model(
        BUILDERS[arch](),
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets,
            init_lora_weights=False,  # non-zero B: a real test, not the identity
            use_rslora=variant == "rslora",
            use_dora=variant == "dora",
            **extra,
        ),
    ).eval()
    if variant == "dora":
        with torch.no_grad():  # move the magnitudes away from their initial value ‖W + sBA‖
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.rand_like(p))
    return model


@pytest.mark.parametrize("arch, which, r, alpha, variant", CASES)
def test_peft_parity_both_directions(arch, which, r, alpha, variant, registry, tmp_path):
    batch = inputs()
    peft_model = _peft_model(arch, TARGETS[arch][which], r, alpha, variant)
    reference = output(peft_model, batch)
    assert not torch.allclose(reference, output(BUILDERS[arch](), batch), atol=1e-3)
    peft_model.save_pretrained(tmp_path / "peft")

    model = BUILDERS[arch]()
    composed = ac.from_peft(model, tmp_path / "peft", name="task", registry=registry)
    ours = output(model, batch)
    assert (ours - reference).abs().max() <= TOL

    composed.to_peft("task", tmp_path / "export")
    back = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "export").eval()
    assert (output(back, batch) - reference).abs().max() <= TOL


def test_peft_rank_and_alpha_patterns(registry, tmp_path):
    batch = inputs()
    peft_model = _peft_model(
        "llama",
        ["q_proj", "v_proj", "down_proj"],
        4,
        8,
        "lora",
        rank_pattern={"v_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"down_proj": 3},
    )
    reference = output(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    model = BUILDERS["llama"]()
    composed = ac.from_peft(model, tmp_path / "peft", registry=registry)
    assert (output(model, batch) - reference).abs().max() <= TOL
    mods = composed.adapters["default"].modules
    assert mods["module.model.layers.1.self_attn.q_proj"].lora_A.shape[0] == 6
    assert mods["module.model.layers.0.self_attn.v_proj"].lora_A.shape[0] == 2
    composed.to_peft("default", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] and config["alpha_pattern"]
    back = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "export").eval()
    assert (output(back, batch) - reference).abs().max() <= TOL


def test_role_targets_export_to_peft(registry, tmp_path):
    batch = inputs()
    model = BUILDERS["llama"]()
    g = Graph()
    g.adapter(
        "mine",
        "lora",
        r=4,
        alpha=8,
        dora=True,
        targets=["attn.q", "mlp.up"],
        rank_pattern={"mlp.up": 2},
    )
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    ours = output(model, batch)
    composed.to_peft("mine", tmp_path / "export")
    back = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "export").eval()
    assert (output(back, batch) - ours).abs().max() <= TOL


def test_gpt2_slices_cannot_be_exported_and_say_so(registry, tmp_path):
    model = BUILDERS["gpt2"]()
    g = Graph()
    g.adapter("a", "lora", targets=["attn.q", "attn.v"])
    composed = ac.compose(model, g, registry=registry)
    with pytest.raises(AdapterFileError, match="parts of fused layers.*attn.qkv"):
        composed.to_peft("a", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_peft_import_errors(registry, tmp_path):
    model = BUILDERS["llama"]()
    with pytest.raises(AdapterFileError, match="holds no adapter_config.json"):
        ac.from_peft(model, tmp_path, registry=registry)
    peft_model = _peft_model("llama", ["q_proj"], 2, 4, "lora")
    peft_model.save_pretrained(tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "peft_type": "MYSTERY"}))
    with pytest.raises(
        AdapterFileError, match="no installed method reads PEFT adapters of type 'MYSTERY'"
    ):
        ac.from_peft(model, tmp_path / "p", registry=registry)

    config_path.write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))  # without its tensors
    with pytest.raises(AdapterFileError, match=r"modules_to_save names \['lm_head'\].*no tensors"):
        ac.from_peft(model, tmp_path / "p", registry=registry)

    config_path.write_text(json.dumps({**config, "r": 3}))  # tensors were saved with r=2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"has shape \(2, 64\), the model needs \(3, 64\)"):
        ac.from_peft(model, tmp_path / "p", registry=registry)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    config_path.write_text(json.dumps(config))
    (tmp_path / "p" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        ac.from_peft(model, tmp_path / "p", registry=registry)
