"""The example third-party plugin package (examples/loha_plugin): installed with pip, found
through its entry point, and composed like a built-in; its PEFT codec matches PEFT's LoHa."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adapter_composer as ac
from adapter_composer.registry import load_registry
from tests.models import inputs, output, randomize, tiny_llama

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "loha_plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (target / "composer_loha.py").exists()
    assert list(target.glob("adapter_composer_loha-*.dist-info/entry_points.txt"))
    return target


def _run(site: Path, code: str) -> dict:
    env_path = f"{site}{':' + sys.path[0] if sys.path[0] else ''}"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_installed_plugin_is_found_through_its_entry_point(installed):
    result = _run(
        installed,
        """
        import json
        from adapter_composer.registry import load_registry
        reg = load_registry()
        m = reg.method("loha")
        print(json.dumps({"plugin": m.plugin, "version": reg.plugin_version(m.plugin), "listed": "loha" in reg.describe()}))
        """,
    )
    assert result == {"plugin": "adapter-composer-loha:loha", "version": "0.1.0", "listed": True}


def test_installed_plugin_composes_like_a_builtin(installed):
    result = _run(
        installed,
        """
        import json, torch
        import adapter_composer as ac
        from tests.models import tiny_llama, inputs, output, randomize
        model = tiny_llama()
        batch = inputs()
        base = output(model, batch)
        g = ac.Graph()
        g.adapter("h", "loha", r=2, targets=["attn.q", "attn.v"])
        g.adapter("l", "lora", r=4, targets=["attn.v"])
        g.sum("h", "l", weights=[0.5, 1.0])
        c = ac.compose(model, g)
        identity = bool(torch.equal(output(model, batch), base))
        randomize(c)
        out = output(model, batch)
        c.merge()
        merged = float((output(model, batch) - out).abs().max())
        c.unmerge()
        print(json.dumps({"identity": identity, "changed": bool(not torch.allclose(out, base)), "merge_err": merged,
                          "plan": c.plan.site("model.layers.0.self_attn.v_proj").program.render()}))
        """,
    )
    assert result["identity"] and result["changed"] and result["merge_err"] <= 1e-5
    assert result["plan"] == "sum[0.5, 1](h:loha, l:lora)"


def _loha_module():
    sys.path.insert(0, str(PLUGIN))
    try:
        import composer_loha

        return composer_loha
    finally:
        sys.path.remove(str(PLUGIN))


def test_plugin_check_graph_rule():
    reg = load_registry(entry_points=False, plugins=[_loha_module()])
    g = ac.Graph()
    g.adapter("wide", "loha", r=40, targets=["attn.v"])  # v has 32 outputs
    diags = ac.validate(g, reg, tiny_llama())
    assert [d.code for d in diags] == ["loha-rank-too-large"]
    assert diags[0].plugin == "adapter-composer-loha" and "layers.0.attn.v" in diags[0].sites


def test_loha_matches_peft(tmp_path):
    from peft import LoHaConfig, PeftModel, get_peft_model

    reg = load_registry(entry_points=False, plugins=[_loha_module()])
    batch = inputs()
    torch.manual_seed(4)
    peft_model = get_peft_model(
        tiny_llama(),
        LoHaConfig(r=3, alpha=5, target_modules=["q_proj", "v_proj"], init_weights=False),
    ).eval()
    reference = output(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    composed = ac.from_peft(model, tmp_path / "peft", registry=reg)
    assert (output(model, batch) - reference).abs().max() <= 1e-5
    composed.to_peft("default", tmp_path / "back")
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "back").eval()
    assert (output(back, batch) - reference).abs().max() <= 1e-5


def test_loha_dense_reference():
    reg = load_registry(entry_points=False, plugins=[_loha_module()])
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("h", "loha", r=2, alpha=3, targets=["attn.q"], layers=[1])
    composed = ac.compose(model, g, registry=reg)
    randomize(composed)
    m = composed.adapters["h"].modules["layers.1.attn.q"]
    q = model.model.layers[1].self_attn.q_proj
    x = torch.randn(4, 64)
    delta = (m.w1a @ m.w1b) * (m.w2a @ m.w2b) * (3 / 2)
    torch.testing.assert_close(q(x), x @ (q.base.weight + delta).T, rtol=0, atol=1e-5)
