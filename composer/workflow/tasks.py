"""Tasks for multi-task experiments: data, fields, labels and metrics, checked before training.

    sst2 = Task.from_files(TaskSpec(name="sst2", text_fields=["sentence"], label_field="label",
                                    num_labels=2, metric="accuracy"), train="train.tsv", dev="dev.tsv")

A task's data is a ``datasets.Dataset`` (or a CSV/TSV/JSON file read through ``datasets``).
:meth:`Task.check` finds every problem at once — a missing field, an empty split, a label
outside the head's range or not in ``label_map``, a non-numeric regression target — and
raises one :class:`TaskDataError` before any training starts.

Kinds: ``classification`` and ``regression`` (a head on the pooled encoder, or the model's
own sequence-classification head), and ``lm`` (a causal language model's own loss: one text
field is modelled whole; with two, ``[prompt, completion]``, only the completion is).

:meth:`Task.encode` tokenises a split once per tokenizer and length and keeps the result;
:meth:`Task.length_cap` reads a percentile of the training lengths, so a few long rows do
not set the length of every batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapter_composer.errors import ComposerError

Metric = Literal["accuracy", "f1", "matthews", "pearson", "spearman", "perplexity"]


class TaskDataError(ComposerError):
    """A task's data cannot be used as declared (every problem is listed)."""


class TaskSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$", description="the task key (also the route key)")
    text_fields: tuple[str, ...] = Field(min_length=1, max_length=2, description="one field, or two for sentence pairs")
    label_field: str | None = Field(None, description="the field holding the label or score (none for lm)")
    kind: Literal["classification", "regression", "lm"] = "classification"
    num_labels: int = Field(2, ge=1, description="classes (classification); 1 for regression")
    metric: Metric = "accuracy"
    label_map: dict[str, int] | None = Field(None, description="string labels → class ids")
    max_length: int = Field(128, ge=8, description="tokens per example after truncation")

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.kind == "lm":
            if self.metric not in ("perplexity", "accuracy"):
                raise ValueError("an lm task is measured with perplexity (or next-token accuracy)")
            return self
        if self.label_field is None:
            raise ValueError("a classification or regression task needs a label_field")
        if self.metric == "perplexity":
            raise ValueError("perplexity measures lm tasks")
        if self.kind == "regression" and self.num_labels != 1:
            raise ValueError("a regression task has num_labels=1")
        if self.kind == "regression" and self.metric not in ("pearson", "spearman"):
            raise ValueError("a regression task is measured with pearson or spearman")
        if self.kind == "classification" and self.metric in ("pearson", "spearman"):
            raise ValueError("pearson/spearman measure regression tasks")
        return self


def _load(source: Any) -> Any:
    import datasets

    if source is None or isinstance(source, datasets.Dataset):
        return source
    path = Path(source)
    if not path.is_file():
        raise TaskDataError(f"no data file at {path}")
    if path.suffix in (".tsv", ".csv"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            rows = sum(1 for line in fh if line.strip())
        if rows <= 1:
            raise TaskDataError(f"{path}: the data file is empty (no rows after the header)")
        return datasets.load_dataset("csv", data_files=str(path), delimiter="\t" if path.suffix == ".tsv" else ",", quoting=3, split="train")
    if path.suffix in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files=str(path), split="train")
    raise TaskDataError(f"{path}: unsupported data file type {path.suffix!r} (csv, tsv, json, jsonl)")


class Task:
    """A task: its spec and its train/dev data (``datasets.Dataset``)."""

    def __init__(self, spec: TaskSpec, train: Any, dev: Any = None):
        self.spec = spec
        self.train = train
        self.dev = dev
        # (split, max_length, id(tokenizer)) → (tokenizer, examples); the tokenizer is kept
        # so its id stays unique while the entry lives
        self._encoded: dict[tuple[str, int, int], tuple[Any, list[dict[str, Any]]]] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def from_files(cls, spec: TaskSpec, train: str | Path | Any, dev: str | Path | Any = None) -> Task:
        try:
            return cls(spec, _load(train), _load(dev))
        except TaskDataError:
            raise
        except Exception as exc:  # datasets' own parse errors name nothing useful
            raise TaskDataError(f"task {spec.name!r}: cannot read its data: {type(exc).__name__}: {exc}") from None

    def label_of(self, value: Any) -> float | int:
        if self.spec.kind == "regression":
            return float(value)
        if self.spec.label_map is not None:
            return self.spec.label_map[str(value)]
        return int(value)

    def check(self) -> None:
        """Raise one TaskDataError listing every problem with this task's data."""
        problems = []
        for split, data in (("train", self.train), ("dev", self.dev)):
            if data is None:
                if split == "train":
                    problems.append("no training data")
                continue
            if len(data) == 0:
                problems.append(f"{split}: the data is empty")
                continue
            fields = [*self.spec.text_fields, *([self.spec.label_field] if self.spec.label_field else [])]
            missing = [f for f in fields if f not in data.column_names]
            if missing:
                problems.append(f"{split}: missing field(s) {missing}; the data has {data.column_names}")
                continue
            if self.spec.kind != "lm":
                problems += self._check_labels(split, list(data[self.spec.label_field]))
        if problems:
            raise TaskDataError(f"task {self.name!r}:\n  " + "\n  ".join(problems))

    def _check_labels(self, split: str, labels: Sequence[Any]) -> list[str]:
        bad: list[str] = []
        for i, value in enumerate(labels):
            try:
                label = self.label_of(value)
            except (KeyError, ValueError, TypeError):
                bad.append(f"row {i}: label {value!r}")
                continue
            if self.spec.kind == "regression":
                if not math.isfinite(label):
                    bad.append(f"row {i}: score {value!r}")
            elif not 0 <= label < self.spec.num_labels:
                bad.append(f"row {i}: label {label} outside 0..{self.spec.num_labels - 1}")
        if not bad:
            return []
        what = "scores" if self.spec.kind == "regression" else "labels"
        return [f"{split}: {len(bad)} unusable {what}, e.g. " + "; ".join(bad[:3])]

    def encode(self, tokenizer: Any, split: str = "train", max_length: int | None = None) -> list[dict[str, Any]]:
        """Tokenised examples: input_ids (token_type_ids), label, task — unpadded, in data
        order, truncated to ``max_length`` (default: the spec's). Computed once per split,
        length and tokenizer, then served from the task's cache."""
        limit = min(max_length or self.spec.max_length, self.spec.max_length)
        key = (split, limit, id(tokenizer))
        if key not in self._encoded:
            full = (split, self.spec.max_length, id(tokenizer))
            if limit < self.spec.max_length and full in self._encoded:
                examples = self._shortened(tokenizer, split, self._encoded[full][1], limit)
            else:
                examples = self._tokenize(tokenizer, split, limit, None)
            self._encoded[key] = (tokenizer, examples)
        return self._encoded[key][1]

    def length_cap(self, tokenizer: Any, percentile: float) -> int:
        """The ``percentile``-th percentile of the training lengths (in tokens, at most the
        spec's ``max_length``): truncating there shortens only the longest rows."""
        if not 0 < percentile <= 100:
            raise ValueError(f"a length percentile is in (0, 100], not {percentile}")
        lengths = sorted(len(x["input_ids"]) for x in self.encode(tokenizer, "train"))
        rank = max(1, math.ceil(percentile / 100 * len(lengths)))
        return max(8, lengths[rank - 1])

    def _shortened(self, tokenizer: Any, split: str, full: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
        """The full-length encoding with only the rows longer than ``limit`` tokenised again
        (truncation of a pair must shorten the longer sentence, not cut the tail)."""
        long_rows = [i for i, x in enumerate(full) if len(x["input_ids"]) > limit]
        if not long_rows:
            return full
        out = list(full)
        for i, item in zip(long_rows, self._tokenize(tokenizer, split, limit, long_rows), strict=True):
            out[i] = item
        return out

    def _tokenize(self, tokenizer: Any, split: str, limit: int, rows: list[int] | None) -> list[dict[str, Any]]:
        data = self.train if split == "train" else self.dev
        if rows is not None:
            data = data.select(rows)
        fields = [[str(v) for v in data[f]] for f in self.spec.text_fields]
        if self.spec.kind == "lm":
            return self._tokenize_lm(tokenizer, fields, limit)
        encoded = tokenizer(*fields, truncation=True, max_length=limit)
        labels = [self.label_of(v) for v in list(data[self.spec.label_field])]
        out = []
        for i, label in enumerate(labels):
            item = {"input_ids": encoded["input_ids"][i], "label": label, "task": self.name}
            if "token_type_ids" in encoded:
                item["token_type_ids"] = encoded["token_type_ids"][i]
            out.append(item)
        return out

    def _tokenize_lm(self, tokenizer: Any, fields: list[list[str]], limit: int) -> list[dict[str, Any]]:
        """``label`` holds the number of prompt tokens, which the loss leaves out."""
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if len(fields) == 1:
            texts = tokenizer(fields[0])["input_ids"]
            return [{"input_ids": (ids + eos)[:limit], "label": 0, "task": self.name} for ids in texts]
        prompts = tokenizer(fields[0])["input_ids"]
        completions = tokenizer(fields[1], add_special_tokens=False)["input_ids"]
        out = []
        for p, c in zip(prompts, completions, strict=True):
            ids = (p + c + eos)[:limit]
            out.append({"input_ids": ids, "label": min(len(p), len(ids) - 1), "task": self.name})
        return out


# --- metrics --------------------------------------------------------------------------


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (for Spearman)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(values), dtype=x.dtype).index_add(0, inverse, ranks)
    return (sums / counts)[inverse]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


def metric_value(metric: str, predictions: Sequence[float], labels: Sequence[float]) -> float:
    """accuracy, binary F1 (positive class 1), Matthews correlation, Pearson, Spearman."""
    p = torch.as_tensor(list(predictions), dtype=torch.float64)
    y = torch.as_tensor(list(labels), dtype=torch.float64)
    if metric == "accuracy":
        return float((p == y).double().mean())
    if metric == "f1":
        tp = float(((p == 1) & (y == 1)).sum())
        fp = float(((p == 1) & (y != 1)).sum())
        fn = float(((p != 1) & (y == 1)).sum())
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    if metric == "matthews":
        tp = float(((p == 1) & (y == 1)).sum())
        tn = float(((p != 1) & (y != 1)).sum())
        fp = float(((p == 1) & (y != 1)).sum())
        fn = float(((p != 1) & (y == 1)).sum())
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / denom if denom else 0.0
    if metric == "pearson":
        return _pearson(p, y)
    if metric == "spearman":
        return _pearson(_ranks(p), _ranks(y))
    if metric == "perplexity":
        raise ValueError("perplexity comes from token losses, not predictions: see workflow.objectives")
    raise ValueError(f"unknown metric {metric!r}")


def check_tasks(tasks: Mapping[str, Task]) -> None:
    """Check every task, and report all their problems together."""
    problems = []
    for task in tasks.values():
        try:
            task.check()
        except TaskDataError as exc:
            problems.append(str(exc))
    if problems:
        raise TaskDataError("\n".join(problems))
