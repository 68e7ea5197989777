"""Phi-3: q/k/v are parts of the fused ``qkv_proj`` in head-count proportion (4 query heads,
2 key/value heads: 64 + 32 + 32 rows), gate and up are the halves of ``gate_up_proj``.
A LoRA on a part changes only that part's rows (the formula, by hand); whole fused layers
match HF PEFT both ways, for LoRA and IA3."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig

import adapter_composer as ac
from tests.architectures.parity import ours_to_peft, peft_to_ours, site_keys
from tests.models import inputs, randomize, tiny_phi3

TOL = 1e-5
QKV = "model.layers.{i}.self_attn.qkv_proj"
GATE_UP = "model.layers.{i}.mlp.gate_up_proj"
ROWS = {"attn.q": (0, 64), "attn.k": (64, 96), "attn.v": (96, 128), "mlp.gate": (0, 96), "mlp.up": (96, 192)}


@pytest.mark.parametrize("role", sorted(ROWS))
def test_a_lora_on_a_part_changes_only_its_rows(role):
    model = tiny_phi3()
    path = (QKV if role.startswith("attn") else GATE_UP).format(i=1)
    layer = model.get_submodule(path)
    w = layer.weight.detach().clone()
    g = ac.Graph()
    g.adapter("a", "lora", r=2, alpha=4, targets=[role], layers=[1])
    composed = ac.compose(model, g)
    randomize(composed, std=0.3)
    lora = composed.adapters["a"].modules[f"layers.1.{role}"]
    start, stop = ROWS[role]
    assert lora.lora_B.shape == (stop - start, 2)
    x = torch.randn(3, 64)
    delta = torch.zeros(w.shape[0], 3)
    delta[start:stop] = 2.0 * lora.lora_B @ lora.lora_A @ x.T  # s = α/r = 2
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(path)(x), (w @ x.T + delta).T, rtol=0, atol=1e-6)
    composed.undo()


def test_fused_roles_and_their_parts_resolve():
    keys = site_keys(tiny_phi3, ["attn.qkv", "mlp.gate_up", "attn.o", "mlp.down"])
    assert keys["layers.0.attn.qkv"] == QKV.format(i=0) and keys["layers.1.mlp.gate_up"] == GATE_UP.format(i=1)
    assert len(keys) == 8


def test_lora_and_ia3_parity_with_peft_both_ways(tmp_path):
    batch = inputs()
    targets = ["attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"]
    diffs = {
        "lora ours → peft": ours_to_peft(tiny_phi3, "lora", {"r": 4, "alpha": 8, "targets": targets}, batch, tmp_path / "1"),
        "lora peft → ours": peft_to_ours(
            tiny_phi3,
            LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], init_lora_weights=False),
            batch, tmp_path / "2",
        ),
        "ia3 ours → peft": ours_to_peft(tiny_phi3, "ia3", {"targets": ["attn.qkv", "mlp.down"]}, batch, tmp_path / "3"),
        "ia3 peft → ours": peft_to_ours(
            tiny_phi3,
            IA3Config(target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
            batch, tmp_path / "4",
        ),
    }
    assert max(diffs.values()) <= TOL, diffs


def test_ia3_on_the_value_part_scales_only_the_value_rows():
    model = tiny_phi3()
    layer = model.get_submodule(QKV.format(i=0))
    w = layer.weight.detach().clone()
    g = ac.Graph()
    g.adapter("a", "ia3", targets=["attn.v"], layers=[0])
    composed = ac.compose(model, g)
    randomize(composed, std=0.5)
    scale = composed.adapters["a"].modules["layers.0.attn.v"].scale().detach()
    assert scale.shape == (32,)
    full = torch.cat([torch.ones(96), scale])
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(QKV.format(i=0))(x), (x @ w.T) * full, rtol=0, atol=1e-6)
    composed.undo()

