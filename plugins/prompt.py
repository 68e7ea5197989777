"""Prompt tuning (Lester et al. 2021): n trainable virtual tokens prepended to the input.

    inputs_embeds = [P; embed(ids)],   P ∈ R^{n × d},   d = the input-embedding width

The attention mask gets n ones, labels get n × -100 and token types n zeros; the host's
model hook (``adapter_composer.runtime.model``) does that, this module only holds P. Stacked
prompts concatenate in order: ``stack(a, b)`` gives ``[P_a; P_b; embed(ids)]``.

Initialisation, as in HF PEFT's ``PromptTuningInit``:

    random   P ~ N(0, 1) (PEFT's ``nn.Embedding`` default)
    vocab    P = embed(ids), ids drawn uniformly (with replacement) from the vocabulary
    text     P = embed(tokenizer(init_text).input_ids), truncated or repeated to n tokens

With ``seed=None`` the draws use torch's global generator in PEFT's order, so under the same
``torch.manual_seed`` a ``random`` or ``vocab`` prompt equals PEFT's; an integer seed uses a
private generator.
P is kept in fp32 (cast to the model's dtype when injected), as PEFT does.

PEFT format: ``adapter_config.json`` with ``peft_type="PROMPT_TUNING"`` and one tensor
``prompt_embeddings`` [n, d]. Importing ignores PEFT's initialisation fields (the saved
tensor replaces whatever an initialisation would give, and the tokenizer it names may not
exist here), so an imported adapter has ``init="random"``. Export writes our init fields.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from adapter_composer.formats.peft import peft_int
from adapter_composer.formats.peft_options import peft_task_type
from adapter_composer.registry import Capabilities, hookimpl

PEFT_TENSOR = "prompt_embeddings"
PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_virtual_tokens: int = Field(20, gt=0, description="n, the number of virtual tokens")
    init: Literal["random", "vocab", "text"] = Field(
        "random",
        description="random: N(0, 1); vocab: embeddings of tokens sampled from the vocabulary; "
        "text: embeddings of init_text's tokens, truncated or repeated to n",
    )
    init_text: str | None = Field(
        None, min_length=1, description="the text whose token embeddings start P (init='text')"
    )
    tokenizer: str | None = Field(
        None,
        min_length=1,
        description="path (or hub name) of the tokenizer for init_text (init='text')",
    )
    seed: int | None = Field(
        None, description="seed of the random and vocab draws; None: torch's global generator"
    )

    @model_validator(mode="after")
    def _text_fields(self) -> PromptConfig:
        if self.init == "text":
            missing = [f for f in ("init_text", "tokenizer") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"init='text' needs {' and '.join(missing)}: give init_text='...' and "
                    "tokenizer='<path of the tokenizer>'"
                )
            if self.seed is not None:
                raise ValueError("seed would be ignored with init='text' (nothing is drawn)")
        else:
            given = [f for f in ("init_text", "tokenizer") if getattr(self, f) is not None]
            if given:
                raise ValueError(
                    f"{' and '.join(given)} would be ignored with init={self.init!r}; "
                    "set init='text' or remove them"
                )
        return self


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block on torch's global CPU generator, re-seeded privately when ``seed`` is given."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fit_to_length(ids: list[int], n: int) -> list[int]:
    """Truncate ``ids`` to n, or repeat them whole until they cover n and cut (PEFT's rule)."""
    if not ids:
        raise ValueError("init_text gives no tokens with this tokenizer")
    return (ids * math.ceil(n / len(ids)))[:n]


def text_token_ids(text: str, tokenizer: str) -> list[int]:
    """``tokenizer(text)["input_ids"]`` (special tokens included, as PEFT does)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as exc:
        raise ValueError(f"prompt tuning: cannot load tokenizer {tokenizer!r}: {exc}") from exc
    return list(tok(text)["input_ids"])


@torch.no_grad()
def initial_prompt(config: PromptConfig, embeddings: nn.Module) -> torch.Tensor:
    """P at initialisation, [n, d] fp32 (see the module docstring)."""
    n = config.num_virtual_tokens
    weight = embeddings.weight
    vocab, d = int(weight.shape[0]), int(weight.shape[1])
    if config.init == "text":
        ids = fit_to_length(text_token_ids(config.init_text, config.tokenizer), n)
    else:
        with seeded(config.seed):
            table = torch.randn(n, d)  # drawn for vocab too: PEFT draws it before the ids
            if config.init == "random":
                return table
            ids = torch.randint(0, vocab, (n,)).tolist()
    outside = sorted({i for i in ids if not 0 <= i < vocab})
    if outside:
        raise ValueError(f"token ids {outside[:5]} are outside the model's vocabulary of {vocab}")
    index = torch.tensor(ids, dtype=torch.long, device=weight.device)
    return embeddings(index).detach().float().cpu()


class PromptEmbedding(nn.Module):
    """The virtual tokens P [n, d]; ``forward()`` returns them for the host to prepend."""

    def __init__(self, prompt: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(prompt.detach().clone().float())  # [n, d]

    def forward(self) -> torch.Tensor:
        return self.prompt

    def extra_repr(self) -> str:
        n, d = self.prompt.shape
        return f"num_virtual_tokens={n}, dim={d}"


def build(config: PromptConfig, site: Any) -> nn.Module:
    return PromptEmbedding(initial_prompt(config, site.module.get_input_embeddings()))


# --- PEFT format ----------------------------------------------------------------------


def peft_model_fields(model: nn.Module) -> dict[str, Any]:
    """The model-shape fields PEFT stores in a prompt-learning config."""
    cfg = model.config
    layers = next(
        (getattr(cfg, a) for a in ("num_hidden_layers", "n_layer") if hasattr(cfg, a)), None
    )
    heads = next(
        (getattr(cfg, a) for a in ("num_attention_heads", "n_head") if hasattr(cfg, a)), None
    )
    return {
        "task_type": peft_task_type(model) or "FEATURE_EXTRACTION",
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_transformer_submodules": 1,
        "inference_mode": True,
        "modules_to_save": None,
    }


def check_peft_prompt_learning(peft: Mapping[str, Any]) -> int:
    """``num_virtual_tokens`` of a PEFT prompt-learning config, refusing what we cannot run."""
    submodules = peft_int(peft, "num_transformer_submodules", 1, nullable=True)
    if submodules != 1:
        raise ValueError(
            f"num_transformer_submodules={submodules}: encoder-decoder virtual tokens are not supported"
        )
    if peft.get("modules_to_save"):
        raise ValueError(f"unsupported PEFT option modules_to_save={peft['modules_to_save']!r:.60}")
    return peft_int(peft, "num_virtual_tokens", minimum=1)


def model_tensor(raw: Mapping[str, torch.Tensor], ours: str) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's single ``prompt_embeddings`` tensor, as the model-level tensor ``ours``."""
    if set(raw) != {PEFT_TENSOR}:
        raise ValueError(f"expected exactly one tensor {PEFT_TENSOR!r}, found {sorted(raw)}")
    return {"model": {ours: raw[PEFT_TENSOR]}}


class PromptPeftCodec:
    """Reads and writes PEFT's ``PromptTuningConfig`` files (decoder-only models)."""

    peft_types = ("PROMPT_TUNING",)

    def from_peft(self, peft: Mapping[str, Any]) -> dict[str, Any]:
        return {"num_virtual_tokens": check_peft_prompt_learning(peft)}

    def to_peft(self, config: PromptConfig, sites: list[Any]) -> dict[str, Any]:
        model = sites[0].module
        return {
            "peft_type": "PROMPT_TUNING",
            **peft_model_fields(model),
            "num_virtual_tokens": config.num_virtual_tokens,
            "token_dim": int(model.get_input_embeddings().weight.shape[1]),
            "prompt_tuning_init": PEFT_INIT[config.init],
            "prompt_tuning_init_text": config.init_text,
            "tokenizer_name_or_path": config.tokenizer,
            "tokenizer_kwargs": None,
        }

    def split_tensors(self, raw: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return model_tensor(raw, "prompt")

    def join_tensors(self, handle: Any, sites: list[Any]) -> dict[str, torch.Tensor]:
        return {PEFT_TENSOR: handle.modules["model"].prompt.detach()}


@hookimpl
def register_methods(register):
    register.method(
        "prompt_tuning",
        config=PromptConfig,
        build=build,
        points=["input.embeddings"],
        capabilities=Capabilities(
            mergeable=False, identity_at_init=False, changes_sequence_length=True
        ),
        peft=PromptPeftCodec(),
        description="Virtual tokens prepended to the input embeddings: [P; embed(ids)].",
    )


__all__ = ["PromptConfig", "PromptEmbedding", "PromptPeftCodec", "build", "initial_prompt"]
