"""Crash-safe saves into a directory that may hold the user's own files.

Two protocols, one per kind of format. Both take an exclusive lock on the directory first
(``flock`` on the directory itself, released by the kernel if the process dies), so a
second writer gets :class:`SaveConflictError` before it writes anything; both fsync every
file and the directory before the step that makes a save visible; both leave every file
they did not write alone (a ``README.md``, an ``eval/`` folder), and both finish or clean
up what an earlier, killed save left behind — only files that save recorded as its own.

**A manifest that names its files** (our composition directory), :func:`commit_with_manifest`:

1. write a journal ``.<manifest>.pending-<token>`` listing the files about to be written
   and the files of the current save (so that a crash at any later step can be cleaned up);
2. write every new file under a new, unique name, and fsync it;
3. write the new manifest to a temporary name and ``os.replace`` it over the old one —
   **the commit point**: before it the old manifest and its files are untouched, after it
   the new ones are complete;
4. remove the previous save's files the new manifest does not name, then the journal.

**Fixed file names** (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``),
:func:`commit_fixed_files`: every file is written as ``.<name>.new-<token>`` and fsynced;
then a journal ``.adapter-composer.commit`` naming them is put in place atomically — **the
commit point** — and each file is renamed over its final name (the config last), then the
journal is removed. A reader that finds the journal takes each file from its ``.new`` name
while it exists (:func:`fixed_file_paths`), so it sees the complete old pair before the
commit point and the complete new pair after it; the next save finishes the renames.
Readers of other libraries (PEFT itself) see the two renames, microseconds apart.

:func:`fs_step` is called before every change to the file system; it does nothing, and
tests replace it to kill the process at each step in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from adapter_composer.errors import AdapterFileError, SaveConflictError
from adapter_composer.formats.files import FILE_NAME

JOURNAL = ".adapter-composer.commit"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def fs_step(label: str) -> None:
    """Called before every file-system change a save makes; a no-op (a test seam)."""


def new_token() -> str:
    return uuid.uuid4().hex[:12]


# --- primitives -------------------------------------------------------------------------


def fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes | Callable[[Path], Any]) -> None:
    """Create ``path`` (it must not exist), write ``data`` (bytes, or a callable that writes
    the file at the path it is given) and fsync it."""
    fs_step(f"write {path.name}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if callable(data):
            data(path)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(src: Path, dst: Path) -> None:
    fs_step(f"rename {src.name} -> {dst.name}")
    os.replace(src, dst)


def _unlink(path: Path) -> None:
    fs_step(f"remove {path.name}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (:class:`SaveConflictError` if another holds it)."""
    if fcntl is None:  # pragma: no cover - Windows: a lock file, held open and locked
        import msvcrt

        fd = os.open(directory / ".adapter-composer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            raise _conflict(directory) from None
        try:
            yield
        finally:
            os.close(fd)
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _conflict(directory) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _conflict(directory: Path) -> SaveConflictError:
    return SaveConflictError(
        f"another save to {directory} is in progress (in this or another process); nothing was "
        "written. Save to another directory, or retry when that save has finished"
    )


def _prepare(directory: Path) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"{directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdapterFileError(f"cannot create {directory}: {exc}") from None
    return directory


def _refuse_unrelated(directory: Path, marker: str, ours: Callable[[str], bool]) -> None:
    if (directory / marker).exists():
        return
    foreign = sorted(p.name for p in directory.iterdir() if not ours(p.name))
    if foreign:
        raise AdapterFileError(
            f"{directory} is a non-empty directory without {marker} (it holds {foreign[:4]}); "
            "refusing to overwrite it. Choose an empty or new directory"
        )


def _clean_legacy_siblings(directory: Path, marker: str) -> None:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` folders earlier versions of this library
    left beside ``directory`` when killed mid-save (only ones that hold nothing but such a
    save, or nothing)."""
    parent = directory.parent
    for prefix in (f".{directory.name}.tmp-", f".{directory.name}.old-"):
        for old in parent.glob(f"{prefix}*"):
            if old.is_symlink() or not old.is_dir():
                continue
            names = {p.name for p in old.iterdir()}
            if not names or marker in names:
                fs_step(f"remove {old.name}")
                shutil.rmtree(old, ignore_errors=True)


def _write_error(directory: Path, exc: OSError) -> AdapterFileError:
    return AdapterFileError(f"could not save to {directory}: {exc}; the previous save is unchanged")


# --- a manifest naming its files -------------------------------------------------------


def commit_with_manifest(
    directory: Path,
    files: Mapping[str, bytes],
    manifest: str,
    manifest_bytes: bytes,
    referenced: Callable[[Path], set[str]],
    token: str,
) -> Path:
    """Save ``files`` (new, unique names) and ``manifest`` into ``directory`` (module docstring).

    ``referenced(directory)`` gives the file names the manifest currently there names (an
    empty set when there is none or it cannot be read); ``token`` is the unique part of
    this save's names.
    """
    directory = _prepare(directory)
    journal = directory / f".{manifest}.pending-{token}"
    tmp = directory / f".{manifest}.tmp-{token}"
    with directory_lock(directory):
        recover_manifest_saves(directory, manifest, referenced)
        _refuse_unrelated(directory, manifest, lambda n: n.startswith(f".{manifest}."))
        old = referenced(directory)
        try:
            record = {"new": sorted(files), "old": sorted(old)}
            write_new(journal, json.dumps(record).encode())
            fsync_dir(directory)
            for name, data in files.items():
                write_new(directory / name, data)
            write_new(tmp, manifest_bytes)
            fsync_dir(directory)
            _replace(tmp, directory / manifest)  # the commit point
            fsync_dir(directory)
        except OSError as exc:
            _abandon(directory, journal, tmp, files)
            raise _write_error(directory, exc) from exc
        except BaseException:
            _abandon(directory, journal, tmp, files)
            raise
        # committed: what follows only tidies up, and a failure here is finished by the next save
        with contextlib.suppress(OSError):
            for name in sorted(old - set(files)):
                _remove_ours(directory, name)
            fsync_dir(directory)
            _unlink(journal)
            fsync_dir(directory)
    with contextlib.suppress(OSError):
        _clean_legacy_siblings(directory, manifest)
    return directory


def _remove_ours(directory: Path, name: str) -> None:
    """Remove a weight file a save of ours wrote (plain ``*.safetensors`` names only)."""
    if FILE_NAME.fullmatch(name) and name.endswith(".safetensors"):
        _unlink(directory / name)


def _abandon(directory: Path, journal: Path, tmp: Path, files: Mapping[str, bytes]) -> None:
    """Undo a save that failed before its commit point (an exception, not a crash)."""
    with contextlib.suppress(OSError):
        for name in files:
            _remove_ours(directory, name)
        _unlink(tmp)
        _unlink(journal)


def recover_manifest_saves(
    directory: Path, manifest: str, referenced: Callable[[Path], set[str]]
) -> None:
    """Clean up after saves that were killed: every file a leftover journal lists that the
    current manifest does not name, the journal's temporary manifest, then the journal."""
    journals = sorted(directory.glob(f".{manifest}.pending-*"))
    if not journals:
        return
    current = referenced(directory)
    for journal in journals:
        token = journal.name.rsplit("-", 1)[-1]
        try:
            record = json.loads(journal.read_text())
            new = {n for n in record.get("new", ()) if isinstance(n, str) and f".{token}." in n}
            listed = new | {n for n in record.get("old", ()) if isinstance(n, str)}
        except (OSError, ValueError, TypeError, AttributeError):
            listed = set()  # a journal cut short: it was written before any file, so none exists
        for name in sorted(listed - current):
            _remove_ours(directory, name)
        _unlink(directory / f".{manifest}.tmp-{token}")
        _unlink(journal)
    fsync_dir(directory)


# --- fixed file names -------------------------------------------------------------------


def _journal_record(directory: Path) -> dict[str, str] | None:
    """Final name -> temporary name of an unfinished commit, or None when there is none."""
    path = directory / JOURNAL
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(files, dict):
        return None
    return {
        final: tmp
        for final, tmp in files.items()
        if isinstance(final, str)
        and isinstance(tmp, str)
        and FILE_NAME.fullmatch(final)
        and tmp.startswith(f".{final}.new-")
        and "/" not in tmp
        and os.sep not in tmp
    }


def fixed_file_paths(directory: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Where each of ``names`` is to be read from: its ``.new`` name while an unfinished commit
    still holds it there, else the final name (see the module docstring)."""
    record = _journal_record(directory) or {}
    out = {}
    for name in names:
        tmp = record.get(name)
        out[name] = directory / tmp if tmp is not None and (directory / tmp).is_file() else directory / name
    return out


def state_of(directory: Path, names: tuple[str, ...]) -> tuple:
    """A snapshot that changes whenever a save touches ``names`` (to detect a concurrent save)."""
    record = _journal_record(directory)
    stats = []
    for name in names:
        for path in (directory / name, *([directory / record[name]] if record and name in record else [])):
            try:
                st = path.stat()
                stats.append((path.name, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((path.name, None))
    return (tuple(sorted(record.items())) if record else None, tuple(stats))


def finish_fixed_commit(directory: Path) -> None:
    """Complete the renames of a commit that was killed after its commit point."""
    record = _journal_record(directory)
    if record is None:
        if (directory / JOURNAL).exists() or (directory / JOURNAL).is_symlink():
            _unlink(directory / JOURNAL)  # unreadable: never a committed journal (those are atomic)
        return
    for final, tmp in record.items():
        if (directory / tmp).is_file():
            _replace(directory / tmp, directory / final)
    fsync_dir(directory)
    _unlink(directory / JOURNAL)
    fsync_dir(directory)


def _stale_fixed(directory: Path, names: tuple[str, ...]) -> list[Path]:
    out = [p for n in names for p in directory.glob(f".{n}.new-*")]
    return out + list(directory.glob(f"{JOURNAL}.tmp-*"))


def commit_fixed_files(directory: Path, files: Mapping[str, Any], marker: str) -> Path:
    """Save ``files`` under their fixed names, in the order given (the marker, a config, last)."""
    directory = _prepare(directory)
    names = tuple(files)
    token = new_token()
    temps = {name: f".{name}.new-{token}" for name in names}
    with directory_lock(directory):
        finish_fixed_commit(directory)
        for stale in _stale_fixed(directory, names):
            _unlink(stale)
        ours = tuple(f".{n}.new-" for n in names) + (JOURNAL,)
        _refuse_unrelated(directory, marker, lambda n: n.startswith(ours))
        journal_tmp = directory / f"{JOURNAL}.tmp-{token}"
        try:
            for name, data in files.items():
                write_new(directory / temps[name], data)
            write_new(journal_tmp, json.dumps({"files": temps}).encode())
            fsync_dir(directory)
            _replace(journal_tmp, directory / JOURNAL)  # the commit point
            fsync_dir(directory)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                for tmp in (*temps.values(), journal_tmp.name):
                    _unlink(directory / tmp)
            if isinstance(exc, OSError):
                raise _write_error(directory, exc) from exc
            raise
        with contextlib.suppress(OSError):  # committed: readers already see the new files
            finish_fixed_commit(directory)
    with contextlib.suppress(OSError):
        _clean_legacy_siblings(directory, marker)
    return directory


def commit_from_every_rank(directory: Path, write: Callable[[], Path]) -> Path:
    """``write()`` for a save that every rank of a sharded (FSDP2) model makes: rank 0 writes,
    the others wait for it and fail with it. Without a process group, just ``write()``."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return write()
    failure = None
    if dist.get_rank() == 0:
        try:
            write()
        except BaseException as exc:  # the others must hear of it before anyone raises
            failure = exc
    flag = torch.tensor([0 if failure is None else 1])
    dist.broadcast(flag, src=0)
    if failure is not None:
        raise failure
    if flag.item():
        raise AdapterFileError(f"rank 0 failed to write {directory}; see its error")
    return Path(directory)


__all__ = [
    "JOURNAL",
    "commit_fixed_files",
    "commit_from_every_rank",
    "commit_with_manifest",
    "directory_lock",
    "finish_fixed_commit",
    "fixed_file_paths",
    "fs_step",
    "new_token",
    "recover_manifest_saves",
    "state_of",
]
