"""Frozen records of what plugins contributed, and the small value types of the contract."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Insertion-point kinds and the site family each one acts in. The families are what the
# host knows how to patch; a kind is how a method acts inside a family.
KINDS: Mapping[str, str] = {
    "linear.delta": "linear",  # y = W x + Δ(x)
    "linear.scale_out": "linear",  # y = (W x + b) ⊙ l
    "linear.scale_in": "linear",  # y = W (x ⊙ l) + b
    "sublayer.output": "sublayer",  # h ↦ h + f(h) on a sublayer's output, before the residual add
    "sublayer.parallel": "sublayer",  # h ↦ h + f(x), x the sublayer's input
    "attention.kv_prefix": "prefix",  # keys = [P; K], values = [P; V] in every attention layer
    "input.embeddings": "prompt",  # inputs_embeds = [P; embed(ids)]
    "module.replace": "module",  # y = M'(x): a trainable copy M' of a whole module (head, embedding, norm)
    "optimizer": "optimizer",  # acts on how parameters are trained, not on the forward pass
}


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a composition graph.

    ``code`` is stable (tests and users match on it); ``message`` says what is wrong
    naming the nodes and sites involved; ``rule`` says which rule was broken; ``fix``
    says what to do instead.
    """

    code: str
    message: str
    nodes: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    rule: str = ""
    fix: str = ""
    plugin: str = "adapter-composer"

    def format(self) -> str:
        lines = [f"[{self.code}] {self.message}"]
        if self.nodes:
            lines.append(f"    nodes: {', '.join(self.nodes)}")
        if self.sites:
            shown = list(self.sites[:6]) + (
                [f"... {len(self.sites) - 6} more"] if len(self.sites) > 6 else []
            )
            lines.append(f"    sites: {', '.join(shown)}")
        if self.rule:
            lines.append(f"    rule: {self.rule}")
        if self.fix:
            lines.append(f"    fix: {self.fix}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared by its plugin (and checked by the conformance tests)."""

    mergeable: bool = False  # its effect can be folded exactly into the base weights
    identity_at_init: bool = True  # a fresh adapter leaves the model's outputs unchanged
    changes_sequence_length: bool = False  # adds positions to the input (prompt tuning)
    trains_base: bool = False  # trains base parameters (optimizer-kind methods such as GaLore)


# --- role targets: how an architecture maps a role to the model -------------------------


# Every target may name a ``stack`` (encoder-decoder models: ``"enc"``, ``"dec"``): a role
# mapped to a tuple of targets, one per stack, acts on all of them; ``"enc.attn.q"`` picks one.
# Sites of a stack get keys ``<stack>.layers.<i>.<role>``. ``layers`` is the config attribute
# counting that stack's layers (default: the architecture's ``num_layers``). A ``path`` may list
# alternatives separated by ``|``; the first one the model has is used (T5's gated MLP names
# its up projection ``wi_1``, the plain one ``wi``).


@dataclass(frozen=True)
class Module:
    """A role held by one module; ``path`` is relative to the backbone, ``{i}`` is the layer."""

    path: str
    stack: str | None = None
    layers: str | None = None


@dataclass(frozen=True)
class Slice:
    """A role held by part ``index`` of ``parts`` parts of a fused module's output.

    The parts are equal unless ``sizes`` gives their relative sizes, as config attribute
    names or integers: Phi-3's ``qkv_proj`` with grouped-query attention is
    ``sizes=("num_attention_heads", "num_key_value_heads", "num_key_value_heads")``."""

    path: str
    index: int
    parts: int
    sizes: tuple[str | int, ...] | None = None
    stack: str | None = None
    layers: str | None = None


@dataclass(frozen=True)
class Sublayer:
    """A sublayer role: ``input`` is where its input enters, ``output`` the module whose
    output is the sublayer's result before the residual add."""

    input: str
    output: str
    stack: str | None = None
    layers: str | None = None


RoleTarget = Module | Slice | Sublayer


@dataclass(frozen=True)
class AttentionGeometry:
    """Shape of the attention key/value cache, for methods that act on it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    source: str  # "builtin", "entry point <name> from <distribution>", or "explicit"


@dataclass(frozen=True)
class MethodRecord:
    name: str
    plugin: str
    config: type  # a pydantic model (frozen, unknown keys rejected)
    build: Callable[..., Any]  # build(config, site) -> module implementing the kind's protocol
    points: tuple[str, ...]
    capabilities: Capabilities
    description: str = ""
    default_targets: tuple[str, ...] = ()
    point_for: Callable[..., str] | None = None  # point_for(config, site) -> kind, when several
    peft: Any = None  # a codec with from_peft/to_peft, when the method has a PEFT equivalent
    param_groups: Callable[..., list[dict]] | None = None  # param_groups(config, modules, lr)
    shared: Callable[..., Any] | None = None  # shared(config, sites) -> module shared by all sites
    init_from_base: Callable[..., Any] | None = None  # a pre-apply hook (LoftQ initialisation)

    def kind_for(self, config: Any, site: Any) -> str:
        if self.point_for is not None:
            return self.point_for(config, site)
        return self.points[0]


@dataclass(frozen=True)
class ArchitectureRecord:
    name: str
    plugin: str
    model_types: tuple[str, ...]
    roles: Mapping[str, RoleTarget | tuple[RoleTarget, ...]]  # a tuple: one target per stack
    num_layers: Callable[[Any], int]
    provides: frozenset[str]  # insertion-point kinds this family supports
    geometry: Callable[[Any], AttentionGeometry] | None = None
    description: str = ""
    unsupported: Mapping[str, str] = field(default_factory=dict)  # role -> why this family cannot have it

    def targets(self, role: str) -> tuple[RoleTarget, ...]:
        target = self.roles[role]
        return target if isinstance(target, tuple) else (target,)

    def stacks(self) -> frozenset[str]:
        return frozenset(t.stack for r in self.roles for t in self.targets(r) if t.stack)


@dataclass(frozen=True)
class OperatorRecord:
    name: str
    plugin: str
    options: type  # pydantic model of the operator's options
    families: Mapping[str, Callable[..., Any]]  # family -> runtime node factory
    keyed: bool = False  # children are addressed by key (route)
    min_children: int = 1
    exact_merge: bool = False  # its composition can be folded into weights exactly
    description: str = ""
    check: Callable[..., list[str]] | None = None  # check(options, n_children, keys) -> problems
    shared: Callable[..., Any] | None = (
        None  # shared(options, n_children) -> module shared by all sites
    )


@dataclass(frozen=True)
class Refusal:
    operator: str
    reason: str
    fix: str
    plugin: str
    method: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class Conflict:
    first: str
    second: str
    reason: str
    fix: str
    plugin: str


@dataclass(frozen=True)
class OrderRule:
    first: str
    then: str
    reason: str
    plugin: str


@dataclass(frozen=True)
class NestingRule:
    outer: str
    inner: str
    allowed: bool
    reason: str
    plugin: str


@dataclass(frozen=True)
class RuleSet:
    refusals: tuple[Refusal, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    orders: tuple[OrderRule, ...] = ()
    nesting: tuple[NestingRule, ...] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)
