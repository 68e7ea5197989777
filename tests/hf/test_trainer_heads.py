"""BertForSequenceClassification with the HF Trainer: adapters plus a trainable head learn,
and the head is saved with them (through Trainer.save_model and through PEFT's format)."""

from __future__ import annotations

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoModelForSequenceClassification, Trainer

import adapter_composer as ac
from adapter_composer import Graph
from tests.hf.helpers import (
    batch_of,
    classification_data,
    losses,
    tiny_bert_classifier,
    training_args,
)

METHODS = {
    "lora": {"r": 4, "alpha": 8, "targets": ["attn.q", "attn.v"]},
    "ia3": {"targets": ["attn.k", "attn.v", "mlp.down"]},
}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", sorted(METHODS))
def test_adapters_and_head_learn_and_the_head_is_saved(registry, tmp_path, method):
    tiny_bert_classifier().save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    g = Graph()
    g.adapter("task", method, **METHODS[method])
    g.adapter("head", "module")  # the classifier, trainable (PEFT's SEQ_CLS modules_to_save)
    composed = ac.compose(model, g, registry=registry)
    base_head = model.classifier.weight.detach().clone()
    data = classification_data()
    trainer = Trainer(model=model, args=training_args(tmp_path / "run"), train_dataset=data)
    trainer.train()
    curve = losses(trainer)
    first, last = sum(curve[:4]) / 4, sum(curve[-4:]) / 4
    assert last < 0.85 * first, f"{method}: loss {first:.3f} → {last:.3f}"
    trained_head = composed.adapters["head"].modules["module.classifier"].weight
    assert not torch.equal(trained_head, base_head) and torch.equal(model.classifier.weight, base_head)

    model.eval()
    batch = batch_of(data)
    expected = _logits(model, batch)
    trainer.save_model(tmp_path / "final")
    again = ac.from_pretrained(AutoModelForSequenceClassification, tmp_path / "final", registry=registry)
    assert torch.equal(_logits(again.model.eval(), batch), expected)

    composed.to_peft("task", tmp_path / "peft")  # the head goes along as modules_to_save
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(peft_model, batch), expected, rtol=0, atol=1e-6)
