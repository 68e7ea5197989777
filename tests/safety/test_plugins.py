"""Third-party plugins that break the runtime contract are caught when composing, naming the
plugin, the method, the adapter and the site; the model is left untouched."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

import adapter_composer as ac
from adapter_composer.errors import AdapterBuildError, PluginContractError, PluginError
from adapter_composer.pipeline.contract import probe_adapter
from adapter_composer.registry import Capabilities, hookimpl, load_registry
from tests.models import BUILDERS, inputs, output, tiny_llama
from tests.profiles import load_profiles
from tests.safety.sources import Untouched


class Cfg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Good(nn.Module):
    """A correct linear.delta module: Δ(x) = x W_d, W_d [out, in] zero."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(fan_out, fan_in))

    def forward(self, x, site):
        return F.linear(x, self.w)

    def delta_weight(self, site):
        return self.w


class NoSite(Good):
    def forward(self, x):  # the wrong signature: the host passes (x, site)
        return F.linear(x, self.w)


class Narrow(Good):
    def forward(self, x, site):  # Δ of width 1: would broadcast over every output
        return F.linear(x, self.w)[..., :1]


class Wide(Good):
    def forward(self, x, site):
        return torch.cat([F.linear(x, self.w)] * 2, dim=-1)


class Ints(Good):
    def forward(self, x, site):
        return F.linear(x, self.w).long()


class NotATensor(Good):
    def forward(self, x, site):
        return [F.linear(x, self.w)]


class Raises(Good):
    def forward(self, x, site):
        raise AttributeError("'NoneType' object has no attribute 'weight'")


class BadScale(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.l = nn.Parameter(torch.ones(size + 1))

    def scale(self):
        return self.l


def _method_plugin(module_cls, *, kind="linear.delta", mergeable=True, build=None):
    def default_build(config, site):
        if kind == "linear.delta":
            return module_cls(site.in_features, site.out_features)
        return module_cls(site.out_features)

    def register_methods(register):
        register.method(
            "acme",
            config=Cfg,
            build=build or default_build,
            points=[kind],
            capabilities=Capabilities(mergeable=mergeable),
            default_targets=["attn.q"],
        )

    plugin = types.ModuleType("acme_plugin")
    plugin.register_methods = hookimpl(register_methods)
    return load_registry(entry_points=False, plugins=[plugin])


def _compose(registry):
    g = ac.Graph()
    g.adapter("tenant", "acme")
    model = tiny_llama()
    return model, g


def test_a_correct_third_party_method_passes_the_probe():
    model, g = _compose(_method_plugin(Good))
    before = output(model, inputs())
    composed = ac.compose(model, g, registry=_method_plugin(Good))
    assert torch.equal(output(model, inputs()), before)
    composed.undo()


@pytest.mark.parametrize(
    "cls, needle",
    [
        (NoSite, "raised TypeError"),
        (Narrow, r"returned shape \(1, 2, 1\); the contract needs exactly \(1, 2, 64\) \(no broadcasting\)"),
        (Wide, r"returned shape \(1, 2, 128\)"),
        (Ints, "torch.int64 tensor, not a floating-point one"),
        (NotATensor, "returned list, not a tensor"),
        (Raises, "raised AttributeError"),
    ],
)
def test_a_broken_module_is_refused_when_composing(cls, needle):
    registry = _method_plugin(cls)
    model, g = _compose(registry)
    with Untouched(model), pytest.raises(PluginContractError, match=needle) as err:
        ac.compose(model, g, registry=registry)
    message = str(err.value)
    assert "method 'acme' (plugin 'acme_plugin')" in message and "adapter 'tenant'" in message
    assert "site layers.0.attn.q" in message and "linear.delta" in message


def test_a_wrong_delta_weight_shape_is_refused():
    class Transposed(Good):  # the right shape only for square layers
        def delta_weight(self, site):
            return torch.zeros(site.weight().shape[1], site.weight().shape[0] + 1)

    reg = _method_plugin(Transposed)
    model, g = _compose(reg)
    with pytest.raises(PluginContractError, match=r"delta_weight\(site\) returned shape \(64, 65\)"):
        ac.compose(model, g, registry=reg)


def test_a_wrong_scale_size_is_refused():
    reg = _method_plugin(BadScale, kind="linear.scale_out", mergeable=True)
    model, g = _compose(reg)
    with pytest.raises(PluginContractError, match=r"scale\(\) returned shape \(65,\)"):
        ac.compose(model, g, registry=reg)


def test_build_returning_a_non_module_is_refused():
    reg = _method_plugin(Good, build=lambda config, site: "a string")
    model, g = _compose(reg)
    with Untouched(model), pytest.raises(PluginContractError, match="build\\(\\) returned str, not an nn.Module"):
        ac.compose(model, g, registry=reg)


def test_build_raising_is_named():
    def build(config, site):
        raise KeyError("weight")

    reg = _method_plugin(Good, build=build)
    model, g = _compose(reg)
    with Untouched(model), pytest.raises(AdapterBuildError, match="method 'acme' \\(plugin 'acme_plugin'\\).*KeyError"):
        ac.compose(model, g, registry=reg)


@pytest.mark.parametrize("answer", ["not a module", 42, object()])
def test_build_site_returning_a_non_module_is_refused(answer):
    def build_site(base, family, site):
        return answer

    plugin = types.ModuleType("acme_sites")
    plugin.build_site = hookimpl(tryfirst=True)(build_site)
    reg = load_registry(entry_points=False, plugins=[plugin])
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    model = tiny_llama()
    with Untouched(model), pytest.raises(PluginContractError, match="plugin 'acme_sites', hook build_site, returned"):
        ac.compose(model, g, registry=reg)


def test_build_site_raising_is_named():
    def build_site(base, family, site):
        raise AttributeError("no attribute 'quant_state'")

    plugin = types.ModuleType("acme_sites")
    plugin.build_site = hookimpl(tryfirst=True)(build_site)
    reg = load_registry(entry_points=False, plugins=[plugin])
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    model = tiny_llama()
    with Untouched(model), pytest.raises(PluginError, match="plugin 'acme_sites', hook build_site, raised AttributeError"):
        ac.compose(model, g, registry=reg)


def test_hot_swapping_a_broken_module_changes_nothing():
    reg = _method_plugin(Narrow)
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("t0", "lora", r=2, targets=["attn.q"])
    g.route({"k0": "t0"}, name="tasks")
    composed = ac.compose(model, g, registry=reg)
    batch = inputs()
    with torch.no_grad():
        before = model(**batch, route=["k0", "k0"]).logits
    with pytest.raises(PluginContractError, match="adapter 'new'"):
        composed.add_adapter("new", "acme", route="tasks", key="k1", targets=["attn.q"])
    assert "new" not in composed.graph and "k1" not in composed._patch.model_hook.route_keys
    with torch.no_grad():
        assert torch.equal(model(**batch, route=["k0", "k0"]).logits, before)


def test_every_built_in_method_passes_the_probe(registry):
    """The probe skips the package's own methods (the conformance battery covers them);
    forced, it accepts every one of them, so it cannot refuse a correct module."""
    for name, profile in load_profiles().items():
        if name not in registry.methods:
            continue
        model = BUILDERS[profile.arch]()
        g = ac.Graph()
        config = dict(profile.config)
        g.adapter("a", name, targets=config.pop("targets", None), **config)
        composed = ac.compose(model, g, registry=registry)
        infos = list(composed._rt.infos["a"].values())
        probe_adapter(registry.method(name), "a", infos, composed._rt.adapters["a"], force=True)
        composed.undo()


def test_the_probe_leaves_training_mode_and_the_rng_alone():
    reg = _method_plugin(Good)
    model, g = _compose(reg)
    model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    composed = ac.compose(model, g, registry=reg)
    assert torch.equal(torch.rand(3), expected)
    assert all(m.training for m in composed.adapters["tenant"].modules.values())


class SloppyCodec:
    """A third-party PEFT codec written the old way: ``int()`` on whatever the file holds."""

    peft_types = ("ACME",)
    tensor_names = {"w": "w"}

    def __init__(self, split=None):
        self._split = split

    def from_peft(self, peft):
        int(peft["r"])  # a list in the file: TypeError
        return {}

    def to_peft(self, config, sites):
        return {"peft_type": "ACME"}

    def split_tensors(self, raw):
        return self._split(raw) if self._split else {"model.layers.0.self_attn.q_proj": {"w": next(iter(raw.values()))}}


@pytest.mark.parametrize(
    "codec, doc, needle",
    [
        (SloppyCodec(), {"peft_type": "ACME", "r": [4]}, r"failed in from_peft: TypeError"),
        (SloppyCodec(split=lambda raw: ["not", "a", "dict"]), {"peft_type": "ACME", "r": 4}, "returned something other than"),
        (SloppyCodec(split=lambda raw: 1 / 0), {"peft_type": "ACME", "r": 4}, "failed in split_tensors: ZeroDivisionError"),
    ],
)
def test_a_sloppy_third_party_peft_codec_is_named(tmp_path, codec, doc, needle):
    import json

    from safetensors.torch import save_file

    def register_methods(register):
        register.method("acme", config=Cfg, build=lambda c, s: Good(s.in_features, s.out_features),
                        points=["linear.delta"], peft=codec)

    plugin = types.ModuleType("acme_plugin")
    plugin.register_methods = hookimpl(register_methods)
    reg = load_registry(entry_points=False, plugins=[plugin])
    (tmp_path / "adapter_config.json").write_text(json.dumps(doc))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.w": torch.zeros(64, 64)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ac.AdapterFileError, match=needle) as err:
        ac.from_peft(tiny_llama(), tmp_path, registry=reg)
    assert "method 'acme' (plugin 'acme_plugin')" in str(err.value)
