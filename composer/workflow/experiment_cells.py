"""The cells of an experiment: what runs, in which order, and each cell's cache key.

A *cell* is one training run. A single-task setup has a cell per task and seed, a
multi-task setup one per seed; the cells a setup's ``init_from`` needs come first. A
cell's key hashes everything that decides its result: the model, the heads, the setup
(not its label), the data declaration and file sizes of its tasks, its TrainConfig
fields, its seed, the selection grid, and the keys of the cells it starts from, so a
changed upstream cell reruns everything built on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter_composer.workflow.experiment_data import data_fingerprint
from adapter_composer.workflow.experiment_spec import ExperimentSpec, ExperimentSpecError, digest

# TrainConfig fields that do not change a cell's numbers (resume is exact)
NOT_IN_KEY = {"progress", "checkpoint_every"}


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


def tasks_with_adapters(spec: ExperimentSpec, cell: Cell) -> list[str]:
    return [cell.task] if cell.task else spec.setup_tasks(cell.setup)


def tasks_trained(spec: ExperimentSpec, cell: Cell) -> list[str]:
    return [cell.task] if cell.task else spec.setup_train_on(cell.setup)


def train_fields(spec: ExperimentSpec, cell: Cell) -> dict[str, Any]:
    """The TrainConfig fields of a cell (lr: the chosen one; a grid is searched first)."""
    setup = spec.setups[cell.setup]
    method, _ = spec.method_of(cell.setup)
    steps = setup.steps if setup.steps is not None else sum(spec.steps_for(t) for t in tasks_trained(spec, cell))
    fields: dict[str, Any] = {"batch_size": spec.budget.batch_size, "progress": False}
    fields.update(spec.budget.train)
    fields.update(setup.train)
    lrs = spec.budget.lr
    names = [cell.setup, method or ""]
    per_task = [f"{n}/{cell.task}" for n in names] if cell.task else []
    lr = setup.lr or next((lrs[k] for k in [*per_task, *names, "default"] if k in lrs), None)
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


# bumped when the runner's own choices change a cell's result (2: fresh regression heads
# start at the mean training label), so caches of an older runner are not reused
RUNNER_VERSION = 2


def cell_key(spec: ExperimentSpec, cell: Cell) -> str:
    setup = spec.setups[cell.setup].model_dump(mode="json", exclude={"label"})
    tasks = sorted(set(tasks_with_adapters(spec, cell)) | set(tasks_trained(spec, cell)))
    return digest({
        "runner": RUNNER_VERSION,
        "model": spec.model.model_dump(mode="json"),
        "heads": spec.heads,
        "setup": setup,
        "method": spec.method_of(cell.setup),
        "task": cell.task,
        "data": {t: data_fingerprint(spec, t) for t in tasks},
        "train": {k: v for k, v in train_fields(spec, cell).items() if k not in NOT_IN_KEY},
        "selection": {"lr": lr_grid(spec, cell), "holdout": spec.selection.holdout if spec.selection else None},
        "deps": {t: d.key for t, d in cell.deps.items()},
    })


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
