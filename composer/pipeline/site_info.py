"""Building one site's description (SiteInfo) from a resolved location: the module there, its
shapes, the rows of a fused module a role names, and the diagnostics when the method's kind
does not fit what is there. Used by :class:`~adapter_composer.pipeline.resolve.Resolver`."""

from __future__ import annotations

from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.registry import Diagnostic, Slice, Sublayer
from adapter_composer.sites import SiteInfo, is_linear, linear_shape


def build_site(resolver, spec, method, loc, kind, family, diags) -> SiteInfo | None:
    """The SiteInfo of adapter ``spec`` at location ``loc``, or None with a diagnostic saying why."""
    try:
        module = resolver.model.get_submodule(loc.path)
        while getattr(module, "is_composer_site", False):  # a live composition (hot swap)
            module = module.base
    except AttributeError:
        diags.append(
            Diagnostic(
                code="role-path-missing",
                message=f"role {loc.role!r} maps to {loc.path!r}, which this model does not have",
                nodes=(spec.name,),
                fix="the architecture plugin does not fit this model variant; target module names instead",
            )
        )
        return None
    common = dict(
        key=loc.key,
        path=loc.path,
        family=family,
        kind=kind,
        role=loc.role,
        layer=loc.layer,
        model_config=getattr(resolver.model, "config", None),
        dtype=resolver.dtype,
        device=resolver.device,
    )
    if family == "linear":
        if isinstance(loc.target, Sublayer) or not is_linear(module):
            what = repr(loc.role) if loc.role else repr(loc.path)
            diags.append(
                Diagnostic(
                    code="target-not-linear",
                    message=f"adapter {spec.name!r} ({method.name}, {kind}) targets {what}, "
                    f"a {type(module).__name__}, not a linear layer",
                    nodes=(spec.name,),
                    sites=(loc.path,),
                    fix="target linear roles (attn.q, attn.k, attn.v, attn.o, mlp.*) or linear modules",
                )
            )
            return None
        fan_in, fan_out = linear_shape(module)
        out_slice = None
        if isinstance(loc.target, Slice):
            bounds = slice_bounds(resolver.model, loc.target, fan_out)
            if bounds is None:
                diags.append(
                    Diagnostic(
                        code="role-path-missing",
                        message=f"{loc.path!r} has {fan_out} outputs, which do not split into the "
                        f"{loc.target.parts} parts {slice_sizes(resolver.model, loc.target)} role {loc.role!r} assumes",
                        nodes=(spec.name,),
                        fix="the architecture plugin does not fit this model variant; target the fused module instead",
                    )
                )
                return None
            out_slice = bounds
            fan_out = bounds[1] - bounds[0]
        return SiteInfo(
            **common,
            out_slice=out_slice,
            in_features=fan_in,
            out_features=fan_out,
            module=module,
        )
    if family == "sublayer":
        if loc.role is not None and not isinstance(loc.target, Sublayer):
            diags.append(
                Diagnostic(
                    code="kind-target-mismatch",
                    message=f"adapter {spec.name!r} ({method.name}, {kind}) acts on a sublayer's output, "
                    f"but role {loc.role!r} is a single layer, not a sublayer",
                    nodes=(spec.name,),
                    sites=(loc.path,),
                    fix="target the sublayer roles 'attn' or 'mlp' (or a module name, at your own risk)",
                )
            )
            return None
        target = (
            loc.target if isinstance(loc.target, Sublayer) else Sublayer(loc.path, loc.path)
        )
        width = (
            linear_shape(module)[1] if is_linear(module) else _output_width(resolver.model, module)
        )
        return SiteInfo(
            **common,
            input_path=target.input,
            in_features=width,
            out_features=width,
            module=module,
        )
    if family == "module":
        return _module_site(spec, method, loc, kind, module, common, diags)
    diags.append(
        Diagnostic(
            code="kind-target-mismatch",
            message=f"adapter {spec.name!r}: kind {kind!r} acts on the whole model, not on {loc.key!r}",
            nodes=(spec.name,),
            fix="leave targets unset for this method",
        )
    )
    return None


def _module_site(spec, method, loc, kind, module, common, diags) -> SiteInfo | None:
    """A whole-module site: the module a role or name resolves to, never part of one."""
    if isinstance(loc.target, Slice | Sublayer):
        what = "part of a fused module" if isinstance(loc.target, Slice) else "a sublayer (two modules)"
        diags.append(
            Diagnostic(
                code="kind-target-mismatch",
                message=f"adapter {spec.name!r} ({method.name}, {kind}) copies a whole module, "
                f"but role {loc.role!r} is {what}",
                nodes=(spec.name,),
                sites=(loc.path,),
                fix="target the module itself by name (e.g. 'c_attn', 'classifier', 'lm_head')",
            )
        )
        return None
    fan_in, fan_out = linear_shape(module) if is_linear(module) else (0, 0)
    return SiteInfo(**common, in_features=fan_in, out_features=fan_out, module=module)

def slice_sizes(model: nn.Module, target: Slice) -> list[int]:
    if target.sizes is None:
        return [1] * target.parts
    cfg = model.config
    return [int(getattr(cfg, v)) if isinstance(v, str) else int(v) for v in target.sizes]

def slice_bounds(model: nn.Module, target: Slice, fan_out: int) -> tuple[int, int] | None:
    """Rows [start, stop) of part ``index`` when ``fan_out`` splits in the given proportions."""
    sizes = slice_sizes(model, target)
    total = sum(sizes)
    if total <= 0 or fan_out % total:
        return None
    unit = fan_out // total
    start = unit * sum(sizes[: target.index])
    return start, start + unit * sizes[target.index]


def _output_width(model: nn.Module, module: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and hasattr(cfg, attr):
            return int(getattr(cfg, attr))
    if is_linear(module):
        return linear_shape(module)[1]
    raise ComposerError(
        f"cannot tell the output width of {type(module).__name__}: the model's config has no "
        "hidden_size, n_embd or d_model; target a linear layer instead"
    )
