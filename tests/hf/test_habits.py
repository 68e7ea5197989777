"""What PEFT users reach for by habit: print_trainable_parameters, disable_adapter,
save_pretrained/from_pretrained, and a clear refusal of a PeftModel."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

import adapter_composer as ac
from adapter_composer import ComposerError, CompositionError, Graph
from tests.hf.helpers import tiny_bert_classifier
from tests.models import inputs, output, randomize, tiny_llama, tiny_llama_scaled


def test_print_trainable_parameters_matches_peft(registry, capsys):
    peft_model = get_peft_model(tiny_bert_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    peft_model.print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    g = Graph()
    g.adapter("task", "lora", r=4, targets=["attn.q", "attn.v"])
    g.adapter("head", "module")  # PEFT's SEQ_CLS trains a copy of the classifier too
    composed = ac.compose(tiny_bert_classifier(), g, registry=registry)
    composed.print_trainable_parameters()
    ours = capsys.readouterr().out.strip()
    assert ours == theirs  # "trainable params: 1,154 || all params: 80,902 || trainable%: ..."
    assert ours.startswith("trainable params: ") and "|| all params: " in ours


def _disable_case(registry, method_config):
    model = tiny_llama_scaled()
    g = Graph()
    g.adapter("a", **method_config)
    composed = ac.compose(model, g, registry=registry)
    randomize(composed, std=0.3)
    return model, composed


@pytest.mark.parametrize(
    "method_config",
    [
        {"method": "lora", "r": 4, "targets": ["attn.q", "mlp.down"]},
        {"method": "bottleneck", "targets": ["mlp"], "bottleneck": 8},
        {"method": "prompt_tuning", "num_virtual_tokens": 3},
        {"method": "module", "targets": ["lm_head"]},
    ],
    ids=lambda c: c["method"],
)
def test_disable_adapter_runs_the_base_model(registry, method_config):
    batch = inputs()
    base = output(tiny_llama_scaled(), batch)
    model, composed = _disable_case(registry, method_config)
    adapted = output(model, batch)
    assert not torch.allclose(adapted[:, -base.shape[1] :], base)
    with composed.disable_adapter():
        assert torch.equal(output(model, batch), base)
    assert torch.equal(output(model, batch), adapted)  # nothing was undone


def test_disable_adapter_is_per_thread(registry):
    model, composed = _disable_case(registry, {"method": "lora", "r": 4, "targets": ["attn.q", "attn.v"]})
    batch = inputs()
    base, adapted = output(tiny_llama_scaled(), batch), output(model, batch)
    barrier = threading.Barrier(2)
    results: dict[str, list[bool]] = {"off": [], "on": []}

    def run(disabled: bool) -> None:
        barrier.wait()
        for _ in range(6):
            if disabled:
                with composed.disable_adapter():
                    results["off"].append(torch.equal(output(model, batch), base))
            else:
                results["on"].append(torch.equal(output(model, batch), adapted))

    threads = [threading.Thread(target=run, args=(flag,)) for flag in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["off"] == [True] * 6 and results["on"] == [True] * 6


def test_disable_adapter_refuses_a_merged_composition(registry):
    model, composed = _disable_case(registry, {"method": "lora", "r": 4, "targets": ["attn.q"]})
    composed.merge()
    with pytest.raises(ComposerError, match="unmerge"), composed.disable_adapter():
        pass
    composed.unmerge()
    other = tiny_llama()
    g = Graph()
    g.adapter("b", "lora", r=4, targets=["attn.q"])
    second = ac.compose(other, g, registry=registry)
    randomize(second)
    batch = inputs()
    before = output(other, batch)
    with composed.disable_adapter():  # switches off this composition only
        assert torch.equal(output(other, batch), before)


def test_save_pretrained_and_from_pretrained_spellings(registry, tmp_path):
    model, composed = _disable_case(registry, {"method": "lora", "r": 4, "targets": ["attn.q"]})
    batch = inputs()
    composed.save_pretrained(tmp_path / "c")  # = composed.save: the composition only
    assert (tmp_path / "c" / "composition.json").is_file() and not (tmp_path / "c" / "config.json").exists()
    fresh = tiny_llama_scaled()
    ac.from_pretrained(fresh, tmp_path / "c", registry=registry)  # = ac.load(fresh, dir)
    assert torch.equal(output(fresh, batch), output(model, batch))


def test_composing_onto_a_peft_model_says_to_unwrap_it(registry):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    g = Graph()
    g.adapter("a", "lora", r=4, targets=["attn.v"])
    for wrapped in (peft_model, peft_model.base_model.model):  # the wrapper, and a model holding its layers
        with pytest.raises(CompositionError) as err:
            ac.compose(wrapped, g, registry=registry)
        assert err.value.codes == ["peft-model"]
        assert "merge_and_unload" in str(err.value) and "unload()" in str(err.value)
    plain = peft_model.merge_and_unload()
    ac.compose(plain, g, registry=registry)  # unwrapped, it composes
