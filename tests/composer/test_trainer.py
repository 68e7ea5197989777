"""A composed model trains with the Hugging Face Trainer as it is."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import adapter_composer as ac
from adapter_composer import Graph
from tests.models import inputs, same_state, state_copy, tiny_llama


def _dataset(n: int = 32, length: int = 12, route: bool = False) -> Dataset:
    ids = inputs(batch=n, length=length, seed=4)["input_ids"]
    data = {"input_ids": ids.tolist(), "labels": ids.tolist()}
    if route:
        data["route"] = ["even" if i % 2 == 0 else "odd" for i in range(n)]
    return Dataset.from_dict(data)


def _args(tmp_path, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=2e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, **kw,
    )


def test_trainer_trains_only_the_adapters(registry, tmp_path):
    model = tiny_llama()
    base = state_copy(model)
    g = Graph()
    g.adapter("a", "lora", r=4, alpha=8, targets=["attn.q", "attn.v", "mlp.down"])
    composed = ac.compose(model, g, registry=registry)
    before = {k: v.clone() for k, v in composed.adapters["a"].state_dict().items()}
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    after = composed.adapters["a"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)
    composed.undo()
    assert same_state(model, base)


def test_trainer_with_routing_keys_in_the_batch(registry, tmp_path):
    model = tiny_llama()
    g = Graph()
    g.adapter("even", "lora", r=4, targets=["attn.q", "attn.v"])
    g.adapter("odd", "lora", r=4, targets=["attn.q", "attn.v"])
    g.route({"even": "even", "odd": "odd"})
    composed = ac.compose(model, g, registry=registry)

    def collate(rows):
        batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}
        batch["route"] = [r["route"] for r in rows]
        return batch

    trainer = Trainer(model=model, args=_args(tmp_path, remove_unused_columns=False), train_dataset=_dataset(route=True), data_collator=collate)
    trainer.train()
    for name in ("even", "odd"):
        assert any(m.lora_B.abs().sum() > 0 for m in composed.adapters[name].modules.values())
