"""What the bad-input battery starts from: a real saved composition and a real PEFT directory
(written by HF PEFT), the outputs they give, and a check that a model was left untouched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import adapter_composer as ac
from tests.models import inputs, output, randomize, same_state, state_copy, tiny_llama


@dataclass
class Source:
    path: Path
    reference: torch.Tensor  # outputs of tiny_llama() with the adapters applied
    batch: dict


def saved_composition(root: Path, registry) -> Source:
    """Two LoRAs (one DoRA, rsLoRA) under a learnable sum, saved."""
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("sst2", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.adapter("mrpc", "lora", r=2, alpha=4, dora=True, rslora=True, targets=["mlp.down"], layers=[1])
    g.sum("sst2", "mrpc", weights=[0.5, 2.0], learnable=True)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    batch = inputs()
    path = composed.save(root / "saved")
    return Source(path, output(model, batch), batch)


def peft_lora(root: Path, **config) -> Source:
    """A LoRA written by HF PEFT for tiny_llama (random A and B)."""
    from peft import LoraConfig, get_peft_model

    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **config}
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(**cfg))
    batch = inputs()
    reference = output(peft_model, batch)
    path = root / "peft"
    peft_model.save_pretrained(path)
    return Source(path, reference, batch)


def manifest(path: Path) -> dict:
    return json.loads((path / "composition.json").read_text())


def weights_file(path: Path, adapter: str) -> Path:
    return path / manifest(path)["adapters"][adapter]["file"]


class Untouched:
    """``with Untouched(model):`` fails unless the model's state and modules are unchanged."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.state = state_copy(self.model)
        self.modules = dict(self.model.named_modules())
        return self

    def __exit__(self, *exc):
        assert same_state(self.model, self.state), "the model's weights changed"
        assert dict(self.model.named_modules()) == self.modules, "the model's modules changed"
        assert not any(getattr(m, "is_composer_site", False) for m in self.model.modules())
        return False
