"""The experiment runner end to end on a tiny spec: the table equals the JSON, mean ± std
over two seeds, the cache, resume after an interruption, a changed spec, plots, errors."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from adapter_composer.cli import main
from adapter_composer.workflow import experiment as ex
from adapter_composer.workflow.experiment_report import load_results, render_table
from adapter_composer.workflow.experiment_spec import (
    ExperimentError,
    ExperimentSpec,
    ExperimentSpecError,
)
from tests.workflow.conftest import tiny_spec


def _cells(out: Path) -> dict[str, dict]:
    found = {}
    for path in (out / "cells").glob("*/*/result.json"):
        r = json.loads(path.read_text())
        found[f"{r['setup']}/{r['seed']}/{r['task'] or 'joint'}"] = r | {"mtime": path.stat().st_mtime_ns}
    return found


@pytest.fixture(scope="module")
def first_run(workspace, tmp_path_factory):
    spec_path = tmp_path_factory.mktemp("spec") / "spec.json"
    spec_path.write_text(json.dumps(tiny_spec(workspace)))
    out = spec_path.parent / "out"
    assert main(["experiment", "run", str(spec_path), "--out", str(out)]) == 0
    return spec_path, out, _cells(out)


def test_every_cell_runs_and_the_table_equals_the_json(first_run):
    _, out, cells = first_run
    # 3 tasks x 2 seeds of lora, one joint cell per seed for route, mix, sum, arrow_heldout
    assert len(cells) == 6 + 4 * 2
    results = load_results(out / "results.json")
    table = (out / "results.md").read_text()
    assert table == render_table(results)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:] if line.startswith("| ")}
    assert set(rows) == {"lora (per task)", "route", "mix", "sum", "arrow_heldout"}
    tasks = ["sent", "pair", "score"]
    for name, setup in results["setups"].items():
        row = rows[setup["label"]]
        assert row[0] == f"{setup['params']:,}"
        for task, text in zip(tasks, row[2:5], strict=True):
            stat = setup["scores"].get(task)
            if stat is None:
                assert text == "–"
                continue
            mean, std = (float(x) for x in re.fullmatch(r"(-?[\d.]+) ± ([\d.]+)", text).groups())
            assert mean == round(100 * stat["mean"], 1) and std == round(100 * stat["std"], 1)
            # mean and sample std over the two seeds, from the per-cell result files
            values = [c["scores"][task] for k, c in cells.items() if c["setup"] == name and task in c["scores"]]
            assert len(values) == 2
            assert stat["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert stat["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert (out / "results.png").stat().st_size > 1000
    # what each setup trains: lora counts its three task adapters, sum trains nothing, arrow
    # over frozen experts only its head; the held-out setup reports the held-out task only
    lora = results["setups"]["lora"]
    assert lora["params"] == sum(c["params"] for k, c in cells.items() if k.startswith("lora/0/"))
    assert results["setups"]["sum"]["params"] == 0 and results["setups"]["arrow_heldout"]["params"] == 0
    assert results["setups"]["arrow_heldout"]["tasks"] == ["score"]
    assert results["setups"]["mix"]["params"] > 0  # its gates


def test_mix_and_sum_start_from_the_single_task_cells(first_run):
    from adapter_composer.formats.files import read_safetensors

    _, out, _ = first_run
    spec = ExperimentSpec.from_file(first_run[0])
    cells = ex.plan(spec)
    sum_cell = next(c for c in cells if c.setup == "sum" and c.seed == 1)
    tasks = ex.load_tasks(spec)
    composed, heads, _ = ex.build(spec, sum_cell, tasks, out)
    for task, dep in sum_cell.deps.items():
        assert dep.setup == "lora" and dep.seed == 1 and dep.task == task
        saved = read_safetensors(dep.directory(out) / "adapter.safetensors")
        now = composed.adapters[task].state_dict()
        assert all(now[k].equal(saved[k]) for k in saved)
    # sum trains nothing: its reported score is the evaluation of exactly these weights
    from adapter_composer.workflow.training import evaluate

    scores = evaluate(composed, heads, tasks, ex.load_model(spec)[1])
    assert scores == pytest.approx(_cells(out)["sum/1/joint"]["scores"], abs=1e-6)


def test_a_second_run_trains_nothing(first_run, monkeypatch):
    spec_path, out, cells = first_run
    calls = []
    monkeypatch.setattr(ex, "run_cell", lambda *a, **k: calls.append(a[1]))
    summary = ex.run_experiment(ExperimentSpec.from_file(spec_path), out, log=lambda line: None)
    assert calls == [] and summary.ran == [] and len(summary.cached) == len(cells)
    assert {k: c["mtime"] for k, c in _cells(out).items()} == {k: c["mtime"] for k, c in cells.items()}
    assert summary.results["setups"] == load_results(out)["setups"]
    # --only runs a subset; the report still shows every setup whose cells are all finished
    summary = ex.run_experiment(ExperimentSpec.from_file(spec_path), out, only=["sum"], log=lambda line: None)
    assert calls == [] and len(summary.cached) == 6 + 2 and all(k.startswith(("lora ", "sum ")) for k in summary.cached)
    assert list(summary.results["setups"]) == ["lora", "route", "mix", "sum", "arrow_heldout"]


def test_a_changed_spec_reruns_only_the_changed_cells(first_run, workspace, tmp_path):
    spec_path, out, before = first_run
    data = tiny_spec(workspace)
    data["setups"]["mix"]["steps"] = 3
    data["setups"]["lora"]["label"] = "LoRA"  # a label is not part of any cell's key
    changed = tmp_path / "spec.json"
    changed.write_text(json.dumps(data))
    summary = ex.run_experiment(ExperimentSpec.from_file(changed), out, log=lambda line: None)
    assert sorted(summary.ran) == ["mix seed 0 joint", "mix seed 1 joint"]
    after = _cells(out)
    assert after.keys() == before.keys()  # the stale mix cells were replaced, not kept beside
    assert sorted(k for k in after if after[k]["mtime"] != before[k]["mtime"]) == ["mix/0/joint", "mix/1/joint"]
    assert "| LoRA |" in (out / "results.md").read_text()
    # changing the single-task adapters changes the key of every setup built from them
    # (and only those: an IA3 setup beside them keeps its keys)
    old = tiny_spec(workspace)
    for d in (old, data):
        d["setups"]["ia3"] = {"method": "ia3", "adapter": {"targets": ["attn.k", "attn.v", "mlp.down"]}}
    data["setups"]["lora"]["adapter"]["r"] = 3
    keys = {(c.setup, c.seed, c.task): c.key for c in ex.plan(ExperimentSpec.parse(old))}
    new = {(c.setup, c.seed, c.task): c.key for c in ex.plan(ExperimentSpec.parse(data))}
    assert keys.keys() == new.keys()
    assert {k[0] for k in keys if keys[k] == new[k]} == {"ia3"}


class _Interrupt:
    """Ctrl-C in the middle of the second cell that trains (after its step-2 checkpoint)."""

    def __init__(self):
        self.starts = 0

    def after_step(self, step):
        if step == 0:
            self.starts += 1
        if self.starts == 2 and step == 2:
            raise KeyboardInterrupt


def test_resume_after_an_interruption(first_run, workspace, tmp_path):
    spec = ExperimentSpec.parse(tiny_spec(workspace))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ex.run_experiment(spec, out, seeds=[0], only=["lora"], plots=False, callbacks=[_Interrupt()], log=lambda line: None)
    assert list(_cells(out)) == ["lora/0/sent"]
    interrupted = next(out.glob("cells/lora/seed0-pair-*"))
    assert [p.name for p in (interrupted / "train" / "checkpoints").iterdir()] == ["step-00000002"]
    spent = json.loads((interrupted / "elapsed.json").read_text())["seconds"]
    summary = ex.run_experiment(spec, out, seeds=[0], only=["lora"], plots=False, log=lambda line: None)
    assert summary.cached == ["lora seed 0 sent"] and summary.ran == ["lora seed 0 pair", "lora seed 0 score"]
    cells = _cells(out)
    assert cells["lora/0/pair"]["resumed_from"] == 2 and cells["lora/0/score"]["resumed_from"] == 0
    assert cells["lora/0/pair"]["seconds"] > spent > 0  # the time before the interruption counts
    # the resumed cell ends where the uninterrupted first run ended (same key, same numbers)
    reference = first_run[2]
    for key in ("lora/0/sent", "lora/0/pair", "lora/0/score"):
        assert cells[key]["key"] == reference[key]["key"]
        assert cells[key]["scores"] == pytest.approx(reference[key]["scores"], abs=1e-6)
    assert not (out / "results.png").exists()
    assert not list(out.glob("cells/*/*/train"))  # checkpoints go once a cell is done


def test_lr_selection_uses_held_out_training_rows_not_dev(workspace, tmp_path, monkeypatch, capsys):
    from adapter_composer.workflow import training

    data = tiny_spec(workspace, seeds=[0], selection={"holdout": 0.25, "lr": {"lora": [1e-3, 3e-2]}}, plots=False)
    data["setups"] = {"lora": data["setups"]["lora"]}
    data["tasks"] = {"sent": data["tasks"]["sent"]}
    seen = []
    real = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda c, h, tasks, *a, **k: seen.append({n: (len(t.train), len(t.dev)) for n, t in tasks.items()}) or real(c, h, tasks, *a, **k))
    summary = ex.run_experiment(ExperimentSpec.parse(data), tmp_path, log=lambda line: None)
    # two grid runs on 18 fit rows scored on the 6 held-out training rows, then the dev (12 rows) once
    assert seen == [{"sent": (18, 6)}, {"sent": (18, 6)}, {"sent": (24, 12)}]
    cell = _cells(tmp_path)["lora/0/sent"]
    scores = cell["selection"]["held_out_scores"]
    assert cell["lr"] == max([1e-3, 3e-2], key=lambda lr: (scores[repr(lr)], -lr))
    assert summary.results["setups"]["lora"]["per_seed"]["0"]["lr"] == {"sent": cell["lr"]}
    assert summary.results["setups"]["lora"]["per_seed"]["0"]["selected"] == {"sent": cell["lr"]}
    # the choice, as budget.lr entries another spec can take
    assert main(["experiment", "rates", str(tmp_path / "results.json")]) == 0
    rates = json.loads(capsys.readouterr().out)["budget"]["lr"]
    assert rates == {"lora/sent": cell["lr"]}
    chosen = tiny_spec(workspace, seeds=[0], plots=False)
    chosen["budget"]["lr"] |= rates
    spec = ExperimentSpec.parse(chosen)
    assert ex.train_fields(spec, next(c for c in ex.plan(spec) if c.label == "lora seed 0 sent"))["lr"] == cell["lr"]
    # a run without a selection has nothing to give
    results = json.loads((tmp_path / "results.json").read_text())
    results["setups"]["lora"]["per_seed"]["0"].pop("selected")
    (tmp_path / "plain.json").write_text(json.dumps(results))
    assert main(["experiment", "rates", str(tmp_path / "plain.json")]) == 1
    assert "no selected learning rates" in capsys.readouterr().err


def test_table_command_re_renders(first_run, capsys, tmp_path):
    _, out, _ = first_run
    assert main(["experiment", "table", str(out / "results.json"), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == (out / "results.md").read_text().strip()
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert main(["experiment", "table", str(tmp_path / "missing.json")]) == 1
    assert "no results file" in capsys.readouterr().err


def _error(data) -> str:
    with pytest.raises(ExperimentSpecError) as err:
        ExperimentSpec.parse(data)
    return str(err.value)


def test_bad_specs_are_reported_with_what_to_do(workspace, tmp_path):
    data = tiny_spec(workspace)
    data["setups"]["mix"]["init_from"] = "lorra"
    data["setups"]["sum"]["operator"] = "summ"
    data["setups"]["route"]["tasks"] = ["sent", "nli"]
    data["budget"]["train"] = {"checkpoint_evry": 2, "eval_every": 5}
    message = _error(data)
    assert "setup 'mix': init_from 'lorra' is not a setup" in message
    assert "setup 'sum': unknown operator 'summ'; registered operators:" in message and "'route'" in message
    assert "setup 'route': tasks names unknown task(s) ['nli']" in message
    assert "'checkpoint_evry' is not a TrainConfig field" in message
    assert "'eval_every' is set by the runner" in message
    bad_task = tiny_spec(workspace)
    bad_task["tasks"]["pair"].pop("columns")
    bad_task["tasks"]["score"]["metric"] = "bleu"
    message = _error(bad_task)
    assert "task 'pair': a header-less file (header: false) needs 'columns'" in message
    assert "task 'score': metric" in message
    assert "model" in _error({"tasks": {}, "setups": {}})
    # problems found when the data is read, before anything trains
    missing = tiny_spec(workspace, plots=False)
    missing["tasks"]["sent"]["train"] = "nope.tsv"
    missing["tasks"]["score"]["label_field"] = "rating"
    with pytest.raises(ExperimentSpecError) as err:
        ex.run_experiment(ExperimentSpec.parse(missing), tmp_path, log=lambda line: None)
    assert "no data file at" in str(err.value) and "nope.tsv" in str(err.value)
    assert "missing field(s) ['rating']" in str(err.value)
    assert not (tmp_path / "cells").exists()
    with pytest.raises(ExperimentSpecError, match="unknown setup"):
        ex.plan(ExperimentSpec.parse(tiny_spec(workspace)), only=["lora", "nope"])
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(tiny_spec(workspace)))
    assert main(["experiment", "run", str(spec_path), "--seeds", "0,one"]) == 2
    assert main(["experiment", "run", str(spec_path), "--only", "lora,nope", "--out", str(tmp_path / "o")]) == 1
    spec_path.write_text("{not json")
    assert main(["experiment", "run", str(spec_path)]) == 1


def test_bad_operator_options_fail_before_training(workspace, tmp_path):
    data = tiny_spec(workspace, plots=False)
    data["setups"]["mix"]["options"] = {"temprature": 2.0}
    with pytest.raises(ExperimentSpecError) as err:
        ex.run_experiment(ExperimentSpec.parse(data), tmp_path, log=lambda line: None)
    assert "setup 'mix'" in str(err.value) and "temprature" in str(err.value)
    assert not (tmp_path / "cells").exists()


def test_plots_without_matplotlib_fail_before_training(workspace, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ExperimentError, match="matplotlib is not installed.*--no-plots"):
        ex.run_experiment(ExperimentSpec.parse(tiny_spec(workspace)), tmp_path, log=lambda line: None)
    assert not (tmp_path / "cells").exists()


def test_tasks_from_files_and_datasets(workspace):
    from adapter_composer.workflow.experiment_data import load_tasks, read_rows

    data = tiny_spec(workspace)
    data["tasks"]["sent"]["max_train_rows"] = 10
    data["tasks"]["viajson"] = {"dataset": "json", "data_files": {"train": str(workspace / "data" / "score_train.json"),
                                                                  "validation": str(workspace / "data" / "score_dev.json")},
                                "text_fields": ["text"], "label_field": "stars", "kind": "regression"}
    tasks = load_tasks(ExperimentSpec.parse(data))
    assert len(tasks["sent"].train) == 10 and len(tasks["sent"].dev) == 12
    assert tasks["pair"].train.column_names == ["id", "a", "b", "relation"] and len(tasks["pair"].train) == 24
    assert tasks["viajson"].spec.metric == "spearman" and tasks["viajson"].train["stars"] == tasks["score"].train["stars"]
    # a byte-order mark and a malformed row (GLUE's files have both)
    odd = workspace / "odd.tsv"
    odd.write_bytes("\ufeffa\tlabel\nx\t1\nbroken line\ny\t0\n".encode())
    rows, skipped = read_rows(odd)
    assert rows == {"a": ["x", "y"], "label": ["1", "0"]} and skipped == 1


def test_the_readme_spec_and_the_example_specs_are_valid():
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    block = readme.split("### Experiments from a spec file", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    spec = ExperimentSpec.parse(json.loads(block))
    assert [c.label for c in ex.plan(spec, seeds=[0]) if c.setup in ("lora", "sum")] == ["lora seed 0 sst2", "lora seed 0 cola", "sum seed 0 joint"]
    for name in ("spec.json", "heldout_mrpc.json"):
        spec = ExperimentSpec.from_file(root / "examples" / "glue" / name)
        assert spec.seeds == [0, 1, 2] and ex.plan(spec)
