"""The routing plugins (arrow, poly, lorahub) need nothing from the host beyond its plugin
API: they import only the public pieces, and they load and compose through the entry-point
path a third-party package uses, with the same results as built-ins."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import torch

import adapter_composer as ac
from adapter_composer.plugins import poly
from adapter_composer.registry import BUILTIN_PLUGINS, load_registry
from tests.models import inputs, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
MODULES = {
    "adapter_composer.plugins.arrow": ROOT / "plugins" / "arrow.py",
    "adapter_composer.plugins.poly": ROOT / "plugins" / "poly.py",
    "adapter_composer.plugins.lorahub": ROOT / "plugins" / "lorahub.py",
}
HELPERS = {"adapter_composer.plugins.param_mix": ROOT / "plugins" / "param_mix.py"}
# the plugin API: the registry, the runtime protocols, the errors, the PEFT-format helpers
PLUGIN_API = (
    "adapter_composer.registry",
    "adapter_composer.runtime",
    "adapter_composer.errors",
    "adapter_composer.formats.peft",
    *HELPERS,
)
OUTSIDE = ("__future__", "collections", "copy", "dataclasses", "math", "threading", "typing", "numpy", "torch", "pydantic", "cma")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
    return found


def test_the_plugins_import_only_the_plugin_api():
    for module, path in {**MODULES, **HELPERS}.items():
        for name in _imports(path):
            if name.startswith("adapter_composer"):
                assert any(name == api or name.startswith(api + ".") for api in PLUGIN_API), f"{module} imports {name}"
            else:
                assert name.split(".")[0] in OUTSIDE, f"{module} imports {name}"


def _entry_point_registry(tmp_path, monkeypatch):
    """The other built-ins given explicitly, the routing plugins found as entry points of an
    installed distribution (a dist-info folder on sys.path), as for examples/loha_plugin."""
    dist = tmp_path / "site" / "routing_plugins-0.0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: routing-plugins\nVersion: 0.0.1\n")
    lines = ["[adapter_composer]"] + [f"{m.rsplit('.', 1)[1]} = {m}" for m in MODULES]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    others = [importlib.import_module(m) for m in BUILTIN_PLUGINS if m not in MODULES]
    return load_registry(builtins=False, entry_points=True, plugins=others)


def _graph() -> ac.Graph:
    g = ac.Graph()
    for name in ("e0", "e1", "e2"):
        g.adapter(name, "lora", r=4, targets=["attn.q", "attn.v"])
    g.op("arrow", "e0", "e1", "e2", top_k=2, name="zero_shot")
    g.op("lorahub", "e0", "e1", "e2", weights=[0.5, -0.3, 0.8], name="hub")
    poly.declare(g, "mt", ["t0", "t1"], skills=2, n_splits=2, r=4, targets=["attn.q", "attn.v"])
    g.route({"arrow": "zero_shot", "hub": "hub", "t0": "mt_t0", "t1": "mt_t1"}, name="tasks")
    return g


def _run(registry):
    model = tiny_llama()
    composed = ac.compose(model, _graph(), registry=registry)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for handle in composed.adapters.values():
            for p in handle.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for module in composed.model.adapter_composer.operators.values():
            for z in getattr(module, "logits", {}).values():
                z.normal_(0, 1.0, generator=gen)
        return composed, model(**inputs(batch=4), route=["arrow", "hub", "t0", "t1"]).logits


def test_the_plugins_load_through_entry_points_and_compose_like_builtins(tmp_path, monkeypatch):
    registry = _entry_point_registry(tmp_path, monkeypatch)
    for operator in ("arrow", "poly", "lorahub"):
        assert registry.operator(operator).plugin == f"routing-plugins:{operator}"
    assert {"arrow", "poly", "lorahub"} <= set(registry.operators)
    composed, out = _run(registry)
    builtin, reference = _run(load_registry(entry_points=False))
    assert builtin.registry.operator("arrow").plugin == "adapter_composer.plugins.arrow"
    assert torch.equal(out, reference)
    assert (out - tiny_llama()(**inputs(batch=4)).logits).abs().amax(dim=(1, 2)).min() > 1e-3  # every row adapted
    assert "arrow(e0:lora, e1:lora, e2:lora)" in composed.plan.explain()


def test_the_example_runs():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "routing_methods.py"), "--steps", "3", "--budget", "6"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("| uniform sum (1/4 each) |", "| arrow (top-2, training-free) |", "| lorahub (CMA-ES, 6 evaluations, 5 examples) |", "| poly, task t2 (trained) |"):
        assert row in proc.stdout, proc.stdout
    assert "reload bit-identical: True" in proc.stdout
