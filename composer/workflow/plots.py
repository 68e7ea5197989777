"""Plots (matplotlib, an optional extra: ``pip install adapter-composer[plot]``).

    plot_graph(graph, "graph.png")                 the composition graph
    plot_gates(gates, "gates.png")                 mean gate per expert, per layer and site (a mix)
    plot_ranks(ranks, "ranks.png")                 AdaLoRA's final rank per site
    plot_results(results, tasks, "results.png")    a task × setup score chart (the GLUE experiment)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("plots need matplotlib: pip install 'adapter-composer[plot]'") from exc
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_graph(graph: Any, path: str | Path) -> Path:
    """Operators as boxes, adapters as ellipses labelled with their method; edges point to children."""
    import networkx as nx

    from adapter_composer.pipeline.graph import AdapterSpec

    plt = _pyplot()
    g = graph.nx
    depth = {}
    for root in graph.roots():
        for node, d in nx.single_source_shortest_path_length(g, root).items():
            depth[node] = max(depth.get(node, 0), d)
    layers: dict[int, list[str]] = {}
    for node in g.nodes:
        layers.setdefault(depth.get(node, 0), []).append(node)
    pos = {n: (i - (len(ns) - 1) / 2, -d) for d, ns in layers.items() for i, n in enumerate(ns)}
    fig, ax = plt.subplots(figsize=(max(4, 1.8 * max(len(v) for v in layers.values())), 1.6 * (len(layers) + 1)))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowstyle="-|>", node_size=1800)
    specs = graph.specs
    for node, (x, y) in pos.items():
        spec = specs.get(node)
        if isinstance(spec, AdapterSpec):
            label, style = f"{node}\n{spec.method}", dict(boxstyle="round,pad=0.4", fc="#dbeafe")
        elif spec is not None:
            label, style = f"{node}\n{spec.operator}", dict(boxstyle="square,pad=0.4", fc="#fde68a")
        else:
            label, style = f"{node}\n(undeclared)", dict(boxstyle="square,pad=0.4", fc="#fecaca")
        ax.text(x, y, label, ha="center", va="center", bbox=style, fontsize=9)
    ax.set_axis_off()
    return _save(fig, path)


def gate_summary(gates: Mapping[str, torch.Tensor], rows: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Mean gate per expert at each mix site (averaged over tokens and the given batch rows)."""
    out = {}
    for label, g in gates.items():
        picked = g if rows is None else g[list(rows)]
        out[label] = picked.reshape(-1, g.shape[-1]).float().mean(0).tolist()
    return out


def plot_gates(
    gates: Mapping[str, torch.Tensor],
    path: str | Path,
    experts: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Heat maps of mix sites (rows, in layer order) × experts, the mean gate in each cell;
    with ``tasks`` (the task of each batch row), one panel per task."""
    plt = _pyplot()
    groups = {"all rows": None} if tasks is None else {t: [i for i, x in enumerate(tasks) if x == t] for t in dict.fromkeys(tasks)}
    labels = sorted(gates, key=_layer_order)
    n_experts = next(iter(gates.values())).shape[-1]
    fig, axes = plt.subplots(1, len(groups), figsize=((1.2 * n_experts + 2) * len(groups) + 1, 0.35 * len(labels) + 1.8), squeeze=False)
    names = list(experts) if experts else [f"expert {i}" for i in range(n_experts)]
    for ax, (group, rows) in zip(axes[0], groups.items(), strict=True):
        summary = gate_summary(gates, rows)
        im = ax.imshow(torch.tensor([summary[k] for k in labels]), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(labels)), [k.split("@", 1)[-1] for k in labels], fontsize=8)
        ax.set_xticks(range(n_experts), names, rotation=30, ha="right")
        ax.set_title(group)
    fig.colorbar(im, ax=axes[0].tolist(), label="mean gate")
    fig.suptitle(title or "gate usage per layer and site")
    return _save(fig, path)


def plot_ranks(ranks: Mapping[str, int], path: str | Path, title: str = "AdaLoRA: final rank per site") -> Path:
    plt = _pyplot()
    labels = sorted(ranks, key=_layer_order)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(labels)), 3.5))
    ax.bar(range(len(labels)), [ranks[k] for k in labels], color="#2563eb")
    ax.set_xticks(range(len(labels)), labels, rotation=75, fontsize=7)
    ax.set_ylabel("rank")
    ax.set_title(title)
    return _save(fig, path)


def plot_results(results: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], path: str | Path) -> Path:
    """Grouped bars: one group per task, one bar per setup (scores in %)."""
    plt = _pyplot()
    setups = list(results)
    width = 0.8 / max(1, len(setups))
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 4))
    for i, setup in enumerate(setups):
        scores = [100 * results[setup]["scores"].get(t, float("nan")) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], scores, width, label=setup)
    ax.set_xticks([j + width * (len(setups) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("dev score (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _layer_order(label: str) -> tuple[int, str]:
    import re

    match = re.search(r"layers\.(\d+)", label)
    return (int(match.group(1)) if match else -1, label)
