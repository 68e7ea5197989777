"""Tasks, mixtures, metrics, heads and the training loop (checkpoints and resume included)."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

import adapter_composer as ac
from adapter_composer import Graph
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.mixture import MixtureSampler, mixture_weights
from adapter_composer.workflow.tasks import Task, TaskDataError, TaskSpec, metric_value
from adapter_composer.workflow.training import TrainConfig, latest_checkpoint, train
from tests.models import tiny_bert, tiny_tokenizer

WORDS = ["good", "bad", "movie", "film", "plot", "the", "a", "very", "not", "same", "other"]


def _synthetic(seed: int = 0, n: int = 120):
    g = torch.Generator().manual_seed(seed)
    sent, pair, score = {"sentence": [], "label": []}, {"s1": [], "s2": [], "label": []}, {"text": [], "score": []}
    for _ in range(n):
        good = int(torch.rand(1, generator=g) < 0.5)
        filler = ["the", "movie", "very", "plot", "a", "film"]
        words = [filler[i] for i in torch.randint(0, 6, (4,), generator=g).tolist()]
        words.insert(int(torch.randint(0, 4, (1,), generator=g)), "good" if good else "bad")
        sent["sentence"].append(" ".join(words))
        sent["label"].append(good)
        same = int(torch.rand(1, generator=g) < 0.5)
        a = filler[int(torch.randint(0, 6, (1,), generator=g))]
        b = a if same else filler[(filler.index(a) + 1) % 6]
        pair["s1"].append(f"{a} the plot")
        pair["s2"].append(f"{'same' if same else 'other'} {b} plot")
        pair["label"].append("same" if same else "other")
        k = int(torch.randint(0, 4, (1,), generator=g))
        score["text"].append(" ".join(["good"] * k + ["film"] * (4 - k)))
        score["score"].append(float(k))
    return sent, pair, score


def _tasks(seed=0):
    sent, pair, score = _synthetic(seed)
    dev_sent, dev_pair, dev_score = _synthetic(seed + 100, 60)
    specs = {
        "sent": TaskSpec(name="sent", text_fields=["sentence"], label_field="label", num_labels=2, metric="accuracy"),
        "pair": TaskSpec(name="pair", text_fields=["s1", "s2"], label_field="label", num_labels=2, metric="f1", label_map={"other": 0, "same": 1}),
        "score": TaskSpec(name="score", text_fields=["text"], label_field="score", kind="regression", num_labels=1, metric="pearson"),
    }
    data = {"sent": (sent, dev_sent), "pair": (pair, dev_pair), "score": (score, dev_score)}
    return {k: Task(specs[k], Dataset.from_dict(data[k][0]), Dataset.from_dict(data[k][1])) for k in specs}


def _setup(registry, route=True):
    model = tiny_bert()
    g = Graph()
    for name in ("sent", "pair", "score"):
        g.adapter(name, "lora", r=4, alpha=8, targets=["attn.q", "attn.v", "mlp.up"])
    if route:
        g.route({n: n for n in ("sent", "pair", "score")}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    tasks = _tasks()
    heads = TaskHeads({k: t.spec for k, t in tasks.items()}, hidden=64, dropout=0.0)
    return composed, heads, tasks, tiny_tokenizer(WORDS)


# --- mixtures and metrics -------------------------------------------------------------


def test_mixture_weights_formulas():
    sizes = {"big": 900, "small": 100}
    assert mixture_weights(sizes, "proportional") == {"big": 0.9, "small": 0.1}
    assert mixture_weights(sizes, "uniform") == {"big": 0.5, "small": 0.5}
    w = mixture_weights(sizes, "temperature", 2.0)
    assert w["big"] == pytest.approx(30 / 40) and w["small"] == pytest.approx(10 / 40)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mixture_weights(sizes, "temperature", 0)
    with pytest.raises(ValueError, match="needs examples"):
        mixture_weights({"a": 0}, "uniform")


@pytest.mark.parametrize("sampling, temperature", [("proportional", 1.0), ("temperature", 3.0), ("uniform", 1.0)])
def test_sampled_proportions_match_within_sampling_error(sampling, temperature):
    examples = {"a": [{"input_ids": [1], "label": 0, "task": "a"}] * 800, "b": [{"input_ids": [1], "label": 0, "task": "b"}] * 150, "c": [{"input_ids": [1], "label": 0, "task": "c"}] * 50}
    sampler = MixtureSampler(examples, batch_size=50, sampling=sampling, temperature=temperature, seed=3)
    draws = [x["task"] for _ in range(200) for x in sampler.next_batch()]
    n = len(draws)
    for task, p in mixture_weights({k: len(v) for k, v in examples.items()}, sampling, temperature).items():
        observed = draws.count(task) / n
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n), (task, observed, p)


def test_sampler_state_resumes_the_same_stream():
    examples = {t: [{"input_ids": [i], "label": 0, "task": t} for i in range(7)] for t in "xy"}
    a = MixtureSampler(examples, 5, seed=1)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(4)]
    b = MixtureSampler(examples, 5, seed=1)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(4)] == expected


def test_metrics_on_hand_made_examples():
    assert metric_value("accuracy", [1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metric_value("f1", [1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # Matthews: tp=2, tn=0, fp=1, fn=1 → (0 − 1)/sqrt(3·3·1·1)
    assert metric_value("matthews", [1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(-1 / 3)
    # Pearson: cov = 4.5, ‖x − x̄‖ = √2, ‖y − ȳ‖ = √(61/6)
    assert metric_value("pearson", [1, 2, 3], [2, 4, 6.5]) == pytest.approx(4.5 / math.sqrt(2 * 61 / 6))
    # Spearman with ties: ranks of [1, 2, 2, 3] are [0, 1.5, 1.5, 3]
    assert metric_value("spearman", [1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(0.9486833, abs=1e-6)


# --- bad input ------------------------------------------------------------------------


def test_bad_task_data_is_reported_before_training(registry):
    composed, heads, tasks, tok = _setup(registry)
    before = {k: v.clone() for k, v in composed.adapters["sent"].state_dict().items()}
    broken = dict(tasks)
    broken["sent"] = Task(tasks["sent"].spec, Dataset.from_dict({"text": ["x"], "label": [0]}), None)
    broken["pair"] = Task(tasks["pair"].spec, Dataset.from_dict({"s1": ["a"], "s2": ["b"], "label": ["maybe"]}), None)
    broken["score"] = Task(tasks["score"].spec, Dataset.from_dict({"text": [], "score": []}), None)
    with pytest.raises(TaskDataError) as err:
        train(composed, heads, broken, tok, TrainConfig(steps=3, progress=False))
    msg = str(err.value)
    assert "task 'sent'" in msg and "missing field(s) ['sentence']" in msg
    assert "task 'pair'" in msg and "label 'maybe'" in msg
    assert "task 'score'" in msg and "the data is empty" in msg
    after = composed.adapters["sent"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_labels_outside_the_head_and_empty_files(tmp_path):
    spec = TaskSpec(name="t", text_fields=["sentence"], label_field="label", num_labels=2)
    task = Task(spec, Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 2, -1]}))
    with pytest.raises(TaskDataError, match=r"2 unusable labels, e.g. row 1: label 2 outside 0..1; row 2: label -1"):
        task.check()
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(TaskDataError, match="the data file is empty"):
        Task.from_files(spec, tmp_path / "empty.tsv")
    with pytest.raises(TaskDataError, match="no data file"):
        Task.from_files(spec, tmp_path / "missing.tsv")


def test_task_spec_consistency():
    with pytest.raises(ValueError, match="regression task has num_labels=1"):
        TaskSpec(name="r", text_fields=["t"], label_field="y", kind="regression", num_labels=2, metric="pearson")
    with pytest.raises(ValueError, match="pearson/spearman measure regression"):
        TaskSpec(name="c", text_fields=["t"], label_field="y", metric="pearson")


# --- training -------------------------------------------------------------------------


def test_routed_multitask_training_learns_every_task(registry):
    composed, heads, tasks, tok = _setup(registry)
    config = TrainConfig(steps=100, batch_size=24, lr=5e-3, head_lr=1e-2, eval_every=50, progress=False, seed=0)
    result = train(composed, heads, tasks, tok, config)
    assert result.losses[-1] < result.losses[0]
    scores = result.final
    assert scores["sent"] > 0.8 and scores["pair"] > 0.8 and scores["score"] > 0.8, scores
    assert [e["step"] for e in result.evaluations] == [50, 100]


def _interrupt_at(step_to_fail):
    class Boom(RuntimeError):
        pass

    class Interrupt:
        def after_step(self, step):
            if step == step_to_fail:
                raise Boom("simulated crash")

    return Interrupt(), Boom


def test_interrupted_run_resumes_from_its_last_checkpoint(registry, tmp_path):
    config = TrainConfig(steps=8, batch_size=8, lr=5e-3, checkpoint_every=4, progress=False, seed=5)
    composed, heads, tasks, tok = _setup(registry)
    train(composed, heads, tasks, tok, config, out_dir=tmp_path / "full")
    reference = {n: h.state_dict() for n, h in composed.adapters.items()}
    reference_heads = heads.state_dict()

    composed, heads, tasks, tok = _setup(registry)
    crash, Boom = _interrupt_at(5)
    with pytest.raises(Boom):
        train(composed, heads, tasks, tok, config, out_dir=tmp_path / "run", callbacks=[crash])
    assert latest_checkpoint(tmp_path / "run").name == "step-00000004"
    composed, heads, tasks, tok = _setup(registry)  # a new process: fresh modules
    train(composed, heads, tasks, tok, config, out_dir=tmp_path / "run", resume=True)
    for name, state in reference.items():
        now = composed.adapters[name].state_dict()
        assert all(torch.equal(state[k], now[k]) for k in state), name
    assert all(torch.equal(v, heads.state_dict()[k]) for k, v in reference_heads.items())


def test_checkpoint_loads_as_a_composition(registry, tmp_path):
    composed, heads, tasks, tok = _setup(registry)
    train(composed, heads, tasks, tok, TrainConfig(steps=3, batch_size=4, progress=False), out_dir=tmp_path)
    loaded = ac.load(tiny_bert(), latest_checkpoint(tmp_path) / "composition", registry=registry)
    assert sorted(loaded.adapters) == ["pair", "score", "sent"]


def test_adalora_controller_plugs_into_the_training_loop(registry):
    from adapter_composer.plugins.adalora import AdaLoraController

    model = tiny_bert()
    g = Graph()
    g.adapter("sent", "adalora", init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10, targets=["attn.q", "attn.v"])
    composed = ac.compose(model, g, registry=registry)
    tasks = {"sent": _tasks()["sent"]}
    heads = TaskHeads({"sent": tasks["sent"].spec}, hidden=64, dropout=0.0)
    controller = AdaLoraController(composed, adapter="sent")
    train(composed, heads, tasks, tiny_tokenizer(WORDS), TrainConfig(steps=10, batch_size=8, progress=False), callbacks=[controller])
    ranks = controller.final_ranks()
    assert sum(ranks.values()) == 2 * len(ranks)  # the target budget: target_r per site on average
    assert [a.step for a in controller.history][:2] == [0, 1]


def _adalora_run(registry):
    from adapter_composer.plugins.adalora import AdaLoraController

    g = Graph()
    g.adapter("sent", "adalora", init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=10, targets=["attn.q", "attn.v"])
    composed = ac.compose(tiny_bert(), g, registry=registry)
    tasks = {"sent": _tasks()["sent"]}
    heads = TaskHeads({"sent": tasks["sent"].spec}, hidden=64, dropout=0.0)
    return composed, heads, tasks, AdaLoraController(composed, adapter="sent")


def test_an_interrupted_adalora_run_resumes_its_controller_state(registry, tmp_path):
    """Importance EMAs, masks and the allocation history are in the checkpoint: a resumed
    AdaLoRA run ends bit-identical to an uninterrupted one (not restarted estimates)."""
    config = TrainConfig(steps=10, batch_size=8, lr=5e-3, checkpoint_every=4, progress=False, seed=3)
    tok = tiny_tokenizer(WORDS)
    composed, heads, tasks, controller = _adalora_run(registry)
    train(composed, heads, tasks, tok, config, out_dir=tmp_path / "full", callbacks=[controller])
    reference = {k: v.clone() for k, v in composed.adapters["sent"].state_dict().items()}
    reference_history = list(controller.history)

    composed, heads, tasks, controller = _adalora_run(registry)
    crash, Boom = _interrupt_at(6)
    with pytest.raises(Boom):
        train(composed, heads, tasks, tok, config, out_dir=tmp_path / "run", callbacks=[controller, crash])
    composed, heads, tasks, controller = _adalora_run(registry)  # a new process: fresh controller
    train(composed, heads, tasks, tok, config, out_dir=tmp_path / "run", resume=True, callbacks=[controller, _interrupt_at(-1)[0]])
    now = composed.adapters["sent"].state_dict()
    assert all(torch.equal(reference[k], now[k]) for k in reference)
    assert controller.history == reference_history  # steps 0-3 restored, 4-9 run after the resume

    # a resume without the controller cannot silently drop its state
    composed, heads, tasks, controller = _adalora_run(registry)
    with pytest.raises(ac.ComposerError, match="callbacks at positions \\[0\\].*same AdaLoraController"):
        train(composed, heads, tasks, tok, config, out_dir=tmp_path / "run", resume=True)
