"""Whole modules trained as adapters: heads, embeddings, norms (HF PEFT's ``modules_to_save``).

    module    y = M'(x)     M' a trainable copy of the targeted module M (M' = M at initialisation)

The copy is made when the composition is applied; the base module stays frozen and is put
back by ``undo()``. The copy composes like any other adapter:

- behind a ``route`` each key has its own copy, so per-task classifier heads are a route over
  copies of ``classifier`` (rows without a key use the base module);
- under a ``stack`` it takes its place in the order with adapters acting at other modules
  (``stack(lora, head)``); two copies of one module cannot be stacked, because the outer one
  replaces the module whole and the inner one would have no effect;
- ``sum`` and ``mix`` are refused: a weight or a gate on a replacement has no defined meaning;
- ``merge()`` copies the trained module into the base module, which is exact.

With no targets it copies the classification head, ``classifier`` or ``score``, as PEFT's
``task_type="SEQ_CLS"`` (and ``TOKEN_CLS``) does. Refused at validation, each with its own
code: a copy of a module another adapter acts inside (``module-overlap``), of a module whose
weights are tied to another one (``module-tied``), and of a module without floating-point
parameters to train (``module-not-trainable``, e.g. a 4-bit quantised layer).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict
from torch import nn

from adapter_composer.registry import Capabilities, Diagnostic, hookimpl

KIND = "module.replace"
# PEFT's task heads: SEQ_CLS and TOKEN_CLS add these names to modules_to_save
HEADS = "re:(.*\\.)?(classifier|score)"


class ModuleConfig(BaseModel):
    """A trainable copy has no options: what it copies is given by ``targets``."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def build(config: ModuleConfig, site: Any) -> nn.Module:
    """A trainable copy of the site's module (same class, same tensors, requires_grad)."""
    clone = copy.deepcopy(site.module)
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


# --- validation -----------------------------------------------------------------------


def _overlaps(graph: Any) -> list[Diagnostic]:
    programs = graph.programs
    copies = {path: prog for (path, family), prog in programs.items() if family == "module"}
    found: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
    for (path, family), prog in programs.items():
        if family in ("prompt", "prefix", "optimizer"):
            continue
        for target, copy_prog in copies.items():
            if (path, family) != (target, "module") and (path == target or path.startswith(target + ".")):
                mine = tuple(sorted({leaf.adapter for leaf in copy_prog.leaves()}))
                others = tuple(sorted({leaf.adapter for leaf in prog.leaves()}))
                found.setdefault((mine, others), []).append(path)
    return [
        Diagnostic(
            code="module-overlap",
            message=f"{', '.join(map(repr, mine))} replace(s) whole modules by trainable copies, but "
            f"{', '.join(map(repr, others))} act(s) on or inside the same modules: the copies would not contain them",
            nodes=mine + others,
            sites=tuple(paths),
            fix="train the copy alone, or adapt the module with the other method instead of copying it",
        )
        for (mine, others), paths in found.items()
    ]


def _replaced_twice(graph: Any) -> list[Diagnostic]:
    found = []
    for (path, family), prog in graph.programs.items():
        if family != "module" or not hasattr(prog, "children"):
            continue
        routed = prog.operator == "route" and all(not hasattr(c, "children") for c in prog.children)
        if routed:
            continue
        names = sorted({leaf.adapter for leaf in prog.leaves()})
        if len(names) < 2:
            continue  # one copy under sum or mix: the operator table refuses it
        found.append(
            Diagnostic(
                code="module-replaced-twice",
                message=f"adapters {', '.join(map(repr, names))} all replace module {path!r}; a copy replaces the "
                "module whole, so only one of them can act on a given example",
                nodes=tuple(names),
                sites=(path,),
                fix="route them (one copy per key: g.route({...})) or keep one",
            )
        )
    return found


def _module_problems(graph: Any) -> list[Diagnostic]:
    model = graph.model
    shared: dict[int, list[str]] = {}
    if model is not None:
        for name, p in model.named_parameters(remove_duplicate=False):
            shared.setdefault(id(p), []).append(name)
    found = []
    for adapter in graph.specs:
        if graph.method_of(adapter) != "module":
            continue
        for info in graph.sites(adapter):
            params = list(info.module.parameters())
            if not params or not all(p.is_floating_point() for p in params):
                found.append(
                    Diagnostic(
                        code="module-not-trainable",
                        message=f"adapter {adapter!r} copies {info.path!r} ({type(info.module).__name__}), which has "
                        + ("no parameters" if not params else "parameters that are not floating point (quantised?)"),
                        nodes=(adapter,),
                        sites=(info.path,),
                        fix="copy a module with floating-point weights, or adapt this one with LoRA",
                    )
                )
                continue
            inside = {id(p) for p in params}
            tied = sorted(
                n
                for pid in inside
                for n in shared.get(pid, [])
                if not (n.startswith(info.path + ".") or info.path == "")
            )
            if tied:
                found.append(
                    Diagnostic(
                        code="module-tied",
                        message=f"adapter {adapter!r} copies {info.path!r}, whose weights are tied to {', '.join(tied[:3])}: "
                        "a trainable copy would untie them and leave the other module with the old weights",
                        nodes=(adapter,),
                        sites=(info.path,),
                        fix="untie the weights first (e.g. tie_word_embeddings=False) or adapt the module with LoRA",
                    )
                )
    return found


# --- hooks ----------------------------------------------------------------------------


@hookimpl
def register_methods(register):
    register.method(
        "module",
        config=ModuleConfig,
        build=build,
        points=[KIND],
        capabilities=Capabilities(mergeable=True, identity_at_init=True),
        default_targets=[HEADS],
        description="A trainable copy of a whole module (head, embedding, norm): PEFT's modules_to_save.",
    )


@hookimpl
def register_rules(register):
    register.refuse(
        kind=KIND,
        operator="stack",
        reason="two copies of one module cannot be ordered: the outer copy replaces the module whole, so the inner "
        "one would have no effect (a stack with adapters at other modules is fine: the copy acts alone there)",
        fix="route the copies (one per key) or keep one",
    )
    for operator, what in (("sum", "weight"), ("mix", "gate")):
        register.refuse(
            kind=KIND,
            operator=operator,
            reason=f"a {what} on a whole-module replacement has no defined meaning (it is not a delta on the module)",
            fix="route the copies per example, or put the copy next to the combination (stack) instead of inside it",
        )


@hookimpl
def check_graph(graph, registry):
    return [*_overlaps(graph), *_replaced_twice(graph), *_module_problems(graph)]


__all__ = ["HEADS", "KIND", "ModuleConfig", "build"]
