"""LowRankLinear: forward equals its dense weight, events preserve the function, gradients go
where they should, and the low-rank path never forms B @ A."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank import LowRankLinear
from lowrank.linalg import balanced_factors

M, N, R = 24, 40, 6
MODES = {
    "low_rank": {},
    "relora": {"keep_base": True, "init": "kaiming"},
    "sltrain": {"sparse_density": 0.05},
    "base_and_sparse": {"keep_base": True, "sparse_density": 0.05, "init": "kaiming"},
}


def make(mode="low_rank", dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    weight = torch.randn(M, N) * 0.1
    options = {**MODES[mode], **kwargs}
    layer = LowRankLinear(N, M, R, alpha=12.0, weight=weight, seed=3, **options)
    with torch.no_grad():
        if layer.sparse_values is not None:
            layer.sparse_values.normal_()
        layer.bias.normal_()
    return layer.to(dtype)


def reference(layer, x):
    return x @ layer.dense_weight().T + layer.bias


@pytest.mark.parametrize("mode", MODES)
def test_forward_equals_dense_weight(mode):
    layer = make(mode)
    x = torch.randn(3, 5, N)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_refactorize_preserves_function_and_balances(mode):
    layer = make(mode)
    with torch.no_grad():
        layer.B.normal_()  # unbalanced on purpose: B large, A small
        layer.A.mul_(0.01)
    x = torch.randn(4, N)
    before, product = layer(x), layer.B @ layer.A
    sigma = layer.refactorize()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.B @ layer.A, product, rtol=1e-5, atol=1e-6)
    # Balanced: BᵀB = AAᵀ = diag(σ).
    # Both Gram matrices equal diag(σ)/s exactly; in fp32 their off-diagonal zeros are sums of
    # products of size up to σ_max/s, each rounded, so they carry a few tens of eps·σ_max/s (1.1e-5 =
    # 4 eps·σ_max/s seen on an Intel Xeon's BLAS): the tolerance scales with the largest entry.
    gram = layer.A @ layer.A.T
    atol = 64 * torch.finfo(torch.float32).eps * float(gram.diagonal().max())
    torch.testing.assert_close(layer.B.T @ layer.B, gram, rtol=1e-4, atol=atol)
    torch.testing.assert_close(layer.B.T @ layer.B, torch.diag(sigma), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(product)[:R], rtol=1e-5, atol=1e-6)


def test_refactorize_never_forms_the_product():
    """Only QR of the factors and an r×r SVD: no op produces an m×n (or n×m) tensor."""
    layer = make("low_rank")
    with _ShapeRecorder() as shapes:
        layer.refactorize()
    assert (M, N) not in shapes and (N, M) not in shapes
    assert any(shape == (R, R) for shape in shapes)


class _ShapeRecorder(TorchDispatchMode):
    def __enter__(self):
        self.shapes = set()
        super().__enter__()
        return self.shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.shapes.add(tuple(tensor.shape))
        return out


def test_forward_and_backward_never_form_the_product():
    layer = make("low_rank")
    x = torch.randn(7, N, requires_grad=True)
    with _ShapeRecorder() as shapes:
        layer(x).square().sum().backward()
    assert (M, N) not in shapes and (N, M) not in shapes
    assert layer.A.grad.shape == (R, N) and layer.B.grad.shape == (M, R)


def test_refactorize_keeps_zero_product_layer_trainable():
    """B = 0 (ReLoRA init): the plain balanced split would zero A too and kill every gradient."""
    layer = make("relora", init="lora")
    assert torch.count_nonzero(layer.B) == 0
    x = torch.randn(4, N)
    before = layer(x)
    sigma = layer.refactorize()
    torch.testing.assert_close(layer(x), before)
    assert torch.all(sigma == 0)
    assert torch.all(layer.A.norm(dim=1) > 0.1)
    layer(x).square().sum().backward()
    assert layer.B.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["relora", "base_and_sparse"])
def test_merge_preserves_function_and_restarts_factors(mode):
    layer = make(mode)
    x = torch.randn(4, N)
    before = layer(x)
    update = layer.scale * layer.B.detach() @ layer.A.detach()
    expected_base = layer.base_weight + update
    old_A = layer.A.detach().clone()
    norm = layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_weight, expected_base)
    assert torch.count_nonzero(layer.B) == 0
    assert not torch.equal(layer.A, old_A)
    assert int(layer.num_merges) == 1
    assert norm == pytest.approx(float(update.norm()), rel=1e-5)


def test_merge_reinitialisation_is_seeded():
    first, second = make("relora"), make("relora")
    first.merge(), second.merge()
    assert torch.equal(first.A, second.A)
    first.merge()
    assert not torch.equal(first.A, second.A)  # a new draw per merge


def test_merge_without_base_is_a_clear_error():
    with pytest.raises(ValueError, match="keep_base=True"):
        make("low_rank").merge()


def test_gradients_reach_factors_and_sparse_values_but_not_base():
    layer = make("base_and_sparse")
    x = torch.randn(5, N)
    layer(x).square().sum().backward()
    assert layer.base_weight.grad is None and not layer.base_weight.requires_grad
    for param in (layer.A, layer.B, layer.sparse_values, layer.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0
    # The sparse values' gradient equals the dense weight gradient gathered on the support.
    dense = torch.zeros(M * N)
    dense[layer.sparse_indices.long()] = layer.sparse_values.detach()
    dense = dense.view(M, N).requires_grad_()
    out = x @ (layer.dense_weight().detach() - dense.detach() + dense).T + layer.bias.detach()
    out.square().sum().backward()
    torch.testing.assert_close(layer.sparse_values.grad, dense.grad.reshape(-1)[layer.sparse_indices.long()], rtol=1e-5, atol=1e-5)


def test_input_gradient_matches_dense_reference():
    layer = make("base_and_sparse")
    x = torch.randn(5, N, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dense_weight().sum(0).expand(5, N), rtol=1e-5, atol=1e-5)


def test_sparse_support_is_exact_distinct_and_seeded():
    first, again = make("sltrain"), make("sltrain")
    k = round(0.05 * M * N)
    assert first.sparse_indices.numel() == first.sparse_values.numel() == k
    assert torch.unique(first.sparse_indices).numel() == k and first.sparse_indices.dtype == torch.int32
    assert torch.all(first.sparse_indices[1:] > first.sparse_indices[:-1])
    assert torch.equal(first.sparse_indices, again.sparse_indices)
    other = LowRankLinear(N, M, R, sparse_density=0.05, seed=4)
    assert not torch.equal(first.sparse_indices, other.sparse_indices)


def test_spectral_init_is_best_rank_r_approximation():
    torch.manual_seed(0)
    weight = torch.randn(M, N)
    layer = LowRankLinear(N, M, R, alpha=3.0, weight=weight, init="spectral")
    u, s, vt = torch.linalg.svd(weight, full_matrices=False)
    best = (u[:, :R] * s[:R]) @ vt[:R]
    torch.testing.assert_close(layer.scale * layer.B @ layer.A, best, rtol=1e-4, atol=1e-5)
    # Both Gram matrices equal diag(σ)/s exactly; in fp32 their off-diagonal zeros are sums of
    # products of size up to σ_max/s, each rounded, so they carry a few tens of eps·σ_max/s (1.1e-5 =
    # 4 eps·σ_max/s seen on an Intel Xeon's BLAS): the tolerance scales with the largest entry.
    gram = layer.A @ layer.A.T
    atol = 64 * torch.finfo(torch.float32).eps * float(gram.diagonal().max())
    torch.testing.assert_close(layer.B.T @ layer.B, gram, rtol=1e-4, atol=atol)
    # With a base, the base keeps the remainder: the layer starts equal to the dense one.
    with_base = LowRankLinear(N, M, R, alpha=3.0, weight=weight, init="spectral", keep_base=True)
    torch.testing.assert_close(with_base.dense_weight(), weight, rtol=1e-5, atol=1e-5)


def test_lora_init_starts_equal_to_base():
    layer = make("relora", init="lora")
    torch.testing.assert_close(layer.dense_weight(), layer.base_weight)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_forward_and_refactorize(mode):
    full = make(mode)
    half = make(mode, dtype=torch.bfloat16)
    x = torch.randn(4, N)
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full(x), rtol=0.05, atol=0.05)
    before = half(x.bfloat16()).float()
    half.refactorize()
    assert half.A.dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), before, rtol=0.05, atol=0.05)
    half(x.bfloat16()).float().sum().backward()
    assert half.A.grad.dtype == torch.bfloat16


def test_parameter_count_is_m_plus_n_times_r():
    layer = LowRankLinear(N, M, R, bias=False)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == (M + N) * R


def test_balanced_factors_matches_dense_svd():
    torch.manual_seed(1)
    B, A = torch.randn(50, 8, dtype=torch.float64), torch.randn(8, 30, dtype=torch.float64)
    new_B, new_A, sigma = balanced_factors(B, A)
    u, s, vt = torch.linalg.svd(B @ A, full_matrices=False)
    torch.testing.assert_close(sigma.double(), s[:8], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_B @ new_A, B @ A)
    # Each column of B' is ±u_i √σ_i (the SVD's sign is arbitrary).
    torch.testing.assert_close((new_B / s[:8].sqrt()).abs(), u[:, :8].abs(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be an integer"),
        ({"rank": 25}, r"\[1, 24\]"),
        ({"sparse_density": 1.0}, "sparse_density must be in"),
        ({"sparse_density": -0.1}, "sparse_density must be in"),
        ({"init": "xavier"}, "init must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    options = {"rank": R, **kwargs}
    with pytest.raises(ValueError, match=message):
        LowRankLinear(N, M, options.pop("rank"), **options)


def test_sltrain_init_follows_the_reference():
    """SLTrain's released code: A Kaiming-uniform, B = 0, S ~ U(±1/√n) on its support."""
    from lowrank.methods import apply_method, load_method
    from tiny_models import build

    model = apply_method(build("llama"), load_method("sltrain", {"lowrank.rank": 4}))
    layers = list(model.modules())
    for layer in (m for m in layers if isinstance(m, LowRankLinear)):
        bound = 1.0 / layer.in_features**0.5
        assert torch.count_nonzero(layer.B) == 0
        assert layer.A.abs().max() <= bound and layer.A.std() > 0.4 * bound
        values = layer.sparse_values.detach()
        assert values.abs().max() <= bound and values.std() > 0.4 * bound  # U(±b) has std b/√3 ≈ 0.58 b
    # a frozen base keeps the function: S starts at zero there
    based = LowRankLinear(N, M, R, sparse_density=0.05, keep_base=True, weight=torch.randn(M, N))
    assert torch.count_nonzero(based.sparse_values) == 0
    seeded = [LowRankLinear(N, M, R, sparse_density=0.05, seed=s).sparse_values for s in (1, 1, 2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])


@pytest.mark.parametrize("mode", ["relora", "base_and_sparse"])
def test_float64_layers_keep_their_precision(mode):
    """merge() and dense_weight() work in the layer's dtype: fp64 stays exact to fp64 rounding."""
    layer = make(mode, dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_()
    expected = layer.base_weight + layer.scale * (layer.B @ layer.A)
    if layer.sparse_values is not None:
        sparse = torch.zeros(M * N, dtype=torch.float64)
        sparse[layer.sparse_indices.long()] = layer.sparse_values.detach()
        expected = expected + sparse.view(M, N)
    assert layer.dense_weight().dtype == torch.float64
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-13, atol=1e-13)
    before = layer.dense_weight()
    layer.merge()
    torch.testing.assert_close(layer.dense_weight(), before, rtol=1e-13, atol=1e-13)


def test_refactorization_maps_carry_the_factors_gradients():
    """After B' = B R, A' = R⁻¹A the chain rule gives ∂L/∂B' = ∂L/∂B·R⁻ᵀ and ∂L/∂A' = Rᵀ·∂L/∂A, for any
    loss of the product (here a non-linear one); the two maps are R⁻ᵀ and Rᵀ, so b_mapᵀ·a_mapᵀ = I."""
    from lowrank.linalg import refactorization_maps

    torch.manual_seed(2)
    B, A, target = (torch.randn(40, 6, dtype=torch.float64), torch.randn(6, 24, dtype=torch.float64),
                    torch.randn(40, 24, dtype=torch.float64))

    def gradients(b, a):
        b, a = b.clone().requires_grad_(), a.clone().requires_grad_()
        ((b @ a).tanh() * target).sum().backward()
        return b.grad, a.grad

    new_B, new_A, _ = balanced_factors(B, A)
    b_map, a_map = refactorization_maps(B, A, new_B, new_A)
    (g_b, g_a), (new_g_b, new_g_a) = gradients(B, A), gradients(new_B, new_A)
    # fp64: the maps come from r×r solves of well-conditioned Grams (σ of a Gaussian product), ~1e-14 here
    torch.testing.assert_close(g_b @ b_map, new_g_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a_map @ g_a, new_g_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b_map.T @ a_map.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    # fp32 factors: the maps in fp32 (work_dtype), the same identity to fp32 rounding
    b32, a32 = refactorization_maps(B.float(), A.float(), new_B.float(), new_A.float())
    assert b32.dtype == torch.float32 and b32.is_contiguous()
    torch.testing.assert_close(b32.double(), b_map, rtol=1e-4, atol=1e-5)


def test_refactorization_maps_are_undefined_when_the_product_lost_rank():
    """B = 0 (a fresh ReLoRA factor) or a zero column: the new coordinates say nothing about the old ones."""
    from lowrank.linalg import refactorization_maps

    torch.manual_seed(3)
    A = torch.randn(4, 12)
    for B in (torch.zeros(10, 4), torch.randn(10, 4) * torch.tensor([1.0, 1.0, 0.0, 1.0])):
        new_B, new_A, _ = balanced_factors(B, A)
        assert refactorization_maps(B, A, new_B, new_A) is None
