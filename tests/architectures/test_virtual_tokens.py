"""Prefix and prompt tuning on the decoder families added for Phi-3, Gemma and the MoE models:
the same logits as HF PEFT from the same initialisation (PEFT's draws, in its order)."""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

import adapter_composer as ac
from tests.models import inputs, output, tiny_gemma, tiny_moe, tiny_phi3

TOL = 1e-5
FAMILIES = {
    "phi3": tiny_phi3,
    "gemma": tiny_gemma,
    "gemma2": lambda: tiny_gemma(version=2),
    "gemma3": lambda: tiny_gemma(version=3),
    "mixtral": lambda: tiny_moe("mixtral"),
    "qwen2_moe": lambda: tiny_moe("qwen2_moe"),
    "qwen3_moe": lambda: tiny_moe("qwen3_moe"),
}
METHODS = {"prefix_tuning": PrefixTuningConfig, "prompt_tuning": PromptTuningConfig}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_virtual_tokens_match_peft(family, method):
    build, batch, n = FAMILIES[family], inputs(), 3
    base = build()
    torch.manual_seed(9)
    theirs = get_peft_model(base, METHODS[method](task_type="CAUSAL_LM", num_virtual_tokens=n)).eval()
    reference = output(theirs, batch)
    plain = output(build(), batch)
    assert not torch.allclose(reference[:, -plain.shape[1]:], plain, atol=1e-3)  # the tokens matter
    model = build()
    torch.manual_seed(9)
    g = ac.Graph()
    g.adapter("p", method, num_virtual_tokens=n)
    ac.compose(model, g)
    assert (output(model, batch) - reference).abs().max().item() <= TOL
