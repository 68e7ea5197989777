"""File primitives shared by every format: atomic directory writes, safetensors reads, checks.

Nothing here unpickles: tensors are read only from safetensors files, metadata only from JSON.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapter_composer.errors import AdapterFileError


def safe_filename(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return stem if stem == name else f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def write_directory_atomically(directory: Path, files: Mapping[str, Any], marker: str) -> Path:
    """Write ``files`` (name → bytes, or a callable(path) that writes) as ``directory``.

    The target is replaced in one rename. An existing directory is only replaced when it
    holds ``marker`` (a previous save) or is empty, so that nothing unrelated is lost.
    """
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise AdapterFileError(f"{directory} exists and is not a directory")
        entries = list(directory.iterdir())
        if entries and not (directory / marker).exists():
            raise AdapterFileError(
                f"{directory} is a non-empty directory without {marker}; refusing to overwrite it"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for name, content in files.items():
            target = tmp / name
            if callable(content):
                content(target)
            else:
                target.write_bytes(content)
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every failure into an :class:`AdapterFileError`."""
    if not path.is_file():
        raise AdapterFileError(f"missing file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from None


def check_tensors(
    where: str, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Names and shapes that do not match, as readable lines."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(
            f"{where}: missing tensors {missing[:6]}"
            + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        )
    if extra:
        problems.append(
            f"{where}: unexpected tensors {extra[:6]}"
            + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
        )
    for k in sorted(set(expected) & set(tensors)):
        if tuple(tensors[k].shape) != tuple(expected[k]):
            problems.append(
                f"{where}: tensor {k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(expected[k])}"
            )
    return problems


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


def write_from_every_rank(directory: Path, files: Mapping[str, Any], marker: str) -> Path:
    """:func:`write_directory_atomically` for a save that every rank of a sharded model makes:
    rank 0 writes, the others wait for it and fail with it. Without a process group (or with a
    model that is not sharded, e.g. DDP saving on rank 0 alone) use the plain function."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return write_directory_atomically(directory, files, marker)
    failure = None
    if dist.get_rank() == 0:
        try:
            write_directory_atomically(directory, files, marker)
        except BaseException as exc:  # the others must hear of it before anyone raises
            failure = exc
    flag = torch.tensor([0 if failure is None else 1])
    dist.broadcast(flag, src=0)
    if failure is not None:
        raise failure
    if flag.item():
        raise AdapterFileError(f"rank 0 failed to write {directory}; see its error")
    return Path(directory)
