"""Host-owned registrars handed to the contribution hooks.

A registrar checks what a plugin gives it and names the plugin in every error, so a
mistake in a third-party package is reported where it was made.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from .errors import PluginError
from .records import (
    KINDS,
    ArchitectureRecord,
    AttentionGeometry,
    Capabilities,
    Conflict,
    MethodRecord,
    Module,
    NestingRule,
    OperatorRecord,
    OrderRule,
    Refusal,
    Slice,
    Sublayer,
)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ROLE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


class _Registrar:
    hook = ""

    def __init__(self, plugin: str):
        self.plugin = plugin

    def _fail(self, what: str) -> PluginError:
        return PluginError(f"plugin {self.plugin!r}, hook {self.hook}: {what}")

    def _name(self, name: Any, what: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise self._fail(
                f"{what} name {name!r} is invalid: use lower-case letters, digits and '_', "
                "starting with a letter"
            )
        return name

    def _config_model(self, config: Any, what: str) -> type:
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise self._fail(
                f"{what}: config must be a pydantic BaseModel subclass, got {config!r}"
            )
        return config


class MethodRegistrar(_Registrar):
    hook = "register_methods"

    def __init__(self, plugin: str):
        super().__init__(plugin)
        self.records: list[MethodRecord] = []

    def method(
        self,
        name: str,
        *,
        config: type,
        build: Callable[..., Any],
        points: Iterable[str],
        capabilities: Capabilities | None = None,
        description: str = "",
        default_targets: Iterable[str] = (),
        point_for: Callable[..., str] | None = None,
        peft: Any = None,
        param_groups: Callable[..., list[dict]] | None = None,
        shared: Callable[..., Any] | None = None,
        init_from_base: Callable[..., Any] | None = None,
    ) -> None:
        """Register one PEFT method (see the README section "Writing a plugin")."""
        self._name(name, "method")
        self._config_model(config, f"method {name!r}")
        if not callable(build):
            raise self._fail(f"method {name!r}: build must be callable, got {build!r}")
        points = tuple(points)
        if not points:
            raise self._fail(f"method {name!r}: declare at least one insertion point kind")
        unknown = [p for p in points if p not in KINDS]
        if unknown:
            raise self._fail(
                f"method {name!r}: unknown insertion point kind(s) {unknown}; known kinds: {sorted(KINDS)}"
            )
        if len(points) > 1 and point_for is None:
            raise self._fail(
                f"method {name!r} declares several kinds {list(points)}: give point_for(config, site) "
                "to say which kind acts at a site"
            )
        if capabilities is not None and not isinstance(capabilities, Capabilities):
            raise self._fail(f"method {name!r}: capabilities must be registry.Capabilities")
        if peft is not None and not all(
            hasattr(peft, a) for a in ("peft_types", "from_peft", "to_peft")
        ):
            raise self._fail(
                f"method {name!r}: the peft codec needs peft_types, from_peft and to_peft"
            )
        self.records.append(
            MethodRecord(
                name=name,
                plugin=self.plugin,
                config=config,
                build=build,
                points=points,
                capabilities=capabilities or Capabilities(),
                description=description.strip(),
                default_targets=tuple(default_targets),
                point_for=point_for,
                peft=peft,
                param_groups=param_groups,
                shared=shared,
                init_from_base=init_from_base,
            )
        )


class ArchitectureRegistrar(_Registrar):
    hook = "register_architectures"

    def __init__(self, plugin: str):
        super().__init__(plugin)
        self.records: list[ArchitectureRecord] = []

    def architecture(
        self,
        name: str,
        *,
        model_types: Iterable[str],
        roles: Mapping[str, Module | Slice | Sublayer | str | tuple[Module | Slice | Sublayer, ...]],
        num_layers: str | Callable[[Any], int] = "num_hidden_layers",
        provides: Iterable[str] = ("linear.delta", "linear.scale_out", "linear.scale_in"),
        geometry: Callable[[Any], AttentionGeometry] | None = None,
        description: str = "",
        unsupported: Mapping[str, str] | None = None,
    ) -> None:
        """Register the role map of one model family. A plain string role target means
        :class:`registry.Module`; a tuple of targets, one per ``stack`` (encoder-decoder
        models), makes the role act in every stack. ``unsupported`` maps roles this family
        cannot offer to the reason, reported when an adapter targets them."""
        self._name(name, "architecture")
        model_types = tuple(model_types)
        if not model_types:
            raise self._fail(f"architecture {name!r}: give at least one model_type")
        resolved: dict[str, Any] = {}
        for role, target in roles.items():
            if not isinstance(role, str) or not _ROLE.match(role):
                raise self._fail(f"architecture {name!r}: invalid role name {role!r}")
            targets = target if isinstance(target, tuple) else (target,)
            targets = tuple(Module(t) if isinstance(t, str) else t for t in targets)
            for t in targets:
                if not isinstance(t, Module | Slice | Sublayer):
                    raise self._fail(
                        f"architecture {name!r}, role {role!r}: target must be a path string, "
                        f"registry.Module, Slice or Sublayer (or a tuple of them), got {t!r}"
                    )
                if isinstance(t, Slice) and not 0 <= t.index < t.parts:
                    raise self._fail(f"architecture {name!r}, role {role!r}: slice index out of range")
                if isinstance(t, Slice) and t.sizes is not None and len(t.sizes) != t.parts:
                    raise self._fail(f"architecture {name!r}, role {role!r}: give one size per part")
            stacks = [t.stack for t in targets]
            if len(targets) > 1 and (None in stacks or len(set(stacks)) != len(stacks)):
                raise self._fail(
                    f"architecture {name!r}, role {role!r}: several targets need distinct stack names"
                )
            resolved[role] = targets if len(targets) > 1 else targets[0]
        unsupported = dict(unsupported or {})
        clash = sorted(set(unsupported) & set(resolved))
        if clash:
            raise self._fail(f"architecture {name!r}: roles both mapped and unsupported: {clash}")
        provides = frozenset(provides)
        unknown = sorted(provides - set(KINDS))
        if unknown:
            raise self._fail(f"architecture {name!r}: unknown kinds in provides: {unknown}")
        if isinstance(num_layers, str):
            attr = num_layers

            def num_layers(config: Any, _attr: str = attr) -> int:
                return int(getattr(config, _attr))

        if not callable(num_layers):
            raise self._fail(
                f"architecture {name!r}: num_layers must be an attribute name or callable"
            )
        self.records.append(
            ArchitectureRecord(
                name=name,
                plugin=self.plugin,
                model_types=model_types,
                roles=resolved,
                num_layers=num_layers,
                provides=provides,
                geometry=geometry,
                description=description.strip(),
                unsupported=unsupported,
            )
        )


class OperatorRegistrar(_Registrar):
    hook = "register_operators"

    def __init__(self, plugin: str):
        super().__init__(plugin)
        self.records: list[OperatorRecord] = []

    def operator(
        self,
        name: str,
        *,
        options: type,
        families: Mapping[str, Callable[..., Any]],
        keyed: bool = False,
        min_children: int = 1,
        exact_merge: bool = False,
        description: str = "",
        check: Callable[..., list[str]] | None = None,
        shared: Callable[..., Any] | None = None,
    ) -> None:
        """Register a composition operator and its runtime node for each site family.

        ``families`` maps a site family to ``factory(children, options, keys, shared, site)``
        returning the node module; ``check(options, n_children, keys)`` returns problems
        with a node's options; ``shared(options, n_children)`` builds one module per node,
        shared by every site (learned weights, routers)."""
        self._name(name, "operator")
        self._config_model(options, f"operator {name!r}")
        known_families = set(KINDS.values())
        bad = sorted(set(families) - known_families)
        if bad:
            raise self._fail(
                f"operator {name!r}: unknown site families {bad}; known: {sorted(known_families)}"
            )
        self.records.append(
            OperatorRecord(
                name=name,
                plugin=self.plugin,
                options=options,
                families=dict(families),
                keyed=keyed,
                min_children=min_children,
                exact_merge=exact_merge,
                description=description.strip(),
                check=check,
                shared=shared,
            )
        )


class RuleRegistrar(_Registrar):
    hook = "register_rules"

    def __init__(self, plugin: str):
        super().__init__(plugin)
        self.refusals: list[Refusal] = []
        self.conflicts: list[Conflict] = []
        self.orders: list[OrderRule] = []
        self.nestings: list[NestingRule] = []

    def refuse(
        self,
        *,
        operator: str,
        reason: str,
        fix: str = "",
        method: str | None = None,
        kind: str | None = None,
    ) -> None:
        """Declare that ``method`` (or every method acting through ``kind``) cannot be
        composed under ``operator``."""
        if (method is None) == (kind is None):
            raise self._fail("refuse(): give exactly one of method= or kind=")
        if kind is not None and kind not in KINDS:
            raise self._fail(f"refuse(): unknown kind {kind!r}")
        self.refusals.append(Refusal(operator, reason, fix, self.plugin, method, kind))

    def conflict(self, first: str, second: str, *, reason: str, fix: str = "") -> None:
        """Declare that two methods must not act at the same site."""
        self.conflicts.append(Conflict(first, second, reason, fix, self.plugin))

    def order(self, first: str, then: str, *, reason: str) -> None:
        """Declare that inside a stack, ``first`` must come before ``then`` at a shared site."""
        self.orders.append(OrderRule(first, then, reason, self.plugin))

    def nesting(self, outer: str, inner: str, *, allowed: bool, reason: str = "") -> None:
        """Declare whether operator ``outer`` may contain operator ``inner``."""
        self.nestings.append(NestingRule(outer, inner, allowed, reason, self.plugin))
