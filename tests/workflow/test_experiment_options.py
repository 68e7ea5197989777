"""Runner options that decide speed and the per-cell learning rate: mixed precision
(``autocast``), config overrides and the attention kernel of the base, per-task rates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_composer.workflow import experiment as ex
from adapter_composer.workflow.experiment_cells import train_fields
from adapter_composer.workflow.experiment_data import load_model, load_tasks
from adapter_composer.workflow.experiment_report import chosen_rates, load_results, render_table
from adapter_composer.workflow.experiment_spec import ExperimentSpec, ExperimentSpecError
from adapter_composer.workflow.training import TrainConfig, TrainingSetupError, evaluate, predict
from tests.workflow.conftest import tiny_spec


def _single(workspace, **overrides) -> dict:
    data = tiny_spec(workspace, seeds=[0], plots=False, **overrides)
    data["setups"] = {"lora": data["setups"]["lora"], "route": data["setups"]["route"]}
    return data


def test_per_task_learning_rates_reach_their_cells_only(workspace):
    data = _single(workspace)
    data["budget"]["lr"] = {"default": 1e-2, "lora/pair": 3e-3, "lora": 5e-3, "route": 2e-3}
    spec = ExperimentSpec.parse(data)
    lrs = {c.label: train_fields(spec, c)["lr"] for c in ex.plan(spec)}
    assert lrs == {"lora seed 0 sent": 5e-3, "lora seed 0 pair": 3e-3, "lora seed 0 score": 5e-3, "route seed 0 joint": 2e-3}


@pytest.mark.parametrize("key", ["lorra", "lora/nli", "lora/", "route/pair", "lora/pair/x"])
def test_a_learning_rate_key_that_matches_no_cell_is_an_error(workspace, key):
    data = _single(workspace)
    data["budget"]["lr"] = {"default": 1e-2, key: 1e-3}
    with pytest.raises(ExperimentSpecError) as err:
        ExperimentSpec.parse(data)
    assert f"budget.lr: key {key!r} matches no cell" in str(err.value) and "'<setup or method>/<task>'" in str(err.value)


def test_model_overrides_and_attention_kernel_are_applied(workspace):
    data = _single(workspace)
    data["model"] |= {"overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, "attn_implementation": "eager"}
    model, _ = load_model(ExperimentSpec.parse(data))
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    assert model.config._attn_implementation == "eager"
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    plain, _ = load_model(ExperimentSpec.parse(_single(workspace)))
    assert plain.config.hidden_dropout_prob == 0.1  # the saved config, untouched by the other spec
    # the overrides are part of every cell's cache key
    keys = {c.setup: c.key for c in ex.plan(ExperimentSpec.parse(data))}
    assert keys != {c.setup: c.key for c in ex.plan(ExperimentSpec.parse(_single(workspace)))}


def test_an_unknown_override_names_the_field(workspace):
    data = _single(workspace)
    data["model"]["overrides"] = {"hidden_dropuot_prob": 0.0}
    with pytest.raises(ExperimentSpecError, match=r"model.overrides: \['hidden_dropuot_prob'\] are not fields of the bert config"):
        load_model(ExperimentSpec.parse(data))


def test_a_bad_autocast_value_is_reported_before_training(workspace):
    data = _single(workspace)
    data["budget"]["train"] = {"autocast": "bf16"}
    with pytest.raises(ExperimentSpecError, match=r"budget.train: autocast='bf16' is not a mixed-precision type"):
        ExperimentSpec.parse(data)
    with pytest.raises(TrainingSetupError, match="'bfloat16'"):
        TrainConfig(steps=1, autocast="half")


def test_bfloat16_training_trains_and_evaluates_close_to_full_precision(workspace, tmp_path):
    data = _single(workspace)
    data["setups"] = {"lora": data["setups"]["lora"]}
    data["tasks"] = {"sent": data["tasks"]["sent"], "score": data["tasks"]["score"]}
    data["budget"] |= {"steps": 6, "train": {"autocast": "bfloat16"}}
    spec = ExperimentSpec.parse(data)
    summary = ex.run_experiment(spec, tmp_path, log=lambda line: None)
    assert summary.ran == ["lora seed 0 sent", "lora seed 0 score"]
    # the trained cell, rebuilt from its saved adapter: outputs under bf16 autocast are the
    # fp32 outputs to bf16 precision (not a different model), and the metric agrees
    tasks = load_tasks(spec)
    cell = next(c for c in ex.plan(spec) if c.task == "score")
    composed, heads, tok = ex.build(spec, cell, tasks, tmp_path)
    from adapter_composer.formats.files import read_safetensors

    folder = cell.directory(tmp_path)
    composed.replace_weights("score", read_safetensors(folder / "adapter.safetensors"))
    heads.heads["score"].load_state_dict(read_safetensors(folder / "head.safetensors"))
    from adapter_composer.workflow.objectives import objective_for

    objective = objective_for(composed, heads, {"score": tasks["score"]})
    composed.eval()
    heads.eval()
    full = predict(objective, tasks["score"], tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = predict(objective, tasks["score"], tok)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert torch.allclose(half, full, atol=0.05 * (full.abs().max().item() + 1), rtol=0.05)
    assert not torch.equal(half, full)  # the autocast really ran in bf16
    reported = summary.results["setups"]["lora"]["per_seed"]["0"]["scores"]["score"]
    assert evaluate(composed, heads, {"score": tasks["score"]}, tok, autocast="bfloat16")["score"] == pytest.approx(reported, abs=1e-6)
    assert evaluate(composed, heads, {"score": tasks["score"]}, tok)["score"] == pytest.approx(reported, abs=0.05)


ROOT = Path(__file__).resolve().parents[2]


def test_the_glue_spec_takes_its_rates_from_the_recorded_selection():
    """examples/glue/spec.json's per-task rates are what tune.json's selection chose on the
    training holdout (docs/glue/tune/results.json), under the same model, tasks and budgets."""
    spec = ExperimentSpec.from_file(ROOT / "examples" / "glue" / "spec.json")
    tune = ExperimentSpec.from_file(ROOT / "examples" / "glue" / "tune.json")
    results = load_results(ROOT / "docs" / "glue" / "tune" / "results.json")
    assert {k: v for k, v in spec.budget.lr.items() if "/" in k} == chosen_rates(results)
    assert len(chosen_rates(results)) == 2 * len(spec.tasks)  # every lora and ia3 cell was selected
    for field in ("model", "tasks", "heads", "data_dir"):
        assert getattr(tune, field) == getattr(spec, field), field
    assert (tune.budget.steps, tune.budget.train, tune.budget.batch_size) == (spec.budget.steps, spec.budget.train, spec.budget.batch_size)
    assert {n: tune.setups[n] for n in tune.setups} == {n: spec.setups[n] for n in tune.setups}
    for name, grid in tune.selection.lr.items():
        assert all(lr in grid for key, lr in chosen_rates(results).items() if key.startswith(name + "/"))


def test_the_readme_glue_table_is_the_runs_table():
    """The README's GLUE table is render_table of the committed three-seed run."""
    results = load_results(ROOT / "docs" / "glue" / "results.json")
    assert results["seeds"] == [0, 1, 2] and set(results["setups"]) == {"lora", "ia3", "route", "mix", "sum"}
    table = render_table(results)
    assert table.split("\n\n")[0] in (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "glue" / "results.md").read_text().strip() == table.strip()


def test_fresh_regression_heads_start_at_the_mean_label_and_loaded_heads_are_kept(workspace, tmp_path):
    from adapter_composer.formats.files import read_safetensors
    from adapter_composer.workflow.heads import TaskHeads

    data = _single(workspace)
    data["tasks"] = {"sent": data["tasks"]["sent"], "score": data["tasks"]["score"]}
    spec = ExperimentSpec.parse(data)
    tasks = load_tasks(spec)
    cells = {c.label: c for c in ex.plan(spec)}
    _, heads, tok = ex.build(spec, cells["lora seed 0 score"], tasks, tmp_path)
    labels = [x["label"] for x in tasks["score"].encode(tok, "train")]
    assert heads.heads["score"].bias.item() == pytest.approx(sum(labels) / len(labels))
    assert abs(sum(labels) / len(labels)) > 0.5  # the check means something: not the default's ~0
    ex.run_experiment(spec, tmp_path, log=lambda line: None)
    # route starts from the trained single-task head: loaded as saved, not reset to the mean
    _, joint, _ = ex.build(spec, cells["route seed 0 joint"], tasks, tmp_path)
    saved = read_safetensors(cells["lora seed 0 score"].directory(tmp_path) / "head.safetensors")
    assert torch.equal(joint.heads["score"].bias, saved["bias"])
    with pytest.raises(ValueError, match="classification task"):
        TaskHeads({"sent": tasks["sent"].spec}, hidden=8).start_at_label_mean("sent", [0, 1])
