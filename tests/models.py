"""Tiny random transformers models, built offline from configs (fp32, eval mode)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

VOCAB = 128
DECODER = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # grouped-query attention: 4 query heads, 2 KV heads


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**DECODER, "num_hidden_layers": layers})).eval()


def tiny_llama_scaled(seed: int = 0) -> LlamaForCausalLM:
    """tiny_llama with larger initial weights (std 0.1): logits span a useful range, which
    input-side methods such as prompt tuning need to show learning in a few steps."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**DECODER, initializer_range=0.1)).eval()


KBIT_DECODER = {**DECODER, "intermediate_size": 128}
# bitsandbytes' CPU 4-bit inference kernel (AVX512-BF16) repacks weights in blocks of 64
# inputs and 32 outputs and fails on other shapes (96), so quantised tests use this width


def tiny_llama_kbit(seed: int = 0) -> LlamaForCausalLM:
    """tiny_llama with an MLP width of 128, a shape every bitsandbytes CPU kernel accepts."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**KBIT_DECODER)).eval()


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**DECODER, sliding_window=None)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**DECODER)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=128,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_roberta(seed: int = 0) -> RobertaModel:
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=130,
        pad_token_id=1,
    )
    return RobertaModel(cfg, add_pooling_layer=False).eval()


def tiny_t5(seed: int = 0, gated: bool = False, decoder_layers: int = 3):
    """T5 with 2 encoder and 3 decoder blocks (the stacks differ in depth on purpose);
    ``gated``: T5 v1.1 / Flan-T5's gated-GELU feed-forward (wi_0, wi_1, wo). transformers
    5.24's generate() sizes its cache by the encoder's depth, so generation needs
    ``decoder_layers=2``."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        num_decoder_layers=decoder_layers,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_phi3(seed: int = 0):
    """Phi-3: fused qkv_proj (64 + 32 + 32 rows: 4 query heads, 2 KV heads) and gate_up_proj."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(**DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()


def tiny_gemma(seed: int = 0, version: int = 1):
    """Gemma (version 1), Gemma 2 or Gemma 3 (text), head_dim 16."""
    import transformers as tf

    config, model = {1: ("GemmaConfig", "GemmaForCausalLM"), 2: ("Gemma2Config", "Gemma2ForCausalLM"),
                     3: ("Gemma3TextConfig", "Gemma3ForCausalLM")}[version]
    torch.manual_seed(seed)
    cfg = getattr(tf, config)(**DECODER, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return getattr(tf, model)(cfg).eval()


def tiny_moe(kind: str = "mixtral", seed: int = 0):
    """Mixture-of-experts decoders: ``mixtral``, ``qwen2_moe`` (with a shared expert), ``qwen3_moe``;
    4 experts, 2 per token."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2)).eval()
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**DECODER, **extra, shared_expert_intermediate_size=48)).eval()
    return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**DECODER, **extra)).eval()


BUILDERS = {
    "llama": tiny_llama,
    "llama_scaled": tiny_llama_scaled,
    "llama_kbit": tiny_llama_kbit,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "phi3": tiny_phi3,
    "gemma": tiny_gemma,
    "gemma2": lambda seed=0: tiny_gemma(seed, version=2),
    "gemma3": lambda seed=0: tiny_gemma(seed, version=3),
}


# role -> (module path template, rows of a fused output), written out by hand so that tests do
# not take paths from the architecture plugin they check (GPT-2's q/k/v are thirds of c_attn)
ROLE_PATHS = {
    "llama": {
        "attn.q": ("model.layers.{i}.self_attn.q_proj", None),
        "attn.k": ("model.layers.{i}.self_attn.k_proj", None),
        "attn.v": ("model.layers.{i}.self_attn.v_proj", None),
        "mlp.down": ("model.layers.{i}.mlp.down_proj", None),
    },
    "gpt2": {
        "attn.q": ("transformer.h.{i}.attn.c_attn", (0, 64)),
        "attn.k": ("transformer.h.{i}.attn.c_attn", (64, 128)),
        "attn.v": ("transformer.h.{i}.attn.c_attn", (128, 192)),
        "mlp.down": ("transformer.h.{i}.mlp.c_proj", None),
    },
    "bert": {
        "attn.q": ("encoder.layer.{i}.attention.self.query", None),
        "attn.k": ("encoder.layer.{i}.attention.self.key", None),
        "attn.v": ("encoder.layer.{i}.attention.self.value", None),
        "mlp.down": ("encoder.layer.{i}.output.dense", None),
    },
}


def role_paths(*roles: str) -> dict[str, dict[str, tuple[str, tuple[int, int] | None]]]:
    return {arch: {r: table[r] for r in roles} for arch, table in ROLE_PATHS.items()}


def inputs(batch: int = 2, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output(model, batch) -> torch.Tensor:
    """Logits for LMs, the last hidden state for encoders."""
    with torch.no_grad():
        out = model(**batch)
    return (
        out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
    )


def randomize(composed, std: float = 0.2, seed: int = 0) -> None:
    """Give every adapter parameter non-trivial values (fresh adapters are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in composed.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    now = model.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


def tiny_tokenizer(words: list[str]):
    """A word-level BERT-style tokenizer built in memory ([CLS] a [SEP] b [SEP]), no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
