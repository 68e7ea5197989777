"""Runner options that decide speed and the per-cell learning rate: mixed precision
(``autocast``), config overrides and the attention kernel of the base, per-task rates."""

from __future__ import annotations

import pytest
import torch

from adapter_composer.workflow import experiment as ex
from adapter_composer.workflow.experiment_cells import train_fields
from adapter_composer.workflow.experiment_data import load_model, load_tasks
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
