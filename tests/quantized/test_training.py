"""Training on a quantised base (QLoRA): the k-bit preparation, gradients, a loss that falls.

Gradients are checked against the dense twin (full precision, weights = W_deq) trained
without activation checkpointing: the quantised model with checkpointing must give the same
adapter gradients, also through the frozen quantised layers and behind a route.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import prepare_model_for_kbit_training
from transformers import Trainer, TrainingArguments

import adapter_composer as ac
from adapter_composer import ComposerError
from adapter_composer.plugins.bnb import (
    cpu_repacked,
    prepare_kbit_training,
    restore_trainable_layout,
    trainer_accepts,
)
from adapter_composer.sites import linear_weight
from tests.models import VOCAB, randomize
from tests.quantized.bases import dense_twin, load_kbit, quantized_layers

ALL_LINEAR = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


def _batch(seed: int = 0, rows: int = 4, length: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _routed_graph() -> ac.Graph:
    g = ac.Graph()
    g.adapter("x", "lora", r=4, alpha=8, targets=ALL_LINEAR)
    g.adapter("y", "lora", r=4, alpha=8, dora=True, targets=["attn.q", "attn.v"])
    g.route({"x": "x", "y": "y"}, name="tasks")
    return g


def _grads(composed) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": p.grad.clone()
        for n, h in composed.adapters.items()
        for k, p in h.modules.items()
        for k, p in [(f"{k}.{pn}", pp) for pn, pp in p.named_parameters()]
    }


def test_prepare_matches_peft(kbit_dir):
    ours = prepare_kbit_training(load_kbit(kbit_dir, 4, dtype=torch.bfloat16, repack=True))
    theirs = prepare_model_for_kbit_training(load_kbit(kbit_dir, 4, dtype=torch.bfloat16, repack=True))
    described = [
        {n: (p.dtype, p.requires_grad) for n, p in m.named_parameters()} for m in (ours, theirs)
    ]
    assert described[0] == described[1]
    assert described[0]["model.norm.weight"] == (torch.float32, False)  # upcast, frozen
    assert described[0]["model.layers.0.self_attn.q_proj.weight"][0] == torch.uint8  # codes untouched
    for m in (ours, theirs):
        assert m.is_gradient_checkpointing
        assert m.get_input_embeddings()(torch.tensor([[3]])).requires_grad  # input grads
    # and on CPU, bitsandbytes' inference repacking stays off, so the layout stays trainable
    assert not any(m.support_avx512bf16_for_cpu for m in quantized_layers(ours).values())


def test_gradients_with_checkpointing_equal_the_dense_twin_behind_a_route(kbit_dir):
    model = prepare_kbit_training(load_kbit(kbit_dir, 4))
    twin = dense_twin(model)
    composed = ac.compose(model.train(), _routed_graph())
    randomize(composed, std=0.05)
    reference = ac.compose(twin.train(), _routed_graph())
    reference.replace_weights("x", composed.adapters["x"].state_dict())
    reference.replace_weights("y", composed.adapters["y"].state_dict())
    batch, route = _batch(), ["x", "y", None, "x"]
    loss = model(**batch, route=route).loss
    loss.backward()
    expected = twin(**batch, route=route).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    ours, theirs = _grads(composed), _grads(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 2 * 7 + 2 * 3 * 2
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6, msg=k)
    # layer 0's adapters get their gradient through the frozen 4-bit layers of layer 1
    assert ours["x.layers.0.attn.q.lora_A"].abs().sum() > 0


def test_a_few_steps_on_a_4bit_base_lower_the_loss(kbit_dir):
    model = prepare_kbit_training(load_kbit(kbit_dir, 4))
    g = ac.Graph()
    g.adapter("a", "lora", r=8, alpha=16, targets=ALL_LINEAR)
    composed = ac.compose(model, g)
    opt = torch.optim.AdamW(composed.param_groups(lr=1e-2))
    batch = _batch(rows=8)
    composed.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"4-bit QLoRA loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] - 0.05
    assert all(p.dtype == torch.uint8 for p in model.parameters() if type(p).__name__ == "Params4bit")


def test_hf_trainer_trains_a_composed_4bit_model(kbit_dir, tmp_path):
    model = prepare_kbit_training(load_kbit(kbit_dir, 4))
    with pytest.raises(ComposerError, match="no trainable adapters"), trainer_accepts(model):
        pass
    g = ac.Graph()
    g.adapter("a", "lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    composed = ac.compose(model, g)
    rows = _batch(rows=8)["input_ids"]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=data)
    with trainer_accepts(model):
        trainer = Trainer(model=model, args=args, train_dataset=data)
    assert "_hf_peft_config_loaded" not in vars(model) and not model._hf_peft_config_loaded
    trainer.train()
    assert composed.adapters["a"].state_dict()["layers.0.attn.q.lora_B"].abs().sum() > 0


# --- bitsandbytes' CPU repacking (AVX512-BF16 machines) --------------------------------


def _repack(layer) -> None:
    """What bitsandbytes does to a 4-bit layer on its first CPU inference call when the CPU has
    AVX512-BF16 (done by hand here, so the test runs the same on every machine)."""
    import bitsandbytes.functional as bnbf

    data, state = bnbf._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = data, state


def _bf16_absmax_reference(layer) -> torch.Tensor:
    """W_deq with each block's absmax rounded to bfloat16, from the standard layout."""
    import bitsandbytes.functional as bnbf

    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    rounded = bnbf.QuantState(
        absmax=absmax.to(torch.bfloat16).float(), shape=state.shape, code=state.code,
        blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
    )
    return bnbf.dequantize_4bit(layer.weight.data, rounded)


@pytest.mark.parametrize("double", [False, True])
def test_a_repacked_weight_dequantizes_to_the_same_values(kbit_dir, double):
    model = load_kbit(kbit_dir, 4, double=double)
    layers = quantized_layers(model)
    expected = {n: _bf16_absmax_reference(m) for n, m in layers.items()}
    for layer in layers.values():
        _repack(layer)
        assert cpu_repacked(layer)
    for n, layer in layers.items():
        torch.testing.assert_close(linear_weight(layer), expected[n], rtol=0, atol=0, msg=n)
    for n, layer in layers.items():
        assert restore_trainable_layout(layer) and not cpu_repacked(layer)
        torch.testing.assert_close(linear_weight(layer), expected[n], rtol=0, atol=0, msg=n)
        x = torch.randn(2, layer.in_features, requires_grad=True)
        y = layer(x)
        torch.testing.assert_close(y, F.linear(x, expected[n]), rtol=0, atol=1e-6)
        y.sum().backward()
        torch.testing.assert_close(x.grad, expected[n].sum(0).expand(2, -1), rtol=0, atol=1e-5)


def test_a_site_over_a_repacked_weight_refuses_to_lose_input_gradients(kbit_dir):
    model = load_kbit(kbit_dir, 4).train()
    g = ac.Graph()
    g.adapter("a", "lora", r=4, targets=["attn.q"])
    composed = ac.compose(model, g)
    site = composed.sites()[("model.layers.1.self_attn.q_proj", "linear")]
    _repack(site.base)
    x = torch.randn(1, 3, 64, requires_grad=True)
    with pytest.raises(ComposerError, match="prepare_kbit_training"):
        site(x)
    prepared = copy.copy(model)  # the same modules: prepare works on the composed model too
    prepare_kbit_training(prepared, gradient_checkpointing=False)
    assert not cpu_repacked(site.base)
    site(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
