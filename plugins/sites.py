"""Built-in site builders: the default answer to ``build_site`` for standard layers.

They answer last (``trylast``), so a plugin can build sites for quantised or custom layers.
"""

from __future__ import annotations

from adapter_composer.registry import hookimpl
from adapter_composer.runtime import SiteBuild
from adapter_composer.runtime.linear import LinearSite
from adapter_composer.runtime.module import ModuleSite
from adapter_composer.runtime.sublayer import SublayerSite
from adapter_composer.sites import is_linear


@hookimpl(trylast=True)
def build_site(base, family, site: SiteBuild):
    if family == "linear" and is_linear(base):
        built = LinearSite(
            base, site.info, site.program, has_scale_in="linear.scale_in" in site.kinds
        )
        built.state = site.state
        return built
    if family == "sublayer":
        built = SublayerSite(base, site.info, site.program)
        built.state = site.state
        return built
    if family == "module":
        built = ModuleSite(base, site.info, site.program)
        built.state = site.state
        return built
    return None
