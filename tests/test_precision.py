"""bf16 storage (lowrank.precision): unbiased stochastic rounding, fp32 compute from bf16 weights
with the same numbers and no fp32 weight copy kept for backward, and the compute-dtype rule."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowrank.errors import UsageError
from lowrank.precision import (
    compute_dtype,
    compute_in,
    linear,
    round_to_bf16,
    stochastic_round_to_bf16,
    step_from_bf16,
    store_parameters,
)
from tests.tiny_models import build, tokens


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_stochastic_rounding_is_unbiased():
    # Values strictly between two bf16 neighbours, at several binades and both signs.
    base = torch.tensor([1.0, -3.0, 0.0123, -1e-5, 7.5e3], dtype=torch.float32)
    ulp = torch.tensor([2.0**-7, 2.0**-6, 2.0**-14, 2.0**-24, 2.0**5])  # bf16 spacing at each base
    fractions = torch.tensor([0.1, 0.37, 0.5, 0.81, 0.93])
    x = base + torch.sign(base + 1e-30) * fractions * ulp
    draws = 4000
    total = torch.zeros_like(x, dtype=torch.float64)
    generator = _generator()
    for _ in range(draws):
        rounded = stochastic_round_to_bf16(x, generator)
        assert rounded.dtype == torch.bfloat16
        total += rounded.double()
    mean = total / draws
    # Each draw is one of the two neighbours: standard error ulp·sqrt(p(1-p)/N) <= ulp/(2·sqrt(N)); 5 of them.
    bound = 5 * ulp.double() / (2 * draws**0.5)
    assert torch.all((mean - x.double()).abs() <= bound), (mean - x.double(), bound)


def test_stochastic_rounding_only_picks_neighbours_and_keeps_exact_values():
    x = torch.randn(10_000, generator=_generator(1))
    rounded = stochastic_round_to_bf16(x, _generator(2)).float()
    # The two bf16 neighbours of x in sign-magnitude bit patterns: truncated, and one bf16 ulp further out.
    toward_zero = x.view(torch.int32) & -65536
    away = (toward_zero + 65536).view(torch.float32)
    assert torch.all((rounded == toward_zero.view(torch.float32)) | (rounded == away))
    assert 0.3 < (rounded == away).float().mean() < 0.7  # both happen (about half the time for random x)
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact, _generator(3)).float(), exact)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    out = stochastic_round_to_bf16(special, _generator(4)).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and torch.isnan(out[2]) and out[3] == 0 and out[4] == 0


def test_stochastic_rounding_keeps_updates_that_nearest_rounding_loses():
    # An update of 1e-4 on a weight of 1.0 is 0.0128 bf16 ulps: round-to-nearest drops all of them.
    steps, update = 500, 1e-4
    nearest = torch.ones(256, dtype=torch.bfloat16)
    stochastic = torch.ones(256, dtype=torch.bfloat16)
    generator = _generator(5)
    for _ in range(steps):
        nearest = round_to_bf16(nearest.float() + update, "nearest")
        stochastic = round_to_bf16(stochastic.float() + update, "stochastic", generator)
    assert torch.all(nearest == 1.0)
    expected = 1.0 + steps * update  # 1.05
    # Per entry a sum of 500 roundings, each with variance <= ulp²/4: mean over 256 entries, 5 standard errors.
    assert abs(stochastic.double().mean().item() - expected) < 5 * 2.0**-7 / 2 * (steps / 256) ** 0.5


def test_stochastic_rounding_is_reproducible_from_the_seed():
    x = torch.randn(1000, generator=_generator(6))
    assert torch.equal(stochastic_round_to_bf16(x, _generator(7)), stochastic_round_to_bf16(x, _generator(7)))
    assert not torch.equal(stochastic_round_to_bf16(x, _generator(7)), stochastic_round_to_bf16(x, _generator(8)))


def test_linear_from_bf16_storage_equals_fp32_math_and_saves_no_fp32_weight():
    weight = torch.randn(24, 16, generator=_generator(9)).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(24, generator=_generator(10)).to(torch.bfloat16).requires_grad_()
    x = torch.randn(3, 5, 16, generator=_generator(11), requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = linear(x, weight, bias)
    assert y.dtype == torch.float32
    # Only the input and the stored (bf16) weight are kept for backward.
    assert sorted(map(str, (t.dtype for t in saved))) == ["torch.bfloat16", "torch.float32"]
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * 4 + weight.numel() * 2

    w32, b32 = weight.detach().float().requires_grad_(), bias.detach().float().requires_grad_()
    x32 = x.detach().clone().requires_grad_()
    reference = F.linear(x32, w32, b32)
    assert torch.allclose(y, reference, rtol=0, atol=1e-6)
    grad_out = torch.randn(y.shape, generator=_generator(12))
    y.backward(grad_out)
    reference.backward(grad_out)
    assert weight.grad.dtype == torch.bfloat16 and bias.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad, x32.grad, atol=1e-5)
    # fp32 gradients rounded once to bf16: within half a bf16 ulp (2^-9 relative) of the fp32 ones.
    assert torch.allclose(weight.grad.float(), w32.grad, rtol=2**-8, atol=1e-6)
    assert torch.allclose(bias.grad.float(), b32.grad, rtol=2**-8, atol=1e-6)


def test_linear_with_equal_dtypes_is_plain_f_linear():
    weight, x = torch.randn(4, 3), torch.randn(2, 3)
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_compute_in_fp32_from_bf16_storage_matches_the_fp32_model():
    model = build("llama")
    store_parameters(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())  # rotary stays fp32
    reference = copy.deepcopy(model)
    store_parameters(reference, torch.float32)  # the same values, exactly, in fp32
    compute_in(model, torch.float32)
    ids = tokens(length=16)
    out = model(input_ids=ids, labels=ids)
    expected = reference(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32
    assert torch.allclose(out.logits, expected.logits, atol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.bfloat16, name
        # fp32 gradients rounded once to bf16 (the embedding's rows summed in fp32 first)
        assert torch.allclose(p.grad.float(), q.grad, rtol=2**-8, atol=1e-6), name


def test_compute_in_gives_a_class_swapped_layer_its_own_forward_back():
    model = build("llama")
    compute_in(model, torch.float32)
    layer = model.model.layers[0].mlp.up_proj
    assert "forward" in vars(layer)

    class Swapped(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0

    layer.__class__ = Swapped  # as fake quantization and OSP do
    compute_in(model, torch.float32)
    assert "forward" not in vars(layer)
    assert torch.all(layer(torch.ones(1, 32)) == 0)


def test_step_from_bf16_runs_the_update_in_fp32_and_rounds_once():
    param = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    param.grad = torch.full((64,), 1.0, dtype=torch.bfloat16)
    seen = {}

    def step_param(p, grad, value):
        assert p is param  # the parameter names the state; the update goes to value
        seen["dtypes"] = (p.dtype, grad.dtype, value.dtype)
        value.add_(grad, alpha=-1e-4)  # far below half a bf16 ulp of 1.0

    accumulator = param.view_as(param).grad_fn.next_functions[0][0]  # the parameter's AccumulateGrad node
    step_from_bf16(step_param, param, "nearest", None)
    # the parameter keeps its dtype throughout (a dtype change would drop its AccumulateGrad node and DDP's hooks on it)
    assert seen["dtypes"] == (torch.bfloat16, torch.float32, torch.float32)
    assert param.view_as(param).grad_fn.next_functions[0][0] is accumulator
    assert param.dtype == torch.bfloat16 and param.grad.dtype == torch.bfloat16
    assert torch.all(param == 1.0)  # nearest rounding loses it
    generator = _generator(13)
    for _ in range(50):
        step_from_bf16(step_param, param, "stochastic", generator)
    assert param.float().mean() < 1.0 - 2e-3  # 50 steps of 1e-4 ≈ 5e-3, kept on average


@pytest.mark.parametrize("precision, device, storage, expected", [
    ("auto", "cpu", torch.bfloat16, (torch.float32, False)),
    ("auto", "cuda", torch.bfloat16, (torch.bfloat16, False)),
    ("auto", "cpu", torch.float32, (torch.float32, False)),
    ("auto", "cuda", torch.float32, (torch.bfloat16, True)),
    ("bf16", "cpu", torch.bfloat16, (torch.bfloat16, False)),
    ("fp32", "cuda", torch.bfloat16, (torch.float32, False)),
    ("bf16-mixed", "cpu", torch.float32, (torch.bfloat16, True)),
])
def test_compute_dtype_rule(precision, device, storage, expected):
    assert compute_dtype(torch.device(device), storage, precision) == expected


def test_unknown_precision_is_one_line():
    with pytest.raises(UsageError, match="--precision must be one of"):
        compute_dtype(torch.device("cpu"), torch.float32, "fp8")
