"""Per-call cost of a routed forward, single-threaded, and a threaded serving loop (not a test).

    python tests/benchmarks/bench_serving.py [--repeats 30]

Two shapes: a small Llama (2 layers × 256, 8 rows × 64 tokens) where the matmuls dominate, and
a tiny one (2 layers × 64, 2 rows × 8 tokens) where the per-call Python work of the hooks and
the per-call state dominates. For each: the plain base forward and the composed forward with
route= (4 LoRAs, r = 8, on all seven linear roles), alternated call by call, and the median of
the per-pair ratios. Then routed calls from 4 threads, each with its own keys (outputs checked
against the same call made alone). Only the public API is used, so the script runs on any
version of the library for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adapter_composer as ac

ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


def llama(hidden: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def composed_model(hidden: int, vocab: int):
    model = llama(hidden, vocab)
    g = ac.Graph()
    for i in range(4):
        g.adapter(f"t{i}", "lora", r=8, targets=ROLES)
    g.route({f"k{i}": f"t{i}" for i in range(4)}, name="tasks")
    composed = ac.compose(model, g)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in composed.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def paired(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
    """Median times of a and b, and the median of the per-pair ratios b / a, with the two
    calls alternated one by one. Times are the calling thread's CPU time (torch runs on one
    intra-op thread here), so other processes on a busy machine do not count."""
    fn_a(), fn_b()
    ta, tb, ratios = [], [], []
    for _ in range(repeats):
        start = time.thread_time()
        fn_a()
        middle = time.thread_time()
        fn_b()
        end = time.thread_time()
        ta.append(middle - start)
        tb.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def case(name: str, hidden: int, vocab: int, rows: int, tokens: int, repeats: int) -> None:
    base, routed = llama(hidden, vocab), composed_model(hidden, vocab)
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)

    def run_base():
        with torch.no_grad():
            base(input_ids=ids, attention_mask=mask)

    def run_routed(keys):
        with torch.no_grad():
            return routed(input_ids=ids, attention_mask=mask, route=keys).logits

    keys = [f"k{i % 4}" for i in range(rows)]
    b, r, ratio = paired(run_base, lambda: run_routed(keys), repeats)
    print(f"{name}: base {b * 1e3:.2f} ms, routed {r * 1e3:.2f} ms, routed / base {ratio:.3f} (median of {repeats} pairs)")

    threads, calls = 4, 10
    per_thread = [[f"k{(i + j) % 4}" for i in range(rows)] for j in range(threads)]  # each thread its own keys
    reference = [run_routed(k) for k in per_thread]
    wrong = [0] * threads

    def work(j: int) -> None:
        for _ in range(calls):
            wrong[j] += not torch.equal(run_routed(per_thread[j]), reference[j])

    pool = [threading.Thread(target=work, args=(j,)) for j in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(f"  {threads} threads × {calls} routed calls, each thread its own keys: "
          f"{sum(wrong)} of {threads * calls} outputs differ from the same call alone")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)  # single-threaded calls: CPU time of this thread is the cost
    case("small (2 × 256, 8 × 64)", 256, 2000, 8, 64, args.repeats)
    case("tiny (2 × 64, 2 × 8)", 64, 128, 2, 8, args.repeats * 4)


if __name__ == "__main__":
    main()
