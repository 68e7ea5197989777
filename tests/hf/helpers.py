"""Tiny sequence-classification models and data for the Hugging Face workflow tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from tests.models import VOCAB

BERT_CLS = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=96, max_position_embeddings=128, num_labels=2,
)


def tiny_bert_classifier(seed: int = 0, **overrides) -> BertForSequenceClassification:
    """A random BertForSequenceClassification (its classifier freshly initialised, as after
    from_pretrained on an encoder checkpoint), eval mode."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**BERT_CLS, **overrides})).eval()


def classification_data(n: int = 64, length: int = 8, seed: int = 5) -> Dataset:
    """Random token ids; the label is the class of the first token (one of two disjoint sets
    of eight ids), which a head over the frozen encoder's [CLS] output can learn quickly."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[:, 0] = 4 + labels * 8 + torch.randint(0, 8, (n,), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def batch_of(data: Dataset, rows: int = 8) -> dict[str, torch.Tensor]:
    part = data[:rows]
    return {k: torch.tensor(part[k]) for k in ("input_ids", "attention_mask")}


def training_args(out, **kw) -> TrainingArguments:
    options = dict(
        output_dir=str(out), max_steps=16, per_device_train_batch_size=16, learning_rate=5e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    options.update(kw)
    return TrainingArguments(**options)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
