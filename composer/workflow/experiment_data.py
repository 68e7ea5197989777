"""Tasks of an experiment spec, read from plain files or ``datasets``, and the base model.

    tasks = load_tasks(spec)                  # {name: Task}, checked, subsets taken
    fit, held = split_for_selection(task, 0.1, seed=0)

Files: ``.tsv`` (tab-separated, no quoting: GLUE's format), ``.csv`` (comma, quoted
fields), ``.json`` (a list of records or a dict of columns) and ``.jsonl`` (one record a
line). A UTF-8 byte-order mark is dropped. ``header: false`` with ``columns`` reads files
without a header line (CoLA); rows with the wrong number of fields are skipped and counted.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from adapter_composer.workflow.experiment_spec import (
    ExperimentSpec,
    ExperimentSpecError,
    TaskSource,
    task_spec,
)


def read_rows(path: Path, header: bool = True, columns: list[str] | None = None) -> tuple[dict[str, list[Any]], int]:
    """Columns of a data file and the number of malformed rows skipped."""
    if not path.is_file():
        raise ExperimentSpecError(f"no data file at {path}; fix the path (relative paths start at data_dir)")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if suffix in (".json", ".jsonl"):
        return _json_rows(path, text, columns), 0
    if suffix not in (".tsv", ".csv"):
        raise ExperimentSpecError(f"{path}: unsupported data file type {suffix!r}; use .tsv, .csv, .json or .jsonl")
    if suffix == ".tsv":
        reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(text.splitlines())
    lines = [row for row in reader if row and any(cell.strip() for cell in row)]
    if header:
        if not lines:
            raise ExperimentSpecError(f"{path}: the file is empty (no header line)")
        names, lines = lines[0], lines[1:]
        names = list(columns) if columns else names
    else:
        names = list(columns or [])
    data: dict[str, list[Any]] = {c: [] for c in names}
    skipped = 0
    for row in lines:
        if len(row) != len(names):
            skipped += 1
            continue
        for c, v in zip(names, row, strict=True):
            data[c].append(v)
    return data, skipped


def _json_rows(path: Path, text: str, columns: list[str] | None) -> dict[str, list[Any]]:
    try:
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExperimentSpecError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(records, dict):
        return {k: list(v) for k, v in records.items()}
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ExperimentSpecError(f"{path}: a JSON data file holds a list of records or a dict of columns")
    names = list(columns) if columns else list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in names}


def _subset(data: dict[str, list[Any]], n: int | None, seed: int, shuffle: bool) -> dict[str, list[Any]]:
    size = len(next(iter(data.values()), []))
    order = list(range(size))
    if shuffle:
        random.Random(seed).shuffle(order)
    keep = order[:n] if n else order
    return {k: [v[i] for i in keep] for k, v in data.items()}


def _from_dataset(name: str, source: TaskSource) -> tuple[Any, Any]:
    import datasets

    try:
        loaded = datasets.load_dataset(source.dataset, source.dataset_config, data_files=source.data_files)
    except Exception as exc:  # datasets' errors vary by builder; name the task and the call
        raise ExperimentSpecError(f"task {name!r}: load_dataset({source.dataset!r}, {source.dataset_config!r}) failed: "
                                  f"{type(exc).__name__}: {exc}") from None
    for split in (source.train_split, source.dev_split):
        if split not in loaded:
            raise ExperimentSpecError(f"task {name!r}: the dataset has no split {split!r}; its splits: {list(loaded)} "
                                      "(set train_split / dev_split)")
    return loaded[source.train_split], loaded[source.dev_split]


def load_task(spec: ExperimentSpec, name: str) -> Any:
    """One task of the spec as a checked ``Task`` (subsets applied)."""
    from datasets import Dataset

    from adapter_composer.workflow.tasks import Task, TaskDataError

    source = spec.tasks[name]
    tspec = task_spec(name, source)
    if source.dataset is not None:
        train, dev = _from_dataset(name, source)
        train_rows = {c: list(train[c]) for c in train.column_names}
        dev_rows = {c: list(dev[c]) for c in dev.column_names} if dev is not None else None
    else:
        train_rows, _ = read_rows(spec.resolve(source.train), source.header, source.columns)
        dev_rows = read_rows(spec.resolve(source.dev), source.header, source.columns)[0] if source.dev else None
    train_rows = _subset(train_rows, source.max_train_rows, source.subset_seed, shuffle=source.max_train_rows is not None)
    if dev_rows is not None:
        dev_rows = _subset(dev_rows, source.max_dev_rows, 0, shuffle=False)
    task = Task(tspec, Dataset.from_dict(train_rows), Dataset.from_dict(dev_rows) if dev_rows is not None else None)
    try:
        task.check()
    except TaskDataError as exc:
        raise ExperimentSpecError(f"{exc}\n  (fix the task's fields in the spec or its data files)") from None
    if task.dev is None:
        raise ExperimentSpecError(f"task {name!r}: no dev data; give 'dev' (the reported numbers are dev scores)")
    return task


def load_tasks(spec: ExperimentSpec, names: list[str] | None = None) -> dict[str, Any]:
    """The tasks, all read before anything trains; every task's problems reported together."""
    tasks, problems = {}, []
    for name in names or list(spec.tasks):
        try:
            tasks[name] = load_task(spec, name)
        except ExperimentSpecError as exc:
            problems.append(str(exc))
    if problems:
        raise ExperimentSpecError("\n".join(problems))
    return tasks


def data_fingerprint(spec: ExperimentSpec, name: str) -> dict[str, Any]:
    """What the cache key records of a task's data: its declaration and its files' sizes."""
    source = spec.tasks[name]
    out: dict[str, Any] = {"source": source.model_dump(mode="json"), "fields": source.task_fields()}
    for split in ("train", "dev"):
        file = getattr(source, split)
        if file is not None:
            path = spec.resolve(file)
            out[f"{split}_bytes"] = path.stat().st_size if path.is_file() else None
    return out


def split_for_selection(task: Any, holdout: float, seed: int) -> Any:
    """A copy of ``task`` whose train is the fit part and whose dev is the held-out part of
    its training rows (seeded); the real dev split is not touched."""
    from adapter_composer.workflow.tasks import Task

    n = len(task.train)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(holdout * n)))
    if n < 2:
        raise ExperimentSpecError(f"task {task.name!r}: {n} training row(s) cannot be split for selection")
    held, fit = sorted(order[:k]), sorted(order[k:])
    return Task(task.spec, task.train.select(fit), task.train.select(held))


def load_model(spec: ExperimentSpec) -> tuple[Any, Any]:
    """A fresh copy of the base encoder (the same weights every call) and its tokenizer
    (the same object every call)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    m = spec.model
    if m.config is not None:
        data = dict(m.config) | dict(m.overrides)
        try:
            config = AutoConfig.for_model(data.pop("model_type", "bert"), **data)
        except (ValueError, KeyError) as exc:
            raise ExperimentSpecError(f"model.config is not a usable transformers config: {exc}") from None
        state = torch.random.get_rng_state()
        torch.manual_seed(m.init_seed)
        model = AutoModel.from_config(config, **_attention(m))
        torch.random.set_rng_state(state)
        path = None
    else:
        from transformers.utils import logging as hf_logging

        path = _model_path(spec)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per cell is noise
        try:
            config = AutoConfig.from_pretrained(path)
            unknown = sorted(k for k in m.overrides if not hasattr(config, k))
            if unknown:
                raise ExperimentSpecError(f"model.overrides: {unknown} are not fields of the {config.model_type} config "
                                          f"at {path}; use names from its config.json")
            for k, v in m.overrides.items():
                setattr(config, k, v)
            model = AutoModel.from_pretrained(path, config=config, **_attention(m))
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    tok_path = str(spec.resolve(m.tokenizer, data=False) if m.tokenizer else path)
    if tok_path not in _TOKENIZERS:
        try:
            _TOKENIZERS[tok_path] = AutoTokenizer.from_pretrained(tok_path)
        except (OSError, ValueError) as exc:
            raise ExperimentSpecError(f"model.tokenizer: no tokenizer at {tok_path} ({exc})") from None
    return model.eval(), _TOKENIZERS[tok_path]


def _attention(m: Any) -> dict[str, Any]:
    return {} if m.attn_implementation is None else {"attn_implementation": m.attn_implementation}


# one tokenizer object per path: a Task caches its tokenization per tokenizer, so every
# cell of a run (and every grid value of a selection) reuses the first cell's encoding
_TOKENIZERS: dict[str, Any] = {}


def _model_path(spec: ExperimentSpec) -> str:
    m = spec.model
    if m.package is not None:
        import importlib

        try:
            module = importlib.import_module(m.package)
        except ImportError:
            raise ExperimentSpecError(f"model.package: {m.package!r} is not installed; "
                                      f"pip install {m.package.replace('_', '-')}") from None
        getter = getattr(module, "get_model_path", None)
        return str(getter()) if getter else str(Path(module.__file__).parent)
    path = spec.resolve(m.path, data=False)
    if not (path / "config.json").is_file():
        raise ExperimentSpecError(f"model.path: no config.json in {path}; give a from_pretrained directory")
    return str(path)
