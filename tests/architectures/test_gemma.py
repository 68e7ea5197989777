"""Gemma 1, 2 and 3 (text): Llama's projections; HF PEFT parity both ways for LoRA on every
linear role and IA3; Gemma 2/3 sublayers end at their post-norms."""

from __future__ import annotations

import pytest
from peft import IA3Config, LoraConfig

import adapter_composer as ac
from tests.architectures.parity import ours_to_peft, peft_to_ours
from tests.models import BUILDERS, inputs

TOL = 1e-5
ALL = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_lora_and_ia3_parity_with_peft_both_ways(arch, tmp_path):
    build, batch = BUILDERS[arch], inputs()
    diffs = {
        "lora ours → peft": ours_to_peft(build, "lora", {"r": 4, "alpha": 8, "targets": ALL}, batch, tmp_path / "1"),
        "dora ours → peft": ours_to_peft(build, "lora", {"r": 4, "dora": True, "targets": ["attn.q", "mlp.down"]}, batch, tmp_path / "2"),
        "lora peft → ours": peft_to_ours(
            build, LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, init_lora_weights=False), batch, tmp_path / "3"
        ),
        "ia3 ours → peft": ours_to_peft(build, "ia3", {"targets": ["attn.k", "attn.v", "mlp.down"]}, batch, tmp_path / "4"),
        "ia3 peft → ours": peft_to_ours(
            build,
            IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
            batch, tmp_path / "5",
        ),
    }
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize(("arch", "attn_out", "mlp_out"), [
    ("gemma", "self_attn", "mlp"),
    ("gemma2", "post_attention_layernorm", "post_feedforward_layernorm"),
    ("gemma3", "post_attention_layernorm", "post_feedforward_layernorm"),
])
def test_sublayers_end_where_the_residual_is_added(arch, attn_out, mlp_out):
    g = ac.Graph()
    g.adapter("h", "bottleneck", style="houlsby", bottleneck=8, targets=["attn", "mlp"])
    composed = ac.compose(BUILDERS[arch](), g)
    paths = {i.path for i in composed._rt.infos["h"].values()}
    assert paths == {f"model.layers.{i}.{m}" for i in range(2) for m in (attn_out, mlp_out)}

