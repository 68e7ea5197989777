"""Composition benchmark: route, mix, compose and hot-swap costs, against the base model and
HF PEFT measured in the same run (not a test: run it and read the table).

    python tests/benchmarks/bench_composition.py            # ~2-4 minutes on 2 CPU cores
    python tests/benchmarks/bench_composition.py --quick    # fewer repeats

Model: random Llama, 4 layers × 512 wide (8 heads, 4 KV heads, MLP 1376, vocab 32000),
fp32, LoRA r=8 on all seven linear roles. Ratios are medians of interleaved timings of the
forward pass (no_grad, eval) against the plain base model in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import PEFT_TARGETS, ROLES, llama, routed, token_batch
from bench_common import timeit as bench_timeit
from transformers import LlamaForCausalLM

import adapter_composer as ac


def base_model(seed: int = 0) -> LlamaForCausalLM:
    return llama(32000, seed)


def batch(rows: int, tokens: int) -> dict[str, torch.Tensor]:
    return token_batch(rows, tokens, 32000, seed=rows)


def timeit(fns: dict, repeats: int) -> dict[str, float]:
    return bench_timeit(fns, repeats, warmup=2)


def ours_route(n: int):
    model = base_model()
    composed = routed(model, n)
    with torch.no_grad():
        for p in composed.parameters():
            p.normal_(0, 0.02)
    return model, composed


def peft_multi(n: int):
    from peft import LoraConfig, get_peft_model

    cfg = lambda: LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS, init_lora_weights=False)  # noqa: E731
    model = get_peft_model(base_model(), cfg(), adapter_name="t0")
    add_times = []
    for i in range(1, n):
        t = time.perf_counter()
        model.add_adapter(f"t{i}", cfg())
        add_times.append(time.perf_counter() - t)
    return model.eval(), add_times


def bench_route(repeats: int, rows: int, tokens: int, n: int, out: list[str]) -> None:
    data = batch(rows, tokens)
    route = [f"k{i % n}" for i in range(rows)]
    names = [f"t{i % n}" for i in range(rows)]
    base = base_model()
    model, composed = ours_route(n)
    peft_model, _ = peft_multi(n)
    t = timeit(
        {
            "base": lambda: base(**data),
            "ours": lambda: model(**data, route=route),
            "peft": lambda: peft_model(**data, adapter_names=names),
        },
        repeats,
    )
    out.append(
        f"route  {n:>2} adapters over {rows:>2} rows × {tokens:>3} tokens   base {t['base'] * 1e3:7.1f} ms   "
        f"ours {t['ours'] / t['base']:.3f}×   HF PEFT adapter_names= {t['peft'] / t['base']:.3f}×"
    )


def bench_mix(repeats: int, out: list[str]) -> None:
    data = batch(8, 128)
    base = base_model()
    model = base_model()
    g = ac.Graph()
    for i in range(4):
        g.adapter(f"e{i}", "lora", r=8, alpha=16, targets=ROLES)
    g.mix("e0", "e1", "e2", "e3", name="experts")
    composed = ac.compose(model, g)
    with torch.no_grad():
        for p in composed.parameters():
            p.normal_(0, 0.02)
    fns = {"base": lambda: base(**data), "ours": lambda: model(**data)}
    xlora = _xlora(4)
    if xlora is not None:
        fns["xlora"] = lambda: xlora(**data)
    t = timeit(fns, repeats)
    peft = f"   HF PEFT X-LoRA {t['xlora'] / t['base']:.3f}×" if "xlora" in t else "   (X-LoRA unavailable)"
    out.append(f"mix    4 LoRA experts, 8 rows × 128 tokens        base {t['base'] * 1e3:7.1f} ms   ours {t['ours'] / t['base']:.3f}×{peft}")


def _xlora(n: int):
    try:
        from peft import LoraConfig, XLoraConfig, get_peft_model
    except ImportError:
        return None
    tmp = Path(tempfile.mkdtemp())
    paths = {}
    for i in range(n):
        m = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS, init_lora_weights=False))
        m.save_pretrained(tmp / f"e{i}")
        paths[str(i)] = str(tmp / f"e{i}")
    model = base_model()
    model.config.use_cache = False
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=512, adapters=paths, xlora_depth=1, xlora_size=64)
    return get_peft_model(model, cfg).eval()


def bench_compose(out: list[str]) -> None:
    import gc

    ac.default_registry()  # built once, outside the timings

    def compose_time(n: int) -> float:
        best = float("inf")
        for _ in range(3):
            model = base_model()
            g = ac.Graph()
            for i in range(n):
                g.adapter(f"t{i}", "lora", r=8, targets=ROLES)
            g.route({f"k{i}": f"t{i}" for i in range(n)})
            gc.collect()
            t = time.perf_counter()
            ac.compose(model, g)
            best = min(best, time.perf_counter() - t)
        return best

    small, large = compose_time(2), compose_time(64)
    _, peft_adds = peft_multi(64)
    out.append(
        f"compose  2 adapters {small / 2 * 1e3:6.1f} ms/adapter   64 adapters {large / 64 * 1e3:6.1f} ms/adapter (best of 3)   "
        f"HF PEFT add_adapter: 2nd {peft_adds[0] * 1e3:6.1f} ms, 41st {peft_adds[39] * 1e3:6.1f} ms, 64th {peft_adds[-1] * 1e3:6.1f} ms"
    )


def bench_hot_swap(out: list[str]) -> None:
    def swap_costs(n: int) -> tuple[float, float, float, float]:
        model, composed = ours_route(n)
        tensors = {k: v.clone() for k, v in composed.adapters["t1"].state_dict().items()}
        swap, replace, copy = [], [], []
        for i in range(7):
            t = time.perf_counter()
            composed.add_adapter(f"new{i}", "lora", route="tasks", key="k1", r=8, alpha=16, targets=ROLES, tensors=tensors)
            swap.append(time.perf_counter() - t)
            t = time.perf_counter()
            composed.replace_weights(f"new{i}", tensors)
            replace.append(time.perf_counter() - t)
            t = time.perf_counter()
            _ = {k: v.clone() for k, v in tensors.items()}
            copy.append(time.perf_counter() - t)
        size = sum(v.numel() for v in tensors.values()) * 4 / 1e6
        return statistics.median(swap), statistics.median(replace), statistics.median(copy), size

    few, many = swap_costs(4), swap_costs(64)
    out.append(
        f"hot swap ({many[3]:.2f} MB adapter): add/replace a whole adapter {few[0] * 1e3:5.2f} ms among 4, {many[0] * 1e3:5.2f} ms among 64; "
        f"new weights in place {many[1] * 1e3:5.2f} ms; copying the weights {many[2] * 1e3:5.2f} ms"
    )


def bench_switch(repeats: int, out: list[str]) -> None:
    model, composed = ours_route(8)
    data = batch(8, 128)
    plan_before = composed.plan
    modules_before = len(list(model.modules()))
    fixed = [f"k{i}" for i in range(8)]
    t = timeit(
        {
            "fixed": lambda: model(**data, route=fixed),
            "switching": lambda: model(**data, route=[f"k{(i + int(time.perf_counter() * 1e6)) % 8}" for i in range(8)]),
        },
        repeats,
    )
    unchanged = composed.plan is plan_before and len(list(model.modules())) == modules_before
    out.append(f"route switching: a new key set every call {t['switching'] / t['fixed']:.3f}× a fixed one; plan and modules unchanged: {unchanged}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 5 if args.quick else 15
    out: list[str] = [f"torch {torch.__version__}, {torch.get_num_threads()} threads"]
    bench_route(repeats, 8, 128, 8, out)
    bench_route(repeats, 32, 32, 32, out)
    bench_mix(repeats, out)
    bench_switch(repeats, out)
    bench_compose(out)
    bench_hot_swap(out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
