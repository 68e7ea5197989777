"""Kill a save with SIGKILL before each of its file-system steps in turn, and look at what is left.

Run as a script by ``test_crash.py`` (one process per format; torch is imported once):

    python -m tests.safety.crash_child composition|peft OUT_DIR

For every step N of a save (counted by replacing ``adapter_composer.formats.commit.fs_step``
in a dry run), the script writes an *old* save into a directory that also holds the user's
own files, forks, and in the child starts a *new* save with ``fs_step`` replaced by one that
SIGKILLs the process just before step N. The parent then reloads the directory with the
library's readers and records whether it holds exactly the old or exactly the new weights
(compared bit for bit with the tensors that were saved), then runs a third save over the
wreck and records that it loads, that only one save's files remain and that the user's files
are untouched. One JSON line per N goes to stdout; the test checks them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # no thread pool alive across fork()

import adapter_composer as ac  # noqa: E402
import adapter_composer.formats.commit as commit  # noqa: E402
from tests.models import randomize, tiny_llama  # noqa: E402

USER_FILES = {"README.md": "my notes\n", "eval/results.json": '{"acc": 0.9}\n'}


def _composed(alpha: float):
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("a", "lora", r=2, alpha=alpha, targets=["attn.q"])
    g.adapter("b", "lora", r=2, alpha=alpha, targets=["attn.v"])
    g.sum("a", "b", weights=[0.5, 1.5], learnable=True)
    return ac.compose(model, g)


def _tensors(composed) -> dict[str, torch.Tensor]:
    """Every weight, and each adapter's alpha (old and new saves differ in both)."""
    out = {f"{n}/{k}": v.detach().clone() for n, h in composed.adapters.items() for k, v in h.state_dict().items()}
    out.update({f"{n}/alpha": torch.tensor(h.config.alpha) for n, h in composed.adapters.items()})
    out.update({f"op/{k}": v.detach().clone() for k, v in composed._rt.shared["sum_1"].state_dict().items()})
    return out


@torch.no_grad()
def _set(composed, values: dict[str, torch.Tensor]) -> None:
    """Put the adapter (and operator) weights of a snapshot back into ``composed``."""
    for name, handle in composed.adapters.items():
        handle.load_tensors({k: values[f"{name}/{k}"] for k in handle.state_dict()})  # (alpha stays)
    for k, v in composed._rt.shared["sum_1"].state_dict(keep_vars=True).items():
        v.copy_(values[f"op/{k}"])


def _save(kind: str, composed, target: Path) -> None:
    if kind == "composition":
        composed.save(target)
    else:
        composed.to_peft("a", target)


def _peft_tensors(composed) -> dict[str, torch.Tensor]:
    handle = composed.adapters["a"]
    return {**{k: v.detach().clone() for k, v in handle.state_dict().items()}, "alpha": torch.tensor(handle.config.alpha)}


def _read(kind: str, target: Path, base) -> dict[str, torch.Tensor]:
    """What the library's reader finds in ``target``, named as :func:`_tensors` names them
    (composed onto ``base``, then undone)."""
    if kind == "composition":
        loaded = ac.load(base, target)
        found = _tensors(loaded)
    else:  # from_peft targets module paths: name them by role again
        loaded = ac.from_peft(base, target, name="a")
        found = {
            re.sub(r"^module\.model\.layers\.(\d+)\.self_attn\.q_proj", r"layers.\1.attn.q", k): v
            for k, v in _peft_tensors(loaded).items()
        }
    loaded.undo()
    return found


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _user_files_intact(target: Path) -> bool:
    return all((target / name).read_text() == text for name, text in USER_FILES.items())


def _write_user_files(target: Path) -> None:
    for name, text in USER_FILES.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)


def _ours(target: Path) -> list[str]:
    return sorted(p.name for p in target.iterdir() if p.name not in ("README.md", "eval"))


def main(kind: str, out: Path) -> None:
    composed, other = _composed(alpha=4.0), _composed(alpha=8.0)  # old and third saves / the new one
    project = (lambda t: t) if kind == "composition" else (lambda t: {k[2:]: v for k, v in t.items() if k.startswith("a/")})
    randomize(composed, seed=1)
    old_all = _tensors(composed)
    randomize(other, seed=2)
    new_all = _tensors(other)
    randomize(composed, seed=3)
    third_all = _tensors(composed)
    old, new, third = project(old_all), project(new_all), project(third_all)

    steps: list[str] = []  # dry runs count the steps of a first save and of a save over one
    first: list[str] = []
    commit.fs_step = first.append
    _save(kind, composed, out / "dry")
    commit.fs_step = steps.append
    _save(kind, composed, out / "dry")
    commit.fs_step = lambda label: None
    base = tiny_llama()
    for fresh, count in ((False, len(steps)), (True, len(first))):
        for n in range(1, count + 2):  # n = count + 1: the save is not killed
            record = _run(kind, out / f"{'fresh' if fresh else 'over'}-{n}", fresh, n, composed, other, base, old_all, third_all, old, new, third)
            record["step"] = (first if fresh else steps)[n - 1] if n <= count else "(not killed)"
            print(json.dumps(record), flush=True)


def _run(kind, target, fresh, n, composed, other, base, old_all, third_all, old, new, third) -> dict:
    """One kill: an old save (unless ``fresh``) and the user's files, a new save killed before
    step ``n``, what the reader finds, then a third save over the wreck."""
    if not fresh:
        _set(composed, old_all)
        _save(kind, composed, target)
        _write_user_files(target)
    pid = os.fork()
    if pid == 0:  # the child: a new save, killed before step n
        calls = [0]

        def step(label: str) -> None:
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

        commit.fs_step = step
        _save(kind, other, target)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    try:
        found = _read(kind, target, base)
        state = "old" if _same(found, old) else "new" if _same(found, new) else "torn"
    except ac.AdapterFileError as exc:
        state = "none" if fresh else f"unloadable: {exc}"  # a first save that never committed
    except Exception as exc:  # never: the test fails on it
        state = f"raw {type(exc).__name__}: {exc}"
    _set(composed, third_all)
    try:
        _save(kind, composed, target)
        third_loads = _same(_read(kind, target, base), third)
    except Exception as exc:
        third_loads = f"{type(exc).__name__}: {exc}"
    return {
        "n": n,
        "fresh": fresh,
        "killed": killed,
        "state": state,
        "third_loads": third_loads,
        "user_files_intact": fresh or _user_files_intact(target),
        "left": _ours(target),
    }


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
