"""PEFT's format both ways: the metadata PEFT writes, AutoPeftModel loading our exports,
modules_to_save and task types, layers_to_transform, each against HF PEFT itself."""

from __future__ import annotations

import json

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    IA3Config,
    LoraConfig,
    PeftModel,
    get_peft_model,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import adapter_composer as ac
from adapter_composer import AdapterFileError, ComposerError, Graph
from adapter_composer.formats.peft_options import peft_targets
from tests.hf.helpers import tiny_bert_classifier
from tests.models import inputs, randomize, tiny_llama

ATOL = 1e-6


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _base(tmp_path, build=tiny_bert_classifier, auto=AutoModelForSequenceClassification):
    """A base model saved to disk and loaded back (so it knows where it came from)."""
    build().save_pretrained(tmp_path / "base")
    return auto.from_pretrained(tmp_path / "base").eval()


def _config(directory):
    return json.loads((directory / "adapter_config.json").read_text())


def test_export_writes_peft_metadata_and_suffix_targets(registry, tmp_path):
    model = _base(tmp_path)
    g = Graph()
    g.adapter("task", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"], layers=[1])
    g.adapter("head", "module")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    composed.to_peft("task", tmp_path / "out", revision="v1")
    cfg = _config(tmp_path / "out")
    assert cfg["task_type"] == "SEQ_CLS" and cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base") and cfg["revision"] == "v1"
    assert cfg["peft_version"] == "0.21.2"
    assert cfg["target_modules"] == ["query", "value"]
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layer"
    assert cfg["modules_to_save"] == ["classifier"]
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(tensors)
    # PEFT's own matching rule selects exactly our sites from those suffixes
    names = [n for n, _ in tiny_bert_classifier().named_modules()]
    chosen = peft_targets(names, cfg["target_modules"], cfg["layers_to_transform"], cfg["layers_pattern"], cfg["modules_to_save"])
    assert chosen == {s.path for s in composed.plan.sites if s.family == "linear"}
    # and AutoPeftModel reads it: same logits
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    batch = inputs(batch=3)
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), rtol=0, atol=ATOL)


def test_auto_peft_causal_lm_loads_our_export(registry, tmp_path):
    model = _base(tmp_path, tiny_llama, AutoModelForCausalLM)
    g = Graph()
    g.adapter("a", "lora", r=4, alpha=8, rslora=True, targets=["attn.q", "attn.v", "mlp.down"])
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    composed.to_peft("a", tmp_path / "out")
    cfg = _config(tmp_path / "out")
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["layers_to_transform"] is None and cfg["modules_to_save"] is None
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    batch = inputs()
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), rtol=0, atol=ATOL)


def test_ia3_without_layers_field_falls_back_to_exact_longer_suffixes(registry, tmp_path):
    model = _base(tmp_path)
    g = Graph()
    g.adapter("a", "ia3", targets=["attn.k", "mlp.down"], layers=[1])
    g.adapter("head", "module")
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    composed.to_peft("a", tmp_path / "out")
    cfg = _config(tmp_path / "out")
    assert "layers_to_transform" not in cfg  # PEFT's IA3Config has no such field
    assert cfg["target_modules"] == ["1.attention.self.key", "layer.1.output.dense"]  # one suffix length for all
    assert cfg["feedforward_modules"] == ["layer.1.output.dense"]
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    batch = inputs()
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), rtol=0, atol=ATOL)


def _peft_seq_cls(tmp_path, config):
    """A PEFT model with random adapter weights and a changed head copy, saved; its logits."""
    base = _base(tmp_path)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    batch = inputs(batch=3)
    return _logits(peft_model.eval(), batch), batch


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["key"], layers_to_transform=[1], layers_pattern="layer"),
        IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    ],
    ids=["lora", "lora-layers", "ia3"],
)
def test_peft_seq_cls_adapters_import_with_their_head(registry, tmp_path, config):
    expected, batch = _peft_seq_cls(tmp_path, config)
    cfg = _config(tmp_path / "peft")
    assert cfg["modules_to_save"] == ["classifier", "score"]  # what PEFT writes for SEQ_CLS
    model = tiny_bert_classifier()
    composed = ac.from_peft(model, tmp_path / "peft", name="task", registry=registry)
    assert sorted(composed.adapters) == ["task", "task_modules"]
    assert [s.path for s in composed.plan.sites if s.family == "module"] == ["classifier"]
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=ATOL)
    # and back: our export of the import is read by PEFT with the same logits
    composed.to_peft("task", tmp_path / "again")
    reread = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "again").eval()
    torch.testing.assert_close(_logits(reread, batch), expected, rtol=0, atol=ATOL)


def test_task_type_heads_are_read_even_when_modules_to_save_is_null(registry, tmp_path):
    expected, batch = _peft_seq_cls(tmp_path, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    cfg = _config(tmp_path / "peft")
    cfg["modules_to_save"] = None  # PEFT adds classifier/score for SEQ_CLS by itself on load
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_bert_classifier()
    ac.from_peft(model, tmp_path / "peft", registry=registry)
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=ATOL)


def test_causal_lm_modules_to_save(registry, tmp_path):
    base = _base(tmp_path, tiny_llama, AutoModelForCausalLM)
    peft_model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    )
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    peft_model.save_pretrained(tmp_path / "peft")
    batch = inputs()
    expected = _logits(peft_model.eval(), batch)
    model = tiny_llama()
    ac.from_peft(model, tmp_path / "peft", name="lm", registry=registry)
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=ATOL)


def test_layers_to_transform_that_the_tensors_contradict_is_refused(registry, tmp_path):
    _peft_seq_cls(tmp_path, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["key"], layers_to_transform=[1], layers_pattern="layer"))
    cfg = _config(tmp_path / "peft")
    cfg["layers_to_transform"] = [0]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_bert_classifier()
    with pytest.raises(AdapterFileError, match="layer 1 is not in layers_to_transform"):
        ac.from_peft(model, tmp_path / "peft", registry=registry)
    assert not any(getattr(m, "is_composer_site", False) for m in model.modules())


def test_a_head_that_does_not_fit_is_refused(registry, tmp_path):
    _peft_seq_cls(tmp_path, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.classifier.weight"] = torch.zeros(5, 64)  # 5 labels, the model has 2
    save_file(tensors, str(path))
    model = tiny_bert_classifier()
    with pytest.raises(AdapterFileError, match="modules_to_save"):
        ac.from_peft(model, tmp_path / "peft", registry=registry)
    assert not any(getattr(m, "is_composer_site", False) for m in model.modules())
    del tensors["base_model.model.classifier.weight"], tensors["base_model.model.classifier.bias"]
    save_file(tensors, str(path))  # modules_to_save names the classifier, the file lost it
    with pytest.raises(AdapterFileError, match=r"modules_to_save names \['classifier'\].*incomplete"):
        ac.from_peft(model, tmp_path / "peft", registry=registry)


def test_which_heads_an_export_carries(registry, tmp_path):
    model = tiny_bert_classifier()
    g = Graph()
    for t in ("a", "b"):
        g.adapter(t, "lora", r=2, targets=["attn.q"])
        g.adapter(f"head_{t}", "module", targets=["classifier"])
        g.stack(t, f"head_{t}", name=f"task_{t}")
    g.route({"a": "task_a", "b": "task_b"})
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    composed.to_peft("a", tmp_path / "none")  # routed heads are not on every call: not by default
    assert _config(tmp_path / "none")["modules_to_save"] is None
    composed.to_peft("a", tmp_path / "a", modules=["head_a"])
    batch = inputs(batch=2)
    with torch.no_grad():
        expected = model(**batch, route=["a", "a"]).logits
    reread = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(reread, batch), expected, rtol=0, atol=ATOL)
    with pytest.raises(ComposerError, match="modules_to_save of another adapter"):
        composed.to_peft("head_a", tmp_path / "x")
    with pytest.raises(ComposerError, match="not 'module' adapters"):
        composed.to_peft("a", tmp_path / "y", modules=["b"])
    with pytest.raises(ComposerError, match="no adapter"):
        composed.to_peft("nope", tmp_path / "z")


def test_hot_swap_refuses_a_peft_adapter_with_heads(registry, tmp_path):
    _peft_seq_cls(tmp_path, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    model = tiny_bert_classifier()
    g = Graph()
    g.adapter("t0", "lora", r=4, targets=["attn.q"])
    g.route({"t0": "t0"}, name="tasks")
    composed = ac.compose(model, g, registry=registry)
    with pytest.raises(ComposerError, match="modules_to_save"):
        composed.load_adapter(tmp_path / "peft", name="t1", route="tasks", key="t1")
