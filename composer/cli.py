"""The ``adapter-composer`` command line: plugins, validate, plan, demo.

    adapter-composer plugins                                  # methods, operators, architectures
    adapter-composer validate GRAPH.json --model CONFIG_OR_DIR  # diagnostics; exit 1 when any
    adapter-composer plan GRAPH.json --model CONFIG_OR_DIR      # the explained plan (--json for JSON)
    adapter-composer demo                                     # the quick-start demo

``--model`` takes a transformers ``config.json`` (or a directory holding one); the model is
built from it on the meta device, so validating a graph for a large model costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from adapter_composer._version import __version__


def _model(spec: str):
    from transformers import AutoConfig, AutoModel

    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(
            f"error: no transformers config at {spec} (give a config.json or a directory holding one)"
        )
    try:
        data = json.loads(path.read_text())
        config = AutoConfig.for_model(**data)
    except (json.JSONDecodeError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: {path} is not a usable transformers config: {exc}") from None
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _graph(spec: str):
    from adapter_composer.pipeline.graph import Graph

    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"error: no graph file at {spec}")
    return Graph.from_json(path.read_text())


def _registry(args):
    from adapter_composer.registry import load_registry

    return load_registry(entry_points=not args.no_entry_points)


def cmd_plugins(args) -> int:
    print(_registry(args).describe())
    return 0


def cmd_validate(args) -> int:
    from adapter_composer.errors import CompositionError
    from adapter_composer.pipeline.validate import validate

    try:
        graph = _graph(args.graph)
    except CompositionError as err:
        print(err, file=sys.stderr)
        return 1
    model = _model(args.model) if args.model else None
    diags = validate(graph, _registry(args), model)
    if not diags:
        print(
            f"ok: {len(graph.adapters)} adapter(s), {len(graph) - len(graph.adapters)} operator(s), no problems"
        )
        return 0
    print(CompositionError(diags), file=sys.stderr)
    return 1


def cmd_plan(args) -> int:
    from adapter_composer.api import plan
    from adapter_composer.errors import CompositionError

    try:
        the_plan = plan(_model(args.model), _graph(args.graph), registry=_registry(args))
    except CompositionError as err:
        print(err, file=sys.stderr)
        return 1
    print(the_plan.to_json() if args.json else the_plan.explain())
    return 0


def cmd_demo(args) -> int:
    from adapter_composer.demo import run_with

    return run_with(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adapter-composer", description="Compose PEFT methods as validated graphs."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--no-entry-points", action="store_true", help="load only the built-in plugins"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list methods, operators, architectures and rules").set_defaults(
        fn=cmd_plugins
    )
    for name, fn, helptext in (
        ("validate", cmd_validate, "report every problem in a graph (exit 1 when any)"),
        ("plan", cmd_plan, "print the plan a graph compiles to on a model"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("graph", help="a graph JSON file (Graph.to_json())")
        p.add_argument(
            "--model",
            required=name == "plan",
            help="a transformers config.json or a directory with one",
        )
        if name == "plan":
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
        p.set_defaults(fn=fn)
    from adapter_composer.demo import add_arguments

    demo = sub.add_parser("demo", help="run the quick-start demo (a tiny model built offline)")
    add_arguments(demo)
    demo.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
