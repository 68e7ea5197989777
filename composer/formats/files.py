"""File primitives shared by every format: safe names, bounded JSON and safetensors reads,
tensor checks. Crash-safe writes are in :mod:`adapter_composer.formats.commit`.

A directory handed to the library is untrusted input. What is read from it:

- only files named by a *plain* name inside it (:func:`member`): letters, digits, ``_``,
  ``-`` and ``.``, not starting with ``.``, at most 200 characters. A symbolic link is
  followed only when its fully resolved target lies inside the directory, or, for a
  Hugging Face hub snapshot (``…/snapshots/<revision>/``), inside that repository's
  ``blobs/`` folder (where the hub cache keeps the files its snapshots link to). Names are
  checked before the file system is asked anything, so an error never reveals whether
  some other path exists;
- JSON (:func:`read_json`): at most :data:`MAX_JSON_BYTES`, nested at most
  :data:`MAX_JSON_DEPTH` deep, no duplicate keys, no ``NaN``/``Infinity``;
- safetensors (:func:`tensor_headers`, :func:`read_safetensors`): headers are read
  without allocating any tensor, so shapes can be checked before anything is built.

Nothing here unpickles: tensors come only from safetensors files, metadata only from JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file

from adapter_composer.errors import AdapterFileError, UnsafePathError

FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- names and paths --------------------------------------------------------------------


def _allowed_roots(directory: Path) -> list[Path]:
    real = Path(os.path.realpath(directory))
    roots = [real]
    if real.parent.name == "snapshots":  # the HF hub cache: snapshots/<rev>/x -> ../../blobs/<hash>
        roots.append(real.parent.parent / "blobs")
    return roots


def member(directory: Path, name: Any, what: str) -> Path:
    """The path of file ``name`` in ``directory``; :class:`UnsafePathError` for anything that
    is not a plain name there or is a link leading outside (see the module docstring)."""
    directory = Path(directory)
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
        raise UnsafePathError(
            f"{what}: {str(name)[:80]!r} is not a plain file name inside {directory} "
            "(letters, digits, '_', '-' and '.', not starting with '.'; no '/', no '..')"
        )
    return inside(directory, directory / name, what)


def inside(directory: Path, path: Path, what: str) -> Path:
    """``path`` (directly in ``directory``) unless it is a link leading outside the directory."""
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not any(target == r or r in target.parents for r in _allowed_roots(directory)):
            raise UnsafePathError(
                f"{what}: {path} is a symbolic link to a place outside {directory}; "
                "links are followed only inside the directory (or into a hub cache's blobs/)"
            )
    return path


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (following an allowed link), else an :class:`AdapterFileError`."""
    if not path.is_file():
        raise AdapterFileError(f"missing file {path} ({what})")
    return path


# --- JSON -------------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (non-finite values are refused)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is not a number JSON allows here: it overflows to infinity (non-finite values are refused)")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, list | tuple):
            items = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((v, depth + 1) for v in items)
    return deepest


def parse_json(data: bytes, where: str) -> Any:
    """Parse JSON bytes with the limits of the module docstring."""
    if len(data) > MAX_JSON_BYTES:
        raise AdapterFileError(f"{where} is {len(data):,} bytes; at most {MAX_JSON_BYTES:,} are read")
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text, parse_constant=_no_constants, parse_float=_finite_float, object_pairs_hook=_no_duplicates
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFileError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise AdapterFileError(f"{where} nests too deeply to read") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise AdapterFileError(f"{where} nests more than {MAX_JSON_DEPTH} levels deep")
    return value


def read_json(path: Path, what: str) -> Any:
    """Read and parse a JSON file (regular file only, size-limited, see :func:`parse_json`)."""
    require_file(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise AdapterFileError(f"{path} is larger than {MAX_JSON_BYTES:,} bytes; refusing to read it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AdapterFileError(f"cannot read {path}: {exc}") from None
    return parse_json(data, str(path))


# --- safetensors ------------------------------------------------------------------------


def tensor_headers(path: Path, what: str) -> dict[str, tuple[torch.dtype | str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor in a safetensors file, without loading any."""
    require_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for key in fh.keys():  # noqa: SIM118 (not a dict)
                piece = fh.get_slice(key)
                out[key] = (_dtype(piece.get_dtype()), tuple(int(d) for d in piece.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from None


_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _dtype(name: str) -> torch.dtype | str:
    return _DTYPES.get(name, name)


def read_safetensors(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every failure into an :class:`AdapterFileError`."""
    require_file(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from None


def load_safetensors_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdapterFileError(
            f"{where} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from None


# --- checks -----------------------------------------------------------------------------


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], tuple):
        return value[1]  # a (dtype, shape) header
    return tuple(value)


def _listed(names: list[str]) -> str:
    return f"{names[:6]}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def check_tensors(
    where: str, tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Names and shapes that do not match, as readable lines. ``tensors`` holds tensors or
    safetensors headers (see :func:`tensor_headers`)."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"{where}: missing tensors {_listed(missing)}")
    if extra:
        problems.append(f"{where}: unexpected tensors {_listed(extra)}")
    for k in sorted(set(expected) & set(tensors)):
        if _shape(tensors[k]) != tuple(expected[k]):
            problems.append(
                f"{where}: tensor {k} has shape {_shape(tensors[k])}, the model needs {tuple(expected[k])}"
            )
    return problems


def dtype_of(value: Any) -> torch.dtype | str:
    return value.dtype if isinstance(value, torch.Tensor) else value[0]


def check_dtypes(
    where: str, tensors: Mapping[str, Any], expected: Mapping[str, torch.dtype]
) -> list[str]:
    """Tensors (or headers) whose dtype does not fit the module's: a floating-point tensor goes
    into any floating-point parameter (cast, as PEFT does), anything else only as exactly
    that dtype (LoftQ's uint8 codes). An integer or bool tensor is never cast into a float
    parameter, nor a float into an integer buffer, silently."""
    bad, floats = [], True
    for k in sorted(set(tensors) & set(expected)):
        got, want = dtype_of(tensors[k]), expected[k]
        if got == want or (got in FLOATING and want.is_floating_point):
            continue
        floats = floats and want.is_floating_point
        bad.append(f"{k} ({str(got).replace('torch.', '')} for a {str(want).replace('torch.', '')} tensor)")
    if not bad:
        return []
    what = "not floating point" if floats else "not of the module's dtype"
    return [f"{where}: tensors {_listed(bad)} are {what}; adapter weights are not cast between kinds"]


def dtypes(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in tensors.items()}


def check_finite(where: str, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors holding NaN or ±Inf (which would turn every output into NaN)."""
    bad = []
    for k, v in sorted(tensors.items()):
        if torch.is_floating_point(v) and v.numel() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            bad.append(f"{k} ({n} of {v.numel()} values)")
    if not bad:
        return []
    return [f"{where}: tensors {_listed(bad)} hold NaN or infinite values"]


def check_fit(
    where: str,
    tensors: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    kinds: Mapping[str, torch.dtype],
    allow_nonfinite: bool = True,
) -> list[str]:
    """Names and shapes (:func:`check_tensors`), dtypes (:func:`check_dtypes`) and, for real
    tensors unless ``allow_nonfinite``, values (:func:`check_finite`)."""
    problems = check_tensors(where, tensors, shapes) + check_dtypes(where, tensors, kinds)
    if not allow_nonfinite and all(isinstance(v, torch.Tensor) for v in tensors.values()):
        problems += check_finite(where, tensors)
    return problems


NONFINITE_FIX = "pass allow_nonfinite=True to load them anyway"


def strict_problems(schema: type, values: Mapping[str, Any], what: str) -> list[str]:
    """The values the pydantic ``schema`` would accept only by *coercing* them (``"false"`` is
    not a bool, ``8.0`` not an int, ``true`` not a number), as readable lines; JSON semantics,
    so a list fits a tuple field. Values the schema refuses anyway are left to validation,
    which reports them as ``bad-config`` / ``bad-options`` diagnostics."""
    try:
        text = json.dumps(dict(values), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return [f"{what}: not plain JSON values: {exc}"]
    try:
        schema.model_validate(dict(values))
    except Exception:
        return []  # refused without coercion too: validation names the fields
    try:
        schema.model_validate_json(text, strict=True)
    except ValidationError as exc:
        return [
            f"{what}: {'.'.join(map(str, e['loc'])) or '(config)'}: {e['msg']}"
            + ("" if e["type"] == "missing" else f" (got {e.get('input')!r:.60})")
            for e in exc.errors()[:6]
        ]
    except Exception as exc:  # a plugin's validator raising something else
        return [f"{what}: the schema's validation raised {type(exc).__name__}: {exc}"]
    return []


def is_sharded(tensor: torch.Tensor) -> bool:
    """A ``DTensor`` (a parameter of a model sharded with FSDP2's ``fully_shard``)."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


def contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain CPU copies; sharded tensors are gathered whole first, which is a collective:
    every rank of the model's mesh must make the same call, in the same order."""
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        if is_sharded(v):
            v = v.full_tensor()
        out[k] = v.to("cpu").contiguous().clone()
    return out
