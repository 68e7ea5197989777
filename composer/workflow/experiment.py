"""Run an experiment spec: every setup × seed, cached per cell, resumable, with a report.

    summary = run_experiment(ExperimentSpec.from_file("spec.json"), out="runs/glue")
    adapter-composer experiment run spec.json --out runs/glue [--seeds 0,1,2] [--only lora,mix]

A *cell* is one training run: a single-task setup has a cell per task and seed, a
multi-task setup one per seed. Single-task cells run first and save their adapter and
head; setups with ``init_from`` load them. Each cell lives in
``OUT/cells/<setup>/seed<k>-<task|joint>-<key>/`` where ``key`` hashes everything that
decides its result (model, data declaration and file sizes, setup, train options, seed,
selection, the keys of the cells it starts from). ``result.json`` is written atomically
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
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapter_composer.workflow.experiment_data import (
    data_fingerprint,
    load_model,
    load_tasks,
    split_for_selection,
)
from adapter_composer.workflow.experiment_report import check_plots, collect, write_report
from adapter_composer.workflow.experiment_spec import (
    ExperimentError,
    ExperimentSpec,
    ExperimentSpecError,
    digest,
    train_config,
)


@dataclass
class Cell:
    setup: str
    seed: int
    task: str | None  # a single-task cell's task; None for a multi-task setup
    key: str = ""
    deps: dict[str, Cell] = field(default_factory=dict)  # adapter task -> the single-task cell it starts from

    @property
    def label(self) -> str:
        return f"{self.setup} seed {self.seed} {self.task or 'joint'}"

    def directory(self, out: Path) -> Path:
        return out / "cells" / self.setup / f"seed{self.seed}-{self.task or 'joint'}-{self.key}"


@dataclass
class RunSummary:
    out: Path
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


# --- planning -------------------------------------------------------------------------


def _adapter_tasks(spec: ExperimentSpec, cell: Cell) -> list[str]:
    return [cell.task] if cell.task else spec.setup_tasks(cell.setup)


def _train_on(spec: ExperimentSpec, cell: Cell) -> list[str]:
    return [cell.task] if cell.task else spec.setup_train_on(cell.setup)


def train_fields(spec: ExperimentSpec, cell: Cell) -> dict[str, Any]:
    """The TrainConfig fields of a cell (lr: the chosen one; a grid is searched first)."""
    setup = spec.setups[cell.setup]
    method, _ = spec.method_of(cell.setup)
    steps = setup.steps if setup.steps is not None else sum(spec.steps_for(t) for t in _train_on(spec, cell))
    fields: dict[str, Any] = {"batch_size": spec.budget.batch_size, "progress": False}
    fields.update(spec.budget.train)
    fields.update(setup.train)
    lrs = spec.budget.lr
    lr = setup.lr or lrs.get(cell.setup) or lrs.get(method or "") or lrs.get("default")
    if lr is not None:
        fields["lr"] = lr
    fields.update(steps=steps, seed=cell.seed)
    return fields


def lr_grid(spec: ExperimentSpec, cell: Cell) -> list[float]:
    if spec.selection is None or train_fields(spec, cell)["steps"] == 0:
        return []
    method, _ = spec.method_of(cell.setup)
    grid = spec.selection.lr
    return list(grid.get(cell.setup) or grid.get(method or "") or [])


def plan(spec: ExperimentSpec, seeds: Sequence[int] | None = None, only: Sequence[str] | None = None) -> list[Cell]:
    """Every cell to run, single-task cells first, each with its cache key."""
    seeds = list(seeds if seeds is not None else spec.seeds)
    wanted = list(only) if only else list(spec.setups)
    unknown = [s for s in wanted if s not in spec.setups]
    if unknown:
        raise ExperimentSpecError(f"--only names unknown setup(s) {unknown}; setups: {sorted(spec.setups)}")
    needed = list(dict.fromkeys([*(spec.setups[s].init_from for s in wanted if spec.setups[s].init_from), *wanted]))
    singles: dict[tuple[str, int, str], Cell] = {}
    cells = []
    for name in needed:
        if spec.setups[name].single:
            for seed in seeds:
                for task in spec.setup_tasks(name):
                    cell = Cell(name, seed, task)
                    singles[(name, seed, task)] = cell
                    cells.append(cell)
    for name in needed:
        setup = spec.setups[name]
        if not setup.single:
            for seed in seeds:
                cell = Cell(name, seed, None)
                if setup.init_from:
                    cell.deps = {t: singles[(setup.init_from, seed, t)] for t in spec.setup_tasks(name)}
                cells.append(cell)
    for cell in cells:
        cell.key = cell_key(spec, cell)
    return cells


def cell_key(spec: ExperimentSpec, cell: Cell) -> str:
    setup = spec.setups[cell.setup].model_dump(mode="json", exclude={"label"})
    tasks = sorted(set(_adapter_tasks(spec, cell)) | set(_train_on(spec, cell)))
    return digest({
        "model": spec.model.model_dump(mode="json"),
        "heads": spec.heads,
        "setup": setup,
        "method": spec.method_of(cell.setup),
        "task": cell.task,
        "data": {t: data_fingerprint(spec, t) for t in tasks},
        "train": train_fields(spec, cell),
        "selection": {"lr": lr_grid(spec, cell), "holdout": spec.selection.holdout if spec.selection else None},
        "deps": {t: d.key for t, d in cell.deps.items()},
    })


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
    composed = ac.compose(model, graph_of(spec, cell.setup, _adapter_tasks(spec, cell)))
    train_on = _train_on(spec, cell)
    heads = TaskHeads({t: tasks[t].spec for t in train_on}, hidden=model.config.hidden_size, **spec.heads)
    for task, dep in cell.deps.items():
        folder = dep.directory(out)
        composed.replace_weights(task, read_safetensors(folder / "adapter.safetensors"))
        if task in heads.heads:
            heads.heads[task].load_state_dict(read_safetensors(folder / "head.safetensors"))
    if not setup.train_adapters:
        for handle in composed.adapters.values():
            for p in handle.parameters():
                p.requires_grad_(False)
    return composed, heads, tokenizer


def graph_of(spec: ExperimentSpec, setup_name: str, adapter_tasks: list[str]) -> Any:
    from adapter_composer import Graph

    setup = spec.setups[setup_name]
    method, options = spec.method_of(setup_name)
    g = Graph()
    for task in adapter_tasks:
        g.adapter(task, method, **options)
    opts = dict(setup.options)
    if opts.get("weights") == "uniform":
        opts["weights"] = [1.0 / len(adapter_tasks)] * len(adapter_tasks)
    if setup.operator == "route":
        g.route({t: t for t in adapter_tasks}, **opts)
    elif setup.operator is not None:
        g.op(setup.operator, *adapter_tasks, name="combined", **opts)
    return g


def _fit(spec, cell, tasks, out, fields, *, out_dir=None, callbacks=()) -> tuple[dict[str, float], int, int, tuple[Any, Any]]:
    """Train (or only evaluate, with 0 steps) one composition: its dev scores, trained
    parameters, the step it resumed from, and (composition, heads)."""
    from adapter_composer.workflow.training import evaluate, latest_checkpoint, train

    composed, heads, tokenizer = build(spec, cell, tasks, out)
    subset = {t: tasks[t] for t in _train_on(spec, cell)}
    config = train_config(fields, f"setup {cell.setup!r}")
    if config.steps == 0:
        scores = evaluate(composed, heads, subset, tokenizer, config.eval_batch_size)
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
    held = {t: split_for_selection(tasks[t], spec.selection.holdout, seed=cell.seed) for t in _train_on(spec, cell)}
    others = {t: v for t, v in tasks.items() if t not in held}
    for lr in grid:
        if repr(lr) in done:
            continue
        fields = train_fields(spec, cell) | {"lr": lr}
        scores, _, _, _ = _fit(spec, cell, {**others, **held}, out, fields)
        done[repr(lr)] = sum(scores.values()) / len(scores)
        log(f"    select lr {lr:g}: held-out mean {done[repr(lr)]:.4f}")
        _write_json(record, done)
    best = max(grid, key=lambda lr: (done[repr(lr)], -lr))
    return best, {k: float(v) for k, v in done.items()}


def run_cell(spec: ExperimentSpec, cell: Cell, tasks: dict[str, Any], out: Path, log=print, callbacks=()) -> dict[str, Any]:
    from safetensors.torch import save_file

    folder = cell.directory(out)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fields = train_fields(spec, cell)
    grid = lr_grid(spec, cell)
    selection = None
    if grid:
        best, scores = _select(spec, cell, tasks, out, folder, grid, log)
        fields["lr"] = best
        selection = {"lr": best, "held_out_scores": scores, "holdout": spec.selection.holdout}
    scores, params, start, (composed, heads) = _fit(spec, cell, tasks, out, fields, out_dir=folder / "train", callbacks=callbacks)
    if cell.task is not None:  # a single-task cell: keep its adapter and head for init_from
        state = {k: v.detach().contiguous() for k, v in composed.adapters[cell.task].state_dict().items()}
        save_file(state, str(folder / "adapter.safetensors"))
        head = {k: v.detach().contiguous() for k, v in heads.heads[cell.task].state_dict().items()}
        save_file(head, str(folder / "head.safetensors"))
    result = {
        "key": cell.key, "setup": cell.setup, "seed": cell.seed, "task": cell.task,
        "scores": {t: float(v) for t, v in scores.items()}, "params": int(params),
        "seconds": round(time.perf_counter() - t0, 2), "steps": fields["steps"], "lr": fields.get("lr"),
        "resumed_from": start, "selection": selection,
    }
    _write_json(folder / "result.json", result)
    shutil.rmtree(folder / "train", ignore_errors=True)  # checkpoints are only for resuming
    _prune(folder)
    return result


def _prune(folder: Path) -> None:
    """Drop cells of the same setup, seed and task with another key (a changed spec)."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    for other in folder.parent.iterdir():
        if other != folder and other.is_dir() and other.name.startswith(prefix) and len(other.name) == len(folder.name):
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

    def __init__(self, log: Callable[[str], None], prefix: str, steps: int, every: float = 5.0):
        self.log, self.prefix, self.steps, self.every = log, prefix, steps, every
        self.t0 = self.last = time.perf_counter()
        self.first: int | None = None

    def after_step(self, step: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = step
        done = step + 1
        if now - self.last < self.every and done < self.steps:
            return
        self.last = now
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
            diags = validate(graph_of(spec, name, _adapter_tasks(spec, cell)), registry, model)
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
    cells = plan(spec, seeds, only)
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
            result = run_cell(spec, cell, tasks, out, log, [Progress(log, prefix, steps), *callbacks])
        except ExperimentError:
            raise
        except Exception as exc:  # KeyboardInterrupt passes through: the cell resumes next run
            raise ExperimentError(f"{prefix} failed: {type(exc).__name__}: {exc}\n  (finished cells are kept; "
                                  "fix the cause and run again to resume)") from exc
        scores = ", ".join(f"{t} {v:.4f}" for t, v in result["scores"].items())
        log(f"{prefix}: done in {_duration(result['seconds'])}: {scores}")
        summary.ran.append(cell.label)
        results.append(result)
    summary.results = collect(spec, results, seeds if seeds is not None else spec.seeds, only)
    summary.results["run_seconds"] = round(time.perf_counter() - t_start, 1)
    write_report(summary.results, out, plots=plots)
    return summary
