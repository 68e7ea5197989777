"""bitsandbytes bases (QLoRA): linear sites over ``Linear4bit`` and ``Linear8bitLt`` layers.

A quantised layer computes y = W_deq x + b, with W_deq the dequantised weight
(:func:`adapter_composer.sites.linear_weight`). Every linear method works on it unchanged:

    delta     y = base(x) + Δ(x)          the base call is bitsandbytes' own kernel
    scales    y = base(x ⊙ a) ⊙ b         (IA3)
    DoRA      reads W_deq for its row norm ‖W_deq + s B A‖, as PEFT does

Merging cannot go into the codes exactly (re-quantising W_deq + ΔW moves every block).
:meth:`BnbLinearSite.merge` therefore swaps the quantised layer for a dense ``nn.Linear``
holding the fold of the program over W_deq:

    W' = diag(b) W_deq diag(a) + E,   bias' = b ⊙ bias          (float32, then the layer's dtype)

exact up to the dequantisation (the usual QLoRA deployment step: a full-precision model
with the adapters folded in). ``unmerge()`` and ``undo()`` put the quantised module itself
back, untouched; ``merge_and_unload()`` leaves the dense layers in the model.

Training: :func:`prepare_kbit_training` is PEFT's ``prepare_model_for_kbit_training``
(freeze, upcast 16-bit parameters that are not 4-bit codes to float32, gradient
checkpointing with input gradients) plus one bitsandbytes-specific step. On CPUs with
AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bfloat16 kernel on its first
inference call; that kernel has no backward, so gradients stop at every repacked layer.
The function restores the trainable layout and turns that repacking off; a site whose
base was repacked refuses to run with input gradients instead of losing them silently.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.registry import hookimpl
from adapter_composer.runtime.linear import LinearSite
from adapter_composer.sites import is_linear, linear_weight, quantization


def cpu_repacked(module: nn.Module) -> bool:
    """Whether bitsandbytes repacked this 4-bit layer for its CPU inference kernel."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


@torch.no_grad()
def restore_trainable_layout(module: nn.Module) -> bool:
    """Put a CPU-repacked 4-bit weight back into bitsandbytes' standard layout (same values:
    the codes in their usual order, absmax as float32 per block). Returns whether it did."""
    if not cpu_repacked(module):
        return False
    import bitsandbytes.functional as bnbf

    state = module.weight.quant_state
    codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(module.weight.data, copy.copy(state))
    fresh = bnbf.QuantState(
        absmax=state.absmax.t().reshape(-1).float().contiguous(),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.original_dtype,
    )
    module.weight.data = codes
    module.weight.quant_state = fresh
    module.quant_state = fresh
    return True


def prepare_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a 4-bit or 8-bit model trainable, as PEFT's ``prepare_model_for_kbit_training``.

    1. freeze every parameter (``compose`` trains only adapters anyway);
    2. cast float16/bfloat16 parameters that are not 4-bit codes (norms, embeddings, the
       head) to float32;
    3. with ``gradient_checkpointing``: ``model.gradient_checkpointing_enable(...)``
       (``use_reentrant=True`` unless the kwargs say otherwise, transformers' default), and
       input gradients (``enable_input_require_grads``) unless ``use_reentrant=False``;
    4. bitsandbytes on CPU: every 4-bit layer back in its trainable layout, repacking off.

    Call it before ``compose``. Returns the model.
    """
    kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)
    for m in model.modules():
        if quantization(m) == "bnb-4bit":
            restore_trainable_layout(m)
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


@contextlib.contextmanager
def trainer_accepts(model: nn.Module) -> Iterator[nn.Module]:
    """Build an HF ``Trainer`` for a composed quantised model inside this context.

    ``Trainer(...)`` refuses a quantised model unless PEFT adapters are attached ("You cannot
    perform fine-tuning on purely quantized models"); it reads transformers' own marker of
    attached adapters once, while it is constructed. The context sets that marker for the
    construction only, after checking that adapters are attached and trainable here::

        with trainer_accepts(model):
            trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    """
    composed = any(getattr(m, "is_composer_site", False) for m in model.modules())
    if not composed or not any(p.requires_grad for p in model.parameters()):
        raise ComposerError(
            "trainer_accepts: the model has no trainable adapters applied; compose a graph "
            "onto it first (a quantised model cannot be fine-tuned by itself)"
        )
    marker = "_hf_peft_config_loaded"
    own = vars(model).copy()
    setattr(model, marker, True)
    try:
        yield model
    finally:
        if marker in own:
            setattr(model, marker, own[marker])
        else:
            delattr(model, marker)  # the class attribute (False) shows again


class BnbLinearSite(LinearSite):
    """A linear site over a bitsandbytes layer; merging swaps in a dense layer (see module doc)."""

    def __init__(self, base: nn.Module, info: Any, program: nn.Module, has_scale_in: bool):
        super().__init__(base, info, program, has_scale_in)
        self.quantization = quantization(base)
        self.model_dtype = info.dtype  # the dense merged layer's dtype when the codes do not say
        self.__dict__["_quantized"] = base  # the bitsandbytes module, also while merged

    def original_weight(self) -> torch.Tensor:
        """W_deq [out, in], dequantised from the (never modified) quantised layer."""
        return linear_weight(self._quantized)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (
            not self.merged
            and torch.is_grad_enabled()
            and x.requires_grad
            and cpu_repacked(self._quantized)
        ):
            raise ComposerError(
                f"the 4-bit weight of {self.path!r} was repacked by bitsandbytes' CPU inference "
                "kernel (AVX512-BF16), which has no backward: gradients would not reach this "
                "layer's input. Call adapter_composer.plugins.bnb.prepare_kbit_training(model) "
                "before training (it restores the trainable layout and keeps it)"
            )
        return super().forward(x, *args, **kwargs)

    @torch.no_grad()
    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', bias') over W_deq and the quantised layer's own bias; W' as [out, in], float32."""
        fold = self.program.linear_fold(self)
        w = self.original_weight().float()
        if fold.a is not None:
            w = w * fold.a.float()[None, :]
        if fold.b is not None:
            w = w * fold.b.float()[:, None]
        if fold.e is not None:
            w = w + fold.e.float()
        bias = self._quantized.bias
        if bias is not None:
            bias = bias.float() * (1.0 if fold.b is None else fold.b.float())
        return w, bias

    def _dense_dtype(self) -> torch.dtype:
        """The dtype the weight had before quantisation (4-bit states record it), else the bias's
        or the model's."""
        state = getattr(self._quantized.weight, "quant_state", None)
        if state is not None:
            return getattr(state, "original_dtype", None) or state.dtype
        if self._quantized.bias is not None:
            return self._quantized.bias.dtype
        return self.model_dtype

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w, bias = self.merged_weights()
        q = self._quantized
        dtype = self._dense_dtype()
        dense = nn.Linear(q.in_features, q.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        dense.weight.copy_(w.to(dtype))
        if bias is not None:
            dense.bias.copy_(bias.to(dtype))
        dense.requires_grad_(False)
        self.base = dense
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base = self._quantized
        self.merged = False

    def forget_originals(self) -> None:
        """Keep the dense merged layer for good (``merge_and_unload``)."""
        self.merged = False
        self.active = False

    def unloaded(self) -> nn.Module | None:
        """The module ``merge_and_unload`` leaves at this path: the dense merged layer."""
        return self.base if self.base is not self._quantized else None

    def extra_repr(self) -> str:
        return f"path={self.path!r}, merged={self.merged}, base={self.quantization}"


@hookimpl
def build_site(base, family, site):
    """A :class:`BnbLinearSite` for a bitsandbytes layer holding quantised weights."""
    if family != "linear" or not is_linear(base) or quantization(base) is None:
        return None
    built = BnbLinearSite(base, site.info, site.program, has_scale_in="linear.scale_in" in site.kinds)
    built.state = site.state
    return built


__all__ = [
    "BnbLinearSite",
    "cpu_repacked",
    "prepare_kbit_training",
    "restore_trainable_layout",
    "trainer_accepts",
]
