"""Which sites of a composition merge exactly, and why the others cannot: the plan behind
:meth:`Composed.merge <adapter_composer.live.composed.Composed.merge>`. Linear sites fold by
the normal form over weights and module copies are copied back, as long as every adapter sits
under stack or sum only (an operator registered with ``exact_merge``) and its method is
mergeable."""

from __future__ import annotations

from typing import Any

from torch import nn

from adapter_composer.errors import CompositionError
from adapter_composer.pipeline.plan import Leaf, OpNode, Program
from adapter_composer.pipeline.validate import Analysis
from adapter_composer.registry import Diagnostic
from adapter_composer.runtime.linear import LinearSite
from adapter_composer.runtime.module import ModuleSite


def plan_merge(composed: Any, partial: bool) -> tuple[list[nn.Module], list[str]]:
    """(the sites to merge, the adapters left active); without ``partial``, refuses with every
    reason when anything cannot be folded exactly."""
    mergeable, problems, unmerged = merge_problems(composed)
    if problems and not partial:
        raise CompositionError(problems, "merge")
    if unmerged and not partial:
        raise CompositionError(
            [
                Diagnostic(
                    code="merge-not-exact",
                    message=f"adapter {a!r} ({composed.adapters[a].method}) cannot be merged into linear weights",
                    nodes=(a,),
                    fix="merge(partial=True) merges the others and leaves it active",
                )
                for a in sorted(unmerged)
            ],
            "merge",
        )
    left = set(unmerged)
    for d in problems:
        left.update(n for n in d.nodes if n in composed.adapters)
    return mergeable, sorted(left)


def merge_problems(composed: Any) -> tuple[list[nn.Module], list[Diagnostic], set[str]]:
    """(sites that fold exactly, diagnostics of what cannot, adapters at sites that never fold)."""
    mergeable, problems, unmerged = [], [], set()
    for (path, family), site in composed._rt.sites.items():
        prog = composed.plan.site(path, family).program
        if not _foldable_site(family, site):
            unmerged.update(leaf.adapter for leaf in prog.leaves())
            continue
        reasons = _unfoldable(prog, composed._analysis)
        if reasons:
            problems.extend(
                Diagnostic(
                    code="merge-not-exact",
                    message=f"{msg} (site {path})",
                    nodes=nodes,
                    sites=(path,),
                    fix=fix,
                )
                for msg, nodes, fix in reasons
            )
        else:
            mergeable.append(site)
    return mergeable, problems, unmerged


def _foldable_site(family: str, site: nn.Module) -> bool:
    """Sites whose program can be folded into the base module: linear layers (the normal
    form over weights) and module copies (the trained copy is copied back)."""
    return (family == "linear" and isinstance(site, LinearSite)) or (family == "module" and isinstance(site, ModuleSite))


def _unfoldable(prog: Program, analysis: Analysis) -> list[tuple[str, tuple[str, ...], str]]:
    out = []

    def walk(p: Program, under: str | None) -> None:
        if isinstance(p, Leaf):
            method = analysis.methods[p.adapter]
            if under is not None:
                out.append(
                    (
                        f"adapter {p.adapter!r} sits inside {under}, whose output depends on the input",
                        (p.adapter,),
                        "merge is exact only for stack and sum",
                    )
                )
            elif not method.capabilities.mergeable:
                out.append(
                    (
                        f"method {method.name} of adapter {p.adapter!r} is not mergeable",
                        (p.adapter,),
                        "merge(partial=True) leaves it active",
                    )
                )
            return
        assert isinstance(p, OpNode)
        record = analysis.registry.operators.get("stack" if p.implicit else p.operator)
        inner = under
        if inner is None and (record is None or not record.exact_merge):
            inner = f"{p.operator} node {p.node!r}"
        for c in p.children:
            walk(c, inner)

    walk(prog, None)
    return out
