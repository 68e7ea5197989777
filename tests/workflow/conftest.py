"""A tiny experiment on disk: a BERT built from a config, a word-level tokenizer, and three
small tasks in a header TSV, a header-less TSV with string labels, and a JSON regression."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.models import tiny_tokenizer

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "plot", "was", "a", "very"]


def _rows(n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    out: dict[str, list] = {"sent": [], "pair": [], "score": []}
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(WORDS[:3] if label else WORDS[3:6])
        text = " ".join([*rng.sample(WORDS[6:], 3), word])
        out["sent"].append((text, label))
        same = rng.randint(0, 1)
        other = word if same else rng.choice(WORDS[:6])
        out["pair"].append((f"the {word}", f"a {other}", "same" if same else "different"))
        stars = sum(w in WORDS[:3] for w in text.split()) * 2.5
        out["score"].append({"text": text, "stars": stars})
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread (and do not fight the other
    jobs on a small machine); the setting is restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("experiment")
    tok = tiny_tokenizer(WORDS)
    tok.save_pretrained(root / "tokenizer")
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "model")
    data = root / "data"
    data.mkdir()
    for split, n, seed in (("train", 24, 0), ("dev", 12, 1)):
        rows = _rows(n, seed)
        (data / f"sent_{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{a}\t{b}\n" for a, b in rows["sent"]))
        (data / f"pair_{split}.tsv").write_text("".join(f"{i}\t{a}\t{b}\t{c}\n" for i, (a, b, c) in enumerate(rows["pair"])))
        (data / f"score_{split}.json").write_text(json.dumps(rows["score"]))
    return root


def tiny_spec(root: Path, **overrides) -> dict:
    lora = {"r": 2, "alpha": 4, "targets": ["attn.q", "attn.v"]}
    spec = {
        "name": "tiny",
        "model": {"path": str(root / "model"), "tokenizer": str(root / "tokenizer")},
        "data_dir": str(root / "data"),
        "tasks": {
            "sent": {"train": "sent_train.tsv", "dev": "sent_dev.tsv", "text_fields": ["sentence"], "label_field": "label",
                     "metric": "accuracy", "max_length": 16},
            "pair": {"train": "pair_train.tsv", "dev": "pair_dev.tsv", "header": False, "columns": ["id", "a", "b", "relation"],
                     "text_fields": ["a", "b"], "label_field": "relation", "label_map": {"different": 0, "same": 1},
                     "metric": "f1", "max_length": 16},
            "score": {"train": "score_train.json", "dev": "score_dev.json", "text_fields": ["text"], "label_field": "stars",
                      "kind": "regression", "metric": "pearson", "max_length": 16},
        },
        "setups": {
            "lora": {"method": "lora", "adapter": lora, "label": "lora (per task)"},
            "route": {"operator": "route", "init_from": "lora", "steps": 4},
            "mix": {"operator": "mix", "init_from": "lora", "options": {"train_experts": False}, "steps": 4},
            "sum": {"operator": "sum", "init_from": "lora", "options": {"weights": "uniform"}, "steps": 0},
            "arrow_heldout": {"operator": "arrow", "init_from": "lora", "options": {"top_k": 1}, "tasks": ["sent", "pair"],
                              "train_on": ["score"], "train_adapters": False, "steps": 4},
        },
        "seeds": [0, 1],
        "budget": {"steps": 4, "batch_size": 4, "lr": {"default": 1e-2, "ia3": 3e-2}, "train": {"checkpoint_every": 2}},
        "plots": True,
    }
    spec.update(overrides)
    return spec
