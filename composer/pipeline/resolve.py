"""Resolving an adapter's targets (roles, module names, regexes) to concrete sites of a model."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import PatternError
from adapter_composer.patterns import MATCH_TIMEOUT, MAX_LENGTH, filter_fullmatch
from adapter_composer.pipeline.graph import AdapterSpec
from adapter_composer.pipeline.site_info import build_site
from adapter_composer.registry import (
    KINDS,
    ArchitectureRecord,
    Diagnostic,
    MethodRecord,
    Module,
    Registry,
    Sublayer,
)
from adapter_composer.sites import MODEL_FAMILIES, SiteInfo


@dataclass(frozen=True)
class _Location:
    key: str
    path: str
    role: str | None
    layer: int | None
    target: Any


def backbone_prefix(model: nn.Module) -> str:
    """Path of the transformers backbone inside ``model`` ('' when the model is the backbone)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_children():
        if module is base:
            return name + "."
    return ""


def model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


class Resolver:
    """Resolves targets on one model; built once per compose."""

    def __init__(self, model: nn.Module, registry: Registry):
        self.model = model
        self.registry = registry
        self.model_type = model_type(model)
        self.arch: ArchitectureRecord | None = registry.architecture_for(self.model_type)
        self.prefix = backbone_prefix(model)
        self.names = _module_names(model)
        self._name_set = frozenset(self.names)
        self.num_layers = self.arch.num_layers(model.config) if self.arch else None
        try:
            first = next(model.parameters())
            self.dtype, self.device = first.dtype, first.device
        except StopIteration:
            self.dtype, self.device = torch.float32, torch.device("cpu")

    # --- locations --------------------------------------------------------------------

    def _layer_count(self, target: Any) -> int:
        if target.layers is None:
            return self.num_layers
        return int(getattr(self.model.config, target.layers))

    def _fill(self, template: str, i: int | None) -> str:
        """The module path of a template in layer ``i``; of ``a|b`` alternatives, the first
        this model has (the first one when none exists: resolution then names it)."""
        options = [self.prefix + (t.format(i=i) if i is not None else t) for t in template.split("|")]
        return next((o for o in options if o in self._name_set), options[0])

    def _role_locations(
        self, spec: AdapterSpec, role: str, diags: list[Diagnostic], stack: str | None = None
    ) -> list[_Location]:
        locs = []
        for target in self.arch.targets(role):
            if stack is not None and target.stack != stack:
                continue
            locs += self._target_locations(spec, role, target, diags)
        return locs

    def _target_locations(
        self, spec: AdapterSpec, role: str, target: Any, diags: list[Diagnostic]
    ) -> list[_Location]:
        template = target.output if isinstance(target, Sublayer) else target.path
        layered = "{i}" in template
        where = "" if target.stack is None else f"{target.stack}."
        if layered:
            count = self._layer_count(target)
            layers = list(range(count)) if spec.layers is None else list(spec.layers)
            bad = [i for i in layers if not 0 <= i < count]
            if bad:
                stack = "" if target.stack is None else f" in its {target.stack!r} stack"
                diags.append(
                    Diagnostic(
                        code="bad-layers",
                        message=f"adapter {spec.name!r} asks for layers {bad}, but the model has {count}{stack} (0..{count - 1})",
                        nodes=(spec.name,),
                        fix=f"use layer indices below {count}",
                    )
                )
                layers = [i for i in layers if i not in bad]
        else:
            layers = [None]
        locs = []
        for i in layers:
            if isinstance(target, Sublayer):
                resolved: Any = replace(target, input=self._fill(target.input, i), output=self._fill(target.output, i))
                path = resolved.output
            else:
                resolved = replace(target, path=self._fill(target.path, i))
                path = resolved.path
            key = f"{where}layers.{i}.{role}" if i is not None else f"{where}{role}"
            locs.append(_Location(key, path, role, i, resolved))
        return locs

    def _unsupported(self, spec: AdapterSpec, role: str) -> Diagnostic:
        return Diagnostic(
            code="role-unsupported",
            message=f"adapter {spec.name!r} targets role {role!r}, which {self.arch.name} models cannot offer: "
            f"{self.arch.unsupported[role]}",
            nodes=(spec.name,),
            rule=f"roles of {self.arch.name}: {', '.join(self.arch.roles)}",
            fix="choose one of those roles",
        )

    def _stack_role(self, target: str) -> tuple[str, str] | None:
        """(stack, role) for a stack-qualified role such as ``enc.attn.q``, else None."""
        if self.arch is None or "." not in target:
            return None
        stack, role = target.split(".", 1)
        if stack in self.arch.stacks() and role in self.arch.roles:
            return stack, role
        return None

    def _pattern_locations(self, spec: AdapterSpec, pattern: str) -> list[_Location]:
        if pattern.startswith("re:"):  # bounded time: targets may come from a file
            paths = filter_fullmatch(pattern[3:], self.names, what=f"adapter {spec.name!r}: target regex")
        else:
            paths = [n for n in self.names if n == pattern or n.endswith("." + pattern)]
        return [_Location(f"module.{p}", p, None, None, Module(p)) for p in paths]

    def locations(
        self, spec: AdapterSpec, method: MethodRecord, diags: list[Diagnostic]
    ) -> list[_Location]:
        targets = spec.targets if spec.targets is not None else method.default_targets
        if not targets:
            diags.append(
                Diagnostic(
                    code="no-targets",
                    message=f"adapter {spec.name!r} ({method.name}) names no targets and the method has no default",
                    nodes=(spec.name,),
                    fix="pass targets=[...] (roles such as 'attn.q', module names, or 're:<regex>')",
                )
            )
            return []
        locs: list[_Location] = []
        known_roles = self.registry.roles
        for t in targets:
            if self.arch is not None and t in self.arch.roles:
                locs.extend(self._role_locations(spec, t, diags))
                continue
            if self.arch is not None and t in self.arch.unsupported:
                diags.append(self._unsupported(spec, t))
                continue
            qualified = self._stack_role(t)
            if qualified is not None:
                stack, role = qualified
                found = self._role_locations(spec, role, diags, stack)
                if not found and not any(x.stack == stack for x in self.arch.targets(role)):
                    stacks = sorted(x.stack for x in self.arch.targets(role) if x.stack)
                    diags.append(
                        Diagnostic(
                            code="role-missing",
                            message=f"adapter {spec.name!r} targets {t!r}, but role {role!r} of {self.arch.name} models "
                            f"exists only in the stack(s) {stacks or ['(all)']}",
                            nodes=(spec.name,),
                            fix=f"target {role!r} (every stack) or one of " + ", ".join(f"'{x}.{role}'" for x in stacks),
                        )
                    )
                locs.extend(found)
                continue
            if t in known_roles:
                if self.arch is None:
                    diags.append(
                        Diagnostic(
                            code="no-architecture",
                            message=f"adapter {spec.name!r} targets role {t!r}, but no architecture plugin maps model type {self.model_type!r}",
                            nodes=(spec.name,),
                            rule="roles are mapped to modules by architecture plugins",
                            fix="target module names or 're:<regex>' patterns instead, or install an architecture plugin",
                        )
                    )
                else:
                    diags.append(
                        Diagnostic(
                            code="role-missing",
                            message=f"adapter {spec.name!r} targets role {t!r}, which {self.arch.name} models do not have",
                            nodes=(spec.name,),
                            rule=f"roles of {self.arch.name}: {', '.join(self.arch.roles)}",
                            fix="choose one of those roles, or target a module name or 're:<regex>'",
                        )
                    )
                continue
            try:
                found = self._pattern_locations(spec, t)
            except PatternError as exc:
                diags.append(
                    Diagnostic(
                        code="bad-pattern",
                        message=str(exc),
                        nodes=(spec.name,),
                        rule=f"a target regex is valid, at most {MAX_LENGTH} characters, and matches a module path in under {MATCH_TIMEOUT} s",
                        fix="fix or simplify the regex (avoid nested repetition such as '(a*)*')",
                    )
                )
                continue
            if found:
                locs.extend(found)
                continue
            if t.startswith("re:"):
                diags.append(
                    Diagnostic(
                        code="pattern-matches-nothing",
                        message=f"adapter {spec.name!r}: regex {t[3:]!r} matches no module of this model",
                        nodes=(spec.name,),
                        fix="check the pattern against [n for n, _ in model.named_modules()] (it must match the whole path)",
                    )
                )
                continue
            vocabulary = sorted(known_roles)
            close = difflib.get_close_matches(
                t, vocabulary + sorted({n.rsplit(".", 1)[-1] for n in self.names}), n=3
            )
            diags.append(
                Diagnostic(
                    code="unknown-role",
                    message=f"adapter {spec.name!r}: {t!r} is neither a known role nor the name of a module in this model"
                    + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""),
                    nodes=(spec.name,),
                    rule=f"known roles: {', '.join(vocabulary)}",
                    fix="use a role, a module name such as 'q_proj', or a regex 're:...'",
                )
            )
        unique: dict[tuple[str, Any], _Location] = {}
        for loc in locs:
            unique.setdefault((loc.path, loc.target), loc)
        return list(unique.values())

    def block_path(self, layer: int) -> str | None:
        """Module path of layer ``layer`` (the architecture's ``block`` role), if mapped."""
        if self.arch is None or "block" not in self.arch.roles or len(self.arch.targets("block")) > 1:
            return None
        return self._fill(self.arch.targets("block")[0].path, layer)

    # --- sites ------------------------------------------------------------------------

    def model_site(self, spec: AdapterSpec, kind: str, diags: list[Diagnostic]) -> SiteInfo | None:
        family = KINDS[kind]
        geometry = None
        if family == "prefix":
            if self.arch is None or self.arch.geometry is None:
                diags.append(self._point_missing(spec, kind))
                return None
            geometry = self.arch.geometry(self.model.config)
        elif self.arch is not None and kind not in self.arch.provides and family != "optimizer":
            diags.append(self._point_missing(spec, kind))
            return None
        return SiteInfo(
            key="model",
            path="",
            family=family,
            kind=kind,
            geometry=geometry,
            model_config=getattr(self.model, "config", None),
            module=self.model,
            dtype=self.dtype,
            device=self.device,
        )

    def _point_missing(self, spec: AdapterSpec, kind: str) -> Diagnostic:
        arch = self.arch.name if self.arch else f"model type {self.model_type!r}"
        provided = ", ".join(sorted(self.arch.provides)) if self.arch else "none known"
        return Diagnostic(
            code="point-missing",
            message=f"adapter {spec.name!r} needs insertion point {kind!r}, which {arch} does not provide",
            nodes=(spec.name,),
            rule=f"insertion points provided: {provided}",
            fix="use a method acting through one of those points, or extend the architecture plugin",
        )

    def sites(
        self, spec: AdapterSpec, method: MethodRecord, config: Any, diags: list[Diagnostic]
    ) -> list[SiteInfo]:
        """Every site where adapter ``spec`` acts, or diagnostics saying why it cannot."""
        model_kinds = [k for k in method.points if KINDS[k] in MODEL_FAMILIES]
        if model_kinds and len(model_kinds) == len(method.points):
            site = self.model_site(spec, model_kinds[0], diags)
            return [site] if site is not None else []
        out: list[SiteInfo] = []
        local: list[Diagnostic] = []
        for loc in self.locations(spec, method, diags):
            probe = SiteInfo(
                key=loc.key, path=loc.path, family="", kind="", role=loc.role, layer=loc.layer
            )
            kind = method.kind_for(config, probe)
            family = KINDS[kind]
            if (
                self.arch is not None
                and loc.role is not None
                and kind not in self.arch.provides
                and family != "module"  # a copy of a module needs nothing from the architecture
            ):
                local.append(self._point_missing(spec, kind))
                continue
            site = build_site(self, spec, method, loc, kind, family, local)
            if site is not None:
                out.append(site)
        diags.extend(_merge_repeats(local))
        return out



def _merge_repeats(diags: list[Diagnostic]) -> list[Diagnostic]:
    """One diagnostic per (code, message), with the sites of all repeats (one per layer)."""
    merged: dict[tuple[str, str], Diagnostic] = {}
    for d in diags:
        key = (d.code, d.message)
        if key in merged:
            old = merged[key]
            merged[key] = Diagnostic(
                d.code,
                d.message,
                old.nodes,
                old.sites + tuple(s for s in d.sites if s not in old.sites),
                d.rule,
                d.fix,
                d.plugin,
            )
        else:
            merged[key] = d
    return list(merged.values())
