"""``composition.json``: its strict schema, and the base model's fingerprint it records.

Every field has a type and nothing is coerced: a manifest that does not fit the schema is
refused with an :class:`AdapterFileError` naming the file and the field. The graph inside
is checked by :meth:`adapter_composer.pipeline.graph.Graph.from_dict`, the adapters'
configs by their methods' own schemas (see :mod:`adapter_composer.formats.composition`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from adapter_composer.errors import AdapterFileError
from adapter_composer.formats.files import member, parse_json, require_file
from adapter_composer.sites import logical_shape

FORMAT = "adapter-composer.composition"
VERSION = 1
MANIFEST = "composition.json"

_STRICT = ConfigDict(frozen=True, extra="forbid", strict=True)


class MethodEntry(BaseModel):
    model_config = _STRICT
    plugin: str = Field(description="the plugin that registered the method")
    version: str = Field(description="that plugin's version when saving")


class AdapterEntry(BaseModel):
    model_config = _STRICT
    file: str = Field(description="plain name of the adapter's safetensors file in the directory")
    method: str = Field(description="the adapter's method")
    tensors: int = Field(ge=0, description="how many tensors the file holds")


class Fingerprint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)
    model_type: str | None = Field(description="the base model's config.model_type")
    class_: str = Field(alias="class", description="the base model's class name")
    num_parameters: int = Field(ge=0, description="parameters of the base model")
    shapes_sha256: str = Field(description="sha256 of the sorted (name, shape) list")
    shapes: dict[str, list[int]] = Field(description="every parameter's shape")


class Manifest(BaseModel):
    model_config = _STRICT
    format: Literal["adapter-composer.composition"]
    version: Literal[1]
    graph: dict[str, Any] = Field(description="the composition graph (Graph.to_dict())")
    methods: dict[str, MethodEntry] = Field(description="method -> plugin and version")
    adapters: dict[str, AdapterEntry] = Field(description="adapter -> its file")
    operators_file: str | None = Field(description="the operators' weights file, if any")
    base_model: Fingerprint = Field(description="the base model the composition was saved on")

    def files(self) -> dict[str, str]:
        """What -> file name: ``adapter <name>`` for each adapter, ``operators`` for the operators."""
        out = {f"adapter {name!r}": entry.file for name, entry in self.adapters.items()}
        if self.operators_file is not None:
            out["operators"] = self.operators_file
        return out


def _field_errors(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:8]:
        loc = ".".join(str(x) for x in e["loc"]) or "(document)"
        got = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(got, dict | list) else f" (got {got!r:.60})"
        parts.append(f"{loc}: {e['msg']}{shown}")
    more = len(exc.errors()) - 8
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_manifest(data: bytes, path: Path) -> Manifest:
    """Check ``composition.json``'s bytes against the schema (format and version first)."""
    raw = parse_json(data, str(path))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not an adapter-composer composition (format {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise AdapterFileError(
            f"{path} has format version {raw.get('version')!r}; this library reads {VERSION}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise AdapterFileError(f"{path} does not fit the composition schema: {_field_errors(exc)}") from None
    for what, name in manifest.files().items():
        member(path.parent, name, f"{path.name}, {what}")
    names = [n.casefold() for n in manifest.files().values()]
    if len(set(names)) != len(names):
        raise AdapterFileError(f"{path}: two entries name the same file: {sorted(manifest.files().values())}")
    return manifest


def read_manifest_bytes(directory: Path) -> bytes:
    path = member(directory, MANIFEST, "the manifest")
    if not path.is_file():
        hint = ""
        if not Path(directory).exists():
            parent = Path(directory).parent
            left = sorted(p.name for p in parent.glob(f".{Path(directory).name}.old-*") if p.is_dir())
            if left:
                hint = f" ({left[0]} beside it holds a save an older version left when it was interrupted)"
            raise AdapterFileError(f"{directory} does not exist{hint}")
        raise AdapterFileError(f"{directory} holds no {MANIFEST}; is it a saved composition?")
    require_file(path, "the manifest")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterFileError(f"cannot read {path}: {exc}") from None


def load_manifest(directory: str | Path) -> Manifest:
    """The checked manifest of a saved composition directory."""
    directory = Path(directory)
    return parse_manifest(read_manifest_bytes(directory), directory / MANIFEST)


def referenced_files(directory: Path) -> set[str]:
    """File names the manifest in ``directory`` names (empty when there is none or it does not
    parse): the files a new save must not remove before its own commit."""
    try:
        return set(load_manifest(directory).files().values())
    except AdapterFileError:
        return set()


# --- fingerprint ------------------------------------------------------------------------


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Model type, class and every parameter's shape (names as in the unpatched model).

    Shapes are logical: a bitsandbytes 4-bit weight counts as the [out, in] matrix it packs,
    so a composition trained on a quantised base loads onto the full-precision model (and
    back), which is how QLoRA adapters are deployed."""
    shapes = {name: list(logical_shape(p)) for name, p in model.named_parameters()}
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "class": type(model).__name__,
        "num_parameters": sum(math.prod(v) for v in shapes.values()),
        "shapes_sha256": digest,
        "shapes": shapes,
    }


def fingerprint_differences(saved: Mapping[str, Any], model: nn.Module) -> list[str]:
    """What differs between a saved fingerprint and ``model`` (empty when they match)."""
    now = fingerprint(model)
    if (
        saved.get("shapes_sha256") == now["shapes_sha256"]
        and saved.get("model_type") == now["model_type"]
    ):
        return []
    out = []
    if saved.get("model_type") != now["model_type"]:
        out.append(
            f"model type: saved on {saved.get('model_type')!r}, this model is {now['model_type']!r}"
        )
    old, new = saved.get("shapes", {}), now["shapes"]
    changed = [k for k in old if k in new and list(old[k]) != list(new[k])]
    for k in changed[:8]:
        out.append(f"parameter {k}: saved shape {tuple(old[k])}, this model {tuple(new[k])}")
    if len(changed) > 8:
        out.append(f"... and {len(changed) - 8} more parameters with other shapes")
    missing = [k for k in old if k not in new]
    extra = [k for k in new if k not in old]
    if missing:
        out.append(
            f"{len(missing)} parameter(s) of the saved base are missing here, e.g. {missing[:3]}"
        )
    if extra:
        out.append(f"{len(extra)} parameter(s) here were not in the saved base, e.g. {extra[:3]}")
    return out or ["the parameter shapes differ"]


__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "AdapterEntry",
    "Fingerprint",
    "Manifest",
    "fingerprint",
    "fingerprint_differences",
    "parse_manifest",
    "load_manifest",
    "referenced_files",
]
