"""Tiny bitsandbytes models (4-bit NF4 and 8-bit LLM.int8), loaded on CPU the way users do:
``save_pretrained`` a full-precision model, ``from_pretrained`` it with a quantization config."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapter_composer.sites import linear_weight, quantization
from tests.models import tiny_llama_kbit


def quantization_config(bits: int, dtype: torch.dtype = torch.float32, double: bool = False):
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=double,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_kbit(directory, bits: int, dtype: torch.dtype = torch.float32, repack: bool = False, **kw):
    """The saved model loaded in ``bits`` bits. ``repack=False`` turns off bitsandbytes' CPU
    inference repacking (AVX512-BF16 machines only), so every machine runs the same kernel."""
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization_config(bits, dtype, **kw), dtype=dtype
    ).eval()
    if not repack:
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model


def dense_twin(quantized) -> torch.nn.Module:
    """The full-precision model with every quantised layer's weight replaced by W_deq: the
    matrix bitsandbytes multiplies by, so it computes what the quantised model computes."""
    dense = tiny_llama_kbit()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if quantization(module) is not None:
                dense.get_submodule(name).weight.copy_(linear_weight(module).float())
    return dense


def quantized_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if quantization(m) is not None}


def registry_with_loha():
    """The built-in plugins plus the example third-party LoHa plugin (examples/loha_plugin)."""
    import sys
    from pathlib import Path

    from adapter_composer.registry import load_registry

    folder = str(Path(__file__).resolve().parents[2] / "examples" / "loha_plugin")
    sys.path.insert(0, folder)
    try:
        import composer_loha
    finally:
        sys.path.remove(folder)
    return load_registry(entry_points=False, plugins=[composer_loha])
