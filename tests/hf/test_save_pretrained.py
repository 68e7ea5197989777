"""HF save paths of a composed model: save_pretrained, Trainer.save_model, resume_from_checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer

import adapter_composer as ac
from adapter_composer import ComposerError, Graph
from tests.hf.helpers import batch_of, classification_data, tiny_bert_classifier, training_args
from tests.models import inputs, output, randomize, tiny_gpt2, tiny_llama


def _bert_composed(registry, seed: int = 0):
    model = tiny_bert_classifier(seed)
    g = Graph()
    g.adapter("lora", "lora", r=4, alpha=8, targets=["attn.q", "attn.v", "attn.o"])
    g.adapter("bn", "bottleneck", targets=["attn"], bottleneck=8)  # wraps the attn.o site: two wrappers
    g.adapter("head", "module")
    composed = ac.compose(model, g, registry=registry)
    return model, composed


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_save_pretrained_writes_base_names_and_reloads_identically(registry, tmp_path):
    model, composed = _bert_composed(registry)
    base = {k: v.clone() for k, v in tiny_bert_classifier().state_dict().items()}
    randomize(composed, std=0.3)
    batch = inputs(batch=3)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "d")
    saved = load_file(str(tmp_path / "d" / "model.safetensors"))
    for name, value in base.items():  # every base weight under its own name, unchanged
        assert torch.equal(saved[name], value), name
    extra = set(saved) - set(base)
    assert extra == {k for k in model.state_dict() if ".program." in k}  # the composition's tensors, live names
    assert (tmp_path / "d" / "adapter_composer" / "composition.json").is_file()

    plain, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "d", output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == extra  # loud, not silent
    torch.testing.assert_close(_logits(plain.eval(), batch), _logits(tiny_bert_classifier(), batch), rtol=0, atol=0)

    again = ac.from_pretrained(AutoModelForSequenceClassification, tmp_path / "d", registry=registry)
    assert torch.equal(_logits(again.model.eval(), batch), expected)
    fresh = tiny_bert_classifier()
    ac.load(fresh, tmp_path / "d", registry=registry)  # the HF directory works for ac.load too
    assert torch.equal(_logits(fresh, batch), expected)


def test_causal_lms_with_tied_and_untied_heads(registry, tmp_path):
    for name, build in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        model = build()
        g = Graph()
        g.adapter("a", "lora", r=4, targets=["attn.qkv" if name == "gpt2" else "attn.q", "mlp.down"])
        composed = ac.compose(model, g, registry=registry)
        randomize(composed)
        batch = inputs()
        model.save_pretrained(tmp_path / name)
        again = ac.from_pretrained(AutoModelForCausalLM, tmp_path / name, registry=registry)
        assert torch.equal(output(again.model.eval(), batch), output(model, batch)), name


def test_trainer_save_model_reloads_identically(registry, tmp_path):
    model, composed = _bert_composed(registry)
    data = classification_data(n=32)
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", max_steps=4), train_dataset=data)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    model.eval()
    batch = batch_of(data)
    again = ac.from_pretrained(AutoModelForSequenceClassification, tmp_path / "final", registry=registry)
    assert torch.equal(_logits(again.model.eval(), batch), _logits(model, batch))


def _resume_setup(registry, seed: int = 0):
    model = tiny_bert_classifier(seed)
    g = Graph()
    g.adapter("lora", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    g.adapter("head", "module")
    g.sum("lora", name="scaled", weights=[1.0], learnable=True)  # operator weights travel too
    return model, ac.compose(model, g, registry=registry)


def _trained_state(composed):
    return {k: v.detach().clone() for k, v in composed.model.state_dict().items() if ".program." in k or k.startswith("adapter_composer.")}


def test_resume_from_checkpoint_reaches_the_uninterrupted_weights(registry, tmp_path):
    data = classification_data(n=48)
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    model, composed = _resume_setup(registry)
    trainer = Trainer(model=model, args=training_args(tmp_path / "a", **args), train_dataset=data)
    trainer.train()
    uninterrupted = _trained_state(composed)
    assert (tmp_path / "a" / "checkpoint-3" / "adapter_composer" / "composition.json").is_file()

    # another base and other adapter values: the checkpoint must restore all of them
    model_b, composed_b = _resume_setup(registry, seed=1)
    randomize(composed_b, std=1.0, seed=9)
    trainer_b = Trainer(model=model_b, args=training_args(tmp_path / "b", **args), train_dataset=data)
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    resumed = _trained_state(composed_b)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 4
    for k in resumed:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=1e-6, msg=k)
    batch = batch_of(data)
    torch.testing.assert_close(_logits(model_b.eval(), batch), _logits(model.eval(), batch), rtol=0, atol=1e-6)


def test_loading_a_base_state_dict_into_the_composed_model(registry):
    model, composed = _bert_composed(registry)
    other = tiny_bert_classifier(seed=3).state_dict()
    result = model.load_state_dict(other, strict=False)
    assert not result.unexpected_keys and all(".program." in k for k in result.missing_keys)
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.base.weight, other["bert.encoder.layer.0.attention.self.query.weight"])
    with pytest.raises(RuntimeError, match="program"):
        model.load_state_dict(other)  # strict: the adapters are missing, and torch says which


def test_what_cannot_be_saved_is_refused(registry, tmp_path):
    model, composed = _bert_composed(registry)
    g = Graph()
    g.adapter("lora", "lora", r=4, targets=["attn.q"])
    composed.undo()
    assert "save_pretrained" not in vars(model)  # undo puts the plain method back
    composed = ac.compose(model, g, registry=registry)
    composed.merge()
    with pytest.raises(ComposerError, match="unmerge"):
        model.save_pretrained(tmp_path / "merged")
    composed.unmerge()
    with pytest.raises(ComposerError, match="upload_folder"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    composed.save(tmp_path / "only-composition")
    with pytest.raises(ac.AdapterFileError, match="ac.load"):
        ac.from_pretrained(AutoModelForSequenceClassification, tmp_path / "only-composition")


def test_a_4bit_base_saves_under_its_own_names(registry, tmp_path):
    """transformers replaces a given state dict by the quantizer's own when saving a
    bitsandbytes model; the composed model's save still writes the original names."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from tests.models import DECODER

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**DECODER, "intermediate_size": 128})).save_pretrained(tmp_path / "base")
    q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q4).eval()
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.q", "attn.v"])
    composed = ac.compose(model, g, registry=registry)
    randomize(composed)
    model.save_pretrained(tmp_path / "d")
    saved = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in saved and "model.layers.0.self_attn.q_proj.weight.absmax" in saved
    assert not any(".base." in k for k in saved)
    batch = inputs()
    # (bitsandbytes' CPU backend repacks 4-bit weights when saving, for plain models too: compare after the save)
    expected = output(model, batch)
    again = ac.from_pretrained(AutoModelForCausalLM, tmp_path / "d", registry=registry)
    assert type(again.model.model.layers[0].self_attn.q_proj.base).__name__ == "Linear4bit"
    assert torch.equal(output(again.model.eval(), batch), expected)
