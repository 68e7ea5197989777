"""The training loop's speed measures change no numbers: dynamic padding and length-sorted
evaluation give the per-example outputs of full padding, length-grouped batches keep the
mixture and each epoch, tokenisation happens once per task and split."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

import adapter_composer as ac
from adapter_composer import Graph
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.mixture import MixtureSampler, collate
from adapter_composer.workflow.objectives import HeadsObjective
from adapter_composer.workflow.tasks import Task, TaskSpec
from adapter_composer.workflow.training import TrainConfig, evaluate, predict, train
from tests.composer.test_training import WORDS, _tasks
from tests.models import randomize, tiny_bert, tiny_tokenizer


def _varied(n=40, seed=0):
    """Sentences of 1 to 12 words, so batches mix very different lengths."""
    g = torch.Generator().manual_seed(seed)
    words = ["good", "bad", "movie", "film", "plot", "the", "a", "very"]
    rows = {"sentence": [], "label": []}
    for _ in range(n):
        k = int(torch.randint(1, 13, (1,), generator=g))
        rows["sentence"].append(" ".join(words[i] for i in torch.randint(0, 8, (k,), generator=g).tolist()))
        rows["label"].append(int(torch.randint(0, 2, (1,), generator=g)))
    return rows


def _routed(registry):
    g = Graph()
    for name in ("sent", "pair", "score"):
        g.adapter(name, "lora", r=4, targets=["attn.q", "attn.v", "mlp.up"])
    g.route({n: n for n in ("sent", "pair", "score")})
    composed = ac.compose(tiny_bert(), g, registry=registry)
    randomize(composed, std=0.3)  # non-zero adapters, so every route key gives its own outputs
    tasks = _tasks()
    heads = TaskHeads({k: t.spec for k, t in tasks.items()}, hidden=64, dropout=0.0)
    return composed.eval(), heads.eval(), tasks, tiny_tokenizer(WORDS)


def test_sorted_dynamic_padding_matches_full_padding_per_example(registry):
    composed, heads, tasks, tok = _routed(registry)
    objective = HeadsObjective(composed, heads)
    for name, task in tasks.items():
        fast = predict(objective, task, tok, batch_size=7)
        full = predict(objective, task, tok, batch_size=7, sort=False, pad_to=task.spec.max_length)
        one = predict(objective, task, tok, batch_size=1, sort=False)  # no padding at all
        assert fast.shape == full.shape == one.shape and len(fast) == len(task.dev)
        assert torch.allclose(fast, full, atol=1e-5), (name, (fast - full).abs().max())
        assert torch.allclose(fast, one, atol=1e-5), (name, (fast - one).abs().max())


def test_training_loss_is_the_same_with_dynamic_and_full_padding(registry):
    composed, heads, tasks, tok = _routed(registry)
    objective = HeadsObjective(composed, heads)
    rows = [x for t in tasks.values() for x in t.encode(tok, "train")[:5]]
    dynamic = objective.loss(collate(rows, tok.pad_token_id))
    full = objective.loss(collate(rows, tok.pad_token_id, length=64))
    assert collate(rows, tok.pad_token_id)["input_ids"].shape[1] < 64
    assert torch.allclose(dynamic, full, atol=1e-5)
    with pytest.raises(ValueError, match="cannot pad to 3 tokens"):
        collate(rows, 0, length=3)


def test_length_grouped_batches_keep_the_epoch_and_shorten_padding():
    lengths = [1 + (7 * i) % 23 for i in range(40)]
    examples = {"t": [{"input_ids": [1] * n, "label": 0, "task": "t"} for n in lengths]}
    plain = MixtureSampler(examples, batch_size=5, seed=2)
    grouped = MixtureSampler(examples, batch_size=5, seed=2, group=4)
    padded = {}
    for name, sampler in (("plain", plain), ("grouped", grouped)):
        batches = [sampler.next_batch() for _ in range(8)]  # one epoch
        served = sorted(len(x["input_ids"]) for b in batches for x in b)
        assert served == sorted(lengths), name  # every row exactly once per epoch
        padded[name] = sum(5 * max(len(x["input_ids"]) for x in b) for b in batches)
    assert padded["grouped"] < 0.8 * padded["plain"], padded
    # resuming in the middle of a sorted pool continues the same stream
    state = grouped.state_dict()
    expected = [grouped.next_batch() for _ in range(6)]
    again = MixtureSampler(examples, batch_size=5, seed=2, group=4)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(6)] == expected


@pytest.mark.parametrize("group", [1, 8])
def test_length_grouping_keeps_the_mixture_proportions(group):
    sizes = {"a": 600, "b": 300, "c": 100}
    examples = {t: [{"input_ids": [1] * (1 + i % 17), "label": 0, "task": t} for i in range(n)] for t, n in sizes.items()}
    sampler = MixtureSampler(examples, batch_size=20, sampling="proportional", seed=4, group=group)
    draws = [x["task"] for _ in range(240) for x in sampler.next_batch()]
    n = len(draws)
    for task, size in sizes.items():
        p = size / 1000
        assert abs(draws.count(task) / n - p) < 4 * math.sqrt(p * (1 - p) / n), (task, draws.count(task) / n)


class CountingTokenizer:
    """Delegates to a tokenizer and counts the calls that tokenise text."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_each_task_is_tokenised_once_per_split(registry):
    g = Graph()
    for name in ("sent", "pair", "score"):
        g.adapter(name, "lora", r=2, targets=["attn.q"])
    g.route({n: n for n in ("sent", "pair", "score")})
    composed = ac.compose(tiny_bert(), g, registry=registry)
    tasks = _tasks()
    heads = TaskHeads({k: t.spec for k, t in tasks.items()}, hidden=64)
    tok = CountingTokenizer(tiny_tokenizer(WORDS))
    # 3 epochs of the 120-row tasks, evaluated four times
    train(composed, heads, tasks, tok, TrainConfig(steps=40, batch_size=27, eval_every=10, progress=False))
    evaluate(composed, heads, tasks, tok)
    assert tok.calls == 2 * len(tasks)  # train and dev, once each


def test_length_percentile_truncates_only_the_longest_rows():
    spec = TaskSpec(name="t", text_fields=["sentence"], label_field="label", max_length=32)
    task = Task(spec, Dataset.from_dict(_varied(200)), None)
    tok = CountingTokenizer(tiny_tokenizer(WORDS))
    full = task.encode(tok, "train")
    cap = task.length_cap(tok, 60)
    lengths = sorted(len(x["input_ids"]) for x in full)
    assert cap == lengths[math.ceil(0.6 * 200) - 1] and cap < lengths[-1]
    short = task.encode(tok, "train", cap)
    assert tok.calls == 2  # the full encoding, then only the rows above the cap
    assert max(len(x["input_ids"]) for x in short) == cap
    for a, b in zip(full, short, strict=True):
        if len(a["input_ids"]) <= cap:
            assert a is b
        else:
            assert b["input_ids"][-1] == tok.sep_token_id and b["input_ids"][:-1] == a["input_ids"][: cap - 1]
    assert task.encode(tok, "train", cap) is short and tok.calls == 2  # cached
