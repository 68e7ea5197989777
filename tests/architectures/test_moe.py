"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) in transformers 5: the experts
are fused 3-D parameters, so expert roles are refused with the reason; attention roles (and
Qwen2-MoE's shared expert) match HF PEFT; the whole MoE block takes sublayer adapters."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig

import adapter_composer as ac
from adapter_composer import CompositionError
from tests.architectures.parity import ours_to_peft, peft_to_ours
from tests.models import inputs, output, randomize, same_state, state_copy, tiny_moe

TOL = 1e-5
KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]
ATTN = ["attn.q", "attn.k", "attn.v", "attn.o"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_fused_experts_are_refused_with_the_reason(kind):
    model = tiny_moe(kind)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dim() == 3  # the layout this refusal is about
    state = state_copy(model)
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q", "mlp.up", "mlp.down"])
    with pytest.raises(CompositionError) as err:
        ac.compose(model, g)
    assert err.value.codes == ["role-unsupported", "role-unsupported"]
    message = str(err.value)
    assert "fused 3-D parameters" in message and "no linear layer sees an expert's input" in message
    assert same_state(model, state) and not hasattr(model, "adapter_composer")


@pytest.mark.parametrize("kind", KINDS)
def test_attention_lora_and_ia3_match_peft(kind, tmp_path):
    build, batch = (lambda: tiny_moe(kind)), inputs()
    diffs = {
        "lora ours → peft": ours_to_peft(build, "lora", {"r": 4, "alpha": 8, "targets": ATTN}, batch, tmp_path / "1"),
        "lora peft → ours": peft_to_ours(
            build, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False),
            batch, tmp_path / "2",
        ),
        "ia3 peft → ours": peft_to_ours(
            build, IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[], init_ia3_weights=False),
            batch, tmp_path / "3",
        ),
    }
    assert max(diffs.values()) <= TOL, diffs


def test_qwen2_moe_shared_expert_matches_peft(tmp_path):
    build, batch = (lambda: tiny_moe("qwen2_moe")), inputs()
    targets = ["mlp.shared.gate", "mlp.shared.up", "mlp.shared.down"]
    diff = ours_to_peft(build, "lora", {"r": 4, "targets": targets}, batch, tmp_path)
    assert diff <= TOL
    g = ac.Graph()
    g.adapter("a", "lora", targets=["mlp.shared.down"])
    paths = {i.path for i in ac.compose(build(), g)._rt.infos["a"].values()}
    assert paths == {f"model.layers.{i}.mlp.shared_expert.down_proj" for i in range(2)}


@pytest.mark.parametrize("kind", KINDS)
def test_the_moe_block_takes_sublayer_adapters(kind):
    model = tiny_moe(kind)
    batch = inputs()
    plain = output(model, batch)
    g = ac.Graph()
    g.adapter("h", "bottleneck", style="pfeiffer", bottleneck=8, targets=["mlp"])
    composed = ac.compose(model, g)
    torch.testing.assert_close(output(model, batch), plain, rtol=0, atol=1e-6)
    randomize(composed, std=0.2)
    assert not torch.allclose(output(model, batch), plain, atol=1e-3)
    composed.undo()
    assert torch.equal(output(model, batch), plain)
