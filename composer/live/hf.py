"""Hugging Face checkpoints of a composed model: ``save_pretrained``, ``Trainer`` saves and resumes.

A composition patches the model in place, so the model's own ``state_dict()`` names the base
weights where the sites hold them (``…query.base.weight``) and holds the adapters too
(``…query.program.op.lora_A``). Written as they are, ``from_pretrained`` would re-initialise
every adapted layer. While a composition is applied, the model's ``save_pretrained`` — which
``Trainer.save_model`` and every Trainer checkpoint call — is replaced by one that writes

    config.json, model.safetensors   the base model's weights under their original names, plus
                                     the composition's tensors under the model's live names
    adapter_composer/                the composition (``composition.json`` + one file per
                                     adapter), the directory :func:`adapter_composer.load` reads

``ac.from_pretrained(AutoModelForX, d)`` rebuilds the composed model from such a directory with
identical outputs. A plain ``AutoModelForX.from_pretrained(d)`` gets the base model and lists
the composition's tensors as UNEXPECTED in its load report. Loading a state dict with original
names into the composed model (``Trainer(resume_from_checkpoint=...)`` does so with
``model.load_state_dict(sd, strict=False)``) renames the base weights back to where the sites
hold them, so a resumed run restores the base and every adapter.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.registry import Diagnostic
from adapter_composer.runtime import CONTAINER_ATTR

SUBDIR = "adapter_composer"  # the composition directory inside a save_pretrained directory
MODEL_FAMILIES = ("prompt", "prefix", "optimizer")


def wrapper_depths(composed: Any) -> dict[str, int]:
    """Module path -> how many site modules wrap the original module there (BERT's attn.o: 2)."""
    depths: dict[str, int] = {}
    for path, family in composed._rt.sites:
        if family not in MODEL_FAMILIES and path:
            depths[path] = depths.get(path, 0) + 1
    return depths


def original_name(key: str, depths: Mapping[str, int]) -> str | None:
    """The name of a live state-dict entry in the unpatched model, or None for a tensor of
    the composition (an adapter, an operator's weights)."""
    parts = key.split(".")
    if parts[0] == CONTAINER_ATTR:
        return None
    out: list[str] = []
    i = 0
    while i < len(parts):
        out.append(parts[i])
        i += 1
        for _ in range(depths.get(".".join(out), 0)):
            if i < len(parts) and parts[i] == "base":
                i += 1
            else:
                return None  # inside a site's program
    return ".".join(out)


def checkpoint_state(composed: Any, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What a checkpoint of the composed model holds: base weights under their original
    names, the composition's tensors under their live names (``state_dict`` defaults to the
    model's own)."""
    if composed.merged:
        raise ComposerError(
            "the composition is merged into the weights, so the base weights cannot be saved as they were: "
            "call composed.unmerge() first, or composed.merge_and_unload() to save a plain merged model"
        )
    given = composed.model.state_dict() if state_dict is None else state_dict
    depths = wrapper_depths(composed)
    out: dict[str, torch.Tensor] = {}
    for key, value in given.items():
        name = original_name(key, depths)
        out[key if name is None else name] = value
    return out


def _rename_on_load(depths_of, module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: entries named as in the unpatched model go where the sites hold them."""
    depths = depths_of()
    for live in module.state_dict(keep_vars=True):
        name = original_name(live, depths)
        if name is None or name == live:
            continue
        if prefix + name in state_dict and prefix + live not in state_dict:
            state_dict[prefix + live] = state_dict.pop(prefix + name)


class _SavePretrained:
    """``model.save_pretrained`` while composed. An object holding the composition and the
    bound original, not a closure, so a deep copy of the model saves its own composition."""

    def __init__(self, composed: Any, original: Any):
        self.composed = composed
        self.original = original
        functools.update_wrapper(self, original)

    def __call__(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
        if kwargs.get("push_to_hub"):
            raise ComposerError(
                "push_to_hub is not supported while a composition is applied (the upload would miss the "
                f"{SUBDIR}/ directory): save_pretrained(d) locally, then upload the folder with "
                "huggingface_hub.upload_folder"
            )
        composed, original = self.composed, self.original
        state = checkpoint_state(composed, state_dict)
        model = composed.model
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is None:
            result = original(save_directory, is_main_process=is_main_process, state_dict=state, **kwargs)
        else:
            result = _save_quantized(model, quantizer, original, state, save_directory, is_main_process, kwargs)
        if is_main_process:
            composed.save(Path(save_directory) / SUBDIR)
        return result


class _Depths:
    """``wrapper_depths(composed)`` on demand (an object, so deep copies follow their copy)."""

    def __init__(self, composed: Any):
        self.composed = composed

    def __call__(self) -> dict[str, int]:
        return wrapper_depths(self.composed)


def _save_quantized(model, quantizer, original, state, save_directory, is_main_process, kwargs):
    """transformers replaces a given state dict by the quantizer's own (bitsandbytes: by
    ``model.state_dict()``), so the translated one is what ``state_dict()`` returns meanwhile."""
    from transformers.quantizers.base import HfQuantizer

    if type(quantizer).get_state_dict_and_metadata is not HfQuantizer.get_state_dict_and_metadata:
        raise ComposerError(
            f"{type(quantizer).__name__} writes its own state dict, with the composition's module names: "
            "save the composition with composed.save(d) and keep the quantized base checkpoint as it is"
        )
    model.state_dict = lambda *args, **kw: dict(state)
    try:
        return original(save_directory, is_main_process=is_main_process, **kwargs)
    finally:
        del model.state_dict


def install(composed: Any) -> None:
    """Put the HF save/load translation on the composed model (undone with the composition)."""
    model: nn.Module = composed.model
    patch = composed._patch
    patch.hooks.append(
        model.register_load_state_dict_pre_hook(functools.partial(_rename_on_load, _Depths(composed)))
    )
    original = getattr(model, "save_pretrained", None)
    if callable(original) and "save_pretrained" not in vars(model):
        model.save_pretrained = _SavePretrained(composed, original)
        patch.added_attrs.append((model, "save_pretrained"))


def peft_diagnostic(model: nn.Module) -> Diagnostic | None:
    """A diagnostic when ``model`` is a HF PEFT model, or holds PEFT's adapter layers."""
    wrapped = type(model).__module__.split(".")[0] == "peft" or getattr(model, "_hf_peft_config_loaded", False)
    layers = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")})
    if not wrapped and not layers:
        return None
    what = f"a PEFT {type(model).__name__}" if wrapped else f"a model holding PEFT layers ({', '.join(layers[:3])})"
    return Diagnostic(
        code="peft-model",
        message=f"compose() got {what}; adapter-composer composes onto the plain transformers model",
        rule="PEFT's wrappers and layers replace the modules the roles map to",
        fix="unwrap it: peft_model.merge_and_unload() keeps its adapter folded in, peft_model.unload() drops it "
        "(or ac.from_peft(base_model, adapter_dir) imports the adapter itself)",
    )


# --- reading ----------------------------------------------------------------------------


def composition_dir(directory: str | Path) -> Path:
    """The composition directory of ``directory``: itself, or its ``adapter_composer/``."""
    directory = Path(directory)
    if not (directory / "composition.json").is_file() and (directory / SUBDIR / "composition.json").is_file():
        return directory / SUBDIR
    return directory


class _QuietReport(logging.Filter):
    """Drops transformers' load report in this thread only (the caller checks the keys itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread and "LOAD REPORT" in str(record.msg))


def load_base(model_class: Any, directory: Path, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``model_class.from_pretrained(directory)`` with its loading info, without the report
    that would list the composition's tensors as unexpected."""
    quiet = _QuietReport()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(quiet)
    try:
        return model_class.from_pretrained(str(directory), output_loading_info=True, **kwargs)
    finally:
        logger.removeFilter(quiet)


__all__ = ["SUBDIR", "checkpoint_state", "composition_dir", "install", "load_base", "original_name", "peft_diagnostic"]
