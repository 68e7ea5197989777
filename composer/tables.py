"""The method × operator table, generated from a registry.

A cell is *verified* when the operator implements every site family the method acts in and
no rule refuses the pair; otherwise it is *refused*, with the rule's reason. The test
battery (tests/composer/test_operator_table.py) checks every verified cell numerically and
every refused cell for its ``CompositionError``; the README's copy of the table is
regenerated with ``python -m adapter_composer.tables --write README.md`` and a test keeps it current.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapter_composer.registry import KINDS, Registry, load_registry

START, END = "<!-- method-operator-table:start -->", "<!-- method-operator-table:end -->"


def cell(registry: Registry, method: str, operator: str) -> tuple[bool, str]:
    """(verified, reason) for one method under one operator."""
    record = registry.method(method)
    op = registry.operator(operator)
    for r in registry.rules.refusals:
        if r.operator == operator and (r.method == method or r.kind in record.points):
            return False, r.reason
    families = sorted({KINDS[k] for k in record.points})
    missing = [f for f in families if f not in op.families]
    if missing:
        return False, f"{operator} has no implementation for {', '.join(missing)} sites"
    return True, ""


def table_markdown(registry: Registry) -> str:
    operators = list(registry.operators)
    lines = ["| method | kinds | " + " | ".join(operators) + " |", "|---|---|" + "---|" * len(operators)]
    notes: dict[str, int] = {}
    for name, record in registry.methods.items():
        cells = []
        for op in operators:
            ok, reason = cell(registry, name, op)
            if ok:
                cells.append("verified")
            else:
                note = notes.setdefault(reason, len(notes) + 1)
                cells.append(f"refused ({note})")
        kinds = ", ".join(f"`{k}`" for k in record.points)
        lines.append(f"| `{name}` | {kinds} | " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"({n}) {reason}" for reason, n in notes.items()]
    return "\n".join(lines)


def replace_in(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"the document has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print (or write into a document) the method × operator table.")
    parser.add_argument("--write", type=Path, help="replace the table block in this file (e.g. README.md)")
    args = parser.parse_args(argv)
    table = table_markdown(load_registry(entry_points=False))
    if args.write:
        args.write.write_text(replace_in(args.write.read_text(), table))
    else:
        sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
