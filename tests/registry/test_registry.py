"""The registry: explicit construction, records, clashes and broken plugins named precisely."""

from __future__ import annotations

import sys
import textwrap
import types

import pytest
from pydantic import BaseModel, ConfigDict

import adapter_composer as ac
import adapter_composer.registry as reg_pkg
from adapter_composer.registry import Capabilities, PluginError, hookimpl, load_registry
from tests.models import inputs, output, tiny_llama


class _Cfg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


def _method_plugin(plugin_name: str, method_name: str) -> types.ModuleType:
    def register_methods(register):
        register.method(method_name, config=_Cfg, build=lambda c, s: None, points=["linear.delta"])

    return _plugin(plugin_name, register_methods=register_methods)


def test_registry_is_built_explicitly_and_fresh_each_time():
    a = load_registry(entry_points=False)
    b = load_registry(entry_points=False)
    assert a is not b and a._pm is not b._pm
    assert "lora" in a.methods and {"stack", "sum"} <= set(a.operators)
    assert {"llama", "gpt2", "bert"} <= {arch.name for arch in a.architectures}


def test_importing_registry_builds_nothing():
    assert not any(isinstance(v, reg_pkg.Registry) for v in vars(reg_pkg.core).values())


def test_records_describe_methods_architectures_operators(registry):
    lora = registry.method("lora")
    assert lora.plugin == "adapter_composer.plugins.lora" and lora.points == ("linear.delta",)
    assert lora.capabilities.mergeable and lora.capabilities.identity_at_init
    assert "r" in lora.config.model_fields
    llama = registry.architecture_for("mistral")
    assert llama.name == "llama" and llama.roles["attn.q"].path == "layers.{i}.self_attn.q_proj"
    text = registry.describe()
    for needle in ("lora", "adapter_composer.plugins.lora", "linear.delta", "stack", "gpt2", "attn.q", "mergeable"):
        assert needle in text


def test_unknown_names_give_the_list(registry):
    with pytest.raises(reg_pkg.RegistryError, match="registered methods"):
        registry.method("lorra")
    with pytest.raises(reg_pkg.RegistryError, match="registered operators"):
        registry.operator("stak")


def test_two_plugins_claiming_one_method_name_are_both_named():
    with pytest.raises(PluginError) as err:
        load_registry(
            entry_points=False,
            plugins=[_method_plugin("acme_one", "twin"), _method_plugin("acme_two", "twin")],
        )
    assert (
        "acme_one" in str(err.value) and "acme_two" in str(err.value) and "twin" in str(err.value)
    )


def test_a_plugin_claiming_a_builtin_name_is_refused():
    with pytest.raises(PluginError, match="adapter_composer.plugins.lora"):
        load_registry(entry_points=False, plugins=[_method_plugin("acme", "lora")])


def test_hook_with_wrong_arguments_names_plugin_and_hook():
    def register_methods(registrar):  # the contract calls it "register"
        pass

    with pytest.raises(PluginError) as err:
        load_registry(
            entry_points=False,
            plugins=[_plugin("acme_bad_args", register_methods=register_methods)],
        )
    message = str(err.value)
    assert "acme_bad_args" in message and "register_methods" in message and "registrar" in message


def test_unknown_hook_is_refused():
    def register_methodz(register):
        pass

    with pytest.raises(PluginError, match="register_methodz.*not in the contract"):
        load_registry(
            entry_points=False, plugins=[_plugin("acme_typo", register_methodz=register_methodz)]
        )


def test_plugin_raising_in_a_hook_is_named():
    def register_operators(register):
        raise RuntimeError("boom")

    with pytest.raises(PluginError, match=r"acme_raises.*register_operators.*boom"):
        load_registry(
            entry_points=False,
            plugins=[_plugin("acme_raises", register_operators=register_operators)],
        )


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"config": dict, "points": ["linear.delta"]}, "pydantic"),
        ({"config": _Cfg, "points": ["linear.sideways"]}, "unknown insertion point"),
        ({"config": _Cfg, "points": []}, "at least one"),
        ({"config": _Cfg, "points": ["linear.delta", "linear.scale_out"]}, "point_for"),
    ],
)
def test_registrar_validates_what_it_is_given(kwargs, needle):
    def register_methods(register):
        register.method("thing", build=lambda c, s: None, **kwargs)

    with pytest.raises(PluginError) as err:
        load_registry(
            entry_points=False, plugins=[_plugin("acme_sloppy", register_methods=register_methods)]
        )
    assert "acme_sloppy" in str(err.value) and needle in str(err.value)


def test_bad_method_name_is_refused():
    with pytest.raises(PluginError, match="invalid"):
        load_registry(entry_points=False, plugins=[_method_plugin("acme", "Not A Name")])


def test_architecture_clash_on_model_type():
    def register_architectures(register):
        register.architecture(
            "mybert",
            model_types=["bert"],
            roles={"attn.q": "encoder.layer.{i}.attention.self.query"},
        )

    with pytest.raises(PluginError, match="model_type 'bert'.*bert.*mybert"):
        load_registry(
            entry_points=False,
            plugins=[_plugin("acme_arch", register_architectures=register_architectures)],
        )


def test_entry_point_that_fails_to_import_is_named(tmp_path, monkeypatch):
    dist = tmp_path / "acme_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[adapter_composer]\nbroken = acme_module_that_does_not_exist\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as err:
        load_registry()
    message = str(err.value)
    assert (
        "entry point 'broken'" in message
        and "acme-broken" in message
        and "failed to import" in message
    )
    assert "entry_points=False" in message
    load_registry(entry_points=False)  # the escape hatch works


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "acme_ep_plugin.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel, ConfigDict
            from adapter_composer.registry import hookimpl

            class Cfg(BaseModel):
                model_config = ConfigDict(frozen=True, extra="forbid")

            @hookimpl
            def register_methods(register):
                register.method("acme_method", config=Cfg, build=lambda c, s: None, points=["linear.delta"])
            """
        )
    )
    dist = tmp_path / "acme_ep-2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-ep\nVersion: 2.3\n")
    (dist / "entry_points.txt").write_text("[adapter_composer]\nacme = acme_ep_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    record = reg.method("acme_method")
    assert record.plugin == "acme-ep:acme" and reg.plugin_version(record.plugin) == "2.3"
    sys.modules.pop("acme_ep_plugin", None)


def test_check_graph_plugin_that_raises_becomes_a_diagnostic():
    def check_graph(graph, registry):
        raise ValueError("plugin bug")

    reg = load_registry(
        entry_points=False, plugins=[_plugin("acme_checker", check_graph=check_graph)]
    )
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    diags = ac.validate(g, reg, tiny_llama())
    assert [d.code for d in diags] == ["plugin-check-failed"]
    assert "acme_checker" in diags[0].message and "plugin bug" in diags[0].message


def test_check_graph_plugin_adds_diagnostics_and_blocks_compose():
    from adapter_composer.registry import Diagnostic

    def check_graph(graph, registry):
        return [
            Diagnostic(code="acme-no-q", message=f"{n} targets q", nodes=(n,))
            for n in graph.specs
            if any(s.role == "attn.q" for s in graph.sites(n))
        ]

    reg = load_registry(entry_points=False, plugins=[_plugin("acme_rule", check_graph=check_graph)])
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    g.adapter("b", "lora", targets=["attn.v"])
    with pytest.raises(ac.CompositionError) as err:
        ac.compose(model, g, registry=reg)
    assert err.value.codes == ["acme-no-q"] and "a targets q" in str(err.value)


def test_build_site_from_a_plugin_takes_precedence():
    from adapter_composer.runtime.linear import LinearSite

    class TracingSite(LinearSite):
        calls = 0

        def forward(self, x, *args, **kwargs):
            TracingSite.calls += 1
            return super().forward(x, *args, **kwargs)

    def build_site(base, family, site):
        if family != "linear":
            return None
        built = TracingSite(
            base, site.info, site.program, has_scale_in="linear.scale_in" in site.kinds
        )
        built.state = site.state
        return built

    reg = load_registry(entry_points=False, plugins=[_plugin("acme_sites", build_site=build_site)])
    model = tiny_llama()
    batch = inputs()
    before = output(model, batch)
    g = ac.Graph()
    g.adapter("a", "lora", targets=["attn.q"])
    composed = ac.compose(model, g, registry=reg)
    assert all(isinstance(s, TracingSite) for s in composed.sites().values())
    assert (output(model, batch) - before).abs().max() == 0 and TracingSite.calls == 2


def test_capabilities_default_is_conservative():
    caps = Capabilities()
    assert not caps.mergeable and caps.identity_at_init and not caps.changes_sequence_length


def test_rules_contributed_as_data_reach_validation():
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "loha_plugin"))
    import composer_loha

    sys.path.pop(0)

    def register_rules(register):
        register.refuse(method="loha", operator="sum", reason="acme says no", fix="use a stack")
        register.conflict("lora", "loha", reason="acme keeps them apart", fix="target other roles")
        register.order("loha", "lora", reason="loha must come first")
        register.nesting("stack", "sum", allowed=False, reason="acme forbids it")

    reg = load_registry(
        entry_points=False,
        plugins=[composer_loha, _plugin("acme_rules", register_rules=register_rules)],
    )
    model = tiny_llama()
    g = ac.Graph()
    g.adapter("h", "loha", r=2, targets=["attn.q"])
    g.adapter("l", "lora", r=2, targets=["attn.q"])
    g.sum("h", "l", name="s")
    g.stack("s", name="outer")
    g2 = ac.Graph()
    g2.adapter("h", "loha", r=2, targets=["attn.q"])
    g2.adapter("l", "lora", r=2, targets=["attn.q"])
    g2.stack("l", "h")
    codes = sorted(d.code for d in ac.validate(g, reg, model))
    assert codes == ["forbidden-nesting", "method-conflict", "unsupported-operator"]
    diags = ac.validate(g2, reg, model)
    assert sorted(d.code for d in diags) == ["method-conflict", "stack-order"]
    order = next(d for d in diags if d.code == "stack-order")
    assert order.sites == ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
    assert "loha must come first" in order.message and order.plugin == "acme_rules"
    refusal = next(d for d in ac.validate(g, reg, model) if d.code == "unsupported-operator")
    assert "acme says no" in refusal.message and refusal.fix == "use a stack"
    nesting = next(d for d in ac.validate(g, reg, model) if d.code == "forbidden-nesting")
    assert "acme forbids it" in nesting.message and "allowed nestings" in nesting.rule
