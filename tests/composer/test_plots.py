"""Plots are written (matplotlib is part of the test extra)."""

from __future__ import annotations

import torch

import adapter_composer as ac
from adapter_composer.workflow.plots import (
    gate_summary,
    plot_gates,
    plot_graph,
    plot_ranks,
    plot_results,
)
from tests.models import inputs, tiny_llama


def _png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_graph_gates_ranks_and_results(registry, tmp_path):
    model = tiny_llama()
    g = ac.Graph()
    for name in ("e0", "e1", "e2"):
        g.adapter(name, "lora", r=2, targets=["attn.q", "mlp.down"])
    g.mix("e0", "e1", "e2", name="experts")
    composed = ac.compose(model, g, registry=registry)
    for site in composed.sites().values():
        torch.nn.init.normal_(site.program.router.weight, std=0.5)
    with composed.record_gates() as gates, torch.no_grad():
        model(**inputs())
    summary = gate_summary(gates)
    assert len(summary) == 4 and all(abs(sum(v) - 1) < 1e-5 for v in summary.values())
    assert _png(plot_graph(g, tmp_path / "graph.png"))
    assert _png(plot_gates(gates, tmp_path / "gates.png", experts=["e0", "e1", "e2"]))
    assert _png(plot_gates(gates, tmp_path / "by_task.png", tasks=["sst2", "mrpc"]))
    per_task = gate_summary(gates, rows=[1])["experts@layers.0.attn.q"]
    expected = gates["experts@layers.0.attn.q"][1].mean(0)
    assert torch.allclose(torch.tensor(per_task), expected)
    assert _png(plot_ranks({"layers.0.attn.q": 3, "layers.1.attn.q": 5}, tmp_path / "ranks.png"))
    results = {"lora": {"scores": {"a": 0.8, "b": 0.7}, "params": 10}, "ia3": {"scores": {"a": 0.7, "b": 0.6}, "params": 5}}
    assert _png(plot_results(results, ["a", "b"], tmp_path / "results.png"))
