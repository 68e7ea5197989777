"""Every method acting on linear layers, on 4-bit (NF4) and 8-bit (LLM.int8) bitsandbytes bases.

References: the *dense twin* (the full-precision model holding W_deq, the matrix bitsandbytes
multiplies by) running the same composition through the ordinary path, and HF PEFT loading
our export onto a second copy of the quantised model. 8-bit layers quantise activations too
in eval mode (LLM.int8), so comparisons with dense layers run in training mode, where
bitsandbytes multiplies by W_deq in floating point; dropout is 0 everywhere here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

import adapter_composer as ac
from adapter_composer import CompositionError
from adapter_composer.plugins.bnb import BnbLinearSite
from adapter_composer.sites import linear_weight, quantization
from tests.models import inputs, output, randomize, same_state, state_copy, tiny_llama_kbit
from tests.quantized.bases import dense_twin, load_kbit, quantized_layers, registry_with_loha

REGISTRY = registry_with_loha()
QVD = ["attn.q", "attn.v", "mlp.down"]
VARIANTS = {
    "lora": ("lora", {"r": 4, "alpha": 8, "targets": QVD}),
    "rslora": ("lora", {"r": 4, "alpha": 8, "rslora": True, "targets": QVD}),
    "dora": ("lora", {"r": 4, "alpha": 8, "dora": True, "targets": QVD}),
    "ia3": ("ia3", {"targets": ["attn.k", "attn.v", "mlp.down"]}),
    "vera": ("vera", {"r": 4, "targets": QVD}),
    "adalora": ("adalora", {"init_r": 4, "target_r": 2, "total_step": 10, "targets": QVD}),
    "galore": ("galore", {"rank": 4, "targets": QVD}),
    "loha": ("loha", {"r": 2, "alpha": 4, "targets": QVD}),
}
IN_PEFT = ["lora", "rslora", "dora", "ia3", "vera", "adalora", "loha"]  # PEFT has no GaLore adapter
BITS = [4, 8]
TOL = 1e-5


def _compose(model, variant: str, seed: int = 0):
    method, config = VARIANTS[variant]
    g = ac.Graph()
    g.adapter("a", method, **config)
    composed = ac.compose(model, g, registry=REGISTRY)
    randomize(composed, std=0.1, seed=seed)
    return composed


def test_every_linear_method_is_covered():
    """A method acting on linear layers cannot skip this battery (LoftQ is refused, below)."""
    linear = {
        name
        for name, m in REGISTRY.methods.items()
        if all(k.startswith("linear.") for k in m.points)
    }
    assert linear - {method for method, _ in VARIANTS.values()} == {"loftq"}


@pytest.mark.parametrize("bits", BITS)
def test_dequantized_weight_is_what_the_layer_multiplies_by(bits, kbit_dir):
    model = load_kbit(kbit_dir, bits).train()
    layers = quantized_layers(model)
    assert len(layers) == 14 and {quantization(m) for m in layers.values()} == {f"bnb-{bits}bit"}
    g = torch.Generator().manual_seed(0)
    for layer in layers.values():
        w = linear_weight(layer)
        assert w.shape == (layer.out_features, layer.in_features)
        x = torch.randn(3, layer.in_features, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, w.float(), layer.bias), rtol=0, atol=1e-6)
    batch = inputs()
    torch.testing.assert_close(output(model, batch), output(dense_twin(model).train(), batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("bits", BITS)
def test_method_on_a_quantised_base_equals_the_dense_twin(bits, variant, kbit_dir, tmp_path):
    """Forward on the quantised base = the same adapters on full-precision W_deq; the saved
    composition loads onto the full-precision model (logical shapes in the fingerprint)."""
    model = load_kbit(kbit_dir, bits)
    twin = dense_twin(model)
    batch = inputs()
    before = output(model.train(), batch)
    method, config = VARIANTS[variant]
    g = ac.Graph()
    g.adapter("a", method, **config)
    fresh = ac.compose(model, g, registry=REGISTRY)
    assert all(isinstance(s, BnbLinearSite) for s in fresh.sites().values())
    if REGISTRY.method(method).capabilities.identity_at_init:
        torch.testing.assert_close(output(model, batch), before, rtol=0, atol=1e-6)
    randomize(fresh, std=0.1)
    ours = output(model, batch)
    assert not torch.allclose(ours, before, atol=1e-3)
    fresh.save(tmp_path / "run")
    ac.load(twin, tmp_path / "run", registry=REGISTRY)
    torch.testing.assert_close(ours, output(twin.train(), batch), rtol=0, atol=TOL)


# PEFT's LoHa sizes its factors from the packed 4-bit parameter ([n·k/2, 1]), so it has no
# 4-bit LoHa to compare with; ours is checked against the dense twin above
PEFT_CASES = [(b, v) for b in BITS for v in IN_PEFT if (b, v) != (4, "loha")]


@pytest.mark.parametrize(("bits", "variant"), PEFT_CASES)
def test_peft_parity(bits, variant, kbit_dir, tmp_path):
    """Our export, loaded by HF PEFT onto another copy of the quantised model: same logits."""
    model = load_kbit(kbit_dir, bits)
    composed = _compose(model, variant)
    batch = inputs()
    ours = output(model, batch)
    composed.to_peft("a", tmp_path / "export")
    theirs = PeftModel.from_pretrained(load_kbit(kbit_dir, bits), tmp_path / "export").eval()
    diff = (output(theirs, batch) - ours).abs().max().item()
    print(f"PEFT parity {variant} {bits}-bit: max |Δ| {diff:.2e}")
    assert diff <= TOL, f"{variant} on {bits}-bit: max |Δ| {diff:.2e} against PEFT"


@pytest.mark.parametrize("bits", BITS)
def test_dora_trained_by_peft_imports_exactly(bits, kbit_dir, tmp_path):
    """PEFT's DoRA on a quantised base (random B, so the magnitude matters) → ac.from_peft."""
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = get_peft_model(load_kbit(kbit_dir, bits), config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)  # away from the norm it was initialised to
    theirs.save_pretrained(tmp_path / "peft")
    batch = inputs()
    composed = ac.from_peft(load_kbit(kbit_dir, bits), tmp_path / "peft", name="task", registry=REGISTRY)
    diff = (output(composed.model, batch) - output(theirs, batch)).abs().max().item()
    assert diff <= TOL, f"DoRA from PEFT on {bits}-bit: max |Δ| {diff:.2e}"


MERGEABLE = sorted(v for v, (m, _) in VARIANTS.items() if REGISTRY.method(m).capabilities.mergeable)


@pytest.mark.parametrize("variant", MERGEABLE)
@pytest.mark.parametrize("bits", BITS)
def test_merge_swaps_in_a_dense_layer_and_unmerge_restores_the_quantised_one(bits, variant, kbit_dir, tmp_path):
    model = load_kbit(kbit_dir, bits).train()
    twin = dense_twin(model)
    originals = quantized_layers(model)
    state = state_copy(model)
    composed = _compose(model, variant)
    batch = inputs()
    unmerged = output(model, batch)
    composed.save(tmp_path / "run")

    composed.merge()
    sites = composed.sites()
    for (path, _), site in sites.items():
        assert type(site.base) is torch.nn.Linear and site.base is not originals[path]
    merged = output(model, batch)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=TOL)
    # the dense layer holds the fold over W_deq: the dense twin merged the ordinary way
    ac.load(twin, tmp_path / "run", registry=REGISTRY).merge()
    for (path, _), site in sites.items():
        torch.testing.assert_close(site.base.weight, twin.get_submodule(path).base.weight, rtol=0, atol=1e-6)

    composed.unmerge()
    assert all(site.base is originals[path] for (path, _), site in sites.items())
    assert torch.equal(output(model, batch), unmerged)
    composed.undo()
    assert all(model.get_submodule(p) is m for p, m in originals.items())
    assert same_state(model, state)


@pytest.mark.parametrize("bits", BITS)
def test_merge_and_unload_leaves_dense_layers(bits, kbit_dir):
    model = load_kbit(kbit_dir, bits).train()
    composed = _compose(model, "dora")
    batch = inputs()
    expected = output(model, batch)
    adapted = {path for path, _ in composed.sites()}
    plain = composed.merge_and_unload()
    assert plain is model and not any(getattr(m, "is_composer_site", False) for m in model.modules())
    for name, module in model.named_modules():
        if name in adapted:
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
    assert set(quantized_layers(model)) == set(quantized_layers(load_kbit(kbit_dir, bits))) - adapted
    torch.testing.assert_close(output(model, batch), expected, rtol=0, atol=TOL)


def test_merged_layer_keeps_the_dtype_of_the_quantised_weights(kbit_dir):
    model = load_kbit(kbit_dir, 4, dtype=torch.bfloat16)
    composed = _compose(model, "lora")
    composed.merge()
    site = next(iter(composed.sites().values()))
    assert site.base.weight.dtype == torch.bfloat16
    composed.undo()


def test_loftq_refuses_a_quantised_base(kbit_dir):
    model = load_kbit(kbit_dir, 4)
    state = state_copy(model)
    g = ac.Graph()
    g.adapter("q", "loftq", r=4, targets=["attn.q", "attn.v"])
    with pytest.raises(CompositionError) as err:
        ac.compose(model, g, registry=REGISTRY)
    assert err.value.codes == ["loftq-quantized-base"]
    assert "bnb-4bit" in str(err.value) and "full-precision" in str(err.value)
    assert same_state(model, state) and not hasattr(model, "adapter_composer")


@pytest.mark.parametrize("bits", BITS)
def test_parameter_report_counts_the_weights_the_codes_stand_for(bits, kbit_dir):
    model = load_kbit(kbit_dir, bits)
    report = _compose(model, "lora").trainable_parameters()
    assert report.base == sum(p.numel() for p in tiny_llama_kbit().parameters())
