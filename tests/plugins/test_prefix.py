"""Prefix tuning: keys = [P_K; K], values = [P_V; V] in every layer, with the KV-head geometry
(GQA); parity with HF PEFT (direct and projected, both directions), dropping the projection
for inference, generate() with the KV cache, stacks, training, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import DynamicCache

import adapter_composer as ac
from adapter_composer import AdapterFileError, CompositionError, Graph
from adapter_composer.plugins.prefix import freeze_projection
from tests.models import BUILDERS, inputs, output, randomize, same_state, state_copy
from tests.plugins.test_prompt import check_generate_uses_cache, train_steps

TOL = 1e-5
SEED = 4321


def _compose(model, registry, **config):
    g = Graph()
    g.adapter("a", "prefix_tuning", **config)
    return ac.compose(model, g, registry=registry)


def _module(composed, name: str = "a"):
    return composed.adapters[name].modules["model"]


def _kv_geometry(model) -> tuple[int, int, int]:
    """(L, H_kv, head_dim) from the model's config."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    width = getattr(cfg, "hidden_size", None) or cfg.n_embd
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return layers, kv, width // heads


# --- the formula ----------------------------------------------------------------------------


@torch.no_grad()
def _reference(model, values: torch.Tensor, batch: dict) -> torch.Tensor:
    """The plain model with P as its past: layer l's cache holds keys P[:, l, 0] and values
    P[:, l, 1] ([n, H_kv, hd] each), and the mask has n leading ones."""
    ids = batch["input_ids"]
    b, n = ids.shape[0], values.shape[0]
    cache = DynamicCache(config=model.config)
    for layer in range(values.shape[1]):
        k = values[:, layer, 0].transpose(0, 1).expand(b, -1, -1, -1)  # [B, H_kv, n, hd]
        v = values[:, layer, 1].transpose(0, 1).expand(b, -1, -1, -1)
        cache.update(k, v, layer)
    mask = torch.cat([torch.ones(b, n, dtype=torch.long), batch["attention_mask"]], dim=1)
    return model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True])
def test_outputs_equal_the_formula(arch, projection, registry):
    model = BUILDERS[arch]()
    batch = inputs()
    composed = _compose(model, registry, num_virtual_tokens=5, projection=projection, seed=0)
    out = output(model, batch)
    values = _module(composed)().detach().clone()
    layers, kv, head_dim = _kv_geometry(model)
    assert values.shape == (5, layers, 2, kv, head_dim)
    composed.undo()
    torch.testing.assert_close(out, _reference(model, values, batch), rtol=0, atol=1e-6)


def test_parameter_counts_use_the_kv_heads(registry):
    model = BUILDERS["llama"]()  # 4 query heads, 2 key/value heads of width 16
    layers, kv, head_dim = _kv_geometry(model)
    assert kv == 2
    composed = _compose(model, registry, num_virtual_tokens=6)
    assert composed.trainable_parameters().trainable == 2 * layers * 6 * kv * head_dim
    composed.undo()
    composed = _compose(
        model, registry, num_virtual_tokens=6, projection=True, projection_hidden=24
    )
    d_kv, width = kv * head_dim, 2 * layers * kv * head_dim
    expected = 6 * d_kv + (d_kv * 24 + 24) + (24 * width + width)  # E, W₁ b₁, W₂ b₂
    assert composed.trainable_parameters().trainable == expected


# --- parity with PEFT -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True])
def test_peft_parity_both_directions(arch, projection, registry, tmp_path):
    batch, n, hidden = inputs(), 4, 24
    model = BUILDERS[arch]()
    torch.manual_seed(SEED)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=n,
        prefix_projection=projection,
        encoder_hidden_size=hidden,
    )
    peft_model = get_peft_model(model, config).eval()
    reference = output(peft_model, batch)
    assert not torch.allclose(reference, output(BUILDERS[arch](), batch), atol=1e-3)

    # the same initialisation (PEFT's draws, in its order) under the same global seed
    ours = BUILDERS[arch]()
    torch.manual_seed(SEED)
    extra = {"projection": True, "projection_hidden": hidden} if projection else {}
    fresh = _compose(ours, registry, num_virtual_tokens=n, **extra)
    assert (output(ours, batch) - reference).abs().max() <= TOL
    fresh.undo()

    peft_model.save_pretrained(tmp_path / "peft")  # projected values only, never the MLP
    model = BUILDERS[arch]()
    composed = ac.from_peft(model, tmp_path / "peft", name="task", registry=registry)
    assert not _module(composed, "task").projected
    assert (output(model, batch) - reference).abs().max() <= TOL

    composed.to_peft("task", tmp_path / "export")
    back = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "export").eval()
    assert (output(back, batch) - reference).abs().max() <= TOL


def test_projected_adapter_exports_its_projected_values(registry, tmp_path):
    batch = inputs()
    model = BUILDERS["llama"]()
    composed = _compose(model, registry, num_virtual_tokens=3, projection=True, seed=2)
    randomize(composed, std=0.1)
    out = output(model, batch)
    composed.to_peft("a", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    layers, kv, head_dim = _kv_geometry(model)
    assert config["prefix_projection"] is False
    assert (config["token_dim"], config["num_attention_heads"]) == (kv * head_dim, kv)
    back = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "export").eval()
    assert (output(back, batch) - out).abs().max() <= TOL


def test_peft_import_errors(registry, tmp_path):
    peft_model = get_peft_model(
        BUILDERS["gpt2"](), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    peft_model.save_pretrained(tmp_path / "p")
    model = BUILDERS["llama"]()  # 2 KV heads of 16: a prefix row is 2·2·32 wide, not 2·2·64
    before = state_copy(model)
    with pytest.raises(AdapterFileError, match=r"has shape \(3, 256\), the model needs \(3, 128\)"):
        ac.from_peft(model, tmp_path / "p", registry=registry)
    assert same_state(model, before)
    config_path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_transformer_submodules": 2}))
    with pytest.raises(AdapterFileError, match="encoder-decoder virtual tokens are not supported"):
        ac.from_peft(BUILDERS["gpt2"](), tmp_path / "p", registry=registry)


# --- the projection, dropped for inference --------------------------------------------------


def test_freeze_projection_keeps_outputs_and_saves_the_direct_form(registry, tmp_path):
    batch = inputs()
    model = BUILDERS["llama"]()
    composed = _compose(model, registry, num_virtual_tokens=4, projection=True, seed=1)
    randomize(composed, std=0.1)
    out = output(model, batch)
    composed.save(tmp_path / "projected")

    freeze_projection(composed, "a")
    module = _module(composed)
    layers, kv, head_dim = _kv_geometry(model)
    assert not module.projected and module.mlp is None and module.embedding is None
    assert [n for n, _ in composed.adapters["a"].named_parameters()] == ["model.prefix"]
    assert composed.trainable_parameters().trainable == 2 * layers * 4 * kv * head_dim
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-6)
    assert composed.graph.spec("a").config["projection"] is False
    composed.save(tmp_path / "direct")
    composed.undo()

    for saved, projected in (("projected", True), ("direct", False)):
        fresh = BUILDERS["llama"]()
        loaded = ac.load(fresh, tmp_path / saved, registry=registry)
        assert _module(loaded).projected is projected
        torch.testing.assert_close(output(fresh, batch), out, rtol=0, atol=1e-6)
        loaded.undo()


def test_freeze_projection_refuses_other_methods(registry):
    model = BUILDERS["llama"]()
    g = Graph()
    g.adapter("p", "prompt_tuning", num_virtual_tokens=2)
    composed = ac.compose(model, g, registry=registry)
    with pytest.raises(ValueError, match="not prefix_tuning"):
        freeze_projection(composed, "p")


# --- generate, stacks, training -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_matches_greedy_forwards_and_uses_the_cache(arch, registry):
    model = BUILDERS[arch]()
    composed = _compose(model, registry, num_virtual_tokens=4, seed=0)
    check_generate_uses_cache(model, first_length=7)  # the prefix sits in the cache already
    composed.undo()


def test_stack_of_two_prefixes_is_one_prefix_of_the_joined_length(registry):
    batch = inputs()
    model = BUILDERS["llama"]()
    g = Graph()
    g.adapter("a", "prefix_tuning", num_virtual_tokens=3, seed=1)
    g.adapter("b", "prefix_tuning", num_virtual_tokens=2, projection=True, seed=2)
    g.stack("a", "b")
    composed = ac.compose(model, g, registry=registry)
    out = output(model, batch)
    joined = torch.cat([_module(composed, "a").values(), _module(composed, "b").values()]).detach()
    composed.undo()
    single = _compose(model, registry, num_virtual_tokens=5)
    with torch.no_grad():
        _module(single).prefix.copy_(joined)
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("projection, lr", [(False, 0.3), (True, 0.03)])
def test_training_lowers_the_loss_and_trains_only_the_prefix(projection, lr, registry):
    model = BUILDERS["llama"]()
    base = state_copy(model)
    composed = _compose(model, registry, num_virtual_tokens=10, projection=projection, seed=0)
    before = {k: v.clone() for k, v in composed.adapters["a"].state_dict().items()}
    losses = train_steps(model, composed, lr=lr)
    assert losses[-1] < 0.9 * losses[0], f"loss {losses[0]:.3f} → {losses[-1]:.3f}"
    after = composed.adapters["a"].state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in after)
    composed.undo()
    assert same_state(model, base)


def test_gradient_checkpointing_keeps_the_prefix_or_refuses_clearly(registry):
    batch = inputs(batch=2, length=12, seed=7)
    grads = []
    for checkpointing in (False, True):
        model = BUILDERS["llama"]()
        composed = _compose(model, registry, num_virtual_tokens=3, seed=0)
        if checkpointing:
            model.gradient_checkpointing_enable()
        composed.train()
        if checkpointing:  # transformers drops the cache in checkpointed layers: refused clearly, as PEFT does
            with pytest.raises(ac.ComposerError, match="gradient checkpointing"):
                model(**batch, labels=batch["input_ids"]).loss.backward()
            model.gradient_checkpointing_disable()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append(_module(composed).prefix.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


# --- refusals and bad input -----------------------------------------------------------------


def test_bert_has_no_kv_prefix_point(registry):
    g = Graph()
    g.adapter("a", "prefix_tuning", num_virtual_tokens=2)
    with pytest.raises(CompositionError) as err:
        ac.compose(BUILDERS["bert"](), g, registry=registry)
    assert err.value.codes == ["point-missing"]
    assert "attention.kv_prefix" in str(err.value)


def test_sum_of_prefixes_is_refused(registry):
    g = Graph()
    g.adapter("a", "prefix_tuning", num_virtual_tokens=2)
    g.adapter("b", "prefix_tuning", num_virtual_tokens=2)
    g.sum("a", "b")
    with pytest.raises(CompositionError) as err:
        ac.compose(BUILDERS["llama"](), g, registry=registry)
    assert "unsupported-operator" in err.value.codes


@pytest.mark.parametrize(
    "config, field",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": -1}, "num_virtual_tokens"),
        ({"projection_hidden": 8}, "projection_hidden would be ignored"),
        ({"projection": True, "projection_hidden": 0}, "projection_hidden"),
    ],
)
def test_bad_config_names_the_field(config, field, registry):
    model = BUILDERS["llama"]()
    before = state_copy(model)
    with pytest.raises(CompositionError) as err:
        _compose(model, registry, **config)
    assert err.value.codes == ["bad-config"]
    assert field in err.value.diagnostics[0].message
    assert same_state(model, before)
