"""The results of an experiment: per-cell results gathered per setup, mean ± std over seeds,
a markdown table and a chart.

    results = json.loads(Path("runs/glue/results.json").read_text())
    print(render_table(results))           # adapter-composer experiment table runs/glue/results.json

Scores are dev metrics; the table shows them in % with one decimal, ``mean ± std`` where
std is the sample standard deviation over seeds (n − 1 in the denominator; a single seed
shows the mean alone). "trained params" counts the adapters and operator weights a setup
trains (a single-task setup: the sum over its tasks; the small task heads are not counted);
"wall time" is the mean over seeds of the seconds its cells took (a single-task setup: the
sum over its tasks).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adapter_composer.workflow.experiment_spec import ExperimentError, read_json_file


def mean_std(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def collect(spec: Any, cells: Sequence[Mapping[str, Any]], seeds: Sequence[int], planned: Sequence[Any] = ()) -> dict[str, Any]:
    """results.json: per setup, the scores of every seed and their mean ± std. With
    ``planned`` (the cells of the full plan), a setup appears only once all its cells have
    a result."""
    have = {(c["setup"], c["seed"], c["task"]) for c in cells}
    incomplete = {c.setup for c in planned if (c.setup, c.seed, c.task) not in have}
    setups = [s for s in spec.setups if s not in incomplete and any(c["setup"] == s for c in cells)]
    out: dict[str, Any] = {
        "name": spec.name,
        "seeds": list(seeds),
        "tasks": list(spec.tasks),
        "metrics": {t: _metric(spec, t) for t in spec.tasks},
        "setups": {},
    }
    for name in setups:
        mine = [c for c in cells if c["setup"] == name]
        per_seed: dict[str, dict[str, Any]] = {}
        for seed in seeds:
            rows = [c for c in mine if c["seed"] == seed]
            scores: dict[str, float] = {}
            for row in rows:
                scores.update(row["scores"])
            per_seed[str(seed)] = {
                "scores": scores,
                "params": sum(r["params"] for r in rows),
                "seconds": round(sum(r["seconds"] for r in rows), 2),
                "lr": {r["task"] or "joint": r["lr"] for r in rows},
            }
            if selected := {r["task"] or "joint": r["lr"] for r in rows if r.get("selection")}:
                per_seed[str(seed)]["selected"] = selected  # rates chosen on the training holdout
        tasks = [t for t in spec.tasks if all(t in s["scores"] for s in per_seed.values())]
        entry = {
            "label": spec.setups[name].label or name,
            "tasks": tasks,
            "per_seed": per_seed,
            "scores": {t: mean_std([s["scores"][t] for s in per_seed.values()]) for t in tasks},
            "params": max(s["params"] for s in per_seed.values()),
            "seconds": mean_std([s["seconds"] for s in per_seed.values()]),
        }
        if tasks:
            entry["average"] = mean_std([sum(s["scores"][t] for t in tasks) / len(tasks) for s in per_seed.values()])
        out["setups"][name] = entry
    return out


def chosen_rates(results: Mapping[str, Any]) -> dict[str, float]:
    """The learning rates a run's selection chose, as ``budget.lr`` entries of another spec:
    ``{"lora/sst2": 0.001, ...}`` per single-task cell, ``{"route": ...}`` per joint setup.
    With several seeds, the rate chosen most often (a tie: the smaller)."""
    out: dict[str, float] = {}
    for name, entry in results.get("setups", {}).items():
        votes: dict[str, list[float]] = {}
        for per_seed in entry.get("per_seed", {}).values():
            for task, lr in per_seed.get("selected", {}).items():
                votes.setdefault(task, []).append(lr)
        for task, lrs in votes.items():
            key = name if task == "joint" else f"{name}/{task}"
            out[key] = min(set(lrs), key=lambda lr: (-lrs.count(lr), lr))
    if not out:
        raise ExperimentError("the results hold no selected learning rates; run a spec with a 'selection' grid first")
    return out


def _metric(spec: Any, task: str) -> str:
    from adapter_composer.workflow.experiment_spec import task_spec

    return task_spec(task, spec.tasks[task]).metric


def cell_text(stat: Mapping[str, float] | None) -> str:
    """A score in % with one decimal: ``86.4 ± 0.3`` (``86.4`` for one seed, ``–`` if absent)."""
    if stat is None:
        return "–"
    text = f"{100 * stat['mean']:.1f}"
    return text + f" ± {100 * stat['std']:.1f}" if stat["n"] > 1 else text


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def render_table(results: Mapping[str, Any]) -> str:
    tasks = [t for t in results["tasks"] if any(t in s["scores"] for s in results["setups"].values())]
    metrics = results.get("metrics", {})
    head = " | ".join(f"{t} ({metrics[t]})" if t in metrics else t for t in tasks)
    lines = [
        f"| setup | trained params | wall time | {head} | average |",
        "|---|---:|---:|" + "---:|" * (len(tasks) + 1),
    ]
    for s in results["setups"].values():
        scores = " | ".join(cell_text(s["scores"].get(t)) for t in tasks)
        lines.append(f"| {s['label']} | {s['params']:,} | {_seconds(s['seconds']['mean'])} | {scores} | {cell_text(s.get('average'))} |")
    seeds = results["seeds"]
    note = (f"Dev scores in %, mean ± sample std over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
            if len(seeds) > 1 else f"Dev scores in %, one seed ({seeds[0]})")
    return "\n".join(lines) + f"\n\n{note}; wall time: mean per seed.\n"


def check_plots() -> None:
    """Fail before training when plots are asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ExperimentError("plots were asked for but matplotlib is not installed: "
                              "pip install 'adapter-composer[plot]', or run with --no-plots (spec: \"plots\": false)") from None


def plot(results: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bars per task, one bar per setup, with the std over seeds as error bars."""
    from adapter_composer.workflow.plots import _pyplot, _save

    plt = _pyplot()
    tasks = [t for t in results["tasks"] if any(t in s["scores"] for s in results["setups"].values())]
    setups = list(results["setups"].values())
    width = 0.8 / max(1, len(setups))
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 4))
    for i, s in enumerate(setups):
        stats = [s["scores"].get(t) for t in tasks]
        means = [100 * st["mean"] if st else float("nan") for st in stats]
        errs = [100 * st["std"] if st else 0.0 for st in stats]
        ax.bar([j + i * width for j in range(len(tasks))], means, width, yerr=errs, capsize=2, label=s["label"])
    ax.set_xticks([j + width * (len(setups) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("dev score (%)")
    ax.set_title(f"{results['name']}: {len(results['seeds'])} seed(s)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(results: Mapping[str, Any], out: Path, plots: bool = True) -> dict[str, Path]:
    """results.json, results.md and (with ``plots``) results.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "results.md"}
    _atomic(paths["json"], json.dumps(results, indent=1))
    _atomic(paths["table"], render_table(results))
    if plots:
        check_plots()
        paths["plot"] = plot(results, out / "results.png")
    return paths


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = read_json_file(path, "results file (give the results.json an experiment run wrote)", ExperimentError)
    if not isinstance(data, dict) or "setups" not in data or "tasks" not in data:
        raise ExperimentError(f"{path} is not an experiment results file (no 'setups' / 'tasks')")
    return data
