"""The ``adapter-composer`` command line: plugins, validate, plan, demo.

    adapter-composer plugins                                  # methods, operators, architectures
    adapter-composer validate GRAPH.json --model CONFIG_OR_DIR  # diagnostics; exit 1 when any
    adapter-composer plan GRAPH.json --model CONFIG_OR_DIR      # the explained plan (--json for JSON)
    adapter-composer demo                                     # the quick-start demo
    adapter-composer experiment run SPEC.json [--out DIR]     # train and evaluate every setup x seed
    adapter-composer experiment table results.json            # re-render the results table
    adapter-composer experiment rates results.json            # the rates a selection chose (budget.lr)

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


def cmd_experiment_run(args) -> int:
    from adapter_composer.errors import ComposerError
    from adapter_composer.workflow.experiment import run_experiment
    from adapter_composer.workflow.experiment_report import render_table
    from adapter_composer.workflow.experiment_spec import ExperimentSpec

    try:
        spec = ExperimentSpec.from_file(args.spec)
        if args.data:
            spec = spec.model_copy(update={"data_dir": str(Path(args.data).resolve())})
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        only = [s for s in args.only.split(",") if s] if args.only else None
        summary = run_experiment(spec, args.out, seeds=seeds, only=only, plots=False if args.no_plots else None)
    except ValueError as err:  # a bad --seeds value
        if not isinstance(err, ComposerError):
            print(f"error: --seeds takes integers separated by commas ({err})", file=sys.stderr)
            return 2
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ComposerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(render_table(summary.results))
    print(f"{len(summary.ran)} cell(s) run, {len(summary.cached)} cached; results in {summary.out}")
    return 0


def cmd_experiment_table(args) -> int:
    from adapter_composer.errors import ComposerError
    from adapter_composer.workflow.experiment_report import load_results, render_table, write_report

    try:
        results = load_results(args.results)
        if args.out:
            write_report(results, Path(args.out), plots=args.plots)
    except ComposerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(render_table(results))
    return 0


def cmd_experiment_rates(args) -> int:
    from adapter_composer.errors import ComposerError
    from adapter_composer.workflow.experiment_report import chosen_rates, load_results

    try:
        rates = chosen_rates(load_results(args.results))
    except ComposerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"budget": {"lr": rates}}, indent=1, sort_keys=True))
    return 0


def _experiment_parser(sub) -> None:
    exp = sub.add_parser("experiment", help="multi-task experiments from a spec file (run, table)")
    esub = exp.add_subparsers(dest="experiment_command", required=True)
    run = esub.add_parser("run", help="train and evaluate every setup x seed (cached, resumable)")
    run.add_argument("spec", help="an experiment spec JSON file")
    run.add_argument("--out", default=None, help="the output folder (default: runs/<spec name>)")
    run.add_argument("--seeds", default=None, help="seeds to run, e.g. 0,1,2 (default: the spec's)")
    run.add_argument("--only", default=None, help="setups to run, e.g. lora,mix (their init_from setups run too)")
    run.add_argument("--data", default=None, help="the data folder (overrides the spec's data_dir)")
    run.add_argument("--no-plots", action="store_true", help="skip results.png (no matplotlib needed)")
    run.set_defaults(fn=cmd_experiment_run)
    table = esub.add_parser("table", help="print the table of a results.json (and rewrite the report with --out)")
    table.add_argument("results", help="results.json (or the folder holding it)")
    table.add_argument("--out", default=None, help="write results.json/.md (and .png with --plots) here")
    table.add_argument("--plots", action="store_true", help="with --out: also draw results.png")
    table.set_defaults(fn=cmd_experiment_table)
    rates = esub.add_parser("rates", help="the learning rates a selection run chose, as budget.lr entries for a spec")
    rates.add_argument("results", help="results.json of a run with a selection grid (or its folder)")
    rates.set_defaults(fn=cmd_experiment_rates)


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
    _experiment_parser(sub)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
