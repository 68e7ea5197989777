"""A multi-task experiment from declaration to results table, in a minute on a CPU.

Three toy tasks (sentiment, a sentence-pair task with string labels, a regression) on a
small BERT built offline, compared in three setups: one LoRA per task trained alone, the
same LoRAs behind a route trained jointly on the task mixture, and a learned mix of the
single-task LoRAs. The README walks through this file; examples/glue/spec.json (run with
``adapter-composer experiment run``) is the same recipe on real GLUE data with a
pretrained encoder.

    python examples/multitask_walkthrough.py [--out results/walkthrough]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

import adapter_composer as ac
from adapter_composer.workflow.heads import TaskHeads
from adapter_composer.workflow.tasks import Task, TaskSpec, check_tasks
from adapter_composer.workflow.training import TrainConfig, train

ROLES = ["attn.q", "attn.v", "mlp.up"]
FILLER = ["the", "movie", "plot", "film", "a", "very", "was", "it"]


# --- 1. data: three tasks as datasets.Dataset objects ----------------------------------


def make_data(n: int, seed: int) -> dict[str, dict[str, list]]:
    rng = random.Random(seed)
    sent, pair, score = {"sentence": [], "label": []}, {"first": [], "second": [], "relation": []}, {"text": [], "stars": []}
    for _ in range(n):
        words = rng.sample(FILLER, 4)
        good = rng.random() < 0.5
        words.insert(rng.randrange(5), "great" if good else "awful")
        sent["sentence"].append(" ".join(words))
        sent["label"].append(int(good) if rng.random() > 0.1 else int(not good))  # 10% label noise
        same = rng.random() < 0.5
        a = rng.choice(FILLER)
        pair["first"].append(f"{a} was fine")
        pair["second"].append(f"{'agree' if same else 'disagree'} {rng.choice(FILLER)}")
        pair["relation"].append("agree" if same == (rng.random() > 0.1) else "disagree")
        k = rng.randrange(5)
        score["text"].append(" ".join(["great"] * k + ["film"] * (4 - k)))
        score["stars"].append(k + rng.gauss(0, 0.7))
    return {"sentiment": sent, "relation": pair, "stars": score}


def tokenizer() -> PreTrainedTokenizerFast:
    words = FILLER + ["great", "awful", "fine", "agree", "disagree"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def encoder() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return BertModel(cfg, add_pooling_layer=False).eval()


# --- 2. tasks: what to read, how to score it --------------------------------------------

SPECS = {
    "sentiment": TaskSpec(name="sentiment", text_fields=["sentence"], label_field="label", metric="accuracy"),
    "relation": TaskSpec(name="relation", text_fields=["first", "second"], label_field="relation", metric="f1",
                         label_map={"disagree": 0, "agree": 1}),
    "stars": TaskSpec(name="stars", text_fields=["text"], label_field="stars", kind="regression", num_labels=1, metric="spearman"),
}


def tasks() -> dict[str, Task]:
    train_data, dev_data = make_data(400, 0), make_data(150, 1)
    return {k: Task(SPECS[k], Dataset.from_dict(train_data[k]), Dataset.from_dict(dev_data[k])) for k in SPECS}


# --- 3. setups: graphs over the same encoder ---------------------------------------------


def run(setup: str, data: dict[str, Task], tok, steps: int, singles: dict | None = None) -> tuple[dict, int, dict]:
    model = encoder()
    g = ac.Graph()
    for name in data:
        g.adapter(name, "lora", r=4, alpha=8, targets=ROLES)
    if setup == "route":
        g.route({name: name for name in data})          # row i uses the LoRA of its task
    elif setup == "mix":
        g.mix(*data, train_experts=False)                # a learned gate over frozen task LoRAs
    composed = ac.compose(model, g)
    heads = TaskHeads({k: t.spec for k, t in data.items()}, hidden=64, dropout=0.0)
    config = TrainConfig(steps=steps, batch_size=32, lr=5e-3, head_lr=1e-2, progress=False, seed=0)
    if setup == "single":  # each task's LoRA trained alone (only its own adapter sees data)
        scores = {}
        for name in data:
            one = ac.Graph()
            one.adapter(name, "lora", r=4, alpha=8, targets=ROLES)
            alone = ac.compose(encoder(), one)
            head = TaskHeads({name: data[name].spec}, hidden=64, dropout=0.0)
            scores[name] = train(alone, head, {name: data[name]}, tok, config).final[name]
            composed.replace_weights(name, alone.adapters[name].state_dict())
            heads.heads[name].load_state_dict(head.heads[name].state_dict())
        states = {n: composed.adapters[n].state_dict() for n in data}
        return scores, composed.trainable_parameters().trainable, {"adapters": states, "heads": heads.state_dict()}
    if singles is not None:  # start from the single-task LoRAs and heads
        for name, state in singles["adapters"].items():
            composed.replace_weights(name, state)
        heads.load_state_dict(singles["heads"])
    result = train(composed, heads, data, tok, TrainConfig(**{**config.__dict__, "steps": steps * len(data) // (3 if setup == "mix" else 1)}))
    return result.final, composed.trainable_parameters().trainable, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per task")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data, tok = tasks(), tokenizer()
    check_tasks(data)  # every data problem is reported before any training
    results = {}
    scores, params, singles = run("single", data, tok, args.steps)
    results["lora per task"] = {"scores": scores, "params": params}
    for setup in ("route", "mix"):
        scores, params, _ = run(setup, data, tok, args.steps, singles if setup == "mix" else None)
        results[f"lora {setup}"] = {"scores": scores, "params": params}
    names = list(data)
    print(f"| setup | trainable params | {' | '.join(names)} |")
    print("|---|---:|" + "---:|" * len(names))
    for setup, r in results.items():
        print(f"| {setup} | {r['params']:,} | " + " | ".join(f"{100 * r['scores'][n]:.1f}" for n in names) + " |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
