"""adapter-composer: compose PEFT methods as validated graphs over transformers models.

    import adapter_composer as ac

    g = ac.Graph()
    g.adapter("sst2", "lora", r=8, alpha=16, targets=["attn.q", "attn.v"])
    composed = ac.compose(model, g)      # validate → plan → apply (in place)
    print(composed.plan.explain())
    composed.undo()                      # the original modules, bit-identical

The package is laid out by pipeline stage: ``pipeline`` (graph → resolve → validate →
plan → apply), ``runtime`` (the modules a composition puts into a model), ``live`` (the
:class:`Composed` handle: training, routing, merging, hot swap), ``formats`` (our
composition directory and PEFT's format), ``workflow`` (multi-task tasks, mixtures,
heads, training, plots), ``registry`` (the plugin host) and ``plugins`` (the built-in
methods, operators and architectures, loaded like third-party ones).
"""

from adapter_composer._version import __version__
from adapter_composer.api import compose, from_peft, from_pretrained, load, plan
from adapter_composer.errors import (
    AdapterBuildError,
    AdapterFileError,
    ArgumentError,
    ComposerError,
    CompositionError,
    HotSwapError,
    PatternError,
    PluginContractError,
    PluginError,
    RegistryError,
    RoutingError,
    SaveConflictError,
    UnknownAdapterError,
    UnknownNodeError,
    UnknownSiteError,
    UnsafePathError,
    WeightsError,
)
from adapter_composer.formats.peft import PeftAdapter, read_peft
from adapter_composer.live.composed import Composed
from adapter_composer.live.handles import AdapterHandle, ParameterReport
from adapter_composer.pipeline.graph import AdapterSpec, Graph, Node, OperatorSpec
from adapter_composer.pipeline.plan import Plan, make_plan
from adapter_composer.pipeline.validate import validate
from adapter_composer.registry import Diagnostic, default_registry, hookimpl, load_registry
from adapter_composer.sites import SiteInfo

__all__ = [
    "AdapterBuildError",
    "AdapterFileError",
    "AdapterHandle",
    "AdapterSpec",
    "ArgumentError",
    "Composed",
    "ComposerError",
    "CompositionError",
    "Diagnostic",
    "Graph",
    "HotSwapError",
    "Node",
    "OperatorSpec",
    "ParameterReport",
    "PatternError",
    "PeftAdapter",
    "Plan",
    "PluginContractError",
    "PluginError",
    "RegistryError",
    "RoutingError",
    "SaveConflictError",
    "SiteInfo",
    "UnknownAdapterError",
    "UnknownNodeError",
    "UnknownSiteError",
    "UnsafePathError",
    "WeightsError",
    "__version__",
    "compose",
    "default_registry",
    "from_peft",
    "from_pretrained",
    "hookimpl",
    "load",
    "load_registry",
    "make_plan",
    "plan",
    "read_peft",
    "validate",
]
