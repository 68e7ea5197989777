"""Building a registry: a fresh plugin manager, built-in and third-party plugins, records."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from . import hookspecs
from .errors import ComposerError, PluginContractError, PluginError, RegistryError
from .records import (
    ArchitectureRecord,
    Diagnostic,
    MethodRecord,
    OperatorRecord,
    PluginInfo,
    RuleSet,
)
from .registrar import ArchitectureRegistrar, MethodRegistrar, OperatorRegistrar, RuleRegistrar

ENTRY_POINT_GROUP = "adapter_composer"

# Built-in plugins, loaded by module name through the same path as third-party ones.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "adapter_composer.plugins.sites",
    "adapter_composer.plugins.bnb",
    "adapter_composer.plugins.operators",
    "adapter_composer.plugins.route",
    "adapter_composer.plugins.mix",
    "adapter_composer.plugins.arrow",
    "adapter_composer.plugins.poly",
    "adapter_composer.plugins.lorahub",
    "adapter_composer.plugins.architectures",
    "adapter_composer.plugins.arch_t5",
    "adapter_composer.plugins.arch_moe",
    "adapter_composer.plugins.lora",
    "adapter_composer.plugins.bottleneck",
    "adapter_composer.plugins.ia3",
    "adapter_composer.plugins.vera",
    "adapter_composer.plugins.adalora",
    "adapter_composer.plugins.loftq",
    "adapter_composer.plugins.galore",
    "adapter_composer.plugins.prompt",
    "adapter_composer.plugins.prefix",
    "adapter_composer.plugins.modules",
)


def _version() -> str:
    try:
        return md.version("adapter-composer")
    except md.PackageNotFoundError:  # running from a source tree
        return "0+source"


class Registry:
    """Everything the installed plugins contributed. Built by :func:`load_registry`."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        plugins: tuple[PluginInfo, ...],
        methods: Mapping[str, MethodRecord],
        architectures: tuple[ArchitectureRecord, ...],
        operators: Mapping[str, OperatorRecord],
        rules: RuleSet,
    ):
        self._pm = pm
        self.plugins = plugins
        self.methods = dict(sorted(methods.items()))
        self.architectures = architectures
        self.operators = dict(sorted(operators.items()))
        self.rules = rules

    # --- queries ----------------------------------------------------------------------

    def method(self, name: str) -> MethodRecord:
        try:
            return self.methods[name]
        except KeyError:
            raise RegistryError(
                f"unknown method {name!r}; registered methods: {sorted(self.methods)}"
            ) from None

    def operator(self, name: str) -> OperatorRecord:
        try:
            return self.operators[name]
        except KeyError:
            raise RegistryError(
                f"unknown operator {name!r}; registered operators: {sorted(self.operators)}"
            ) from None

    def architecture_for(self, model_type: str | None) -> ArchitectureRecord | None:
        for record in self.architectures:
            if model_type in record.model_types:
                return record
        return None

    @property
    def roles(self) -> frozenset[str]:
        """Every role some architecture maps."""
        return frozenset(role for a in self.architectures for role in a.roles)

    def plugin_version(self, plugin: str) -> str:
        for info in self.plugins:
            if info.name == plugin:
                return info.version
        return "unknown"

    # --- hooks the host calls during validation and apply ------------------------------

    def check_graph(self, graph: Any) -> list[Diagnostic]:
        """Run every plugin's ``check_graph``; a plugin that raises becomes a diagnostic."""
        found: list[Diagnostic] = []
        for impl in self._pm.hook.check_graph.get_hookimpls():
            try:
                result = impl.function(graph=graph, registry=self)
            except Exception as exc:  # a broken plugin must not hide the other diagnostics
                found.append(
                    Diagnostic(
                        code="plugin-check-failed",
                        message=f"plugin {impl.plugin_name!r} raised in check_graph: {type(exc).__name__}: {exc}",
                        rule="check_graph never raises",
                        fix=f"report this to the authors of {impl.plugin_name!r} or uninstall it",
                        plugin=impl.plugin_name,
                    )
                )
                continue
            for item in result or ():
                if not isinstance(item, Diagnostic):
                    found.append(
                        Diagnostic(
                            code="plugin-check-failed",
                            message=f"plugin {impl.plugin_name!r} returned {item!r} from check_graph, not a Diagnostic",
                            rule="check_graph returns a list of registry.Diagnostic",
                            plugin=impl.plugin_name,
                        )
                    )
                else:
                    found.append(item)
        return found

    def build_site(self, base: Any, family: str, site: Any) -> Any:
        """The first answer of the ``build_site`` hook, checked: it must be an ``nn.Module``
        (a :class:`PluginContractError` naming the plugin otherwise)."""
        from torch import nn

        hook = self._pm.hook.build_site
        impls = hook.get_hookimpls()
        built, plugin = None, "a build_site plugin"
        if any(getattr(i, "hookwrapper", False) or getattr(i, "wrapper", False) for i in impls):
            built = hook(base=base, family=family, site=site)  # wrappers: let pluggy run them
        else:
            for impl in reversed(impls):  # pluggy's call order: last registered, tryfirst first
                try:
                    built = impl.function(base=base, family=family, site=site)
                except ComposerError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r}, hook build_site, raised {type(exc).__name__}: "
                        f"{exc} (building the {family!r} site at {site.path!r})"
                    ) from exc
                if built is not None:
                    plugin = repr(impl.plugin_name)
                    break
        if built is None:
            raise RegistryError(
                f"no plugin builds a {family!r} site for module {site.path!r} of type "
                f"{type(base).__name__}; install a plugin that implements build_site for it"
            )
        if not isinstance(built, nn.Module):
            raise PluginContractError(
                f"plugin {plugin}, hook build_site, returned {type(built).__name__} for the {family!r} "
                f"site at {site.path!r}, not an nn.Module; build_site returns a site module "
                "(see adapter_composer.runtime) or None"
            )
        return built

    # --- listing ----------------------------------------------------------------------

    def describe(self) -> str:
        """A readable listing of plugins, methods, operators, architectures and rules."""
        from .describe import describe

        return describe(self)


def _entry_point_plugins() -> list[tuple[str, Any, str]]:
    found = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.name if dist is not None else "unknown distribution"
        version = dist.version if dist is not None else "unknown"
        where = f"entry point {ep.name!r} ({ep.value}) from {dist_name}"
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginError(
                f"{where} failed to import: {type(exc).__name__}: {exc}. "
                f"Fix or uninstall {dist_name}, or call load_registry(entry_points=False)."
            ) from exc
        found.append((f"{dist_name}:{ep.name}", obj, version))
    return found


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} violates the hook contract: {exc}") from exc
    except ValueError as exc:  # registered twice under one name
        raise PluginError(f"plugin {name!r} could not be registered: {exc}") from exc


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    specs = {
        name
        for name in dir(hookspecs)
        if hasattr(getattr(hookspecs, name), "adapter_composer_spec")
    }
    for plugin_name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        for attr in dir(plugin):
            obj = getattr(plugin, attr, None)
            if callable(obj) and hasattr(obj, "adapter_composer_impl") and attr not in specs:
                raise PluginError(
                    f"plugin {plugin_name!r} implements hook {attr!r}, which is not in the contract; "
                    f"hooks are: {sorted(specs)} (see registry/hookspecs.py)"
                )


def _collect(pm: pluggy.PluginManager, hook: str, registrar_cls: type) -> list[Any]:
    registrars = []
    for impl in getattr(pm.hook, hook).get_hookimpls():
        registrar = registrar_cls(impl.plugin_name)
        try:
            impl.function(register=registrar)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r}, hook {hook}: raised {type(exc).__name__}: {exc}"
            ) from exc
        registrars.append(registrar)
    return registrars


def _unique(records: Iterable[Any], what: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for record in records:
        if record.name in seen:
            raise PluginError(
                f"{what} {record.name!r} is registered by two plugins: {seen[record.name].plugin!r} "
                f"and {record.plugin!r}; uninstall one of them or load the registry with only one"
            )
        seen[record.name] = record
    return seen


def load_registry(
    *, entry_points: bool = True, plugins: Iterable[Any] = (), builtins: bool = True
) -> Registry:
    """Build a registry with a fresh plugin manager.

    Loads the built-in plugins (unless ``builtins=False``), then third-party plugins from
    the entry-point group ``adapter_composer`` (unless ``entry_points=False``), then any
    plugin objects (modules or instances) given in ``plugins``. Nothing is shared with
    other registries and nothing happens at import time.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    if builtins:
        for modname in BUILTIN_PLUGINS:
            _register(pm, importlib.import_module(modname), modname)
            infos.append(PluginInfo(modname, _version(), "builtin"))
    if entry_points:
        for name, obj, version in _entry_point_plugins():
            _register(pm, obj, name)
            infos.append(PluginInfo(name, version, f"entry point {name}"))
    for obj in plugins:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        if pm.is_registered(obj):
            continue
        _register(pm, obj, name)
        infos.append(PluginInfo(name, getattr(obj, "__version__", "unknown"), "explicit"))
    _check_hook_names(pm)

    methods = _unique(
        (r for reg in _collect(pm, "register_methods", MethodRegistrar) for r in reg.records),
        "method",
    )
    archs = _unique(
        (
            r
            for reg in _collect(pm, "register_architectures", ArchitectureRegistrar)
            for r in reg.records
        ),
        "architecture",
    )
    seen_types: dict[str, ArchitectureRecord] = {}
    for arch in archs.values():
        for mt in arch.model_types:
            if mt in seen_types:
                raise PluginError(
                    f"model_type {mt!r} is mapped by two architectures: {seen_types[mt].name!r} "
                    f"(plugin {seen_types[mt].plugin!r}) and {arch.name!r} (plugin {arch.plugin!r})"
                )
            seen_types[mt] = arch
    operators = _unique(
        (r for reg in _collect(pm, "register_operators", OperatorRegistrar) for r in reg.records),
        "operator",
    )
    rule_regs = _collect(pm, "register_rules", RuleRegistrar)
    rules = RuleSet(
        refusals=tuple(r for reg in rule_regs for r in reg.refusals),
        conflicts=tuple(r for reg in rule_regs for r in reg.conflicts),
        orders=tuple(r for reg in rule_regs for r in reg.orders),
        nesting=tuple(r for reg in rule_regs for r in reg.nestings),
    )
    return Registry(
        pm,
        tuple(infos),
        methods,
        tuple(sorted(archs.values(), key=lambda a: a.name)),
        operators,
        rules,
    )


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry used when none is passed: built-ins plus installed plugins, built once on
    first use (never at import time). Pass ``registry=load_registry(...)`` to use another."""
    return load_registry()
