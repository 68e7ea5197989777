"""adapter-composer: compose PEFT methods as validated graphs over transformers models.

    import composer
    g = composer.Graph()
    g.adapter("sst2", "lora", r=8, alpha=16, targets=["attn.q", "attn.v"])
    composed = composer.compose(model, g)      # validate → plan → apply (in place)
    print(composed.plan.explain())
    composed.undo()                            # the original modules, bit-identical

Note: the import name ``composer`` is also used by MosaicML's Composer; install only one
of the two in an environment.
"""

from registry import Diagnostic

from .api import compose, default_registry, make_plan, plan
from .composed import AdapterHandle, Composed, ParameterReport
from .errors import AdapterFileError, ComposerError, CompositionError, RoutingError
from .graph import AdapterSpec, Graph, Node, OperatorSpec
from .io import load
from .peft_io import PeftAdapter, from_peft, read_peft
from .plan import Plan
from .sites import SiteInfo
from .validate import validate

__all__ = [
    "AdapterFileError",
    "AdapterHandle",
    "AdapterSpec",
    "Composed",
    "ComposerError",
    "CompositionError",
    "Diagnostic",
    "Graph",
    "Node",
    "OperatorSpec",
    "ParameterReport",
    "PeftAdapter",
    "Plan",
    "RoutingError",
    "SiteInfo",
    "compose",
    "default_registry",
    "from_peft",
    "load",
    "make_plan",
    "plan",
    "read_peft",
    "validate",
]
