"""train() on models with their own heads: a sequence classifier and a causal LM (heads=None),
and the refusals when the model, the heads and the tasks do not fit."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import adapter_composer as ac
from adapter_composer import Graph
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.tasks import Task, TaskSpec
from adapter_composer.workflow.training import (
    TrainConfig,
    TrainingSetupError,
    latest_checkpoint,
    train,
)
from tests.composer.test_training import WORDS, _interrupt_at, _tasks
from tests.hf.helpers import tiny_bert_classifier
from tests.models import tiny_bert, tiny_llama, tiny_tokenizer

LM_WORDS = ["good", "bad", "film", "plot", "a", "the", "great", "awful"]


def _classifier(registry, **overrides):
    g = Graph()
    g.adapter("lora", "lora", r=4, alpha=8, targets=["attn.q", "attn.v", "mlp.up"])
    g.adapter("head", "module")  # a trainable copy of `classifier` (PEFT's modules_to_save)
    g.stack("lora", "head")
    return ac.compose(tiny_bert_classifier(**overrides), g, registry=registry)


def _logits(composed, tok, texts):
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return composed.model(**batch).logits


def test_sequence_classifier_trains_its_own_head_with_its_own_loss(registry):
    composed = _classifier(registry)
    tok = tiny_tokenizer(WORDS)
    task = {"sent": _tasks()["sent"]}
    texts = list(task["sent"].dev["sentence"][:8])
    with composed.disable_adapter():
        base = _logits(composed, tok, texts)
    before = _logits(composed, tok, texts)
    assert torch.allclose(before, base)  # the copy and a zero LoRA B: the identity at start
    result = train(composed, None, task, tok, TrainConfig(steps=60, batch_size=16, lr=1e-2, progress=False))
    assert sum(result.losses[-10:]) / 10 < 0.6 * sum(result.losses[:10]) / 10
    assert result.final["sent"] > 0.8, result.final
    assert (_logits(composed, tok, texts) - base).abs().max() > 0.1


def test_regression_on_a_one_label_classifier(registry):
    composed = _classifier(registry, num_labels=1)
    score = {"score": _tasks()["score"]}
    result = train(composed, None, score, tiny_tokenizer(WORDS), TrainConfig(steps=60, batch_size=16, lr=1e-2, progress=False))
    assert result.losses[-1] < result.losses[0]
    assert result.final["score"] > 0.8, result.final


def test_classifier_run_resumes_to_the_uninterrupted_weights(registry, tmp_path):
    tok, task = tiny_tokenizer(WORDS), {"sent": _tasks()["sent"]}
    config = TrainConfig(steps=8, batch_size=8, lr=5e-3, checkpoint_every=4, progress=False, seed=3)
    composed = _classifier(registry)
    train(composed, None, task, tok, config, out_dir=tmp_path / "full")
    reference = {n: h.state_dict() for n, h in composed.adapters.items()}
    composed = _classifier(registry)
    crash, Boom = _interrupt_at(5)
    with pytest.raises(Boom):
        train(composed, None, task, tok, config, out_dir=tmp_path / "run", callbacks=[crash])
    assert latest_checkpoint(tmp_path / "run").name == "step-00000004"
    composed = _classifier(registry)
    train(composed, None, task, tok, config, out_dir=tmp_path / "run", resume=True)
    for name, state in reference.items():
        now = composed.adapters[name].state_dict()
        assert all(torch.equal(state[k], now[k]) for k in state), name


def _lm_task(n=96, seed=0, pairs=False):
    """'a good film' → 'great', 'a bad plot' → 'awful': the completion follows the prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(n):
        good = bool(torch.rand(1, generator=g) < 0.5)
        noun = ["film", "plot"][int(torch.randint(0, 2, (1,), generator=g))]
        prompts.append(f"{'a' if good else 'the'} {'good' if good else 'bad'} {noun}")
        completions.append("great" if good else "awful")
    if pairs:
        data, fields = {"prompt": prompts, "completion": completions}, ["prompt", "completion"]
    else:
        data, fields = {"text": [f"{p} {c}" for p, c in zip(prompts, completions, strict=True)]}, ["text"]
    spec = TaskSpec(name="lm", text_fields=fields, kind="lm", metric="accuracy" if pairs else "perplexity")
    return Task(spec, Dataset.from_dict(data), Dataset.from_dict({k: v[:32] for k, v in data.items()}))


def _lm(registry):
    g = Graph()
    g.adapter("lora", "lora", r=4, alpha=8, targets=["attn.q", "attn.v", "mlp.up"])
    # a random model's unit-RMS final norm keeps its logits near 0: train a copy of lm_head too
    g.adapter("head", "module", targets=["re:lm_head"])
    g.stack("lora", "head")
    return ac.compose(tiny_llama(), g, registry=registry)


def test_causal_lm_trains_with_its_own_loss(registry):
    composed, tok = _lm(registry), tiny_tokenizer(LM_WORDS)
    texts = {"lm": _lm_task()}
    config = TrainConfig(steps=60, batch_size=16, lr=2e-2, progress=False)
    from adapter_composer.workflow.training import evaluate

    start = evaluate(composed, None, texts, tok)["lm"]
    result = train(composed, None, texts, tok, config)
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    assert result.final["lm"] < 0.3 * start  # perplexity
    ids = tok(["a good film"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        after = composed.model(input_ids=ids).logits
        with composed.disable_adapter():
            base = composed.model(input_ids=ids).logits
    assert (after - base).abs().max() > 0.1


def test_causal_lm_completion_loss_leaves_the_prompt_out(registry):
    composed, tok = _lm(registry), tiny_tokenizer(LM_WORDS)
    task = {"lm": _lm_task(pairs=True)}
    example = task["lm"].encode(tok, "train")[0]
    assert example["label"] == len(tok(task["lm"].train["prompt"][0])["input_ids"])  # prompt tokens
    result = train(composed, None, task, tok, TrainConfig(steps=40, batch_size=16, lr=2e-2, progress=False))
    assert result.final["lm"] == 1.0  # next-token accuracy on the completions only


def test_causal_lm_resumes_to_the_uninterrupted_weights(registry, tmp_path):
    tok, task = tiny_tokenizer(LM_WORDS), {"lm": _lm_task()}
    config = TrainConfig(steps=6, batch_size=8, lr=5e-3, checkpoint_every=3, progress=False, seed=1)
    composed = _lm(registry)
    train(composed, None, task, tok, config, out_dir=tmp_path / "full")
    reference = composed.adapters["lora"].state_dict()
    composed = _lm(registry)
    crash, Boom = _interrupt_at(4)
    with pytest.raises(Boom):
        train(composed, None, task, tok, config, out_dir=tmp_path / "run", callbacks=[crash])
    composed = _lm(registry)
    train(composed, None, task, tok, config, out_dir=tmp_path / "run", resume=True)
    now = composed.adapters["lora"].state_dict()
    assert all(torch.equal(reference[k], now[k]) for k in reference)


def test_models_heads_and_tasks_that_do_not_fit_are_refused(registry):
    tok, tasks = tiny_tokenizer(WORDS), _tasks()
    config = TrainConfig(steps=1, progress=False)
    classifier = _classifier(registry)
    heads = TaskHeads({"sent": tasks["sent"].spec}, hidden=64)
    with pytest.raises(TrainingSetupError, match="has its own classification head; pass heads=None"):
        train(classifier, heads, {"sent": tasks["sent"]}, tok, config)
    with pytest.raises(TrainingSetupError, match=r"task 'score' has 1 label\(s\); the model's head has num_labels=2"):
        train(classifier, None, {"sent": tasks["sent"], "score": tasks["score"]}, tok, config)
    with pytest.raises(TrainingSetupError, match="is an lm task; a sequence classifier has no LM head"):
        train(classifier, None, {"lm": _lm_task()}, tok, config)
    g = Graph()
    g.adapter("lora", "lora", r=2, targets=["attn.q"])
    encoder = ac.compose(tiny_bert(), g, registry=registry)
    with pytest.raises(TrainingSetupError, match="BertModel has none"):
        train(encoder, None, {"sent": tasks["sent"]}, tok, config)
    with pytest.raises(TrainingSetupError, match="a causal LM's own loss trains lm tasks"):
        train(_lm(registry), None, {"sent": tasks["sent"]}, tok, config)


def test_a_frozen_fresh_classifier_is_warned_about(registry):
    g = Graph()
    g.adapter("lora", "lora", r=2, targets=["attn.q"])
    composed = ac.compose(tiny_bert_classifier(), g, registry=registry)
    with pytest.warns(UserWarning, match=r"head is frozen .* graph.adapter\('head', 'module'\)"):
        train(composed, None, {"sent": _tasks()["sent"]}, tiny_tokenizer(WORDS), TrainConfig(steps=1, progress=False))
