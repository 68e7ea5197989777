"""(IA)³: the formula by hand, stacks with LoRA in both orders, and PEFT parity both ways.

    keys, values   y = (W x + b) ⊙ l        feed-forward (down projection)   y = W (x ⊙ l) + b

The module paths below are written out here, not taken from the architecture plugin.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import adapter_composer as ac
from adapter_composer import AdapterFileError, CompositionError, Graph
from tests.models import BUILDERS, inputs, output, randomize, role_paths

TOL = 1e-5

PATHS = role_paths("attn.k", "attn.v", "mlp.down")
FEEDFORWARD = {"mlp.down"}


def _weight_bias(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[out, in] weight and bias, as copies (GPT-2's Conv1D stores the weight as [in, out])."""
    w = layer.weight.detach().clone()
    w = w if isinstance(layer, torch.nn.Linear) else w.T
    return w, None if layer.bias is None else layer.bias.detach().clone()


def _set_weight_bias(layer: torch.nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
    with torch.no_grad():
        layer.weight.copy_(w if isinstance(layer, torch.nn.Linear) else w.T)
        if b is not None:
            layer.bias.copy_(b)


def _vector(composed, name: str, key: str) -> torch.Tensor:
    return composed.adapters[name].modules[key].scale().detach()


def _composed(arch: str, registry, **config):
    model = BUILDERS[arch]()
    g = Graph()
    g.adapter("a", "ia3", **config)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


# --- the formula, written out ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_one_layer_equals_the_formula(arch, registry):
    """Each adapted layer on its own: output scale (bias included) or input scale."""
    base = BUILDERS[arch]()
    model, composed = _composed(arch, registry)
    x = torch.randn(3, 5, 64)
    for role, (template, rows) in PATHS[arch].items():
        path = template.format(i=1)
        layer = model.get_submodule(path)
        w, b = _weight_bias(base.get_submodule(path))
        scale = _vector(composed, "a", f"layers.1.{role}")
        if role in FEEDFORWARD:
            x_in = torch.randn(3, 5, w.shape[1])
            expected = (x_in * scale) @ w.T + (0 if b is None else b)
        else:
            x_in = x
            y = x @ w.T + (0 if b is None else b)
            expected = y.clone()
            lo, hi = rows or (0, y.shape[-1])
            expected[..., lo:hi] = y[..., lo:hi] * scale
            if rows is not None:  # the other adapted third of c_attn is scaled by its own vector
                other = "attn.v" if role == "attn.k" else "attn.k"
                olo, ohi = PATHS[arch][other][1]
                expected[..., olo:ohi] *= _vector(composed, "a", f"layers.1.{other}")
        with torch.no_grad():
            torch.testing.assert_close(layer(x_in), expected, rtol=0, atol=TOL)


def _reference_model(base: torch.nn.Module, composed, arch: str) -> torch.nn.Module:
    """A copy of the base with every weight merged by hand: diag(l) W, l ⊙ b, or W diag(l)."""
    ref = copy.deepcopy(base)
    for key, module in composed.adapters["a"].modules.items():
        _, i, role = key.split(".", 2)
        template, rows = PATHS[arch][role]
        layer = ref.get_submodule(template.format(i=i))
        w, b = _weight_bias(layer)
        scale = module.scale().detach()
        if role in FEEDFORWARD:
            w = w * scale[None, :]
        else:
            lo, hi = rows or (0, w.shape[0])
            w[lo:hi] *= scale[:, None]
            if b is not None:
                b[lo:hi] *= scale
        _set_weight_bias(layer, w, b)
    return ref


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_whole_model_equals_hand_merged_weights(arch, registry):
    batch = inputs()
    base = BUILDERS[arch]()
    model, composed = _composed(arch, registry)
    reference = output(_reference_model(base, composed, arch), batch)
    assert not torch.allclose(reference, output(base, batch), atol=1e-3)
    torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=TOL)
    composed.merge()  # the host's fold algebra gives the same weights
    torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=TOL)
    composed.unmerge()


def test_feedforward_patterns_choose_the_side(registry):
    model = BUILDERS["llama"]()
    g = Graph()
    g.adapter(
        "a",
        "ia3",
        targets=["attn.k", "mlp.up", "mlp.down"],
        feedforward=["up_proj", r"re:model\.layers\.1\.mlp\.down_proj"],
    )
    composed = ac.compose(model, g, registry=registry)
    kinds = {k: m.kind for k, m in composed.adapters["a"].modules.items()}
    assert kinds == {
        "layers.0.attn.k": "linear.scale_out",
        "layers.1.attn.k": "linear.scale_out",
        "layers.0.mlp.up": "linear.scale_in",
        "layers.1.mlp.up": "linear.scale_in",
        "layers.0.mlp.down": "linear.scale_out",  # the full-path regex names layer 1 only
        "layers.1.mlp.down": "linear.scale_in",
    }
    sizes = {k: m.scale().shape[0] for k, m in composed.adapters["a"].modules.items()}
    assert sizes["layers.0.mlp.up"] == 64 and sizes["layers.0.mlp.down"] == 64
    assert sizes["layers.1.mlp.down"] == 96 and sizes["layers.0.attn.k"] == 32


# --- stacks with LoRA: the order decides -----------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_stack_with_lora_in_both_orders(arch, registry):
    """Stack[ia3, lora]: (Wx + b) ⊙ l + sBAx;  Stack[lora, ia3]: (Wx + b + sBAx) ⊙ l."""
    base = BUILDERS[arch]()
    path = PATHS[arch]["attn.k"][0].format(i=0)
    w, b = _weight_bias(base.get_submodule(path))
    b = torch.zeros(w.shape[0]) if b is None else b
    x = torch.randn(2, 7, 64)
    batch = inputs()
    results, outputs = {}, {}
    for order in [("s", "lo"), ("lo", "s")]:
        model = BUILDERS[arch]()
        g = Graph()
        g.adapter("s", "ia3", targets=["attn.k"], layers=[0])
        g.adapter("lo", "lora", r=2, alpha=4, targets=["attn.k"], layers=[0])
        g.stack(*order)
        composed = ac.compose(model, g, registry=registry)
        randomize(composed, std=0.3)
        scale = _vector(composed, "s", "layers.0.attn.k")
        lora = composed.adapters["lo"].modules["layers.0.attn.k"]
        delta = lora.scale * (x @ lora.lora_A.T @ lora.lora_B.T).detach()
        wx_b = x @ w.T + b
        expected = wx_b * scale + delta if order[0] == "s" else (wx_b + delta) * scale
        with torch.no_grad():
            results[order] = model.get_submodule(path)(x)
        torch.testing.assert_close(results[order], expected, rtol=0, atol=TOL)
        outputs[order] = output(model, batch)
        composed.merge()
        torch.testing.assert_close(output(model, batch), outputs[order], rtol=0, atol=TOL)
        composed.undo()
    assert not torch.allclose(results[("s", "lo")], results[("lo", "s")], atol=1e-3)
    assert not torch.allclose(outputs[("s", "lo")], outputs[("lo", "s")], atol=1e-3)


def test_ia3_and_lora_at_one_site_need_an_order(registry):
    g = Graph()
    g.adapter("s", "ia3", targets=["attn.k"])
    g.adapter("lo", "lora", targets=["attn.k"])
    with pytest.raises(CompositionError) as err:
        ac.compose(BUILDERS["llama"](), g, registry=registry)
    assert "no-declared-order" in err.value.codes


# --- parity with PEFT -----------------------------------------------------------------

# (architecture, target_modules, feedforward_modules) as a PEFT user would write them
CASES = [
    ("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], ["up_proj"]),
    ("llama", r".*\.(k_proj|v_proj|down_proj)", r".*layers\.1\.mlp\.down_proj"),
    # PEFT tests a feed-forward name with str.endswith, not at a "." boundary: both are
    # feed-forward here (and "proj" itself, which must be a target too, matches no module)
    ("llama", ["k_proj", "up_proj", "proj"], ["proj"]),
    ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    ("gpt2", ["c_attn", "c_proj", "c_fc"], ["c_proj"]),  # both c_proj layers are feed-forward
    ("bert", ["key", "value", "output.dense"], ["output.dense"]),  # attention.output too
    ("bert", ["query", "value", "intermediate.dense"], ["intermediate.dense"]),
]


def _peft_model(arch, targets, feedforward, seed=11):
    model = get_peft_model(
        BUILDERS[arch](), IA3Config(target_modules=targets, feedforward_modules=feedforward)
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the identity: l = 1 + 0.5·N(0, 1)
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("arch, targets, feedforward", CASES)
def test_peft_parity_both_directions(arch, targets, feedforward, registry, tmp_path):
    batch = inputs()
    peft_model = _peft_model(arch, targets, feedforward)
    reference = output(peft_model, batch)
    assert not torch.allclose(reference, output(BUILDERS[arch](), batch), atol=1e-3)
    peft_model.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())

    model = BUILDERS[arch]()
    composed = ac.from_peft(model, tmp_path / "peft", name="task", registry=registry)
    assert (output(model, batch) - reference).abs().max() <= TOL
    peft_ff = {
        n for n, m in peft_model.named_modules() if getattr(m, "is_feedforward", False)
    }  # PEFT's own decision, per module
    ours_ff = {i.path for i in composed._rt.infos["task"].values() if i.kind == "linear.scale_in"}
    assert {p.removeprefix("base_model.model.") for p in peft_ff} == ours_ff

    composed.to_peft("task", tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert exported["fan_in_fan_out"] == saved["fan_in_fan_out"]
    back = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "export").eval()
    assert (output(back, batch) - reference).abs().max() <= TOL
    back_ff = {n for n, m in back.named_modules() if getattr(m, "is_feedforward", False)}
    assert {p.removeprefix("base_model.model.") for p in back_ff} == ours_ff  # PEFT reads the same split


def test_role_targets_export_to_peft(registry, tmp_path):
    batch = inputs()
    model, composed = _composed("llama", registry, targets=["attn.k", "attn.v", "mlp.down"])
    ours = output(model, batch)
    composed.to_peft("a", tmp_path / "export")
    back = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "export").eval()
    assert (output(back, batch) - ours).abs().max() <= TOL


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"feedforward": ["re:(unclosed"]},
        {"feedforward": "mlp.down"},  # a string, not a list of patterns
        {"init": "zeros"},
        {"rank": 4},  # not an IA3 option
    ],
)
def test_bad_config_is_refused(config, registry):
    g = Graph()
    g.adapter("a", "ia3", **config)
    with pytest.raises(CompositionError) as err:
        ac.compose(BUILDERS["llama"](), g, registry=registry)
    assert err.value.codes == ["bad-config"]


def test_peft_file_errors(registry, tmp_path):
    model = BUILDERS["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _peft_model("llama", ["k_proj", "down_proj"], ["down_proj"]).save_pretrained(tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    weights_path = tmp_path / "p" / "adapter_model.safetensors"
    config, tensors = json.loads(config_path.read_text()), load_file(str(weights_path))
    k0 = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"

    def load_with(cfg=config, ts=tensors):
        config_path.write_text(json.dumps(cfg))
        save_file(ts, str(weights_path))
        return ac.from_peft(model, tmp_path / "p", registry=registry)

    with pytest.raises(AdapterFileError, match="feedforward_modules is missing"):
        load_with({**config, "feedforward_modules": None})
    with pytest.raises(AdapterFileError, match=r"modules_to_save names \['lm_head'\].*no tensors"):
        load_with({**config, "modules_to_save": ["lm_head"]})  # named, but its tensors are not in the file
    with pytest.raises(AdapterFileError, match=r"shape \(32, 2\); IA3 vectors are \[out, 1\]"):
        load_with(ts={**tensors, k0: torch.ones(32, 2)})
    with pytest.raises(AdapterFileError, match=r"has shape \(16,\), the model needs \(32,\)"):
        load_with(ts={**tensors, k0: torch.ones(16, 1)})
    # the file says [1, in] (feed-forward) where the config says output scaling
    with pytest.raises(AdapterFileError, match=r"missing tensors.*layers\.0\.self_attn.*l_out"):
        load_with(ts={**tensors, k0: torch.ones(1, 64)})
    with pytest.raises(AdapterFileError, match="unexpected tensors.*mlp.down_proj.l_in"):
        load_with({**config, "feedforward_modules": []})
    with pytest.raises(AdapterFileError, match="is not an IA3 vector"):
        load_with(ts={**tensors, "base_model.model.lm_head.lora_A.weight": torch.ones(2, 64)})
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
