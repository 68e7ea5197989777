"""Where the routed and mixed forwards spend their time beyond the base model (issue 12's
profile; not a test: run it and read the table).

    python tests/benchmarks/bench_profile.py            # ~2 minutes on 2 CPU cores
    python tests/benchmarks/bench_profile.py --markdown # the README's table

The same model, batches and compositions as bench_floor.py. Wall times are medians of
interleaved no-grad forwards (base, ours, ...). A second pass wraps the runtime's functions
with wall-clock timers (≈ 0.3 µs each) and splits the extra time per forward into:

* **low-rank kernels**: ``routed_delta`` / ``mixed_delta`` (gathers + batched GEMMs);
* **bank lookup**: ``bank_of`` (the data-pointer freshness check; stacking under grad);
* **node Python**: the rest of the route/mix node's ``linear_nf`` (the per-child
  ``lowrank_of`` walk, the row→slot decision, gates);
* **site wrapper**: ``LinearSite.forward`` minus its base linear and its node;
* **outside sites**: everything else (the model-level hook, per-call state, and the base
  linears running at a different speed inside a site).

``kernel GFLOP/s`` is the low-rank FLOPs (2·r·(in+out) per row token and site, plus the
gathers' zero work) over the kernels' time, against the base linears' GFLOP/s in the same run:
the gap between them is what keeps the ratio above the FLOP floor.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_common import timeit
from bench_floor import _decode_step, _mixed, base_model, batch, ours_route

from adapter_composer.plugins import mix as mix_plugin
from adapter_composer.plugins import route as route_plugin
from adapter_composer.runtime import linear as linear_mod

ACC: dict[str, float] = defaultdict(float)
FLOPS: dict[str, float] = defaultdict(float)
ON = [False]  # the timers run only in measure(); the ratio's timing sees a bare wrapper call


DEPTH = [0]  # > 0 inside a LinearSite.forward: its base linear counts as "linear in site"


def _timed(name: str, fn, flops=None):
    def wrapper(*args, **kwargs):
        if not ON[0]:
            return fn(*args, **kwargs)
        key = name
        if name == "site":
            DEPTH[0] += 1
        elif name == "linear" and DEPTH[0]:
            key = "linear in site"
        t = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            ACC[key] += time.perf_counter_ns() - t
            if name == "site":
                DEPTH[0] -= 1
            if flops is not None:
                FLOPS[name] += flops(*args, **kwargs)

    return wrapper


def _lowrank_flops(x, a, b, *rest, **kw) -> float:
    tokens = x.numel() // x.shape[-1]
    return 2.0 * tokens * a.shape[1] * (a.shape[2] + b.shape[1])


def _linear_flops(self, x, *args, **kwargs) -> float:
    return 2.0 * (x.numel() // x.shape[-1]) * self.in_features * self.out_features


def instrument() -> None:
    """Wrap the functions the breakdown reads (module-level names, patched where they are used)."""
    torch.nn.Linear.forward = _timed("linear", torch.nn.Linear.forward, _linear_flops)
    linear_mod.LinearSite.forward = _timed("site", linear_mod.LinearSite.forward)
    for module, node in ((route_plugin, route_plugin.RouteNode), (mix_plugin, mix_plugin.MixNode)):
        node.linear_nf = _timed("node", node.linear_nf)
        module.bank_of = _timed("bank", module.bank_of)
        for kernel in ("routed_delta", "mixed_delta"):
            if hasattr(module, kernel):
                setattr(module, kernel, _timed("kernels", getattr(module, kernel), _lowrank_flops))


def measure(fn, repeats: int) -> dict[str, float]:
    """Per-call seconds of each timer over ``repeats`` calls (after one warm-up)."""
    with torch.no_grad():
        fn()
        ACC.clear()
        FLOPS.clear()
        ON[0] = True
        t = time.perf_counter_ns()
        for _ in range(repeats):
            fn()
        wall = time.perf_counter_ns() - t
        ON[0] = False
    out = {k: v / repeats / 1e9 for k, v in ACC.items()}
    out["wall"] = wall / repeats / 1e9
    out["kernel_flops"] = FLOPS.get("kernels", 0.0) / repeats
    out["linear_flops"] = FLOPS.get("linear", 0.0) / repeats
    out["linear"] = out.get("linear", 0.0) + out.get("linear in site", 0.0)
    return out


def breakdown(work: str, base_fn, ours_fn, repeats: int) -> dict:
    t = timeit({"base": base_fn, "ours": ours_fn}, repeats)
    b, o = measure(base_fn, repeats), measure(ours_fn, repeats)
    in_site_linear = o.get("linear in site", 0.0)
    site_extra = o.get("site", 0.0) - in_site_linear
    node = o.get("node", 0.0)
    kernels, bank = o.get("kernels", 0.0), o.get("bank", 0.0)
    parts = {
        "low-rank kernels": kernels,
        "bank lookup": bank,
        "node Python": node - kernels - bank,
        "site wrapper": site_extra - node,
    }
    parts["outside sites"] = (o["wall"] - b["wall"]) - sum(parts.values())
    kernel_rate = o["kernel_flops"] / kernels / 1e9 if kernels else None
    linear_rate = b["linear_flops"] / b["linear"] / 1e9 if b.get("linear") else None
    return {"work": work, "base_ms": t["base"] * 1e3, "ratio": t["ours"] / t["base"],
            "extra_ms": (o["wall"] - b["wall"]) * 1e3, "parts": {k: v * 1e3 for k, v in parts.items()},
            "kernel_gflops": kernel_rate, "linear_gflops": linear_rate,
            "floor": 1.0 + o["kernel_flops"] / max(b["linear_flops"], 1.0)}


def rows(repeats: int, only: set[str]) -> list[dict]:
    out = []
    for tag, (n, r, tok) in {"route32": (32, 32, 32), "route8": (8, 8, 128), "route128": (128, 128, 16)}.items():
        if tag in only:
            data, keys = batch(r, tok), [f"k{i % n}" for i in range(r)]
            base = base_model()
            model, _ = ours_route(n)
            out.append(breakdown(f"route, {n} adapters × {r} rows × {tok} tokens", lambda b=base, d=data: b(**d),
                                 lambda m=model, d=data, k=keys: m(**d, route=k), repeats))
    if "decode" in only:
        data, keys = batch(16, 16), [f"k{i % 16}" for i in range(16)]
        base = base_model()
        model, _ = ours_route(16)
        out.append(breakdown("decode step, 16 rows × 16 adapters (cache of 16)", _decode_step(base, data, {}),
                             _decode_step(model, data, {"route": keys}), repeats * 3))
    for tag, top_k in (("mix", None), ("top2", 2)):
        if tag in only:
            data = batch(8, 128)
            base, model = base_model(), _mixed(top_k)
            what = "dense" if top_k is None else f"top-{top_k}"
            out.append(breakdown(f"mix of 4 LoRA experts, {what}, 8 × 128", lambda b=base, d=data: b(**d),
                                 lambda m=model, d=data: m(**d), repeats))
    return out


def render(table: list[dict], markdown: bool) -> str:
    names = list(table[0]["parts"]) if table else []
    if markdown:
        lines = ["| work | base | ours | FLOP floor | extra per forward | " + " | ".join(names) + " | kernel / base-linear GFLOP/s |",
                 "|---|---:|---:|---:|---:|" + "---:|" * len(names) + "---:|"]
        for r in table:
            parts = " | ".join(f"{r['parts'][k]:.2f} ms" for k in names)
            rates = f"{r['kernel_gflops']:.0f} / {r['linear_gflops']:.0f}" if r["kernel_gflops"] else ""
            lines.append(f"| {r['work']} | {r['base_ms']:.1f} ms | {r['ratio']:.3f}× | {r['floor']:.3f}× | {r['extra_ms']:.2f} ms | {parts} | {rates} |")
        return "\n".join(lines)
    lines = []
    for r in table:
        parts = ", ".join(f"{k} {r['parts'][k]:.2f}" for k in names)
        rates = f"; kernels {r['kernel_gflops']:.0f} GFLOP/s vs base linears {r['linear_gflops']:.0f}" if r["kernel_gflops"] else ""
        lines.append(f"{r['work']:<52} base {r['base_ms']:7.1f} ms  ours {r['ratio']:.3f}× (floor {r['floor']:.3f}×)  "
                     f"extra {r['extra_ms']:.2f} ms = {parts}{rates}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", default="", help="comma-separated: route32,route8,route128,decode,mix,top2")
    args = parser.parse_args()
    torch.set_num_threads(2)
    only = set(filter(None, args.only.split(","))) or {"route32", "route8", "route128", "decode", "mix", "top2"}
    instrument()
    table_rows = rows(args.repeats, only)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats; times per forward")
    print(render(table_rows, args.markdown))


if __name__ == "__main__":
    main()
