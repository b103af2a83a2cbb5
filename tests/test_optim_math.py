"""The pure tensor functions behind ProjectedAdamW, and option fallbacks of the optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank.optim import ProjectedAdamW
from lowrank.optim.projection import gaussian_projection, limit_norm_growth, svd_basis
from lowrank.seeding import derive_seed, sample_subset, subset_size
from lowrank.optim.spikes import adaptive_clip, norm_scaling, reset_warmup_factor, spam_clip


def test_derive_seed_depends_on_every_key_and_their_order():
    seeds = {derive_seed(0, i, j) for i in range(20) for j in range(20)}
    assert len(seeds) == 400
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(3, 4, 5) == derive_seed(3, 4, 5)
    assert all(0 <= s < 2**63 for s in seeds)


def test_sample_subset_is_exact_sorted_unique_and_deterministic():
    for numel, density in ((1000, 0.25), (1000, 0.9), (7, 0.5), (5, 1e-6)):
        k = subset_size(numel, density)
        assert k == max(1, round(density * numel))
        subset = sample_subset(numel, k, seed=(1, 2, 3))
        assert subset.dtype == torch.int32 and subset.numel() == k
        assert torch.equal(subset, subset.unique())  # sorted, no repeats
        assert 0 <= int(subset.min()) and int(subset.max()) < numel
        assert torch.equal(subset, sample_subset(numel, k, seed=(1, 2, 3)))
    assert not torch.equal(sample_subset(1000, 250, seed=(1,)), sample_subset(1000, 250, seed=(2,)))


def test_sample_subset_is_uniform():
    torch.manual_seed(0)
    counts = torch.zeros(40)
    for trial in range(2000):
        counts[sample_subset(40, 10, seed=(trial,)).long()] += 1
    # Each entry is kept with probability 1/4: 500 ± 3·sqrt(2000·0.25·0.75) ≈ 500 ± 58.
    assert (counts - 500).abs().max() < 60


def test_spam_clip_formula():
    torch.manual_seed(0)
    g = torch.randn(50) * 10
    v = torch.rand(50) * 0.01
    limit = 50.0 * v
    expected = torch.where(g.square() > limit, g.sign() * limit.sqrt(), g)
    torch.testing.assert_close(spam_clip(g, v, 50.0), expected, atol=1e-6, rtol=0)
    assert not torch.equal(spam_clip(g, v, 50.0), g)


def test_spam_clip_leaves_entries_without_history_alone():
    """v_{t-1} = 0: the entry has never had a gradient; clipping to sqrt(θ·0) = 0 would freeze it."""
    g = torch.tensor([3.0, -2.0, 5.0, -7.0])
    v = torch.tensor([0.0, 0.0, 1e-4, 1e-4])
    bound = (50.0 * 1e-4) ** 0.5
    torch.testing.assert_close(spam_clip(g, v, 50.0), torch.tensor([3.0, -2.0, bound, -bound]))


def test_reset_warmup_factor_endpoints_and_shape():
    assert reset_warmup_factor(0, 10) == 0.01
    assert reset_warmup_factor(10, 10) == 1.0 and reset_warmup_factor(99, 10) == 1.0
    assert math.isclose(reset_warmup_factor(5, 10), 0.505)
    values = [reset_warmup_factor(k, 10) for k in range(11)]
    assert values == sorted(values)
    assert reset_warmup_factor(0, 0) == 1.0


def test_adaptive_clip_and_norm_scaling_formulas():
    torch.manual_seed(0)
    g = torch.randn(30)
    g[3] = 40.0
    max_avg = torch.tensor(0.5)
    out = adaptive_clip(g, max_avg, 0.9, step=2)
    expected_avg = 0.9 * 0.5 + 0.1 * 40.0
    threshold = expected_avg / (1 - 0.9**2)
    assert math.isclose(float(max_avg), expected_avg, rel_tol=1e-6)
    torch.testing.assert_close(out, torch.where(g.abs() > threshold, g / 40.0 * threshold, g))

    m, v = torch.tensor(2.0), torch.tensor(5.0)
    out = norm_scaling(g, m, v, 0.7, 0.9, step=3, eps=1e-8)
    norm = g.norm()
    m_ref, v_ref = 0.7 * 2.0 + 0.3 * norm, 0.9 * 5.0 + 0.1 * norm**2
    target = (m_ref / (1 - 0.7**3)) / ((v_ref / (1 - 0.9**3)).sqrt() + 1e-8)
    torch.testing.assert_close(out, g / norm * target)
    zero = torch.zeros(4)
    m_before = float(m)
    assert torch.equal(norm_scaling(zero, m, v, 0.7, 0.9, step=4, eps=1e-8), zero)
    assert float(m) == m_before


def test_limit_norm_growth():
    previous = torch.tensor(0.0)
    first = limit_norm_growth(torch.full((4,), 3.0), previous)
    assert torch.equal(first, torch.full((4,), 3.0)) and math.isclose(float(previous), 6.0)
    grown = limit_norm_growth(torch.full((4,), 6.0), previous)  # norm 12 > 1.01·6
    assert math.isclose(float(grown.norm()), 6.06, rel_tol=1e-5) and math.isclose(float(previous), 6.06, rel_tol=1e-5)
    shrunk = limit_norm_growth(torch.full((4,), 1.0), previous)
    assert torch.equal(shrunk, torch.ones(4))


def test_gaussian_projection_is_seeded_with_variance_one_over_rank():
    p = gaussian_projection((300, 500), 64, seed=(0, 1, 2))
    assert p.shape == (300, 64)
    assert torch.equal(p, gaussian_projection((300, 500), 64, seed=(0, 1, 2)))
    assert not torch.equal(p, gaussian_projection((300, 500), 64, seed=(0, 1, 3)))
    assert abs(float(p.var()) * 64 - 1) < 0.05
    assert gaussian_projection((500, 300), 64, seed=(0,)).shape == (300, 64)


def test_svd_basis_is_compact_and_clamps_rank():
    g = torch.randn(6, 10)
    basis = svd_basis(g, 50)
    assert basis.shape == (6, 6) and basis.untyped_storage().nbytes() == 6 * 6 * 4


def test_projection_group_falls_back_to_adam_for_non_matrices():
    torch.manual_seed(0)
    shapes = [(7,), (2, 3, 4)]
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = ProjectedAdamW(ours, lr=1e-2, projection="svd", rank=2, density=0.5)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
        assert "projector" not in opt.state[p]


def test_reset_keeps_the_projector_clock():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 12))
    opt = ProjectedAdamW([p], lr=1e-2, projection="randomized", rank=3, update_proj_gap=4, reset_interval=3)
    for _ in range(9):
        p.grad = torch.randn(8, 12)
        opt.step()
    state = opt.state[p]
    # 9 steps: bases at steps 0, 4, 8; resets before steps 3 and 6 (after 3 and 6 steps).
    assert state["projector_updates"] == 3 and state["resets"] == 2 and state["step"] == 3
    assert state["total_step"] == 9


def test_rotate_moment_maps_the_first_moment_exactly_and_v_exactly_under_a_scaled_permutation():
    """m is linear in the gradients: rotating the average = averaging the rotated gradients, for any map.
    v averages squares: exact when the map is a scaled permutation (no two coordinates mix)."""
    from lowrank.optim.rotation import rotate_moment

    torch.manual_seed(4)
    gradients = torch.randn(5, 12, 3, dtype=torch.float64)  # five steps of a 12×3 factor (B-like)
    weights = 0.9 ** torch.arange(5, 0, -1, dtype=torch.float64)  # an EMA's weights

    def average(gs, square=False):
        return sum(w * (g.square() if square else g) for w, g in zip(weights, gs))

    general = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(rotate_moment(average(gradients), general, dim=1), average(gradients @ general))
    torch.testing.assert_close(rotate_moment(average(gradients.mT), general, dim=0), average(general @ gradients.mT))
    scaled_permutation = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -0.5], [3.0, 0.0, 0.0]], dtype=torch.float64)
    for dim, gs, mapped in ((1, gradients, gradients @ scaled_permutation), (0, gradients.mT, scaled_permutation @ gradients.mT)):
        v = rotate_moment(average(gs, square=True), scaled_permutation, dim=dim, squared=True)
        torch.testing.assert_close(v, average(mapped, square=True))
    # a general map: the diagonal of the mapped second moments if the old coordinates were uncorrelated
    v = rotate_moment(average(gradients, square=True), general, dim=1, squared=True)
    torch.testing.assert_close(v, average(gradients, square=True) @ general.square())
    assert (v >= 0).all()
    moment32 = average(gradients).float()
    assert rotate_moment(moment32, general, dim=1).dtype == torch.float32  # computed in the map's fp64, stored back
    with pytest.raises(ValueError, match="dim 0 has 12 entries"):
        rotate_moment(average(gradients), general, dim=0)


def test_projected_adamw_rotates_low_bit_moments_through_their_decoding():
    """8-bit moments: decoded, mapped, encoded. The result differs from mapping the decoded values
    exactly by at most one requantization: half the widest gap of the code book times the block's scale."""
    from lowrank.optim import lowbit

    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.randn(128, 64))  # 8192 entries: quantized (>= 4096)
    optimizer = ProjectedAdamW([p], lr=1e-3, state_bits=8)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        optimizer.step()
    state = optimizer.state[p]
    m, v, quantized = optimizer._moments(p, optimizer.param_groups[0], state, p.shape)
    assert quantized
    transform = torch.eye(64) + 0.1 * torch.randn(64, 64)
    expected = {"exp_avg": m @ transform, "exp_avg_sq": v @ transform.square()}
    optimizer.rotate_momentum(p, transform, dim=1)
    m_new, v_new, _ = optimizer._moments(p, optimizer.param_groups[0], state, p.shape)
    for key, value in (("exp_avg", m_new), ("exp_avg_sq", v_new)):
        book = lowbit.code_book(8, key == "exp_avg")
        half_gap = float((book[1:] - book[:-1]).max()) / 2
        scale = state[f"{key}_absmax"].repeat_interleave(256)[: p.numel()].view(p.shape)
        assert ((value - expected[key]).abs() <= half_gap * scale + 1e-7).all(), key
    assert state["step"] == 3  # bias correction goes on
