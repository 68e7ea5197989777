"""T5 (and T5 v1.1 / Flan-T5, mT5): an encoder-decoder, mapped as two stacks.

Roles act in every stack that has them; prefix a role with its stack to pick one:

    attn.q attn.k attn.v attn.o   self-attention            enc + dec   (``enc.attn.q``, ``dec.attn.q``)
    xattn.q xattn.k xattn.v xattn.o   cross-attention (queries from the decoder,
                                  keys/values from the encoder output)     dec only
    mlp.up mlp.down               feed-forward ``wi``/``wo``    enc + dec
    mlp.gate                      gated models' ``wi_0`` (their ``mlp.up`` is ``wi_1``)
    attn xattn mlp                the sublayers (their output before dropout and the residual add)
    embed                         the shared token embedding

Sites get stack-qualified keys (``enc.layers.0.attn.q``, ``dec.layers.1.xattn.v``), so one
adapter file holds both stacks. The encoder has ``num_layers`` blocks, the decoder
``num_decoder_layers``; ``layers=[...]`` picks block indices in each stack. HF PEFT's
``target_modules=["q", "v"]`` on T5 is ``targets=["attn.q", "attn.v", "xattn.q", "xattn.v"]``.
"""

from __future__ import annotations

from adapter_composer.registry import Module, Sublayer, hookimpl

LINEAR_KINDS = ("linear.delta", "linear.scale_out", "linear.scale_in")
SUBLAYER_KINDS = ("sublayer.output", "sublayer.parallel")

ENC = "encoder.block.{i}.layer"
DEC = "decoder.block.{i}.layer"
DEC_LAYERS = "num_decoder_layers"


def _both(enc: str, dec: str) -> tuple[Module, Module]:
    return Module(enc, stack="enc"), Module(dec, stack="dec", layers=DEC_LAYERS)


def _dec(path: str) -> Module:
    return Module(path, stack="dec", layers=DEC_LAYERS)


def _roles() -> dict:
    roles: dict = {}
    for p in "qkvo":
        roles[f"attn.{p}"] = _both(f"{ENC}.0.SelfAttention.{p}", f"{DEC}.0.SelfAttention.{p}")
        roles[f"xattn.{p}"] = _dec(f"{DEC}.1.EncDecAttention.{p}")
    roles["mlp.gate"] = _both(f"{ENC}.1.DenseReluDense.wi_0", f"{DEC}.2.DenseReluDense.wi_0")
    roles["mlp.up"] = _both(
        f"{ENC}.1.DenseReluDense.wi_1|{ENC}.1.DenseReluDense.wi",
        f"{DEC}.2.DenseReluDense.wi_1|{DEC}.2.DenseReluDense.wi",
    )
    roles["mlp.down"] = _both(f"{ENC}.1.DenseReluDense.wo", f"{DEC}.2.DenseReluDense.wo")
    roles["attn"] = (
        Sublayer(f"{ENC}.0.SelfAttention", f"{ENC}.0.SelfAttention", stack="enc"),
        Sublayer(f"{DEC}.0.SelfAttention", f"{DEC}.0.SelfAttention", stack="dec", layers=DEC_LAYERS),
    )
    roles["xattn"] = Sublayer(f"{DEC}.1.EncDecAttention", f"{DEC}.1.EncDecAttention", stack="dec", layers=DEC_LAYERS)
    roles["mlp"] = (
        Sublayer(f"{ENC}.1.DenseReluDense", f"{ENC}.1.DenseReluDense", stack="enc"),
        Sublayer(f"{DEC}.2.DenseReluDense", f"{DEC}.2.DenseReluDense", stack="dec", layers=DEC_LAYERS),
    )
    roles["embed"] = Module("shared")
    return roles


T5_ROLES = _roles()


@hookimpl
def register_architectures(register):
    register.architecture(
        "t5",
        model_types=["t5", "mt5"],
        roles=T5_ROLES,
        num_layers="num_layers",
        provides=(*LINEAR_KINDS, *SUBLAYER_KINDS),
        description="T5 / mT5 encoder-decoders: stacks 'enc' and 'dec'; self-attention attn.*, "
        "cross-attention xattn.* (decoder), feed-forward mlp.*.",
    )


__all__ = ["T5_ROLES"]
