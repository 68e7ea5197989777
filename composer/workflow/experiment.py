"""Run an experiment spec: every setup × seed, cached per cell, resumable, with a report.

    summary = run_experiment(ExperimentSpec.from_file("spec.json"), out="runs/glue")
    adapter-composer experiment run spec.json --out runs/glue [--seeds 0,1,2] [--only lora,mix]

A *cell* is one training run (see ``experiment_cells``). Single-task cells run first and
save their adapter and head; setups with ``init_from`` load them. Each cell lives in
``OUT/cells/<setup>/seed<k>-<task|joint>-<key>/``, ``key`` a hash of everything that
decides its result. ``result.json`` is written atomically
when the cell finishes; a later run with the same key skips it, a changed key reruns it
(and every cell that starts from it). An interrupted cell resumes from its last
``train()`` checkpoint (``budget.train.checkpoint_every``) with ``resume=True``.

With a learning-rate grid (``selection.lr``), each grid value trains on the fit part of
each task's training rows and is scored on the held-out part; the best one trains on all
training rows and the dev split is evaluated once, for the reported number.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from adapter_composer.workflow.experiment_cells import (
    Cell,
    RunSummary,
    graph_of,
    lr_grid,
    plan,
    tasks_trained,
    tasks_with_adapters,
    train_fields,
)
from adapter_composer.workflow.experiment_data import (
    load_model,
    load_tasks,
    split_for_selection,
)
from adapter_composer.workflow.experiment_report import check_plots, collect, write_report
from adapter_composer.workflow.experiment_spec import (
    ExperimentError,
    ExperimentSpec,
    ExperimentSpecError,
    train_config,
)

# --- one cell -------------------------------------------------------------------------


def build(spec: ExperimentSpec, cell: Cell, tasks: dict[str, Any], out: Path) -> tuple[Any, Any, Any]:
    """The cell's composition over a fresh base, its heads, and the tokenizer; adapters
    and heads start from the cells in ``deps``."""
    import adapter_composer as ac
    from adapter_composer.formats.files import read_safetensors
    from adapter_composer.workflow.heads import TaskHeads

    setup = spec.setups[cell.setup]
    torch.manual_seed(cell.seed)
    model, tokenizer = load_model(spec)
    composed = ac.compose(model, graph_of(spec, cell.setup, tasks_with_adapters(spec, cell)))
    train_on = tasks_trained(spec, cell)
    heads = TaskHeads({t: tasks[t].spec for t in train_on}, hidden=model.config.hidden_size, **spec.heads)
    for task, dep in cell.deps.items():
        folder = dep.directory(out)
        composed.replace_weights(task, read_safetensors(folder / "adapter.safetensors"))
        if task in heads.heads:
            heads.heads[task].load_state_dict(read_safetensors(folder / "head.safetensors"))
    for task in train_on:  # fresh regression heads start at the mean training label
        if task not in cell.deps and tasks[task].spec.kind == "regression":
            heads.start_at_label_mean(task, [x["label"] for x in tasks[task].encode(tokenizer, "train")])
    if not setup.train_adapters:
        for handle in composed.adapters.values():
            for p in handle.parameters():
                p.requires_grad_(False)
    return composed, heads, tokenizer


def _fit(spec, cell, tasks, out, fields, *, out_dir=None, callbacks=()) -> tuple[dict[str, float], int, int, tuple[Any, Any]]:
    """Train (or only evaluate, with 0 steps) one composition: its dev scores, trained
    parameters, the step it resumed from, and (composition, heads)."""
    from adapter_composer.workflow.training import evaluate, latest_checkpoint, train

    composed, heads, tokenizer = build(spec, cell, tasks, out)
    subset = {t: tasks[t] for t in tasks_trained(spec, cell)}
    config = train_config(fields, f"setup {cell.setup!r}")
    if config.steps == 0:
        scores = evaluate(composed, heads, subset, tokenizer, config.eval_batch_size, autocast=config.autocast)
        return scores, 0, 0, (composed, heads)
    start = 0
    if out_dir is not None and (last := latest_checkpoint(out_dir)) is not None:
        start = int(last.name.split("-")[-1])
    result = train(composed, heads, subset, tokenizer, config, out_dir=out_dir, resume=out_dir is not None, callbacks=callbacks)
    return result.final, composed.trainable_parameters().trainable, start, (composed, heads)


def _select(spec, cell, tasks, out, folder: Path, grid: list[float], log) -> tuple[float, dict[str, float]]:
    """The grid value with the best mean score on the held-out part of the training rows."""
    record = folder / "selection.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    held = {t: split_for_selection(tasks[t], spec.selection.holdout, seed=cell.seed) for t in tasks_trained(spec, cell)}
    others = {t: v for t, v in tasks.items() if t not in held}
    for lr in grid:
        if repr(lr) in done:
            continue
        fields = train_fields(spec, cell) | {"lr": lr}
        scores, _, _, _ = _fit(spec, cell, {**others, **held}, out, fields)
        done[repr(lr)] = sum(scores.values()) / len(scores)
        log(f"    select lr {lr:g}: held-out mean {done[repr(lr)]:.4f}")
        _write_json(record, done)
    best = max(grid, key=lambda lr: (done[repr(lr)], -lr))  # a tie goes to the smaller value
    return best, {k: float(v) for k, v in done.items()}


def run_cell(spec: ExperimentSpec, cell: Cell, tasks: dict[str, Any], out: Path, log=print, callbacks=(), prefix: str = "") -> dict[str, Any]:
    """Train (after any selection) and evaluate one cell; write its result.json. The
    seconds reported are the time spent on it, across interruptions (steps redone after
    an interruption count)."""
    from safetensors.torch import save_file

    folder = cell.directory(out)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spent = folder / "elapsed.json"
    before = json.loads(spent.read_text())["seconds"] if spent.is_file() else 0.0

    def tick() -> None:
        _write_json(spent, {"seconds": before + time.perf_counter() - t0})

    try:
        fields = train_fields(spec, cell)
        grid = lr_grid(spec, cell)
        selection = None
        if grid:
            best, scores = _select(spec, cell, tasks, out, folder, grid, log)
            fields["lr"] = best
            selection = {"lr": best, "held_out_scores": scores, "holdout": spec.selection.holdout}
        progress = Progress(log, prefix or cell.label, fields["steps"], tick=tick)
        scores, params, start, (composed, heads) = _fit(spec, cell, tasks, out, fields, out_dir=folder / "train", callbacks=[progress, *callbacks])
    except BaseException:  # an interruption: keep the time spent so far
        tick()
        raise
    if cell.task is not None:  # a single-task cell: keep its adapter and head for init_from
        state = {k: v.detach().contiguous() for k, v in composed.adapters[cell.task].state_dict().items()}
        save_file(state, str(folder / "adapter.safetensors"))
        head = {k: v.detach().contiguous() for k, v in heads.heads[cell.task].state_dict().items()}
        save_file(head, str(folder / "head.safetensors"))
    result = {
        "key": cell.key, "setup": cell.setup, "seed": cell.seed, "task": cell.task,
        "scores": {t: float(v) for t, v in scores.items()}, "params": int(params),
        "seconds": round(before + time.perf_counter() - t0, 2), "steps": fields["steps"], "lr": fields.get("lr"),
        "resumed_from": start, "selection": selection,
    }
    _write_json(folder / "result.json", result)
    shutil.rmtree(folder / "train", ignore_errors=True)  # checkpoints are only for resuming
    spent.unlink(missing_ok=True)
    _prune(folder)
    return result


def _prune(folder: Path) -> None:
    """Drop cells of the same setup, seed and task with another key (a changed spec)."""
    pattern = re.compile(re.escape(folder.name.rsplit("-", 1)[0]) + r"-[0-9a-f]{16}")
    for other in folder.parent.iterdir():
        if other != folder and other.is_dir() and pattern.fullmatch(other.name):
            shutil.rmtree(other, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def cached_result(cell: Cell, out: Path) -> dict[str, Any] | None:
    path = cell.directory(out) / "result.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("key") == cell.key else None


# --- progress -------------------------------------------------------------------------


class Progress:
    """``[cell i/n] setup seed task: step s/S, eta`` lines, at most every ``every`` seconds."""

    def __init__(self, log: Callable[[str], None], prefix: str, steps: int, every: float = 5.0, tick: Callable[[], None] | None = None):
        self.log, self.prefix, self.steps, self.every, self.tick = log, prefix, steps, every, tick
        self.t0 = self.last = time.perf_counter()
        self.first: int | None = None

    def after_step(self, step: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first, self.t0 = step, now
        done = step + 1
        if now - self.last < self.every and done < self.steps:
            return
        self.last = now
        if self.tick is not None:
            self.tick()
        rate = (now - self.t0) / max(1, done - self.first)
        eta = rate * (self.steps - done)
        self.log(f"{self.prefix}: step {done}/{self.steps}, eta {_duration(eta)}")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# --- the whole run --------------------------------------------------------------------


def preflight(spec: ExperimentSpec, cells: list[Cell]) -> None:
    """Every graph checked on a meta-device copy of the base before anything trains."""
    from transformers import AutoConfig, AutoModel

    from adapter_composer.errors import CompositionError
    from adapter_composer.pipeline.validate import validate
    from adapter_composer.registry import load_registry
    from adapter_composer.workflow.experiment_data import _model_path

    m = spec.model
    if m.config is not None:
        data = dict(m.config)
        config = AutoConfig.for_model(data.pop("model_type", "bert"), **data)
    else:
        config = AutoConfig.from_pretrained(_model_path(spec))
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    registry = load_registry()
    problems = []
    for name in dict.fromkeys(c.setup for c in cells):
        cell = next(c for c in cells if c.setup == name)
        try:
            diags = validate(graph_of(spec, name, tasks_with_adapters(spec, cell)), registry, model)
        except (CompositionError, TypeError, ValueError) as exc:
            problems.append(f"setup {name!r}: {exc}")
            continue
        if diags:
            problems.append(f"setup {name!r}: {CompositionError(diags)}")
    if problems:
        raise ExperimentSpecError("the setups' graphs do not compose:\n" + "\n".join(problems))


def run_experiment(
    spec: ExperimentSpec,
    out: str | Path | None = None,
    *,
    seeds: Sequence[int] | None = None,
    only: Sequence[str] | None = None,
    plots: bool | None = None,
    log: Callable[[str], None] | None = None,
    callbacks: Sequence[Any] = (),
) -> RunSummary:
    """Train and evaluate every cell not cached, then write results.json, results.md and
    (with ``plots``) results.png into ``out``. ``callbacks`` go to every cell's final train()."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out if out is not None else Path("runs") / spec.name)
    plots = spec.plots if plots is None else plots
    if plots:
        check_plots()
    spec.check()  # a spec built in Python (ExperimentSpec(...)) is checked here
    cells = plan(spec, seeds, only)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    preflight(spec, cells)
    tasks = load_tasks(spec)
    out.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(out=out)
    results = []
    t_start = time.perf_counter()
    todo = [c for c in cells if cached_result(c, out) is None]
    log(f"{len(cells)} cell(s): {len(cells) - len(todo)} cached, {len(todo)} to run -> {out}")
    for i, cell in enumerate(cells, 1):
        if (cached := cached_result(cell, out)) is not None:
            summary.cached.append(cell.label)
            results.append(cached)
            continue
        prefix = f"[cell {i}/{len(cells)}] {cell.label}"
        steps = train_fields(spec, cell)["steps"]
        log(f"{prefix}: {steps} steps" + (f", lr grid {lr_grid(spec, cell)}" if lr_grid(spec, cell) else ""))
        try:
            result = run_cell(spec, cell, tasks, out, log, callbacks, prefix)
        except ExperimentError:
            raise
        except Exception as exc:  # KeyboardInterrupt passes through: the cell resumes next run
            raise ExperimentError(f"{prefix} failed: {type(exc).__name__}: {exc}\n  (finished cells are kept; "
                                  "fix the cause and run again to resume)") from exc
        scores = ", ".join(f"{t} {v:.4f}" for t, v in result["scores"].items())
        log(f"{prefix}: done in {_duration(result['seconds'])}: {scores}")
        summary.ran.append(cell.label)
        results.append(result)
    # the report covers every setup whose cells are all finished, not only those run now
    finished = {(r["setup"], r["seed"], r["task"]): r for r in results}
    for cell in plan(spec, seeds):
        if (cell.setup, cell.seed, cell.task) not in finished and (cached := cached_result(cell, out)) is not None:
            finished[(cell.setup, cell.seed, cell.task)] = cached
    summary.results = collect(spec, list(finished.values()), seeds if seeds is not None else spec.seeds, plan(spec, seeds))
    summary.results["run_seconds"] = round(time.perf_counter() - t_start, 1)
    write_report(summary.results, out, plots=plots)
    return summary
