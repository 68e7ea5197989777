"""The adapter-composer command line."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

import adapter_composer as ac
from adapter_composer.cli import main


@pytest.fixture()
def config_dir(tmp_path):
    LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def _write(tmp_path, graph):
    path = tmp_path / "graph.json"
    path.write_text(graph.to_json())
    return str(path)


def test_plugins_lists_everything(capsys):
    assert main(["--no-entry-points", "plugins"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "stack" in out and "llama" in out and "linear.delta" in out


def test_validate_good_graph(tmp_path, config_dir, capsys):
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    assert main(["validate", _write(tmp_path, g), "--model", str(config_dir)]) == 0
    assert "no problems" in capsys.readouterr().out


def test_validate_bad_graph_exits_nonzero_with_diagnostics(tmp_path, config_dir, capsys):
    g = ac.Graph()
    g.adapter("a", "lora", r=0, targets=["attn.q"])
    g.adapter("b", "lora", targets=["mlp.nope"])
    assert main(["validate", _write(tmp_path, g), "--model", str(config_dir / "config.json")]) == 1
    err = capsys.readouterr().err
    assert "[bad-config]" in err and "[unknown-role]" in err


def test_validate_unreadable_graph_file(tmp_path, capsys):
    (tmp_path / "g.json").write_text("{nope")
    assert main(["validate", str(tmp_path / "g.json")]) == 1
    assert "[bad-graph-file]" in capsys.readouterr().err


def test_plan_prints_the_table_and_json(tmp_path, config_dir, capsys):
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q", "attn.v"])
    assert main(["plan", _write(tmp_path, g), "--model", str(config_dir)]) == 0
    assert "layers.1.self_attn.v_proj" in capsys.readouterr().out
    assert main(["plan", _write(tmp_path, g), "--model", str(config_dir), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sites"]) == 4


def test_missing_model_config_is_an_error(tmp_path):
    g = ac.Graph()
    g.adapter("a", "lora")
    with pytest.raises(SystemExit, match="no transformers config"):
        main(["plan", _write(tmp_path, g), "--model", str(tmp_path / "nowhere")])
