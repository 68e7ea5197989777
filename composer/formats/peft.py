"""Import from and export to HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The host handles files; each method's codec (``register.method(..., peft=codec)``)
translates its config and its tensor names. A codec has:

    peft_types                      PEFT's ``peft_type`` values it reads
    from_peft(peft_config) -> dict  our config (keyword arguments) from adapter_config.json
    to_peft(config, sites) -> dict  adapter_config.json for an adapter at these sites
    tensor_names                    PEFT tensor suffix -> our tensor name, for per-module
                                    tensors ``base_model.model.<module path>.<suffix>``
    split_tensors(raw), join_tensors(handle, sites)   optional, for other layouts (shared
                                    or model-level tensors); see :func:`split_tensors`.

The host itself handles what every method shares (:mod:`adapter_composer.formats.peft_options`):
``modules_to_save`` and task-type heads (our ``module`` method), ``layers_to_transform``,
suffix-style ``target_modules`` and the metadata fields PEFT writes.

Tensors are grouped by *where* they belong: a module path (a site), ``"shared"`` (the
adapter's shared module) or ``"model"`` (a model-level site). ``peft`` is never imported.

Reading is strict (the directory is untrusted): ``adapter_config.json`` must be a JSON
object read with :func:`adapter_composer.formats.files.parse_json`'s limits; codecs read
its fields with the typed helpers of :mod:`adapter_composer.formats.peft_fields`
(re-exported here); whatever a codec returns is checked against the method's schema with
no coercion; tensors must be floating point and finite (``allow_nonfinite=True`` to load
NaN/Inf anyway); and the shapes are compared with what the model would build, on the meta
device, before anything is built (:meth:`PeftAdapter.check_fits`). Any failure, including
one raised inside a third-party codec, is an :class:`AdapterFileError` naming the file.
Writes are crash-safe (:func:`adapter_composer.formats.commit.commit_fixed_files`) and
leave other files of the directory (PEFT's ``README.md``) alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import (
    AdapterFileError,
    ComposerError,
    CompositionError,
)
from adapter_composer.formats.commit import fixed_file_paths, state_of
from adapter_composer.formats.files import (
    NONFINITE_FIX,
    check_finite,
    check_fit,
    dtypes,
    inside,
    load_safetensors_bytes,
    member,
    parse_json,
    strict_problems,
)
from adapter_composer.formats.peft_export import CONFIG, WEIGHTS, export_peft, join_tensors
from adapter_composer.formats.peft_fields import (
    peft_bool,
    peft_dict,
    peft_float,
    peft_int,
    peft_str,
    peft_strings,
)
from adapter_composer.formats.peft_options import (
    PREFIX,
    layer_problems,
    missing_modules,
    split_module_tensors,
    take_host_options,
)
from adapter_composer.pipeline.graph import Graph
from adapter_composer.registry import MethodRecord, Registry, default_registry

MODULES = "_modules"  # suffix of the name under which an import declares its modules_to_save


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter read from disk, ready to be declared in a graph and loaded."""

    method: str
    config: Mapping[str, Any]
    targets: tuple[str, ...]
    tensors: Mapping[str, Mapping[str, torch.Tensor]]  # module path -> our tensor name -> tensor
    source: Path
    modules: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save
    saved_names: tuple[str, ...] = ()  # the names modules_to_save lists

    def declare(self, graph: Graph, name: str) -> str:
        """Declare this adapter in ``graph`` under ``name``; its ``modules_to_save`` (heads
        and other whole modules) become a ``module`` adapter named ``<name>_modules``."""
        targets = list(self.targets) if self.targets else None
        node = graph.adapter(name, self.method, targets=targets, **dict(self.config))
        if self.modules:
            graph.adapter(name + MODULES, "module", targets=[f"re:{re.escape(p)}" for p in sorted(self.modules)])
        return node

    def neutral_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors under our architecture-neutral names, for an adapter whose sites have
        ``keys`` (``layers.0.attn.q``, ``module.<path>``, ``model``)."""
        tensors = {f"{key}.{t}": v for key in keys for t, v in self._for(key).items()}
        tensors.update({f"shared.{t}": v for t, v in self.tensors.get("shared", {}).items()})
        return tensors

    def check_fits(self, model: nn.Module, name: str, registry: Registry | None = None) -> None:
        """Compare the file's tensors with what declaring the adapter as ``name`` on ``model``
        would build, planned on the meta device: nothing is built or allocated."""
        from adapter_composer.pipeline.shapes import planned_shapes
        from adapter_composer.pipeline.validate import analyse

        graph = Graph()
        self.declare(graph, name)
        analysis = analyse(graph, registry or default_registry(), model)
        if analysis.diagnostics:
            raise CompositionError(analysis.diagnostics, f"the PEFT adapter in {self.source}")
        planned = planned_shapes(analysis)
        if planned is None:
            return  # not buildable on the meta device: checked after building
        keys = [info.key for info in analysis.sites[name]]
        tensors = self.neutral_tensors(keys)
        problems = check_fit(str(self.source), tensors, planned.adapters[name], planned.adapter_dtypes[name])
        if problems:
            raise AdapterFileError(
                "the PEFT adapter does not fit the model (nothing was built):\n  " + "\n  ".join(problems)
            )

    def load_into(self, composed: Any, name: str) -> None:
        """Copy the weights into adapter ``name`` of ``composed`` (checked first)."""
        lacking = missing_modules(self.saved_names, self.modules, composed._analysis.resolver.names)
        if lacking:
            raise AdapterFileError(
                f"{self.source}: modules_to_save names {lacking}, which this model has, but {WEIGHTS} holds no "
                "tensors for them (PEFT always saves them): the file is incomplete"
            )
        handle = composed.adapters[name]
        tensors = self.neutral_tensors(list(handle.modules))
        problems = check_fit(str(self.source), tensors, handle.expected_shapes(), dtypes(handle.state_dict()))
        if problems:
            raise AdapterFileError(
                "the PEFT adapter does not fit the model:\n  " + "\n  ".join(problems)
            )
        handle.load_tensors(tensors)
        if self.modules:
            self._load_modules(composed, name + MODULES)

    def _load_modules(self, composed: Any, name: str) -> None:
        handle = composed.adapters[name]
        tensors = {f"module.{p}.{t}": v for p, values in self.modules.items() for t, v in values.items()}
        problems = check_fit(f"{self.source} (modules_to_save)", tensors, handle.expected_shapes(), dtypes(handle.state_dict()))
        if problems:
            raise AdapterFileError("the PEFT adapter's modules_to_save do not fit the model:\n  " + "\n  ".join(problems))
        handle.load_tensors(tensors)

    def _for(self, key: str) -> Mapping[str, torch.Tensor]:
        where = key[len("module.") :] if key.startswith("module.") else key
        return self.tensors.get(where, {})


def unsupported_options(
    peft: Mapping[str, Any], defaults: Mapping[str, Any], *, bias: bool = True
) -> list[str]:
    """The options of a PEFT config this codec cannot honour, as ``key=value`` strings: any
    of ``defaults`` set to something else (unset, ``None`` and empty count as default), and a
    ``bias`` other than "none"."""
    problems = [
        f"{k}={peft[k]!r:.60}"
        for k, default in defaults.items()
        if peft.get(k, default) not in (default, None, [], {})
    ]
    if bias and peft.get("bias", "none") != "none":
        problems.append(f"bias={peft['bias']!r:.60}")
    return problems


def split_tensors(
    raw: Mapping[str, torch.Tensor], names: Mapping[str, str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``base_model.model.<path>.<suffix>`` tensors by module path, renamed to ours."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"tensor {key!r} does not start with {PREFIX!r}")
        body = key[len(PREFIX) :]
        for suffix, ours in names.items():
            if body.endswith("." + suffix):
                out.setdefault(body[: -len(suffix) - 1], {})[ours] = value
                break
        else:
            raise ValueError(f"tensor {key!r} is not one this method has ({sorted(names)})")
    return out


def _method_for(registry: Registry, peft_type: str) -> MethodRecord:
    for record in registry.methods.values():
        if record.peft is not None and peft_type in record.peft.peft_types:
            return record
    known = sorted(
        t for r in registry.methods.values() if r.peft is not None for t in r.peft.peft_types
    )
    raise AdapterFileError(
        f"no installed method reads PEFT adapters of type {peft_type!r}; readable types: {known}"
    )


def _read_pair(directory: Path) -> tuple[bytes, bytes]:
    """The bytes of the config and the weights of one save (retried while a save runs)."""
    names = (CONFIG, WEIGHTS)
    for _ in range(5):
        before = state_of(directory, names)
        paths = fixed_file_paths(directory, names)
        for name, path in paths.items():
            what = f"the PEFT {'config' if name == CONFIG else 'weights'}"
            if path.name == name:
                member(directory, name, what)
            else:  # the .new file of an unfinished commit (ours, unless someone forged a journal)
                inside(directory, path, what)
        if not paths[CONFIG].is_file():
            raise AdapterFileError(f"{directory} holds no {CONFIG}; is it a PEFT adapter directory?")
        if not paths[WEIGHTS].is_file():
            pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (directory / n).exists()]
            hint = (
                f" ({pickled[0]} is there, but pickles are never loaded: convert it to safetensors)"
                if pickled
                else ""
            )
            raise AdapterFileError(f"missing file {directory / WEIGHTS}{hint}")
        try:
            data = {name: path.read_bytes() for name, path in paths.items()}
        except FileNotFoundError:
            continue  # a save renamed a file under us
        except OSError as exc:
            raise AdapterFileError(f"cannot read {directory}: {exc}") from None
        if state_of(directory, names) == before:
            return data[CONFIG], data[WEIGHTS]
    raise AdapterFileError(f"{directory} kept changing while it was read (concurrent saves?); try again")


def _codec_call(method: MethodRecord, what: str, where: Path, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (ValueError, ComposerError) as exc:
        raise AdapterFileError(f"{where}: {exc}") from None
    except Exception as exc:  # a codec tripping over a value it did not expect
        raise AdapterFileError(
            f"{where}: the PEFT codec of method {method.name!r} (plugin {method.plugin!r}) failed in "
            f"{what}: {type(exc).__name__}: {exc}"
        ) from None


def read_peft(
    directory: str | Path, *, registry: Registry | None = None, allow_nonfinite: bool = False
) -> PeftAdapter:
    """Read and check a PEFT adapter directory (without touching any model)."""
    registry = registry or default_registry()
    directory = Path(directory)
    cfg_path = directory / CONFIG
    config_bytes, weights_bytes = _read_pair(directory)
    peft_config = parse_json(config_bytes, str(cfg_path))
    if not isinstance(peft_config, dict):
        raise AdapterFileError(f"{cfg_path} must hold a JSON object, not a {type(peft_config).__name__}")
    peft_type = peft_config.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterFileError(f"{cfg_path}: peft_type must be a string, got {peft_type!r:.60}")
    method = _method_for(registry, peft_type)
    codec = method.peft
    try:
        peft_config, host = take_host_options(peft_config)  # modules_to_save, layers_to_transform
    except ValueError as exc:
        raise AdapterFileError(f"{cfg_path}: {exc}") from None
    config = _codec_call(method, "from_peft", cfg_path, codec.from_peft, peft_config)
    if not isinstance(config, Mapping):
        raise AdapterFileError(
            f"{cfg_path}: the PEFT codec of method {method.name!r} (plugin {method.plugin!r}) "
            f"returned {type(config).__name__} from from_peft, not a dict of config fields"
        )
    problems = strict_problems(method.config, config, f"{cfg_path} read as {method.name}")
    if problems:
        raise AdapterFileError("the PEFT config does not fit the method's schema:\n  " + "\n  ".join(problems))
    raw = load_safetensors_bytes(weights_bytes, str(directory / WEIGHTS))
    problems = [] if allow_nonfinite else check_finite(str(directory / WEIGHTS), raw)
    if problems:
        fix = "" if allow_nonfinite else f"\nIf non-finite values are intended, {NONFINITE_FIX}."
        raise AdapterFileError("\n".join(problems) + fix)
    raw, modules = split_module_tensors(raw, host.modules, getattr(codec, "tensor_names", {}) or {})
    split = codec.split_tensors if hasattr(codec, "split_tensors") else (lambda r: split_tensors(r, codec.tensor_names))
    tensors = _codec_call(method, "split_tensors", directory / WEIGHTS, split, raw)
    if not isinstance(tensors, Mapping) or not all(
        isinstance(group, Mapping) and all(isinstance(t, torch.Tensor) for t in group.values())
        for group in tensors.values()
    ):
        raise AdapterFileError(
            f"{directory / WEIGHTS}: the PEFT codec of method {method.name!r} (plugin {method.plugin!r}) "
            "returned something other than {where: {name: tensor}} from split_tensors"
        )
    bad = [w for w in tensors if not isinstance(w, str) or w.startswith("re:")]
    if bad:
        raise AdapterFileError(f"{directory / WEIGHTS}: tensors name modules {bad[:3]!r:.80}, which are not module paths")
    targets = tuple(sorted(w for w in tensors if w not in ("shared", "model")))
    try:
        problems = layer_problems(targets, host)
    except ComposerError as exc:  # a layers_pattern too slow to match
        raise AdapterFileError(f"{cfg_path}: {exc}") from None
    if problems:
        raise AdapterFileError(f"{directory / WEIGHTS} adapts layers its config excludes:\n  " + "\n  ".join(problems))
    return PeftAdapter(method.name, dict(config), targets, tensors, directory, modules, host.saved)


__all__ = [
    "CONFIG",
    "PREFIX",
    "WEIGHTS",
    "PeftAdapter",
    "export_peft",
    "join_tensors",
    "peft_bool",
    "peft_dict",
    "peft_float",
    "peft_int",
    "peft_str",
    "peft_strings",
    "read_peft",
    "split_tensors",
    "unsupported_options",
]
