"""Choose the GLUE learning rates on a held-out split of the *training* data (never dev).

    python examples/glue/tune.py --data ../shared/data/glue                 # print the choices
    python examples/glue/tune.py --data ../shared/data/glue --write         # and store them in budgets.json

Every task's training rows are split once (seeded): 10 % (at most 1,000 rows) is held out
and scored, the rest trains. For each method a small grid of (adapter lr, head lr) pairs is
trained on the tuning tasks at ``--steps`` steps each (a proxy for the full budget, kept
short because the machine has two cores) and the pair with the best mean held-out score is
chosen. It prints every score and the choice, and writes them to ``tuning.json`` beside
this file; ``--write`` copies the chosen rates into ``budgets.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import glue_experiment as ge  # noqa: E402

# (adapter lr, head lr) pairs; IA3 scales activations and needs a far larger rate than LoRA
GRID = {
    "lora": [(1e-3, 1e-2), (3e-3, 1e-2)],
    "ia3": [(1e-2, 1e-2), (3e-2, 1e-2)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tasks", default="sst2,stsb", help="the tuning tasks (cheap ones: the rates are shared by all)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per task and grid point")
    parser.add_argument("--methods", default="lora,ia3")
    parser.add_argument("--write", action="store_true", help="store the chosen rates in budgets.json")
    args = parser.parse_args()
    budgets = ge.load_budgets()
    names = args.tasks.split(",")
    tasks = {n: t for n, t in ge.load_tasks(args.data, budgets, holdout=0.1).items() if n in names}
    encoder = ge.Encoder()
    record: dict[str, dict[str, dict[str, float]]] = {}
    chosen = {}
    t0 = time.perf_counter()
    for method in args.methods.split(","):
        record[method] = {}
        for lr, head_lr in GRID[method]:
            for n in names:
                budgets["tasks"][n]["steps"] = args.steps
            scores, _, _, _ = ge.single_task(method, budgets, tasks, encoder, seed=0, lr=lr, head_lr=head_lr)
            scores["mean"] = statistics.fmean(scores[n] for n in names)
            record[method][f"lr={lr:g} head_lr={head_lr:g}"] = scores
            print(f"{method} lr={lr:g} head_lr={head_lr:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
        best = max(record[method], key=lambda k: record[method][k]["mean"])
        lr, head_lr = GRID[method][list(record[method]).index(best)]
        chosen[method] = {"lr": lr, "head_lr": head_lr}
        print(f"chosen for {method}: {best}", flush=True)
    out = {"tasks": names, "steps": args.steps, "holdout": "10% of train (at most 1000 rows), seed 1234",
           "scores": record, "chosen": chosen, "seconds": time.perf_counter() - t0}
    (HERE / "tuning.json").write_text(json.dumps(out, indent=2) + "\n")
    if args.write:
        data = json.loads((HERE / "budgets.json").read_text())
        for method, rates in chosen.items():
            data["setups"][method]["train"].update(rates)
        (HERE / "budgets.json").write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(chosen))


if __name__ == "__main__":
    main()
