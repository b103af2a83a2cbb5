"""lowrank.quant: formats (codes in range, error bounds, FP4 grids, stochastic rounding, outliers,
agreement with torchao) and straight-through fake quantization of linear and low-rank layers."""

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build, logits, tokens
from torch import nn

from lowrank import LowRankConfig, LowRankLinear, lowrank_layers, wrap
from lowrank.quant import (
    E1M2_GRID,
    E2M1_GRID,
    STABLE_SPAM_FP4,
    STABLE_SPAM_INT4_ACTIVATIONS,
    STABLE_SPAM_INT4_WEIGHTS,
    FakeQuantConfig,
    FakeQuantLinear,
    FakeQuantLowRankLinear,
    QuantFormat,
    apply_fake_quant,
    bits_per_weight,
    dequantize,
    fake_quant_layers,
    fake_quant_state_dict,
    fake_quantize,
    is_fake_quantized,
    load_fake_quant_state_dict,
    quantize,
    remove_fake_quant,
    straight_through,
)
from lowrank.seeding import cpu_generator

INT_FORMATS = [QuantFormat("int", bits, 32, symmetric) for bits in (2, 3, 4, 8) for symmetric in (True, False)]


def sample(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def per_group(t, g):
    """``t`` as (groups, g) rows."""
    return t.reshape(-1, g)


# ----------------------------------------------------------------------------- integer formats


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f.label)
def test_int_codes_in_range_and_rtn_error_within_half_a_step(fmt):
    x = sample(6, 128) * 3
    q = quantize(x, fmt)
    assert q.codes.shape == x.shape and q.scale.shape == (6, 4)
    assert q.codes.dtype == (torch.int8 if fmt.symmetric else torch.uint8)
    codes = q.codes.long()
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    if fmt.symmetric:
        assert q.zero is None and fmt.qmax == 2 ** (fmt.bits - 1) - 1 and fmt.qmin == -fmt.qmax
    else:
        assert q.zero.min() >= 0 and q.zero.max() <= 2**fmt.bits - 1 and fmt.qmin == 0
    error = per_group((x - dequantize(q, fmt)).abs(), 32)
    assert (error <= q.scale.reshape(-1, 1) / 2 * (1 + 1e-5)).all()


def test_int4_symmetric_scale_is_absmax_over_seven_and_asymmetric_is_min_max():
    x = sample(4, 64)
    q = quantize(x, QuantFormat("int", 4, 64))
    torch.testing.assert_close(q.scale, x.abs().amax(-1, keepdim=True) / 7)
    q = quantize(x, QuantFormat("int", 4, 64, symmetric=False))
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    torch.testing.assert_close(q.scale, (hi - lo) / 15)
    torch.testing.assert_close(q.zero, (-torch.round(lo / q.scale)).to(torch.int32))
    # Stable-SPAM's weight formula: q = clamp(round(x/s) + z, 0, 15), x̂ = (q - z)·s.
    expected = torch.clamp(torch.round(x / q.scale) + q.zero, 0, 15)
    assert torch.equal(q.codes.float(), expected)


def test_groupings_per_row_per_tensor_and_fake_quantize_keeps_shape_and_dtype():
    x = sample(2, 3, 16).to(torch.bfloat16)
    row = quantize(x, QuantFormat("int", 8, -1))
    assert row.scale.shape == (2, 3, 1)
    tensor = quantize(x, QuantFormat("int", 8, None))
    assert tensor.scale.shape == ()
    torch.testing.assert_close(tensor.scale, x.float().abs().max() / 127)
    for fmt in (QuantFormat("int", 4, 8), QuantFormat("fp4_e2m1", 4, -1), QuantFormat("int", 8, None, symmetric=False)):
        y = fake_quantize(x, fmt)
        assert y.shape == x.shape and y.dtype == x.dtype
    # An all-zero group gets a tiny finite scale and exact zeros, not NaN.
    assert torch.equal(fake_quantize(torch.zeros(2, 8), QuantFormat("int", 4, 8, symmetric=False)), torch.zeros(2, 8))


def test_int2_asymmetric_has_four_levels_and_symmetric_three():
    x = sample(1, 256)
    assert set(quantize(x, QuantFormat("int", 2, 256, symmetric=False)).codes.flatten().tolist()) == {0, 1, 2, 3}
    assert set(quantize(x, QuantFormat("int", 2, 256)).codes.flatten().tolist()) == {-1, 0, 1}
    assert set(quantize(x, QuantFormat("int", 3, 256)).codes.flatten().tolist()) <= set(range(-3, 4))


# ----------------------------------------------------------------------------- FP4


@pytest.mark.parametrize("kind, grid", [("fp4_e1m2", E1M2_GRID), ("fp4_e2m1", E2M1_GRID)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_fp4_values_lie_on_the_grid_times_the_group_scale(kind, grid, stochastic):
    fmt = QuantFormat(kind, 4, 32, stochastic=stochastic)
    x = sample(8, 64)
    q = quantize(x, fmt, generator=cpu_generator(1) if stochastic else None)
    scale = q.scale.reshape(-1, 1)
    torch.testing.assert_close(scale, per_group(x, 32).abs().amax(-1, keepdim=True) / grid[-1])
    assert q.codes.dtype == torch.uint8 and q.codes.max() <= 15
    values = per_group(dequantize(q, fmt), 32)
    levels = torch.tensor(sorted({v * s for v in grid for s in (1, -1)}))
    on_grid = (values / scale).unsqueeze(-1) - levels
    assert on_grid.abs().amin(-1).max() < 1e-6
    # The group's absmax lands on the grid's maximum exactly (up to float rounding).
    torch.testing.assert_close(values.abs().amax(-1), per_group(x, 32).abs().amax(-1))
    if not stochastic:
        # Nearest grid point: no other level is closer.
        target = per_group(x, 32) / scale
        best = ((target.unsqueeze(-1) - levels).abs()).amin(-1)
        assert ((target - values / scale).abs() <= best + 1e-6).all()


def test_fp4_rounds_ties_to_the_even_code():
    fmt = QuantFormat("fp4_e2m1", 4, 8)
    # Scale 1 (absmax 6); 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 are midpoints.
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]])
    assert fake_quantize(x, fmt).tolist() == [[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]]
    x = torch.tensor([[-6.0, -0.2, -0.3, 0.0, -2.6, 0.8, -4.9, 5.1]])
    assert fake_quantize(x, fmt).tolist() == [[-6.0, -0.0, -0.5, 0.0, -3.0, 1.0, -4.0, 6.0]]


def test_e1m2_equals_symmetric_int4_fake_quantization():
    # E1M2's grid {0, 1/4, ..., 7/4} is uniform: scaled to the absmax it is int4 absmax's k/7 grid.
    x = sample(16, 64)
    torch.testing.assert_close(
        fake_quantize(x, QuantFormat("fp4_e1m2", 4, 64)), fake_quantize(x, QuantFormat("int", 4, 64)), rtol=0, atol=1e-6
    )


# ----------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize(
    "fmt",
    [
        QuantFormat("int", 4, 64, stochastic=True),
        QuantFormat("int", 3, 64, symmetric=False, stochastic=True),
        QuantFormat("fp4_e2m1", 4, 64, stochastic=True),
        QuantFormat("fp4_e1m2", 4, 64, stochastic=True, keep_outliers=2),
    ],
    ids=lambda f: f.label,
)
def test_stochastic_rounding_is_unbiased_and_seeded(fmt):
    x = sample(1, 64)
    draws = 4000
    # Identical rows share one scale, so each row is an independent rounding of the same group.
    y = fake_quantize(x.expand(draws, 64).contiguous(), fmt, generator=cpu_generator(7, 1))
    step = quantize(x, replace(fmt, stochastic=False)).scale
    grid_gap = step * (2.0 if fmt.kind == "fp4_e2m1" else 1.0)  # E2M1's widest gap is 2 scales (4 → 6)
    # Each draw's error is within one gap (std ≤ gap / 2), so the mean is within 5σ = 5·gap/(2√N).
    tolerance = 5 * grid_gap / (2 * math.sqrt(draws))
    inside = torch.ones(64, dtype=torch.bool)
    if fmt.kind == "int" and not fmt.symmetric:
        # The rounded zero point can leave up to half a step of the group outside the grid's
        # range [(qmin - z)s, (qmax - z)s]; entries there are clipped (by at most half a step).
        q = quantize(x, replace(fmt, stochastic=False))
        low, high = (fmt.qmin - q.zero) * q.scale, (fmt.qmax - q.zero) * q.scale
        inside = ((x >= low) & (x <= high))[0]
        assert ((y.mean(0) - x[0]).abs()[~inside] <= step[0, 0] / 2 + 1e-6).all()
    assert ((y.mean(0) - x[0]).abs()[inside] <= tolerance).all()
    # Not round-to-nearest in disguise: some entries take both neighbours.
    assert (y.std(0) > 0).sum() > 32
    # A pure function of the seed.
    again = fake_quantize(x.expand(draws, 64).contiguous(), fmt, generator=cpu_generator(7, 1))
    other = fake_quantize(x.expand(draws, 64).contiguous(), fmt, generator=cpu_generator(7, 2))
    assert torch.equal(y, again) and not torch.equal(y, other)
    # noise= is the same thing as a generator.
    noise = torch.rand(draws, 64, generator=cpu_generator(7, 1))
    assert torch.equal(fake_quantize(x.expand(draws, 64).contiguous(), fmt, noise=noise), y)


def test_stochastic_rounding_needs_exactly_one_source_of_noise():
    x = sample(2, 8)
    with pytest.raises(ValueError, match="generator"):
        quantize(x, QuantFormat("int", 4, 8, stochastic=True))
    with pytest.raises(ValueError, match="rounds to nearest"):
        quantize(x, QuantFormat("int", 4, 8), generator=cpu_generator(0))


# ----------------------------------------------------------------------------- outliers


@pytest.mark.parametrize("fmt", [STABLE_SPAM_INT4_ACTIVATIONS, replace(STABLE_SPAM_FP4, group_size=64)], ids=lambda f: f.label)
def test_outliers_are_kept_exactly_and_left_out_of_the_scale(fmt):
    x = sample(4, 128)
    x[0, 3], x[0, 40], x[1, 70], x[2, 127] = 50.0, -80.0, 1e4, -3.0e3
    q = quantize(x, fmt, generator=cpu_generator(0) if fmt.stochastic else None)
    y = dequantize(q, fmt)
    big = x.abs().reshape(-1, 64).topk(2, dim=-1).indices
    assert torch.equal(y.reshape(-1, 64).gather(-1, big), x.reshape(-1, 64).gather(-1, big))
    # The scale comes from the remaining entries: the third-largest magnitude of each group.
    third = x.abs().reshape(-1, 64).topk(3, dim=-1).values[:, 2]
    top = fmt.qmax if fmt.kind == "int" else E1M2_GRID[-1]
    torch.testing.assert_close(q.scale.reshape(-1), third / top)
    # Everything else is quantized with that scale: the error stays within one step.
    rest = torch.ones_like(x.reshape(-1, 64), dtype=torch.bool).scatter(-1, big, False)
    error = (y - x).abs().reshape(-1, 64)
    assert (error[rest] <= q.scale.reshape(-1, 1).expand(-1, 64)[rest] * (1 + 1e-5)).all()
    assert y.dtype == x.dtype


def test_outliers_keep_the_input_dtype_exactly():
    x = (sample(2, 32) * 10).to(torch.bfloat16)
    fmt = QuantFormat("int", 4, 32, keep_outliers=3)
    y = fake_quantize(x, fmt)
    idx = x.float().abs().topk(3, dim=-1).indices
    assert torch.equal(y.gather(-1, idx), x.gather(-1, idx))


# ----------------------------------------------------------------------------- validation and accounting


def test_group_size_that_does_not_divide_raises_one_line():
    with pytest.raises(ValueError) as error:
        quantize(sample(4, 48), QuantFormat("int", 4, 32))
    message = str(error.value)
    assert "\n" not in message and "(4, 48)" in message and "32" in message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "int", "bits": 5}, "bits"),
        ({"kind": "fp4_e2m1", "bits": 8}, "bits"),
        ({"kind": "nf4"}, "unknown quantization kind"),
        ({"kind": "fp4_e1m2", "symmetric": False}, "symmetric"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 8, "keep_outliers": 8}, "keep_outliers"),
    ],
)
def test_quant_format_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantFormat(**kwargs)


def test_bits_per_weight():
    assert bits_per_weight(QuantFormat("int", 4, 128)) == 4.125
    assert bits_per_weight(QuantFormat("int", 4, 128, symmetric=False)) == 4 + 20 / 128
    assert bits_per_weight(QuantFormat("fp4_e2m1", 4, 32), scale_bits=8) == 4.25
    assert bits_per_weight(QuantFormat("int", 8, -1), (4096, 4096)) == 8 + 16 / 4096
    assert bits_per_weight(STABLE_SPAM_INT4_ACTIVATIONS) == 4 + (16 + 2 * (16 + 6)) / 64
    with pytest.raises(ValueError, match="shape"):
        bits_per_weight(QuantFormat("int", 8, None))


def test_presets_are_stable_spams_formats():
    assert STABLE_SPAM_INT4_WEIGHTS.label == "int4-g256-asym"
    assert STABLE_SPAM_INT4_ACTIVATIONS.label == "int4-g64-sr-o2"
    assert STABLE_SPAM_FP4.label == "fp4_e1m2-g256-o2"


# ----------------------------------------------------------------------------- torchao agreement


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f.label)
def test_int_formats_agree_with_torchao_affine_primitives(fmt):
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    x = sample(8, 128)
    mapping = qp.MappingType.SYMMETRIC if fmt.symmetric else qp.MappingType.ASYMMETRIC
    target = torch.int8 if fmt.symmetric else torch.uint8
    block = (1, fmt.group_size)
    scale, zero = qp.choose_qparams_affine(x, mapping, block, target, fmt.qmin, fmt.qmax)
    codes = qp.quantize_affine(x, block, scale, zero, target, fmt.qmin, fmt.qmax)
    values = qp.dequantize_affine(codes, block, scale, zero, target, fmt.qmin, fmt.qmax, output_dtype=torch.float32)
    ours = quantize(x, fmt)
    torch.testing.assert_close(ours.scale, scale, rtol=1e-6, atol=0)
    if not fmt.symmetric:
        assert torch.equal(ours.zero, zero.to(torch.int32))
    assert torch.equal(ours.codes.long(), codes.long())
    torch.testing.assert_close(dequantize(ours, fmt), values, rtol=1e-6, atol=1e-7)


def test_e2m1_codes_agree_with_torchao_mx_conversion():
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    x = sample(16, 32) * 4
    fmt = QuantFormat("fp4_e2m1", 4, 32)
    ours = quantize(x, fmt)
    theirs = kernels.f32_to_f4_unpacked(x / ours.scale)
    assert torch.equal(ours.codes, theirs)
    torch.testing.assert_close(dequantize(ours, fmt), kernels.f4_unpacked_to_f32(theirs) * ours.scale)


# ----------------------------------------------------------------------------- straight-through estimator


@pytest.mark.parametrize("fmt", [QuantFormat("int", 4, 16, symmetric=False), QuantFormat("fp4_e2m1", 4, 16, keep_outliers=1)], ids=lambda f: f.label)
def test_straight_through_gradient_is_the_identity_inside_the_clip_range(fmt):
    x = sample(4, 32).requires_grad_()
    y = straight_through(x, fmt)
    assert torch.equal(y, fake_quantize(x.detach(), fmt))
    upstream = sample(4, 32, seed=5)
    (y * upstream).sum().backward()
    # Every entry lies inside its group's range (absmax / min–max scale), so it passes unchanged.
    assert torch.equal(x.grad, upstream)


def test_fake_quant_linear_gradients_are_those_of_the_quantized_product():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.q_proj = nn.Linear(32, 16)
    fmt_w, fmt_a = QuantFormat("int", 4, 16, symmetric=False), QuantFormat("int", 4, 8)
    apply_fake_quant(model, FakeQuantConfig(fmt_w, fmt_a))
    layer = model.q_proj
    x = sample(5, 32).requires_grad_()
    layer(x).square().sum().backward()
    w_hat = fake_quantize(layer.weight.detach(), fmt_w).requires_grad_()
    x_hat = fake_quantize(x.detach(), fmt_a).requires_grad_()
    F.linear(x_hat, w_hat, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_hat.grad)
    torch.testing.assert_close(x.grad, x_hat.grad)


# ----------------------------------------------------------------------------- fake-quantized models


def small_formats():
    """W4A4 in Stable-SPAM's style, with groups that fit the tiny model (hidden 32, MLP 64)."""
    weights = QuantFormat("int", 4, 16, symmetric=False)
    activations = QuantFormat("int", 4, 16, stochastic=True, keep_outliers=2)
    return FakeQuantConfig(weights=weights, activations=activations, seed=3)


def test_w4a4_tiny_llama_trains_with_falling_loss():
    torch.manual_seed(0)
    model = apply_fake_quant(build("llama").train(), small_formats())
    assert len(fake_quant_layers(model)) == 14  # 7 projections × 2 blocks
    ids = tokens(batch=4, length=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "proj" in n)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(layer.fake_quant.draws == 25 for layer in fake_quant_layers(model).values())


def test_torch_compile_aot_eager_equals_eager():
    eager = apply_fake_quant(build("llama").train(), small_formats())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    ids = tokens()
    for _ in range(2):  # the second call draws new noise in both: the counters move together
        out_e = eager(ids, labels=ids)
        out_c = compiled(ids, labels=ids)
        torch.testing.assert_close(out_c.logits, out_e.logits, rtol=1e-5, atol=1e-5)
        out_e.loss.backward()
        out_c.loss.backward()
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fake_quant_state_dict(eager) == fake_quant_state_dict(compiled_model)


def test_low_rank_layers_quantize_factors_base_input_and_intermediate(monkeypatch):
    torch.manual_seed(0)
    model = nn.Module()
    model.up_proj = LowRankLinear(32, 24, 8, alpha=16.0, keep_base=True, sparse_density=0.05, init="kaiming", weight=sample(24, 32), seed=1)
    with torch.no_grad():
        model.up_proj.sparse_values.normal_()
        model.up_proj.bias.normal_()
    fmt_w, fmt_a = QuantFormat("int", 4, 8, symmetric=False), QuantFormat("int", 4, 8, keep_outliers=1)
    apply_fake_quant(model, FakeQuantConfig(fmt_w, fmt_a, target_modules=["up_proj"]))
    layer = model.up_proj
    assert isinstance(layer, FakeQuantLowRankLinear) and isinstance(layer, LowRankLinear)
    x = sample(3, 32)
    # By hand: x̂ = Q_a(x), h = Q_a(s·Q_w(A) x̂), y = Q_w(B) h + Q_w(W0) x̂ + S x + b (S, b in full precision).
    q = lambda t: fake_quantize(t.detach(), fmt_w)  # noqa: E731
    x_hat = fake_quantize(x, fmt_a)
    hidden = fake_quantize(F.linear(x_hat, q(layer.A)) * layer.scale, fmt_a)
    sparse = torch.zeros(24 * 32).index_put_((layer.sparse_indices.long(),), layer.sparse_values.detach()).view(24, 32)
    expected = F.linear(hidden, q(layer.B)) + F.linear(x_hat, q(layer.base_weight)) + x @ sparse.T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # What the matmuls see: the quantized input with Q(A), then the quantized intermediate with Q(B).
    seen = []
    original = F.linear

    def spy(inp, weight, bias=None):
        seen.append((inp.detach(), weight.detach()))
        return original(inp, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    layer(x)
    monkeypatch.undo()
    (first_input, a_used), (intermediate, b_used) = seen[0], seen[1]
    assert torch.equal(first_input, x_hat) and torch.equal(a_used, q(layer.A))
    assert torch.equal(intermediate, hidden) and torch.equal(b_used, q(layer.B))
    assert not torch.equal(intermediate, F.linear(x_hat, q(layer.A)) * layer.scale)
    # Events still work on the full-precision factors, and the wrapped model still lists the layer.
    assert list(lowrank_layers(model)) == ["up_proj"]
    layer.merge()
    layer.refactorize()
    layer(x).sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None and layer.base_weight.grad is None


def test_wrapped_tiny_llama_fake_quantizes_its_low_rank_layers():
    model = wrap(build("llama"), LowRankConfig(rank=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    apply_fake_quant(model, FakeQuantConfig(QuantFormat("int", 4, 8), QuantFormat("int", 8, -1)))
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in fake_quant_layers(model).items()}
    assert kinds["q_proj"] is FakeQuantLowRankLinear and kinds["k_proj"] is FakeQuantLinear
    ids = tokens()
    model(ids, labels=ids).loss.backward()


def test_remove_fake_quant_restores_the_exact_original_logits():
    model = build("llama")
    ids = tokens()
    before = logits(model, ids)
    keys = list(model.state_dict())
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_fake_quant(model, FakeQuantConfig(weights=QuantFormat("int", 4, 16)))
    assert is_fake_quantized(model) and list(model.state_dict()) == keys
    assert not torch.equal(logits(model, ids), before)
    assert remove_fake_quant(model) is model
    assert not is_fake_quantized(model) and not hasattr(model, "fake_quant_config")
    assert torch.equal(logits(model, ids), before)
    restored = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all(restored[name] is module and type(module) is nn.Linear for name, module in originals.items())
    assert not any(hasattr(m, "fake_quant") for m in model.modules())


def test_draw_counts_round_trip_for_resume():
    model = apply_fake_quant(build("llama"), small_formats())
    ids = tokens()
    model(ids)
    state = fake_quant_state_dict(model)
    resumed = apply_fake_quant(build("llama"), small_formats())
    load_fake_quant_state_dict(resumed, state)
    torch.testing.assert_close(logits(resumed, ids), logits(model, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        load_fake_quant_state_dict(resumed, {"nope": 1})


def test_apply_fake_quant_errors():
    model = build("llama")
    with pytest.raises(ValueError, match="matches no module.*q_proj"):
        apply_fake_quant(model, FakeQuantConfig(weights=QuantFormat(), target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="only nn.Linear and LowRankLinear"):
        apply_fake_quant(model, FakeQuantConfig(weights=QuantFormat(group_size=8), target_modules=["input_layernorm"]))
    with pytest.raises(ValueError) as error:
        apply_fake_quant(model, FakeQuantConfig(weights=QuantFormat("int", 4, 256)))
    assert "model.layers.0.self_attn.q_proj" in str(error.value) and "\n" not in str(error.value)
    assert not is_fake_quantized(model)  # a failed apply changes nothing
    apply_fake_quant(model, FakeQuantConfig(activations=QuantFormat("int", 8, -1)))
    with pytest.raises(ValueError, match="already"):
        apply_fake_quant(model, FakeQuantConfig(activations=QuantFormat("int", 8, -1)))
    with pytest.raises(ValueError, match="quantizes nothing"):
        FakeQuantConfig()
    with pytest.raises(ValueError, match="stochastic rounding of weights"):
        FakeQuantConfig(weights=QuantFormat(stochastic=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_from_a_device_generator_and_rtn_matches_cpu():
    x = sample(64, 256)
    fmt = QuantFormat("int", 4, 64, symmetric=False)
    torch.testing.assert_close(fake_quantize(x.cuda(), fmt).cpu(), fake_quantize(x, fmt))
    model = apply_fake_quant(build("llama").cuda(), small_formats())
    ids = tokens().cuda()
    first = logits(model, ids)
    load_fake_quant_state_dict(model, {name: 0 for name in fake_quant_layers(model)})
    again = logits(model, ids)
    assert first.is_cuda and torch.equal(first, again)
