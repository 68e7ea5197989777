"""What the benchmark scripts share: the random Llama (4 layers × 512), batches, interleaved
timing and the routed composition of n LoRA adapters (r = 8 on all seven linear roles).
Imported by the scripts in this folder (run as ``python tests/benchmarks/<script>.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adapter_composer as ac

ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """Random Llama: 4 layers × 512 (8 heads, 4 KV heads, MLP 1376), fp32, eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


def token_batch(rows: int, tokens: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timeit(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call, the candidates interleaved so they share the machine's noise."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def routed(model: torch.nn.Module, n: int) -> ac.Composed:
    """n LoRA adapters (r = 8, α = 16, all seven roles) behind a route keyed k0..k{n-1}."""
    g = ac.Graph()
    for i in range(n):
        g.adapter(f"t{i}", "lora", r=8, alpha=16, targets=ROLES)
    g.route({f"k{i}": f"t{i}" for i in range(n)}, name="tasks")
    return ac.compose(model, g)
