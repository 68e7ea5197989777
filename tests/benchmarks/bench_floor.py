"""Routed serving and mixtures against the base model and HF PEFT, on a body-dominated model
(issue 12's table, every row in one run; not a test: run it and read the table).

    python tests/benchmarks/bench_floor.py              # ~4-6 minutes on 2 CPU cores
    python tests/benchmarks/bench_floor.py --quick      # fewer repeats, smaller PEFT side
    python tests/benchmarks/bench_floor.py --markdown   # the README's table

Model: random Llama, 4 layers × 512 (8 heads, 4 KV heads, MLP 1376, vocab 8000), fp32,
LoRA r = 8 on all seven linear roles, torch.set_num_threads(2). Every ratio is the median
over interleaved repeats (base, ours, PEFT, base, ours, ...) of no-grad eval forwards,
except the training step. Memory is measured in fresh child processes (RSS, /proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_common import PEFT_TARGETS, ROLES, llama, routed, timeit, token_batch
from transformers import LlamaForCausalLM

import adapter_composer as ac

VOCAB = 8000


def base_model(seed: int = 0) -> LlamaForCausalLM:
    return llama(VOCAB, seed)


def batch(rows: int, tokens: int) -> dict[str, torch.Tensor]:
    return token_batch(rows, tokens, VOCAB, seed=rows + tokens)


def randomized(model: torch.nn.Module, params) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def ours_route(n: int):
    model = base_model()
    composed = routed(model, n)
    randomized(model, composed.parameters())
    return model, composed


def peft_route(n: int):
    from peft import LoraConfig, get_peft_model

    def cfg():
        return LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS, init_lora_weights=False)

    model = get_peft_model(base_model(), cfg(), adapter_name="t0")
    for i in range(1, n):
        model.add_adapter(f"t{i}", cfg())
    return model.eval()


def row(table: list, work: str, t: dict, target: str, note: str = "") -> None:
    base = t.get("base")
    ours = t["ours"] / base if base else None
    peft = t["peft"] / base if base and "peft" in t else None
    table.append({"work": work, "base_ms": None if base is None else base * 1e3, "ours": ours, "peft": peft,
                  "target": target, "note": note})


def bench_route(table: list, repeats: int, n: int, rows: int, tokens: int, target: str, peft: bool) -> None:
    data = batch(rows, tokens)
    keys, names = [f"k{i % n}" for i in range(rows)], [f"t{i % n}" for i in range(rows)]
    base = base_model()
    model, _ = ours_route(n)
    fns = {"base": lambda: base(**data), "ours": lambda: model(**data, route=keys)}
    if peft:
        pm = peft_route(n)
        fns["peft"] = lambda: pm(**data, adapter_names=names)
    t = timeit(fns, repeats)
    row(table, f"route, {n} adapters × {rows} rows × {tokens} tokens", t, target)


def _decode_step(model, data, extra: dict):
    """A callable running one decode step (one token per row) on a prefilled KV cache, cropped
    back after each step so every repeat sees the same cache length."""
    with torch.no_grad():
        out = model(**data, use_cache=True, **extra)
    cache = getattr(out, "cache", None) or out.past_key_values  # transformers 5.24 names it cache
    length = data["input_ids"].shape[1]
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.ones(nxt.shape[0], length + 1, dtype=torch.long)

    def step():
        model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True, **extra)
        cache.crop(-1)  # drop the token just added

    return step


def bench_generate(table: list, repeats: int, peft: bool) -> None:
    rows, n, new, prompt = 16, 16, 64, 16
    data = batch(rows, prompt)
    keys, names = [f"k{i % n}" for i in range(rows)], [f"t{i % n}" for i in range(rows)]
    base = base_model()
    model, _ = ours_route(n)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    fns = {"base": lambda: base.generate(**data, **gen), "ours": lambda: model.generate(**data, **gen, route=keys)}
    extra = {"base": {}, "ours": {"route": keys}}
    models = {"base": base, "ours": model}
    if peft:
        pm = peft_route(n)
        fns["peft"] = lambda: pm.generate(**data, **gen, adapter_names=names)
        extra["peft"], models["peft"] = {"adapter_names": names}, pm
    t = timeit(fns, max(3, repeats // 3))
    tps = {k: rows * new / v for k, v in t.items()}
    note = f"tokens/s: base {tps['base']:.0f}, ours {tps['ours']:.0f}" + (f", PEFT {tps['peft']:.0f}" if "peft" in tps else "")
    vs_peft = f"; {tps['ours'] / tps['peft']:.2f}× PEFT" if "peft" in tps else ""
    table.append({"work": f"routed generate, {rows} rows × {n} adapters, {new} new tokens (KV cache)",
                  "base_ms": t["base"] * 1e3, "ours": t["ours"] / t["base"], "peft": t.get("peft", 0) / t["base"] or None,
                  "target": "≥ 0.9× base tokens/s, ≥ 1.5× PEFT",
                  "note": f"{tps['ours'] / tps['base']:.2f}× base tokens/s{vs_peft} ({note})"})
    prefill = timeit({k: (lambda m=models[k], e=extra[k]: m(**data, **e)) for k in models}, repeats)
    row(table, f"  prefill ({rows} rows × {prompt} tokens)", prefill, "")
    steps = {k: _decode_step(models[k], data, extra[k]) for k in models}
    row(table, f"  decode step ({rows} rows × 1 token, cache of {prompt})", timeit(steps, repeats * 3), "")


def _mixed(top_k: int | None):
    model = base_model()
    g = ac.Graph()
    for i in range(4):
        g.adapter(f"e{i}", "lora", r=8, alpha=16, targets=ROLES)
    g.mix("e0", "e1", "e2", "e3", name="experts", top_k=top_k)
    composed = ac.compose(model, g)
    randomized(model, composed.parameters())
    return model


def _xlora(top_k: int | None):
    from peft import LoraConfig, XLoraConfig, get_peft_model

    tmp = Path(tempfile.mkdtemp())
    paths = {}
    for i in range(4):
        m = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS, init_lora_weights=False))
        m.save_pretrained(tmp / f"e{i}")
        paths[str(i)] = str(tmp / f"e{i}")
    model = base_model()
    model.config.use_cache = False
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=512, adapters=paths, xlora_depth=1, xlora_size=64, top_k_lora=top_k)
    return get_peft_model(model, cfg).eval()


def bench_mix(table: list, repeats: int, top_k: int | None, target: str, peft: bool) -> None:
    data = batch(8, 128)
    base, model = base_model(), _mixed(top_k)
    fns = {"base": lambda: base(**data), "ours": lambda: model(**data)}
    note = ""
    if peft:
        try:
            xl = _xlora(top_k)
            fns["peft"] = lambda: xl(**data)
            note = "PEFT: X-LoRA" + (f" top_k_lora={top_k}" if top_k else "")
        except Exception as exc:  # report what PEFT lacks instead of failing the run
            note = f"PEFT: X-LoRA unavailable ({type(exc).__name__})"
    what = "dense" if top_k is None else f"top-{top_k}"
    row(table, f"mix of 4 LoRA experts, {what}, 8 × 128", timeit(fns, repeats), target, note)


def bench_train(table: list, repeats: int) -> None:
    from peft import LoraConfig, get_peft_model

    data = batch(4, 128)
    labels = data["input_ids"]
    ours = base_model().train()
    g = ac.Graph()
    g.adapter("t", "lora", r=8, alpha=16, targets=ROLES)
    composed = ac.compose(ours, g)
    peft = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS)).train()
    steps = {}
    for name, m, params in (("ours", ours, list(composed.parameters())), ("peft", peft, [p for p in peft.parameters() if p.requires_grad])):
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(m=m, opt=opt):
            with torch.enable_grad():
                m(**data, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    t = timeit(steps, repeats)
    table.append({"work": "LoRA training step (fwd + bwd + AdamW), 4 × 128, vs PEFT", "base_ms": t["peft"] * 1e3,
                  "ours": t["ours"] / t["peft"], "peft": 1.0, "target": "≤ 0.85× PEFT, kept", "note": "ratio to PEFT's step"})


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(kind: str) -> None:
    torch.set_num_threads(2)
    model = base_model()
    data = batch(8, 16)
    before = _rss_mib()
    if kind == "ours":
        g = ac.Graph()
        for i in range(64):
            g.adapter(f"t{i}", "lora", r=8, alpha=16, targets=ROLES)
        g.route({f"k{i}": f"t{i}" for i in range(64)}, name="tasks")
        composed = ac.compose(model, g)
        params = list(composed.parameters())
        call = {"route": [f"k{i}" for i in range(8)]}
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS), adapter_name="t0")
        for i in range(1, 64):
            model.add_adapter(f"t{i}", LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS))
        model.eval()
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        call = {"adapter_names": [f"t{i}" for i in range(8)]}
    composed_rss = _rss_mib()
    with torch.no_grad():
        model(**data, **call)
    called = _rss_mib()
    weights = sum(p.numel() * p.element_size() for p in params) / 2**20
    print(json.dumps({"weights": weights, "compose": composed_rss - before, "call": called - composed_rss}))


def bench_memory(table: list, peft: bool) -> None:
    got = {}
    for kind in ("ours", "peft") if peft else ("ours",):
        out = subprocess.run([sys.executable, __file__, "--memory-child", kind], capture_output=True, text=True, check=True)
        got[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    o = got["ours"]
    note = f"weights {o['weights']:.0f} MiB; ours RSS +{o['compose']:.0f} MiB after compose, +{o['call']:.0f} MiB after the first routed call"
    if "peft" in got:
        p = got["peft"]
        note += f"; PEFT +{p['compose']:.0f} MiB after 64 add_adapter, +{p['call']:.0f} MiB after the first adapter_names= call"
    table.append({"work": "memory, 64 resident r=8 adapters on all roles", "base_ms": None, "ours": None, "peft": None,
                  "target": "their own bytes, no stacked duplicate", "note": note})


def render(table: list, markdown: bool) -> str:
    def ratio(v):
        return "" if v is None else f"{v:.3f}×"

    if markdown:
        lines = ["| work | base | adapter-composer | HF PEFT | target | notes |", "|---|---:|---:|---:|---|---|"]
        for r in table:
            base = "" if r["base_ms"] is None else f"{r['base_ms']:.1f} ms"
            ours = "" if r["ours"] is None else f"**{r['ours']:.3f}×**"
            lines.append(f"| {r['work']} | {base} | {ours} | {ratio(r['peft'])} | {r['target']} | {r['note']} |")
        return "\n".join(lines)
    lines = []
    for r in table:
        base = "" if r["base_ms"] is None else f"base {r['base_ms']:8.1f} ms"
        lines.append(f"{r['work']:<66} {base:<17} ours {ratio(r['ours']):<8} PEFT {ratio(r['peft']):<8} target {r['target']}  {r['note']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--markdown", action="store_true", help="print the README's table")
    parser.add_argument("--no-peft", action="store_true", help="skip the HF PEFT columns")
    parser.add_argument("--only", default="", help="comma-separated subset: route,generate,mix,train,memory")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    torch.set_num_threads(2)
    repeats = 3 if args.quick else 9
    peft = not args.no_peft
    only = set(filter(None, args.only.split(","))) or {"route", "generate", "mix", "train", "memory"}
    table: list = []
    if "route" in only:
        bench_route(table, repeats, 32, 32, 32, "≤ 1.08×", peft)
        bench_route(table, repeats, 8, 8, 128, "≤ 1.05×", peft)
        bench_route(table, repeats, 128, 128, 16, "≤ 1.12×", peft)
    if "generate" in only:
        bench_generate(table, repeats, peft)
    if "mix" in only:
        bench_mix(table, repeats, None, "≤ 1.06×", peft)
        bench_mix(table, repeats, 2, "≤ 1.08×", peft)
    if "train" in only and peft:
        bench_train(table, repeats)
    if "memory" in only:
        bench_memory(table, peft)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} interleaved repeats (medians)")
    print(render(table, args.markdown))


if __name__ == "__main__":
    main()
