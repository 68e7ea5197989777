"""Prompt tuning: the formula [P; embed(ids)], parity with HF PEFT (random, vocab and text
initialisation, both directions), generate() with the KV cache, stacks, training, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, PromptTuningConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import adapter_composer as ac
from adapter_composer import CompositionError, Graph
from tests.models import BUILDERS, VOCAB, inputs, output, same_state, state_copy, tiny_llama_scaled

TOL = 1e-5
SEED = 1234
TEXT = "w3 w17 w5 w99 w42"  # five words; the tokenizer adds <bos>: six ids


# --- helpers shared with test_prefix ------------------------------------------------------


def backbone_lengths(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Record the sequence length of every call that reaches the transformer backbone."""
    lengths: list[int] = []

    def record(module, args, kwargs):
        given = [*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")]
        x = next(t for t in given if isinstance(t, torch.Tensor))
        lengths.append(int(x.shape[1]))

    return lengths, model.base_model.register_forward_pre_hook(record, with_kwargs=True)


@torch.no_grad()
def greedy_without_cache(
    model, ids: torch.Tensor, steps: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding by full forward passes over the whole sequence, no KV cache: the
    tokens and each step's last-position logits."""
    last = []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        last.append(logits[:, -1])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids, last


def check_generate_uses_cache(model, first_length: int, steps: int = 6) -> float:
    """generate() = greedy full forwards (tokens, and logits within 1e-5); the first backbone
    call sees ``first_length`` positions and every later one a single new token (the KV
    cache is used). Returns the largest logit difference."""
    model.generation_config.eos_token_id = None  # tiny GPT-2's eos is token 0: never stop early
    ids = inputs(batch=2, length=7, seed=3)["input_ids"]
    expected, expected_logits = greedy_without_cache(model, ids, steps)
    lengths, handle = backbone_lengths(model)
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=1,
            return_dict_in_generate=True,
            output_logits=True,
        )
    handle.remove()
    assert torch.equal(generated.sequences, expected)
    diff = max(
        (a - b).abs().max().item() for a, b in zip(generated.logits, expected_logits, strict=True)
    )
    assert diff <= 1e-5
    assert lengths == [first_length] + [1] * (steps - 1)
    return diff


def train_steps(model, composed, lr: float, steps: int = 30) -> list[float]:
    """The conformance battery's toy task: predict a fixed random batch."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(composed.param_groups(lr=lr))
    composed.train()
    batch = inputs(batch=2, length=12, seed=7)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    composed.eval()
    return losses


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A word-level tokenizer over the tiny models' vocabulary that prepends <bos> (id 0)."""
    words = ["<bos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 0)]
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return str(path)


def _compose(model, registry, **config):
    g = Graph()
    g.adapter("a", "prompt_tuning", **config)
    return ac.compose(model, g, registry=registry)


def _prompt(composed, name: str = "a") -> torch.Tensor:
    return composed.adapters[name].modules["model"].prompt


# --- the formula ----------------------------------------------------------------------------


@torch.no_grad()
def _reference(model, prompt: torch.Tensor, batch: dict) -> torch.Tensor:
    """The plain model on [P; embed(ids)] with the mask (and token types) prefixed."""
    ids = batch["input_ids"]
    b, n = ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(b, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    extra = {
        "attention_mask": torch.cat(
            [torch.ones(b, n, dtype=torch.long), batch["attention_mask"]], 1
        )
    }
    if "token_type_ids" in batch:
        extra["token_type_ids"] = torch.cat(
            [torch.zeros(b, n, dtype=torch.long), batch["token_type_ids"]], 1
        )
    out = model(inputs_embeds=embeds, **extra)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_outputs_equal_the_formula(arch, registry):
    model = BUILDERS[arch]()
    batch = inputs()
    if arch == "bert":
        batch["token_type_ids"] = torch.ones_like(batch["input_ids"])
    composed = _compose(model, registry, num_virtual_tokens=5, seed=0)
    out = output(model, batch)
    assert out.shape[1] == 5 + batch["input_ids"].shape[1]
    if arch != "bert":  # labels get 5 × -100: the last virtual position predicts the first token
        ids = batch["input_ids"]
        with torch.no_grad():
            loss = model(**batch, labels=ids).loss
        expected = F.cross_entropy(out[:, 4:-1].reshape(-1, out.shape[-1]), ids.reshape(-1))
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    prompt = _prompt(composed).detach().clone()
    composed.undo()
    torch.testing.assert_close(out, _reference(model, prompt, batch), rtol=0, atol=1e-6)


def test_parameter_count_and_seeds(registry):
    model = BUILDERS["llama"]()
    composed = _compose(model, registry, num_virtual_tokens=7, seed=3)
    assert composed.trainable_parameters().trainable == 7 * model.config.hidden_size
    first = _prompt(composed).detach().clone()
    composed.undo()
    again = _compose(model, registry, num_virtual_tokens=7, seed=3)
    assert torch.equal(_prompt(again), first)
    again.undo()
    other = _compose(model, registry, num_virtual_tokens=7, seed=4)
    assert not torch.allclose(_prompt(other), first)


def test_vocab_init_takes_rows_of_the_embedding_matrix(registry):
    model = BUILDERS["llama"]()
    table = model.get_input_embeddings().weight.detach()
    composed = _compose(model, registry, num_virtual_tokens=9, init="vocab", seed=5)
    prompt = _prompt(composed).detach()
    matches = (prompt[:, None, :] == table[None, :, :]).all(-1)  # [n, vocab]
    assert bool(matches.any(1).all()), "every virtual token is some token's embedding"


# --- parity with PEFT -----------------------------------------------------------------------


def _peft_model(arch: str, n: int, init: str, tokenizer: str | None = None):
    model = BUILDERS[arch]()
    torch.manual_seed(SEED)
    extra = (
        {"prompt_tuning_init_text": TEXT, "tokenizer_name_or_path": tokenizer}
        if init == "TEXT"
        else {}
    )
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init=init, **extra
    )
    return get_peft_model(model, config).eval()


INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "peft_init, n", [("RANDOM", 4), ("SAMPLE_VOCAB", 5), ("TEXT", 3), ("TEXT", 11)]
)
def test_peft_parity_both_directions(arch, peft_init, n, registry, tokenizer_dir, tmp_path):
    batch = inputs()
    tokenizer = tokenizer_dir if peft_init == "TEXT" else None
    peft_model = _peft_model(arch, n, peft_init, tokenizer)
    reference = output(peft_model, batch)
    assert reference.shape[1] == n + batch["input_ids"].shape[1]

    # the same initialisation (random and vocab draws under the same global seed)
    model = BUILDERS[arch]()
    torch.manual_seed(SEED)
    text = {"init_text": TEXT, "tokenizer": tokenizer} if peft_init == "TEXT" else {}
    fresh = _compose(model, registry, num_virtual_tokens=n, init=INITS[peft_init], **text)
    assert torch.equal(_prompt(fresh), peft_model.prompt_encoder["default"].embedding.weight)
    assert (output(model, batch) - reference).abs().max() <= TOL
    fresh.undo()

    peft_model.save_pretrained(tmp_path / "peft")
    model = BUILDERS[arch]()
    composed = ac.from_peft(model, tmp_path / "peft", name="task", registry=registry)
    assert composed.adapters["task"].config.init == "random"  # the saved tensor replaces any init
    assert (output(model, batch) - reference).abs().max() <= TOL

    composed.to_peft("task", tmp_path / "export")
    back = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "export").eval()
    assert (output(back, batch) - reference).abs().max() <= TOL


def test_text_init_truncates_and_repeats_the_text(registry, tokenizer_dir):
    model = BUILDERS["llama"]()
    table = model.get_input_embeddings().weight.detach()
    ids = [0, 3 + 2, 17 + 2, 5 + 2, 99 + 2, 42 + 2]  # <bos> then w{i} at id i + 2
    for n, expected in [(4, ids[:4]), (6, ids), (14, (ids * 3)[:14])]:
        composed = _compose(
            model,
            registry,
            num_virtual_tokens=n,
            init="text",
            init_text=TEXT,
            tokenizer=tokenizer_dir,
        )
        assert torch.equal(_prompt(composed).detach(), table[expected])
        composed.undo()


def test_export_keeps_the_init_fields_and_import_needs_no_tokenizer(
    registry, tokenizer_dir, tmp_path
):
    model = BUILDERS["gpt2"]()
    composed = _compose(
        model, registry, num_virtual_tokens=8, init="text", init_text=TEXT, tokenizer=tokenizer_dir
    )
    composed.to_peft("a", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (
        config["prompt_tuning_init"] == "TEXT" and config["tokenizer_name_or_path"] == tokenizer_dir
    )
    assert (config["num_virtual_tokens"], config["token_dim"]) == (8, 64)
    config["tokenizer_name_or_path"] = str(tmp_path / "gone")  # import must not need it
    (tmp_path / "export" / "adapter_config.json").write_text(json.dumps(config))
    batch = inputs()
    out = output(model, batch)
    composed.undo()
    fresh = BUILDERS["gpt2"]()
    ac.from_peft(fresh, tmp_path / "export", registry=registry)
    assert torch.equal(output(fresh, batch), out)


# --- generate, stacks, training -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_matches_greedy_forwards_and_uses_the_cache(arch, registry):
    model = BUILDERS[arch]()
    composed = _compose(model, registry, num_virtual_tokens=4, seed=0)
    check_generate_uses_cache(model, first_length=4 + 7)
    composed.undo()


def test_stack_of_two_prompts_is_their_concatenation(registry):
    batch = inputs()
    model = BUILDERS["llama"]()
    g = Graph()
    g.adapter("a", "prompt_tuning", num_virtual_tokens=3, seed=1)
    g.adapter("b", "prompt_tuning", num_virtual_tokens=4, seed=2)
    g.stack("a", "b")
    composed = ac.compose(model, g, registry=registry)
    out = output(model, batch)
    joined = torch.cat([_prompt(composed, "a"), _prompt(composed, "b")]).detach().clone()
    composed.undo()
    single = _compose(model, registry, num_virtual_tokens=7)
    with torch.no_grad():
        _prompt(single).copy_(joined)
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-6)


def test_training_lowers_the_loss_and_trains_only_the_prompt(registry):
    model = tiny_llama_scaled()  # std-0.02 logits stay within ±1.3: no prompt lowers this loss 10 %
    base = state_copy(model)
    composed = _compose(model, registry, num_virtual_tokens=10, seed=0)
    start = _prompt(composed).detach().clone()
    losses = train_steps(model, composed, lr=0.3)
    assert losses[-1] < 0.9 * losses[0], f"loss {losses[0]:.3f} → {losses[-1]:.3f}"
    assert not torch.equal(_prompt(composed), start)
    assert [n for n, _ in composed.adapters["a"].named_parameters()] == ["model.prompt"]
    composed.undo()
    assert same_state(model, base)


# --- refusals and bad input -----------------------------------------------------------------


def test_sum_of_prompts_is_refused(registry):
    g = Graph()
    g.adapter("a", "prompt_tuning", num_virtual_tokens=2)
    g.adapter("b", "prompt_tuning", num_virtual_tokens=2)
    g.sum("a", "b")
    with pytest.raises(CompositionError) as err:
        ac.compose(BUILDERS["llama"](), g, registry=registry)
    assert "unsupported-operator" in err.value.codes


@pytest.mark.parametrize(
    "config, field",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": -3}, "num_virtual_tokens"),
        ({"init": "text", "init_text": "w1 w2"}, "tokenizer"),
        ({"init": "text", "tokenizer": "/some/tokenizer"}, "init_text"),
        ({"init": "text"}, "init_text and tokenizer"),
        ({"init": "random", "init_text": "w1"}, "init_text would be ignored"),
        ({"init": "text", "init_text": "w1", "tokenizer": "t", "seed": 1}, "seed would be ignored"),
        ({"init": "text", "init_text": "", "tokenizer": "t"}, "init_text"),
        ({"init": "sideways"}, "init"),
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


def test_unreadable_tokenizer_is_a_clear_error(registry, tmp_path):
    model = BUILDERS["llama"]()
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        _compose(model, registry, init="text", init_text="w1", tokenizer=str(tmp_path / "none"))
    assert all(p.requires_grad for p in model.parameters()), "the model was left patched"
