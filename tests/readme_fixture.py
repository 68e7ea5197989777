"""The names README.md's Python snippets may use, built offline and tiny (tests/test_readme.py).

Every ```python block of the README runs in a fresh namespace holding these names, in a fresh
temporary working directory (relative paths such as ``runs/sst2`` land there). A block whose
fence is preceded by the line ``<!-- readme-test: continue -->`` continues the previous
block's namespace instead.

    model, other_model, fresh_model   tiny random Llamas (4 layers, 128 wide), the same weights
    model_dir                         that Llama written with save_pretrained (from_pretrained works)
    batch                             4 rows × 12 tokens: input_ids, attention_mask
    prompts                           2 rows × 5 tokens, for generate()
    peft_dir                          a LoRA (r=4 on q_proj, v_proj) written by HF PEFT for that Llama
    encoder, tokenizer                a tiny BERT encoder and a word-level tokenizer for it
    data_dir                          GLUE-style TSVs: data_dir/MRPC/{train,dev}.tsv, data_dir/SST-2/...
    classifier_dir                    a tiny BertForSequenceClassification (2 labels) written with save_pretrained
    train_data                        a datasets.Dataset for it: input_ids, attention_mask, labels (64 rows)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from tests.hf.helpers import classification_data, tiny_bert_classifier
from tests.models import tiny_tokenizer

WORDS = ["the", "a", "film", "movie", "good", "bad", "great", "awful", "plot", "actor", "said", "company", "shares", "rose", "fell", "today"]
LLAMA = dict(
    vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def _tsv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")


def _glue(root: Path) -> None:
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))

    for split, n in (("train", 48), ("dev", 16)):
        _tsv(root / "SST-2" / f"{split}.tsv", ["sentence", "label"], [[sentence(), rng.randint(0, 1)] for _ in range(n)])
        _tsv(
            root / "MRPC" / f"{split}.tsv",
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            [[rng.randint(0, 1), i, i + 1, sentence(), sentence()] for i in range(n)],
        )


def _peft_lora(model_dir: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out)


def namespace(root: Path) -> dict[str, Any]:
    """Build the snippet namespace under ``root`` (a temporary directory)."""
    model_dir = root / "fixture" / "tiny-llama"
    llama().save_pretrained(model_dir)
    peft_dir = root / "fixture" / "peft-lora"
    _peft_lora(model_dir, peft_dir)
    data_dir = root / "fixture" / "glue"
    _glue(data_dir)
    classifier_dir = root / "fixture" / "tiny-bert-classifier"
    tiny_bert_classifier().save_pretrained(classifier_dir)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (4, 12), generator=g)
    prompt_ids = torch.randint(2, 128, (2, 5), generator=g)
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(vocab_size=len(WORDS) + 4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=96, max_position_embeddings=64),
        add_pooling_layer=False,
    ).eval()
    return {
        "model": llama(),
        "other_model": llama(),
        "fresh_model": llama(),
        "model_dir": str(model_dir),
        "batch": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        "prompts": {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)},
        "peft_dir": str(peft_dir),
        "encoder": encoder,
        "tokenizer": tiny_tokenizer(WORDS),
        "data_dir": str(data_dir),
        "classifier_dir": str(classifier_dir),
        "train_data": classification_data(),
    }
