"""The plugin contract of adapter-composer: every hook a plugin may implement.

This file is the whole contract. Each docstring follows one template: what the hook is
for, what it receives, what it returns, and when it is called. Built-in plugins
(``plugins.*``) implement these hooks through exactly the same path as third-party
packages, which are found through the entry-point group ``adapter_composer``.

Contribution hooks (``register_*``) receive a registrar owned by the host. The registrar
validates everything it is given and names the contributing plugin in any error. The
order in which pluggy calls hook implementations never matters: contributions are keyed
by name and a clash is an error naming both plugins.
"""

from __future__ import annotations

import pluggy

PROJECT = "adapter_composer"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register):
    """Contribute PEFT methods.

    Receives: ``register``, a :class:`registry.registrar.MethodRegistrar`; call
    ``register.method(name, config=..., build=..., points=[...], ...)`` once per method.
    Returns: nothing.
    Called: once per registry, while :func:`registry.load_registry` builds it.
    """


@hookspec
def register_architectures(register):
    """Contribute architecture maps: model families' roles mapped to module paths.

    Receives: ``register``, a :class:`registry.registrar.ArchitectureRegistrar`; call
    ``register.architecture(name, model_types=[...], roles={...}, ...)``.
    Returns: nothing.
    Called: once per registry, while :func:`registry.load_registry` builds it.
    """


@hookspec
def register_operators(register):
    """Contribute composition operators (``stack``, ``sum``, ``mix``, ``route``, ...).

    Receives: ``register``, a :class:`registry.registrar.OperatorRegistrar`; call
    ``register.operator(name, options=..., families={...}, ...)``.
    Returns: nothing.
    Called: once per registry, while :func:`registry.load_registry` builds it.
    """


@hookspec
def register_rules(register):
    """Contribute validation rules as data.

    Receives: ``register``, a :class:`registry.registrar.RuleRegistrar`; call
    ``register.refuse(...)`` (a method × operator or kind × operator cell that is not
    supported), ``register.conflict(...)`` (two methods that must not share a site),
    ``register.order(...)`` (an order two methods must have inside a stack) or
    ``register.nesting(...)`` (whether one operator may contain another).
    Returns: nothing.
    Called: once per registry, while :func:`registry.load_registry` builds it.
    """


@hookspec
def check_graph(graph, registry):
    """Inspect a composition graph and report problems.

    Receives: ``graph``, a read-only :class:`adapter_composer.pipeline.validate.GraphView` (resolved nodes,
    children, the networkx graph and, when a model is known, the resolved sites);
    ``registry``, the :class:`registry.Registry` being used.
    Returns: a list of :class:`registry.Diagnostic` (empty when all is well). Never
    raises and never mutates the graph: an exception is reported as a diagnostic
    naming the plugin.
    Called: during validation, after the built-in rules, once per ``compose``.
    """


@hookspec(firstresult=True)
def build_site(base, family, site):
    """Decide who builds the runtime module for one site.

    Receives: ``base``, the model's original module at the site; ``family``, the
    site family (``"linear"``, ``"sublayer"``, ``"module"``); ``site``, the
    :class:`adapter_composer.sites.SiteInfo` describing it.
    Returns: a site module (see :mod:`adapter_composer.runtime`) wrapping ``base``, or ``None``
    to let the next plugin decide. The first non-``None`` answer wins; the built-in
    builders answer last, so a plugin can provide sites for quantised or custom layers.
    An answer that is not an ``nn.Module`` is a :class:`registry.PluginContractError`, and an
    exception a :class:`registry.PluginError`, both naming the plugin.
    Called: once per site, while ``compose`` applies a plan.
    """
