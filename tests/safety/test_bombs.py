"""Files that try to exhaust memory or time: huge declared shapes, slow regexes, deep nesting."""

from __future__ import annotations

import json

import pytest
import torch

import adapter_composer as ac
import adapter_composer.patterns as patterns
import adapter_composer.plugins.lora as lora
from adapter_composer.errors import AdapterFileError, ComposerError, CompositionError, PatternError
from tests.models import tiny_llama
from tests.safety.sources import Untouched, manifest

SLOW = "(.*){1,32000}[bc]"  # backtracks for seconds on a module path, even in the regex package


@pytest.fixture
def fast_timeouts(monkeypatch):
    monkeypatch.setattr(patterns, "MATCH_TIMEOUT", 0.02)
    monkeypatch.setattr(patterns, "BUDGET", 0.2)


@pytest.fixture
def real_builds(monkeypatch):
    """The devices LoRA modules were built on (meta: planned; anything else: allocated)."""
    devices: list[str] = []
    for cls in ("LoRA", "DoRA"):
        real = getattr(lora, cls)

        def make(*args, _real=real, **kwargs):
            devices.append(torch.empty(0).device.type)  # the default device at build time
            return _real(*args, **kwargs)

        monkeypatch.setattr(lora, cls, make)
    return devices


def _edit_config(path, adapter, **changes):
    data = manifest(path)
    for node in data["graph"]["nodes"]:
        if node["name"] == adapter:
            node["config"].update(changes)
    (path / "composition.json").write_text(json.dumps(data))


@pytest.mark.parametrize("r", [2**18, 2**40])
def test_a_declared_rank_bomb_is_caught_from_the_headers_before_any_build(registry, composition, real_builds, r):
    _edit_config(composition.path, "sst2", r=r)
    model = tiny_llama()
    with Untouched(model), pytest.raises(AdapterFileError) as err:
        ac.load(model, composition.path, registry=registry)
    assert f"the model needs ({r}, 64)" in str(err.value) and "nothing was built" in str(err.value)
    assert real_builds and set(real_builds) == {"meta"}  # planned on the meta device only


def test_a_peft_rank_bomb_is_caught_before_any_build(registry, peft_dir, real_builds):
    cfg_path = peft_dir.path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "r": 2**30}))
    model = tiny_llama()
    with Untouched(model), pytest.raises(AdapterFileError, match="nothing was built"):
        ac.from_peft(model, peft_dir.path, registry=registry)
    assert set(real_builds) == {"meta"}


def test_a_rank_too_large_to_build_is_the_librarys_error(registry):
    g = ac.Graph()
    g.adapter("big", "lora", r=2**40, targets=["attn.q"])
    model = tiny_llama()
    with Untouched(model), pytest.raises(ac.AdapterBuildError, match="method 'lora'.*adapter 'big'.*site layers.0.attn.q"):
        ac.compose(model, g, registry=registry)


def test_a_slow_target_regex_is_refused(registry, fast_timeouts):
    g = ac.Graph()
    g.adapter("a", "lora", targets=[f"re:{SLOW}"])
    model = tiny_llama()
    with Untouched(model), pytest.raises(CompositionError) as err:
        ac.compose(model, g, registry=registry)
    assert err.value.codes == ["bad-pattern"] and "took too long" in str(err.value)


def test_a_slow_target_regex_in_a_saved_graph_is_refused(registry, composition, fast_timeouts):
    data = manifest(composition.path)
    data["graph"]["nodes"][0]["targets"] = [f"re:{SLOW}"]
    (composition.path / "composition.json").write_text(json.dumps(data))
    with pytest.raises(CompositionError) as err:
        ac.load(tiny_llama(), composition.path, registry=registry)
    assert "bad-pattern" in err.value.codes and "composition.json" in str(err.value)


@pytest.mark.parametrize("bad", ["re:([", "re:" + "a" * 2000])
def test_an_invalid_or_huge_target_regex_is_a_diagnostic(registry, bad):
    g = ac.Graph()
    g.adapter("a", "lora", targets=[bad])
    with pytest.raises(CompositionError) as err:
        ac.compose(tiny_llama(), g, registry=registry)
    assert err.value.codes == ["bad-pattern"]


def test_the_issues_catastrophic_pattern_finishes(registry):
    """``([a-z_.0-9]*)*X`` ran for seconds with ``re``; bounded matching answers at once."""
    g = ac.Graph()
    g.adapter("a", "lora", targets=["re:([a-z_.0-9]*)*X"])
    with pytest.raises(CompositionError) as err:
        ac.compose(tiny_llama(), g, registry=registry)
    assert err.value.codes == ["pattern-matches-nothing"]


def test_slow_and_invalid_peft_rank_patterns_are_refused(registry, peft_dir, fast_timeouts):
    cfg_path = peft_dir.path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "rank_pattern": {"([": 2}}))
    with pytest.raises(AdapterFileError, match="rank_pattern key '\\(\\[' is not a valid regular expression"):
        ac.from_peft(tiny_llama(), peft_dir.path, registry=registry)
    cfg_path.write_text(json.dumps({**cfg, "alpha_pattern": {SLOW: 2.0}}))
    model = tiny_llama()
    with Untouched(model), pytest.raises(PatternError, match="took too long"):
        ac.from_peft(model, peft_dir.path, registry=registry)


def test_matching_budget_covers_all_module_names(monkeypatch):
    monkeypatch.setattr(patterns, "BUDGET", 0.0)
    with pytest.raises(PatternError, match="took more than"):
        patterns.filter_fullmatch("a", ["a", "b", "c"])


@pytest.mark.parametrize("what", ["composition", "peft"])
def test_deep_nesting_is_refused(registry, composition, peft_dir, what):
    deep = "[" * 20000 + "]" * 20000
    if what == "composition":
        text = manifest(composition.path)
        raw = json.dumps(text).replace('"weights": [0.5, 2.0]', f'"weights": {deep}')
        (composition.path / "composition.json").write_text(raw)
        target, call = composition.path, ac.load
    else:
        cfg = json.loads((peft_dir.path / "adapter_config.json").read_text())
        raw = json.dumps(cfg)[:-1] + f', "extra": {deep}}}'
        (peft_dir.path / "adapter_config.json").write_text(raw)
        target, call = peft_dir.path, ac.from_peft
    with pytest.raises(AdapterFileError, match="nests"):
        call(tiny_llama(), target, registry=registry)


def test_a_safetensors_header_declaring_more_than_the_file_holds(registry, composition):
    from tests.safety.sources import weights_file

    path = weights_file(composition.path, "sst2")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [2**20, 2**20]
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + data[8 + n :])
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        ac.load(tiny_llama(), composition.path, registry=registry)


def test_every_bomb_error_is_the_librarys():
    assert issubclass(PatternError, ComposerError) and issubclass(ac.AdapterBuildError, ComposerError)
