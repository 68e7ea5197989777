"""The method × operator table's numeric checks for the routing operators (arrow, poly,
lorahub), used by tests/composer/test_operator_table.py for every *verified* cell.

Each builds its reference independently of the operator's code:
  arrow    ΔWₑ is read off a model holding expert e alone (its site applied to the identity
           matrix), vₑ is its top right singular vector (torch.linalg.svd), the gates follow
           the paper's formula, and y = y₀ + Σₑ gₑ(x)(yₑ(x) − y₀(x)) at each site
  poly     a model holding one adapter whose parameters are Σₛ wₛ θₛ, w = σ(Z)/Σσ(Z) per site
  lorahub  the same with the node's weights w
"""

from __future__ import annotations

import torch

from adapter_composer.runtime import CONTAINER_ATTR
from tests.models import BUILDERS, inputs, output

ATOL = 2e-5


def _table():
    # the battery's helpers, imported late because the battery imports this module
    from tests.composer import test_operator_table

    return test_operator_table


def _perturb_experts(composed, seed: int = 4) -> None:
    """Arrow freezes its experts, so the battery's randomize() leaves them at init: move every
    adapter parameter, frozen or not."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for handle in composed.adapters.values():
            for p in handle.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def check_arrow(method, model, composed):
    table = _table()
    profile = table.PROFILES[method]
    _perturb_experts(composed)
    batch = inputs()
    singles = {n: table._alone(method, composed, n)[0] for n in ("a", "b")}
    base = BUILDERS[profile.arch](0)
    for path, _family in table._site_paths(composed)[:3]:
        args, kwargs, out = table._capture(model, path, batch)
        x = args[0] if args else kwargs["input"]
        with torch.no_grad():
            eye = torch.eye(x.shape[-1], dtype=x.dtype)
            y0 = _first(base.get_submodule(path)(x))
            deltas, protos = [], []
            for name in ("a", "b"):
                module = singles[name].get_submodule(path)
                dw = (_first(module(eye)) - _first(base.get_submodule(path)(eye))).t()  # ΔWₑ [out, in]
                _, s, vh = torch.linalg.svd(dw.double())
                protos.append(vh[0].to(x.dtype) if s[0] > 0 else torch.zeros(x.shape[-1], dtype=x.dtype))
                deltas.append(_first(module(x)) - y0)
            scores = (x @ torch.stack(protos).t()).abs()
            gates = (scores / 1.0).softmax(-1)  # top_k = 3 by default: both experts
            expected = y0 + sum(gates[..., e : e + 1] * deltas[e] for e in range(2))
        torch.testing.assert_close(_first(out), expected, rtol=0, atol=ATOL)


def _mixed_reference(method, composed, weights_at):
    """A fresh model holding adapter ``a`` alone with parameters Σᵢ wᵢ θᵢ at each site."""
    table = _table()
    alone, single = table._alone(method, composed, "a")
    states = [composed.adapters[n].state_dict() for n in ("a", "b")]
    params = {n for n, _ in composed.adapters["a"].named_parameters()}
    mixed = {}
    for key, value in states[0].items():
        if key.startswith("shared.") or key not in params:
            mixed[key] = value  # shared tensors and buffers: the first child's
        else:
            site = key.rsplit(".", 1)[0]
            w = weights_at(site)
            mixed[key] = w[0] * states[0][key] + w[1] * states[1][key]
    single.adapters["a"].load_tensors(mixed)
    return alone


def check_poly(method, model, composed):
    node = getattr(composed.model, CONTAINER_ATTR).operators["node"]
    with torch.no_grad():
        for z in node.logits.values():
            z.normal_(0, 1.5)
    composed.eval()

    def weights_at(site):
        z = torch.sigmoid(node.logits[site.replace(".", "/")])[0]
        return z / z.sum()

    reference = _mixed_reference(method, composed, weights_at)
    batch = inputs()
    torch.testing.assert_close(output(model, batch), output(reference, batch), rtol=0, atol=ATOL)


def check_lorahub(method, model, composed):
    weights = getattr(composed.model, CONTAINER_ATTR).operators["node"].weights
    weights.copy_(torch.tensor([0.7, -0.4]))
    reference = _mixed_reference(method, composed, lambda site: [0.7, -0.4])
    batch = inputs()
    torch.testing.assert_close(output(model, batch), output(reference, batch), rtol=0, atol=ATOL)


ROUTING_CHECKS = {"arrow": check_arrow, "poly": check_poly, "lorahub": check_lorahub}
