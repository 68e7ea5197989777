"""LoftQ: the normal-float quantiser, the alternating initialisation, the quantised site.

References: the code books are checked against bitsandbytes' NF4 constants and the
quantile construction (stdlib ``NormalDist``); the quantiser against an argmin over the
whole table (PEFT's former ``NFQuantizer``); the initialisation against the installed PEFT
``loftq_init`` itself, run on CPU with a stand-in for bitsandbytes that quantises with the
reference quantiser; sites against dense formulas.
"""

from __future__ import annotations

import sys
import types
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch.overrides import TorchFunctionMode

import adapter_composer as ac
from adapter_composer import CompositionError, Graph
from adapter_composer.errors import ComposerError
from adapter_composer.plugins import loftq as loftq_plugin
from adapter_composer.plugins.loftq import (
    LoftQ,
    LoftqConfig,
    QuantizedLinear,
    QuantizedLinearSite,
    loftq_init,
    low_rank_split,
)
from adapter_composer.plugins.quantize import (
    dequantize,
    normal_float_table,
    pack,
    quantize,
    quantize_dequantize,
    unpack,
)
from adapter_composer.registry import hookimpl, load_registry
from adapter_composer.tables import cell
from tests.models import (
    inputs,
    output,
    randomize,
    same_state,
    state_copy,
    tiny_gpt2,
    tiny_llama,
)

# bitsandbytes' NF4 code book (QLoRA, Dettmers et al. 2023, appendix E), as hard-coded there
NF4_QLORA = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def reference_table(bits: int) -> torch.Tensor:
    """The normal-float construction with the standard library's Φ⁻¹ (PEFT/bitsandbytes use scipy)."""
    if bits == 4:
        return torch.tensor(NF4_QLORA)
    ppf, half = NormalDist().inv_cdf, 2 ** (bits - 1)
    pos = [ppf(p) for p in torch.linspace(0.9677083, 0.5, half + 1)[:-1].tolist()]
    neg = [-ppf(p) for p in torch.linspace(0.9677083, 0.5, half)[:-1].tolist()]
    values = torch.tensor(pos + [0.0] + neg).sort().values
    return values / values.max()


def reference_quantize(w: torch.Tensor, bits: int, block: int = 64):
    """PEFT's former NFQuantizer.quantize_block: argmin over the whole table, LIFO packing."""
    blocks = w.float().flatten().reshape(-1, block)
    absmax = blocks.abs().max(dim=-1)[0]
    table = reference_table(bits)
    codes = torch.argmin((blocks / absmax[:, None]).unsqueeze(-1).sub(table).abs(), dim=-1)
    per = 8 // bits
    grouped = codes.reshape(-1, per)
    packed = torch.zeros(grouped.shape[0], dtype=torch.uint8)
    for i in range(per):
        packed |= (grouped[:, i] << (i * bits)).to(torch.uint8)
    deq = (table[codes] * absmax[:, None]).reshape(w.shape)
    return packed, absmax, deq


def weight(out: int = 96, fan_in: int = 64, seed: int = 0) -> torch.Tensor:
    """Gaussian noise plus a low-rank part, like a trained projection."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(out, fan_in, generator=g) * 0.02
    return noise + torch.randn(out, 4, generator=g) @ torch.randn(4, fan_in, generator=g) * 0.01


REGISTRY = load_registry(entry_points=False)


def compose(model, **adapters):
    """``adapters``: name → keyword arguments of ``Graph.adapter`` (method defaults to loftq)."""
    return ac.compose(model, _graph(**adapters), registry=REGISTRY)


# --- the quantiser ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_books_are_the_normal_float_tables(bits):
    table = normal_float_table(bits)
    assert table.dtype == torch.float32 and table.numel() == 2**bits
    assert torch.equal(table, reference_table(bits))  # bit for bit
    assert table[0] == -1 and table[-1] == 1 and (table == 0).sum() == 1
    assert torch.all(table[1:] > table[:-1])
    assert (table > 0).sum() == 2 ** (bits - 1)  # one more positive value than negative ones


def test_packing_layout_and_round_trip():
    assert pack(torch.tensor([1, 0, 3, 2]), 2).tolist() == [0b10110001]  # first code lowest
    assert pack(torch.tensor([3, 10]), 4).tolist() == [0xA3]
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (256,), generator=torch.Generator().manual_seed(bits))
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == 256 * bits // 8
        assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits, bound", [(2, 0.6), (4, 0.1), (8, 0.01)])
def test_round_trip_error_bounds(bits, bound):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    codes, absmax = quantize(w, bits, 64)
    assert codes.dtype == torch.uint8 and codes.shape == (96 * 64 * bits // 8,)
    assert absmax.dtype == torch.float32 and absmax.shape == (96,)
    deq = dequantize(codes, absmax, w.shape, bits, 64)
    table = normal_float_table(bits)
    half_gap = (table[1:] - table[:-1]).max() / 2
    err = (w - deq).abs().reshape(-1, 64)
    assert torch.all(err <= absmax[:, None] * half_gap * (1 + 1e-6))  # nearest code, per block
    assert (w - deq).norm() / w.norm() < bound
    assert torch.equal(deq.abs().reshape(-1, 64).amax(-1), absmax)  # each block's max is exact
    again, absmax_again = quantize(deq, bits, 64)  # quantising a quantised weight changes nothing
    assert torch.equal(again, codes) and torch.equal(absmax_again, absmax)


def test_zero_blocks_and_bad_shapes():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    deq = quantize_dequantize(w, 4, 64)
    assert torch.equal(deq[0], torch.zeros(64)) and torch.isfinite(deq).all()
    with pytest.raises(ValueError, match="blocks of 48"):
        quantize(torch.zeros(4, 20), 4, 48)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(64), 3, 64)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantiser_matches_the_argmin_reference(bits):
    w = weight(seed=bits)
    table = normal_float_table(bits)
    ties = torch.cat([torch.ones(1), (table[1:] + table[:-1]) / 2])  # values on every midpoint
    w[0, : ties.numel()] = ties[:64]
    packed, absmax, deq = reference_quantize(w, bits)
    codes, mine_absmax = quantize(w, bits, 64)
    assert torch.equal(codes, packed) and torch.equal(mine_absmax, absmax)
    assert torch.equal(dequantize(codes, absmax, w.shape, bits, 64), deq)


# --- the initialisation -----------------------------------------------------------------


def test_low_rank_split_matches_peft():
    from peft.utils.loftq_utils import _low_rank_decomposition

    res = weight()
    ref = _low_rank_decomposition(res, reduced_rank=8)
    low, high = low_rank_split(res, 8)
    torch.testing.assert_close(low, ref["L"], rtol=0, atol=1e-7)
    torch.testing.assert_close(high, ref["R"], rtol=0, atol=1e-7)


class _CudaOnCpu(TorchFunctionMode):
    """PEFT's loftq_init moves its work to "cuda"; keep it on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            args = tuple("cpu" if a in ("cuda", "xpu") else a for a in args)
            if kwargs.get("device") in ("cuda", "xpu"):
                kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _fake_bitsandbytes(bits: int) -> types.ModuleType:
    """bitsandbytes' blockwise 4-bit API (blocks of 64 over the flattened weight, absmax,
    nearest code), quantising with the reference quantiser at ``bits``."""

    class Params4bit:
        def __init__(self, data, requires_grad=False, compress_statistics=False, quant_type="nf4"):
            assert quant_type == "nf4" and not compress_statistics
            self.data, _, deq = reference_quantize(data, bits)
            self.quant_state = deq

        def to(self, device):
            return self

    bnb = types.ModuleType("bitsandbytes")
    bnb.nn = types.SimpleNamespace(Params4bit=Params4bit)
    bnb.functional = types.SimpleNamespace(dequantize_4bit=lambda data, state: state.clone())
    return bnb


@pytest.mark.parametrize("bits, iters", [(4, 1), (4, 3), (2, 2), (8, 2)])
def test_initialisation_matches_peft_loftq_init(monkeypatch, bits, iters):
    """Runs the installed PEFT ``loftq_init`` (its loop, residuals, SVD split and A = R,
    B = L convention); PEFT's former NFQuantizer used the same loop for 2 and 8 bits."""
    from peft.utils import loftq_utils

    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes(bits))
    monkeypatch.setattr(loftq_utils, "is_bnb_available", lambda: True)
    monkeypatch.setattr(loftq_utils, "is_bnb_4bit_available", lambda: True)
    w = weight(seed=iters)
    with _CudaOnCpu():
        deq, lora_a, lora_b = loftq_utils.loftq_init(w, num_bits=4, reduced_rank=8, num_iter=iters)
    mine = loftq_init(w, bits, 8, iters)
    assert torch.equal(mine.dequantized, deq)
    torch.testing.assert_close(mine.lora_A, lora_a, rtol=0, atol=1e-7)
    torch.testing.assert_close(mine.lora_B, lora_b, rtol=0, atol=1e-7)


def test_scale_is_folded_into_both_factors():
    assert LoftqConfig(r=4).scale() == 1.0  # alpha defaults to r: PEFT's convention holds as is
    assert LoftqConfig(r=4, alpha=8).scale() == 2.0
    assert LoftqConfig(r=4, alpha=8, rslora=True).scale() == 4.0
    w = weight()
    plain, scaled = loftq_init(w, 4, 8, 2), loftq_init(w, 4, 8, 2, scale=4.0)
    assert torch.equal(scaled.codes, plain.codes)
    torch.testing.assert_close(scaled.lora_A * 2, plain.lora_A, rtol=1e-6, atol=0)
    torch.testing.assert_close(4.0 * scaled.lora_B @ scaled.lora_A, plain.lora_B @ plain.lora_A)


@pytest.mark.parametrize("bits, iters", [(2, [1, 2, 3]), (4, [1, 2, 3, 4, 5]), (8, [1, 2, 3, 5])])
def test_residual_drops_and_does_not_grow_with_iters(bits, iters):
    """‖W − deq(Q) − s·BA‖_F < ‖W − deq(quant(W))‖_F, and it does not grow over these steps.
    (The alternation is no guaranteed descent, block scales move: at 2 bits it turns
    around after about three steps on such weights.)"""
    w = weight(seed=5)
    plain = (w - quantize_dequantize(w, bits)).norm()
    norms = []
    for t in iters:
        init = loftq_init(w, bits, 8, t)
        norms.append((w - init.dequantized - init.lora_B @ init.lora_A).norm())
    assert norms[0] < 0.9 * plain
    assert all(b <= a * (1 + 1e-6) for a, b in zip(norms, norms[1:], strict=False))


# --- the quantised site -----------------------------------------------------------------


def _reference(x, op: LoftQ, bias=None):
    """deq(Q) x + b + s·B A x, dense."""
    return F.linear(x, op.dequantized(), bias) + op.scale * x @ op.lora_A.t() @ op.lora_B.t()


def test_site_runs_on_the_quantised_base_plus_lora():
    model = tiny_llama()
    composed = compose(model, a={"r": 4, "alpha": 8.0, "targets": ["attn.q", "attn.v"]})
    randomize(composed, std=0.05)
    site = model.model.layers[0].self_attn.v_proj
    assert isinstance(site, QuantizedLinearSite) and isinstance(site.base, QuantizedLinear)
    op = composed.adapters["a"].modules["layers.0.attn.v"]
    assert op.scale == 2.0 and op.codes.dtype == torch.uint8
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(site(x), _reference(x, op), rtol=0, atol=1e-6)
    assert torch.equal(site.original_weight(), op.dequantized())
    assert not output(model, inputs()).isnan().any()


def test_the_site_uses_the_q_the_lora_was_fitted_to():
    model = tiny_llama()
    w = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    composed = compose(model, a={"r": 4, "iters": 1, "targets": ["attn.q"]})
    site = model.model.layers[1].self_attn.q_proj
    op = composed.adapters["a"].modules["layers.1.attn.q"]
    low, high = low_rank_split(w - site.base.dequantized_weight(), 4)  # fitted to this base
    torch.testing.assert_close(op.lora_B @ op.lora_A, low @ high, rtol=0, atol=1e-6)
    with torch.no_grad():
        op.codes.zero_()  # the base reads the op's buffers, not a copy
    assert torch.equal(site.base.dequantized_weight(), op.dequantized())


def test_gpt2_fused_slices_and_conv1d():
    model = tiny_gpt2()
    attn = model.transformer.h[0].attn
    w_attn, b_attn = attn.c_attn.weight.detach().t().clone(), attn.c_attn.bias.detach().clone()
    composed = compose(
        model,
        q={"r": 4, "targets": ["attn.q", "attn.o"]},
        v={"r": 2, "bits": 2, "targets": ["attn.v"]},  # another LoftQ on other rows of c_attn
    )
    randomize(composed, std=0.05)
    q, v = composed.adapters["q"].modules, composed.adapters["v"].modules
    op_q, op_v, op_o = q["layers.0.attn.q"], v["layers.0.attn.v"], q["layers.0.attn.o"]
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        expected_w = torch.cat([op_q.dequantized(), w_attn[64:128], op_v.dequantized()])
        expected = F.linear(x, expected_w, b_attn)
        expected[..., :64] += _reference(x, op_q) - F.linear(x, op_q.dequantized())
        expected[..., 128:] += _reference(x, op_v) - F.linear(x, op_v.dequantized())
        torch.testing.assert_close(attn.c_attn(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            attn.c_proj(x), _reference(x, op_o, attn.c_proj.base.bias), rtol=0, atol=1e-6
        )


def test_a_delta_beside_it_sees_the_quantised_base():
    model = tiny_llama()
    composed = compose(
        model,
        a={"r": 4, "targets": ["attn.q"]},
        d={"method": "lora", "r": 2, "dora": True, "targets": ["attn.q"]},
    )
    randomize(composed, std=0.05)
    site = model.model.layers[0].self_attn.q_proj
    op, dora = (composed.adapters[n].modules["layers.0.attn.q"] for n in ("a", "d"))
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        q = op.dequantized()
        merged = q + dora.scale * dora.lora_B @ dora.lora_A
        factor = dora.magnitude / merged.norm(dim=1)  # DoRA's row norm, on deq(Q)
        expected = F.linear(x, merged) * factor + _reference(x, op) - F.linear(x, q)
        torch.testing.assert_close(site(x), expected, rtol=0, atol=1e-6)


def test_undo_restores_the_original_modules_exactly():
    model = tiny_gpt2()
    batch = inputs()
    before, state = output(model, batch), state_copy(model)
    modules = dict(model.named_modules())
    composed = compose(model, a={"r": 4, "targets": ["attn.q", "attn.o", "mlp.up"]})
    randomize(composed)
    assert not torch.allclose(output(model, batch), before)
    composed.undo()
    assert same_state(model, state)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(output(model, batch), before)


def test_only_the_lora_factors_train():
    model = tiny_llama()
    composed = compose(model, a={"r": 4, "targets": ["attn.q"]})
    op = composed.adapters["a"].modules["layers.0.attn.q"]
    assert {n for n, _ in op.named_parameters()} == {"lora_A", "lora_B"}
    assert {n for n, _ in op.named_buffers()} == {"codes", "absmax"}
    batch = inputs()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert op.lora_A.grad is not None and op.lora_B.grad is not None
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_load_copies_the_saved_codes_over_a_fresh_initialisation(tmp_path, monkeypatch):
    model = tiny_llama()
    composed = compose(model, a={"r": 4, "bits": 2, "iters": 2, "targets": ["attn.q", "attn.v"]})
    randomize(composed)
    saved, out = composed.adapters["a"].state_dict(), output(model, inputs())
    composed.save(tmp_path / "c")
    real = loftq_plugin.loftq_init

    def different(weight, bits, r, iters=1, block_size=64, scale=1.0):
        return real(weight * 0.5, bits, r, 1, block_size, scale)  # another Q, other factors

    monkeypatch.setattr(loftq_plugin, "loftq_init", different)
    fresh = tiny_llama()
    loaded = ac.load(fresh, tmp_path / "c", registry=REGISTRY)
    assert torch.equal(output(fresh, inputs()), out)
    now = loaded.adapters["a"].state_dict()
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
    assert now["layers.0.attn.q.codes"].dtype == torch.uint8


def test_merge_is_refused():
    model = tiny_llama()
    composed = compose(
        model,
        a={"r": 4, "targets": ["attn.q"]},
        b={"method": "lora", "r": 2, "targets": ["attn.v"]},
    )
    randomize(composed)
    batch = inputs()
    out = output(model, batch)
    with pytest.raises(CompositionError) as err:
        composed.merge()
    assert "merge-not-exact" in err.value.codes
    assert composed.merge(partial=True) == ["a"]
    torch.testing.assert_close(output(model, batch), out, rtol=0, atol=1e-5)
    with pytest.raises(ComposerError, match="not exact"):
        model.model.layers[0].self_attn.q_proj.merge()


# --- validation -------------------------------------------------------------------------


def _graph(**adapters) -> Graph:
    g = Graph()
    for name, kwargs in adapters.items():
        kwargs = dict(kwargs)
        g.adapter(name, kwargs.pop("method", "loftq"), **kwargs)
    return g


def _expect(g: Graph, codes: set[str], model=None, registry=REGISTRY) -> CompositionError:
    """compose refuses with ``codes`` and leaves the model untouched."""
    model = model or tiny_llama()
    state = state_copy(model)
    with pytest.raises(CompositionError) as err:
        ac.compose(model, g, registry=registry)
    assert codes <= set(err.value.codes), err.value
    assert same_state(model, state)
    assert not any(isinstance(m, QuantizedLinearSite) for m in model.modules())
    return err.value


def test_two_loftq_adapters_on_the_same_rows_are_refused():
    err = _expect(
        _graph(a={"targets": ["attn.q"]}, b={"targets": ["attn.q", "attn.v"]}),
        {"loftq-shared-site"},
    )
    d = next(d for d in err.diagnostics if d.code == "loftq-shared-site")
    assert d.nodes == ("a", "b") and len(d.sites) == 2 and d.fix
    fused = _graph(a={"targets": ["attn.qkv"]}, b={"targets": ["attn.k"]})  # all rows, then k's
    _expect(fused, {"loftq-shared-site"}, model=tiny_gpt2())


@pytest.mark.parametrize("operator", ["stack", "sum", "mix", "route"])
def test_operators_are_refused(operator):
    g = _graph(a={"r": 4, "targets": ["attn.q"]}, b={"method": "lora", "targets": ["attn.q"]})
    if operator == "route":
        g.route({"ka": "a", "kb": "b"}, name="node")
    elif operator == "mix":
        g.mix("a", "b", name="node")
    else:
        g.op(operator, "a", "b", name="node")
    err = _expect(g, {"unsupported-operator"})
    verified, reason = cell(REGISTRY, "loftq", operator)
    assert not verified and reason in str(err)


class _BlendOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _BlendPlugin:
    """A third-party operator no rule knows about."""

    @hookimpl
    def register_operators(self, register):
        register.operator("blend", options=_BlendOptions, families={"linear": lambda *a: None})


def test_an_unknown_operator_is_refused_too():
    registry = load_registry(entry_points=False, plugins=[_BlendPlugin()])
    g = _graph(a={"targets": ["attn.q"]}, b={"method": "lora", "targets": ["attn.q"]})
    g.op("blend", "a", "b", name="node")
    err = _expect(g, {"loftq-not-root"}, registry=registry)
    assert "'node'" in str(err) and "'a'" in str(err)


@pytest.mark.parametrize(
    "config, where",
    [
        ({"bits": 3}, "bits"),
        ({"block_size": 12}, "multiple of 8"),
        ({"iters": 0}, "iters"),
        ({"rank": 4}, "rank"),
        ({"block_size": 48}, "block_size 48 does not divide"),
        ({"r": 40}, "exceeds"),
    ],
)
def test_bad_configs_are_refused(config, where):
    err = _expect(_graph(a={**config, "targets": ["attn.q", "attn.v"]}), {"bad-config"})
    assert where in str(err)


def test_a_half_precision_model_runs():
    model = tiny_llama().to(torch.bfloat16)
    composed = compose(model, a={"r": 4, "targets": ["attn.q", "attn.v"]})
    op = composed.adapters["a"].modules["layers.0.attn.q"]
    assert op.absmax.dtype == torch.float32 and op.lora_A.dtype == torch.float32
    out = output(model, inputs())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
