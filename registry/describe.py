"""A readable listing of a registry (``Registry.describe()`` and ``adapter-composer plugins``)."""

from __future__ import annotations

from typing import Any

from .records import Module, Slice, Sublayer


def _target(t: Any) -> str:
    if isinstance(t, tuple):
        return "; ".join(f"{x.stack}: {_target(x)}" for x in t)
    if isinstance(t, Module):
        return t.path
    if isinstance(t, Slice):
        return f"{t.path}[part {t.index + 1}/{t.parts}]"
    if isinstance(t, Sublayer):
        return t.output if t.input == t.output else f"in {t.input} → out {t.output}"
    return repr(t)


def describe(registry: Any) -> str:
    lines = ["Plugins:"]
    for info in registry.plugins:
        lines.append(f"  {info.name} {info.version} ({info.source})")
    lines.append("")
    lines.append("Methods:")
    for m in registry.methods.values():
        caps = m.capabilities
        flags = [
            n
            for n in ("mergeable", "identity_at_init", "changes_sequence_length", "trains_base")
            if getattr(caps, n)
        ]
        lines.append(f"  {m.name}  [plugin {m.plugin}]  points: {', '.join(m.points)}")
        if m.description:
            lines.append(f"      {m.description.splitlines()[0]}")
        lines.append(f"      capabilities: {', '.join(flags) or 'none'}")
        if m.default_targets:
            lines.append(f"      default targets: {', '.join(m.default_targets)}")
        fields = m.config.model_fields
        for fname, f in fields.items():
            if f.is_required():
                default = "required"
            elif f.default_factory is not None:
                default = f"default {f.default_factory()!r}"
            else:
                default = f"default {f.default!r}"
            lines.append(f"      {fname}: {f.description or ''} ({default})")
    lines.append("")
    lines.append("Operators:")
    for o in registry.operators.values():
        lines.append(f"  {o.name}  [plugin {o.plugin}]  families: {', '.join(sorted(o.families))}")
        if o.description:
            lines.append(f"      {o.description.splitlines()[0]}")
    lines.append("")
    lines.append("Architectures:")
    for a in registry.architectures:
        lines.append(f"  {a.name}  [plugin {a.plugin}]  model types: {', '.join(a.model_types)}")
        lines.append(f"      insertion points: {', '.join(sorted(a.provides))}")
        for role, target in a.roles.items():
            lines.append(f"      {role:<10} {_target(target)}")
        for role, reason in a.unsupported.items():
            lines.append(f"      {role:<10} not supported: {reason}")
    rules = registry.rules
    if rules.refusals or rules.conflicts or rules.orders:
        lines.append("")
        lines.append("Rules:")
        for r in rules.refusals:
            who = f"method {r.method}" if r.method else f"kind {r.kind}"
            lines.append(f"  refuse {who} under {r.operator}: {r.reason}  [plugin {r.plugin}]")
        for c in rules.conflicts:
            lines.append(f"  conflict {c.first} × {c.second}: {c.reason}  [plugin {c.plugin}]")
        for o in rules.orders:
            lines.append(f"  order {o.first} before {o.then}: {o.reason}  [plugin {o.plugin}]")
    return "\n".join(lines)
