"""Parity with HF PEFT for an architecture, both ways: our adapter exported and loaded by PEFT,
and PEFT's adapter (random weights) imported by ``ac.from_peft``; and the sites a target names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model

import adapter_composer as ac
from tests.models import randomize


def decoder_forward(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def ours_to_peft(build: Callable, method: str, config: dict, batch: dict, tmp: Path,
                 forward: Callable = decoder_forward, registry: Any = None) -> float:
    """max |Δ| between our composition and PEFT loading its export onto a fresh model."""
    model = build()
    g = ac.Graph()
    g.adapter("a", method, **config)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.2)
    ours = forward(model, batch)
    assert not torch.allclose(ours, forward(build(), batch), atol=1e-3)  # the adapter acts
    composed.to_peft("a", tmp / "export")
    theirs = PeftModel.from_pretrained(build(), tmp / "export").eval()
    return (forward(theirs, batch) - ours).abs().max().item()


def peft_to_ours(build: Callable, peft_config: Any, batch: dict, tmp: Path,
                 forward: Callable = decoder_forward, registry: Any = None) -> float:
    """max |Δ| between a PEFT adapter with random weights and ``ac.from_peft`` of its files."""
    theirs = get_peft_model(build(), peft_config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    reference = forward(theirs, batch)
    assert not torch.allclose(reference, forward(build(), batch), atol=1e-3)
    theirs.save_pretrained(tmp / "peft")
    model = build()
    ac.from_peft(model, tmp / "peft", name="task", registry=registry)
    return (forward(model, batch) - reference).abs().max().item()


def site_keys(build: Callable, targets: list[str], registry: Any = None, **config) -> dict[str, str]:
    """{site key: module path} of a LoRA on ``targets``, as resolution found them."""
    g = ac.Graph()
    g.adapter("a", "lora", r=2, targets=targets, **config)
    composed = ac.compose(build(), g, registry=registry)
    return {k: i.path for k, i in composed._rt.infos["a"].items()}
