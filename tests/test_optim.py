"""ProjectedAdamW against torch.optim.AdamW, GaLore, Fira, APOLLO, Stable-SPAM and direct formulas."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lowrank.optim import ProjectedAdamW
from lowrank.seeding import subset_size

SHAPES = [(12, 20), (20, 12)]  # basis on the left (m < n) and on the right (m >= n)


def make_params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)  # some peers modify p.grad in place
        opt.step()
    return [p.detach().clone() for p in params]


def assert_close_params(a, b, atol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def assert_matches_torch_adamw(shapes, steps, **options):
    """ProjectedAdamW with ``options`` (lr 1e-2, weight decay 0.1) ends where torch's AdamW does."""
    grads = make_grads(shapes, steps)
    ours = make_params(shapes)
    ref = clone_params(ours)
    got = run(ProjectedAdamW(ours, lr=1e-2, weight_decay=0.1, **options), ours, grads)
    want = run(torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1), ref, grads)
    assert_close_params(got, want, atol=1e-6)


# ---------------------------------------------------------------------------- plain AdamW


@pytest.mark.parametrize("foreach", [True, False, None])
def test_all_options_off_matches_torch_adamw(foreach):
    torch.manual_seed(0)
    assert_matches_torch_adamw([(6, 9), (9,), (2, 3, 4)], 20, foreach=foreach)


def test_foreach_chunks_bound_temporaries_and_match_torch_adamw(monkeypatch):
    """The multi-tensor path runs over chunks of at most FOREACH_CHUNK_NUMEL elements."""
    import lowrank.optim.adamw as adamw_module

    shapes = [(6, 9), (9,), (2, 3, 4), (30,)]
    chunks = list(adamw_module._chunks([torch.empty(s) for s in shapes], 60))
    assert [[tuple(t.shape) for t in c] for c in chunks] == [[(6, 9)], [(9,), (2, 3, 4)], [(30,)]]
    monkeypatch.setattr(adamw_module, "FOREACH_CHUNK_NUMEL", 60)
    calls = []
    original = torch._foreach_sqrt
    monkeypatch.setattr(torch, "_foreach_sqrt", lambda tensors: calls.append(len(tensors)) or original(tensors))
    assert_matches_torch_adamw(shapes, 5, foreach=True)
    assert calls == [1, 2, 1] * 5


def test_general_path_matches_torch_adamw():
    """The per-parameter path (any option on, or the CPU) is the same AdamW with every option inert."""
    torch.manual_seed(0)
    # A threshold no gradient reaches routes the parameter through the general path.
    assert_matches_torch_adamw([(6, 9)], 20, spike_threshold=1e30)


def test_lr_is_read_from_the_group_each_step():
    torch.manual_seed(0)
    shapes = [(4, 5)]
    grads = make_grads(shapes, 6)
    ours = make_params(shapes)
    ref = clone_params(ours)
    opt = ProjectedAdamW(ours, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.0)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (opt, ref_opt)]
    for (g,) in grads:
        ours[0].grad, ref[0].grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for s in schedules:
            s.step()
    torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- projections vs peers


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_projection_matches_galore(shape):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    grads = make_grads([shape], 20)
    ours = make_params([shape])
    ref = clone_params(ours)
    opt = ProjectedAdamW(ours, lr=1e-2, eps=1e-10, projection="svd", rank=4, update_proj_gap=5, scale=0.25)
    peer = galore_torch.GaLoreAdamW(
        [{"params": ref, "rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}], lr=1e-2, eps=1e-10
    )
    assert_close_params(run(opt, ours, grads), run(peer, ref, grads), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_fira_residual_matches_fira(shape):
    fira = pytest.importorskip("fira")
    torch.manual_seed(0)
    grads = make_grads([shape], 20)
    ours = make_params([shape])
    ref = clone_params(ours)
    opt = ProjectedAdamW(ours, lr=1e-2, eps=1e-10, projection="svd", rank=4, update_proj_gap=5, residual="fira")
    peer = fira.FiraAdamW(
        [{"params": ref, "rank": 4, "update_proj_gap": 5, "alpha": 1.0, "proj_type": "std"}], lr=1e-2, eps=1e-10
    )
    assert_close_params(run(opt, ours, grads), run(peer, ref, grads), atol=1e-6)
    # The limiter must have been exercised, or the comparison would not cover it.
    assert float(opt.state[ours[0]]["limiter_norm"]) > 0


def test_fira_residual_is_the_orthogonal_complement_for_any_scale():
    """With scale != 1 the residual is still G − P PᵀG (Fira's code uses G − scale·P PᵀG)."""
    torch.manual_seed(0)
    shape = (12, 20)
    (p,) = make_params([shape])
    g = torch.randn(shape)
    opt = ProjectedAdamW([p], lr=1.0, projection="svd", rank=3, scale=0.25, residual="fira")
    p0 = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    basis = opt.state[p]["projector"]
    low = basis.t() @ g
    # First Adam step: direction = m/(sqrt(v)+eps·sqrt(bc2)) with m=(1-b1)g, v=(1-b2)g².
    b1, b2, eps = 0.9, 0.999, 1e-8
    bc2 = math.sqrt(1 - b2)
    direction = (1 - b1) * low / ((1 - b2) ** 0.5 * low.abs() + eps * bc2)
    residual = g - basis @ low
    factor = direction.norm(dim=0) / (low.norm(dim=0) + 1e-8)
    update = 0.25 * basis @ direction + residual * factor
    expected = p0 - bc2 / (1 - b1) * update
    torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=0)
    # The residual is orthogonal to the basis: Pᵀ(G − P PᵀG) = 0.
    assert (basis.t() @ residual).abs().max() < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_type,rank", [("channel", 4), ("tensor", 1)])
def test_random_projection_matches_apollo(shape, scale_type, rank, monkeypatch):
    apollo_torch = pytest.importorskip("apollo_torch")
    import apollo_torch.random_projector as rp

    torch.manual_seed(0)
    grads = make_grads([shape], 20)
    ours = make_params([shape])
    ref = clone_params(ours)
    opt = ProjectedAdamW(
        ours, lr=1e-2, eps=1e-10, projection="random", rank=rank, update_proj_gap=100, scale=2.0, scale_type=scale_type
    )
    got = run(opt, ours, grads)
    # APOLLO draws its own Gaussian from its own seed; hand it ours so the trajectories can match.
    basis = opt.state[ours[0]]["projector"] * math.sqrt(rank)

    def same_draw(draw_shape, seed, device=None, dtype=torch.float32):
        return basis.t().clone() if tuple(draw_shape)[0] == rank else basis.clone()

    monkeypatch.setattr(rp, "stable_randn", same_draw)
    peer = apollo_torch.APOLLOAdamW(
        [
            {
                "params": ref,
                "rank": rank,
                "update_proj_gap": 100,
                "scale": 4.0,  # APOLLO multiplies by sqrt(scale)
                "proj": "random",
                "proj_type": "std",
                "scale_type": scale_type,
            }
        ],
        lr=1e-2,
        eps=1e-10,
    )
    assert_close_params(got, run(peer, ref, grads), atol=1e-6)


def test_randomized_projection_finds_the_svd_subspace():
    from lowrank.optim.projection import randomized_basis, svd_basis

    torch.manual_seed(0)
    m, n, r = 96, 160, 8
    u, _ = torch.linalg.qr(torch.randn(m, m))
    v, _ = torch.linalg.qr(torch.randn(n, m))
    spectrum = torch.arange(1, m + 1, dtype=torch.float32) ** -1.0
    g = (u * spectrum) @ v.t()
    exact = svd_basis(g, r)
    for grad in (g, g.t()):
        approx = randomized_basis(grad, r, seed=(0, 1, 2))
        reference = svd_basis(grad, r)
        assert approx.shape == reference.shape == exact.shape
        torch.testing.assert_close(approx.t() @ approx, torch.eye(r), atol=1e-5, rtol=0)
        # Same subspace (σ8/σ9 = 0.89 is a small gap; without power iterations the distance is ~0.96)
        # and the same captured energy.
        distance = torch.linalg.matrix_norm(approx @ approx.t() - reference @ reference.t(), ord=2)
        assert distance < 0.1
        low = approx.t() @ grad if grad.shape[0] < grad.shape[1] else grad @ approx
        low_ref = reference.t() @ grad if grad.shape[0] < grad.shape[1] else grad @ reference
        assert low.norm() / low_ref.norm() > 0.99999


def test_projection_state_bytes_match_galore_formula():
    torch.manual_seed(0)
    m, n, r = 16, 40, 4  # m <= n: projector m×r, moments 2·r×n
    (p,) = make_params([(m, n)])
    opt = ProjectedAdamW([p], lr=1e-3, projection="svd", rank=r)
    p.grad = torch.randn(m, n)
    opt.step()
    assert opt.state_bytes().total == (m * r + 2 * r * n) * 4
    assert opt.state[p]["projector"].untyped_storage().nbytes() == m * r * 4  # no hidden full U


# ---------------------------------------------------------------------------- sparse momentum


def test_sparse_momentum_bytes_frozen_entries_and_shared_seed():
    torch.manual_seed(0)
    shape, density, lr, wd, steps = (40, 30), 0.25, 1e-2, 0.1, 5
    grads = make_grads([shape], steps)
    a = make_params([shape])
    b = clone_params(a)
    start = a[0].detach().clone()
    opt_a = ProjectedAdamW(a, lr=lr, weight_decay=wd, density=density, seed=7)
    opt_b = ProjectedAdamW(b, lr=lr, weight_decay=wd, density=density, seed=7)
    run(opt_a, a, grads)
    run(opt_b, b, grads)

    k = subset_size(a[0].numel(), density)
    assert k == round(density * a[0].numel())
    assert opt_a.state_bytes().total == 2 * k * 4  # no index or mask in the saved state
    assert opt_a.state_bytes().subset_cache == k * 4  # int32 indices, outside the state

    subset = opt_a._subsets[a[0]][1]
    assert torch.equal(subset, opt_b._subsets[b[0]][1])  # same seed, same subset
    assert subset.numel() == k and subset.unique().numel() == k
    assert torch.equal(a[0], b[0])

    outside = torch.ones(a[0].numel(), dtype=torch.bool)
    outside[subset.long()] = False
    decayed = start.reshape(-1).clone()
    for _ in range(steps):
        decayed.mul_(1 - lr * wd)
    assert torch.equal(a[0].detach().reshape(-1)[outside], decayed[outside])
    assert (a[0].detach().reshape(-1)[~outside] - decayed[~outside]).abs().min() > 0

    # Kept entries follow plain AdamW on the gathered gradients.
    ref = torch.nn.Parameter(start.reshape(-1)[subset.long()].clone())
    ref_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=wd)
    for (g,) in grads:
        ref.grad = g.reshape(-1)[subset.long()].clone()
        ref_opt.step()
    torch.testing.assert_close(a[0].detach().reshape(-1)[subset.long()], ref.detach(), atol=1e-6, rtol=0)


def test_sparse_subset_changes_at_reset_and_with_seed():
    torch.manual_seed(0)
    shape = (30, 20)
    a = make_params([shape])
    opt = ProjectedAdamW(a, lr=1e-2, density=0.1, reset_interval=3, seed=1)
    other = make_params([shape])
    opt_other = ProjectedAdamW(other, lr=1e-2, density=0.1, seed=2)
    run(opt_other, other, make_grads([shape], 1))
    subsets = []
    for (g,) in make_grads([shape], 7):
        a[0].grad = g
        opt.step()
        subsets.append(opt._subsets[a[0]][1].clone())
    assert torch.equal(subsets[0], subsets[2])
    assert not torch.equal(subsets[2], subsets[3])  # reset after 3 steps: new period, new subset
    assert torch.equal(subsets[3], subsets[5]) and not torch.equal(subsets[5], subsets[6])
    assert not torch.equal(subsets[0], opt_other._subsets[other[0]][1])  # other seed, other subset
    assert opt.state[a[0]]["resets"] == 2


def test_sparse_momentum_on_projected_gradient():
    torch.manual_seed(0)
    m, n, r, density = 16, 40, 4, 0.5
    (p,) = make_params([(m, n)])
    opt = ProjectedAdamW([p], lr=1e-2, projection="svd", rank=r, density=density)
    run(opt, [p], make_grads([(m, n)], 3))
    k = round(density * r * n)
    assert opt.state[p]["exp_avg"].shape == (k,)
    assert opt.state_bytes().total == (m * r + 2 * k) * 4


# ---------------------------------------------------------------------------- spikes and resets


def test_spam_clip_matches_formula():
    torch.manual_seed(0)
    shape, theta, b1, b2, lr = (5, 6), 50.0, 0.9, 0.999, 1e-2
    (p,) = make_params([shape])
    opt = ProjectedAdamW([p], lr=lr, spike_threshold=theta, spike_skip_steps=2)
    p_ref = p.detach().clone()
    m = torch.zeros(shape)
    v = torch.zeros(shape)
    grads = make_grads([shape], 6)
    grads[4][0][0, :3] *= 1000.0  # spikes after the skip window
    clipped_any = False
    for t, (g,) in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        if t > 2:
            limit = theta * v
            spikes = g.square() > limit
            clipped_any |= bool(spikes.any())
            g = torch.where(spikes, g.sign() * limit.sqrt(), g)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p_ref = p_ref - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach(), p_ref, atol=1e-6, rtol=0)
    assert clipped_any


def test_spam_clip_does_not_freeze_entries_first_seen_late():
    """A Zipf-distributed token stream: most embedding rows get their first gradient after the
    spike clip's skip window. Every row that ever received a gradient must have moved."""
    torch.manual_seed(0)
    vocab, dim, steps = 2000, 8, 200
    embedding = torch.nn.Embedding(vocab, dim)
    start = embedding.weight.detach().clone()
    opt = ProjectedAdamW(embedding.parameters(), lr=1e-3, spike_threshold=5000.0, spike_skip_steps=20)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    first_seen = torch.full((vocab,), -1)
    for step in range(steps):
        tokens = torch.multinomial(zipf, 64, replacement=True)
        first_seen[tokens[first_seen[tokens] < 0]] = step
        embedding(tokens).square().sum().backward()
        opt.step()
        opt.zero_grad()
    late = first_seen >= 20
    assert int(late.sum()) > 100
    moved = (embedding.weight.detach() - start).abs().sum(dim=1) > 0
    assert bool(moved[late].all()), f"{int((~moved[late]).sum())} of {int(late.sum())} late rows never trained"


@pytest.mark.parametrize("foreach", [True, False])
def test_reset_warmup_matches_formula_and_reset_step_keeps_gradient(foreach):
    torch.manual_seed(0)
    shape, interval, warmup, b1, b2, lr = (4, 7), 4, 3, 0.9, 0.999, 1e-2
    (p,) = make_params([shape])
    opt = ProjectedAdamW([p], lr=lr, reset_interval=interval, reset_warmup=warmup, foreach=foreach)
    p_ref = p.detach().clone()
    m = torch.zeros(shape)
    v = torch.zeros(shape)
    since_reset, resets = 0, 0
    for t, (g,) in enumerate(make_grads([shape], 11), start=1):
        if t > 1 and (t - 1) % interval == 0:
            m.zero_(), v.zero_()
            since_reset, resets = 0, resets + 1
        p.grad = g.clone()
        opt.step()
        since_reset += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        k = since_reset - 1
        factor = 1.0 if resets == 0 or k >= warmup else 0.01 + 0.99 * (1 - math.cos(math.pi * k / warmup)) / 2
        p_ref = p_ref - factor * lr * (m / (1 - b1**since_reset)) / ((v / (1 - b2**since_reset)).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach(), p_ref, atol=1e-6, rtol=0)
        if since_reset == 1 and resets:
            # Reset step: the moments hold exactly this step's gradient, not old values or zeros.
            torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - b1) * g, atol=1e-7, rtol=0)
    assert resets == 2 and opt.state[p]["resets"] == 2


def test_stable_spam_matches_formula_through_a_reset():
    torch.manual_seed(0)
    shape, interval, lr, eps = (6, 5), 4, 1e-2, 1e-8
    b1, b2 = 0.9, 0.999
    g1, g2, g3 = 0.7, 0.9, 0.999
    (p,) = make_params([shape])
    opt = ProjectedAdamW([p], lr=lr, adaptive_clip=True, norm_scaling=True, reset_interval=interval)
    p_ref = p.detach().clone()
    m, v = torch.zeros(shape), torch.zeros(shape)
    max_avg = norm_avg = norm_sq_avg = 0.0
    since_reset = 0
    grads = make_grads([shape], 10)
    grads[5][0][1, 1] = 80.0  # a spike
    for t, (g,) in enumerate(grads, start=1):
        if t > 1 and (t - 1) % interval == 0:
            m, v, since_reset = torch.zeros(shape), torch.zeros(shape), 0
        p.grad = g.clone()
        opt.step()
        since_reset += 1
        gmax = g.abs().max()
        max_avg = g3 * max_avg + (1 - g3) * gmax
        threshold = max_avg / (1 - g3**t)
        g = torch.where(g.abs() > threshold, g / gmax * threshold, g)
        norm = g.norm()
        norm_avg = g1 * norm_avg + (1 - g1) * norm
        norm_sq_avg = g2 * norm_sq_avg + (1 - g2) * norm**2
        g = g / norm * (norm_avg / (1 - g1**t)) / ((norm_sq_avg / (1 - g2**t)).sqrt() + eps)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p_ref = p_ref - lr * (m / (1 - b1**since_reset)) / ((v / (1 - b2**since_reset)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), p_ref, atol=1e-6, rtol=0)


def test_stable_spam_matches_pytorch_optimizer_without_resets():
    po = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    shapes = [(6, 5), (7,)]
    grads = make_grads(shapes, 15)
    ours = make_params(shapes)
    ref = clone_params(ours)
    opt = ProjectedAdamW(ours, lr=1e-2, weight_decay=0.1, adaptive_clip=True, norm_scaling=True)
    peer = po.StableSPAM(ref, lr=1e-2, weight_decay=0.1, gamma1=0.7, gamma2=0.9, theta=0.999, update_proj_gap=10**9)
    assert_close_params(run(opt, ours, grads), run(peer, ref, grads), atol=1e-6)


def test_reset_momentum_on_demand():
    torch.manual_seed(0)
    a, b = make_params([(8, 6), (5,)])
    opt = ProjectedAdamW([a, b], lr=1e-2, density=0.5, reset_warmup=10)
    run(opt, [a, b], make_grads([(8, 6), (5,)], 3))
    subset_before = opt._subsets[a][1].clone()
    opt.reset_momentum([a])
    assert opt.state[a]["step"] == 0 and opt.state[a]["resets"] == 1
    assert not opt.state[a]["exp_avg"].any() and not opt.state[a]["exp_avg_sq"].any()
    assert opt.state[b]["step"] == 3 and opt.state[b]["exp_avg"].any()  # untouched
    a.grad, b.grad = torch.randn(8, 6), torch.randn(5)
    before = a.detach().clone()
    opt.step()
    assert not torch.equal(opt._subsets[a][1], subset_before)
    # Warm-up restarted: the first step after the reset moves kept entries by 0.01·lr (Adam's first
    # step has |m̂/sqrt(v̂)| = 1).
    moved = (a.detach() - before).abs().reshape(-1)[opt._subsets[a][1].long()]
    torch.testing.assert_close(moved, torch.full_like(moved, 0.01 * 1e-2), atol=3e-7, rtol=0)
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.reset_momentum([torch.nn.Parameter(torch.zeros(2))])


# ---------------------------------------------------------------------------- checkpoints


CHECKPOINT_CONFIGS = [
    dict(projection="svd", rank=3, update_proj_gap=4, density=0.5, spike_threshold=50.0, spike_skip_steps=2,
         reset_interval=5, reset_warmup=3),
    dict(projection="randomized", rank=3, update_proj_gap=4, residual="fira"),
    dict(projection="random", rank=3, update_proj_gap=4, reset_interval=5),
    dict(density=0.3, reset_interval=4, adaptive_clip=True, norm_scaling=True),
    dict(projection="svd", rank=3, update_proj_gap=4, state_dtype=torch.float32),
    dict(reset_interval=4, reset_warmup=3, foreach=True, state_dtype=torch.float32),
    # Low-bit moments; these shapes are under 4096 entries, so they stay full precision (the
    # quantized resume: tests/test_lowbit.py).
    dict(projection="svd", rank=3, update_proj_gap=4, density=0.5, reset_interval=4, state_bits=4),
]


@pytest.mark.parametrize("config", CHECKPOINT_CONFIGS, ids=range(len(CHECKPOINT_CONFIGS)))
def test_state_dict_round_trip_is_bit_identical(config):
    torch.manual_seed(0)
    shapes = [(10, 14), (14, 10), (6,)]
    dtype = torch.bfloat16 if config.get("state_dtype") else torch.float32
    grads = make_grads(shapes, 14)
    params = make_params(shapes, dtype=dtype)
    opt = ProjectedAdamW(params, lr=1e-2, weight_decay=0.01, **config)
    run(opt, params, grads[:7])

    buffer = io.BytesIO()
    torch.save({"optim": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for state in saved["optim"]["state"].values():
        assert all(isinstance(v, (torch.Tensor, int, float, bool)) for v in state.values())

    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = ProjectedAdamW(resumed, lr=1e-2, weight_decay=0.01, **config)
    opt2.load_state_dict(saved["optim"])
    for p, q in zip(params, resumed):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            assert type(value) is type(other)
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), key
    continued = run(opt, params, grads[7:])
    restarted = run(opt2, resumed, grads[7:])
    for x, y in zip(continued, restarted):
        assert torch.equal(x, y)


def test_bf16_params_with_fp32_state():
    torch.manual_seed(0)
    (p,) = make_params([(8, 12)], dtype=torch.bfloat16)
    opt = ProjectedAdamW([p], lr=1e-2, projection="svd", rank=2, state_dtype=torch.float32)
    run(opt, [p], make_grads([(8, 12)], 3))
    assert p.dtype == torch.bfloat16
    assert {opt.state[p][k].dtype for k in ("exp_avg", "exp_avg_sq", "projector")} == {torch.float32}


# ---------------------------------------------------------------------------- validation


BAD_OPTIONS = [
    ("density", 1.5), ("density", 0.0), ("rank", 0), ("lr", -1.0), ("eps", -1e-8), ("weight_decay", -0.1),
    ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.99)), ("projection", "qr"), ("residual", "lora"),
    ("update_proj_gap", 0), ("gammas", (0.7, 0.9)), ("scale_type", "row"), ("reset_interval", -1),
    ("scale", 0.0), ("spike_threshold", -1.0), ("state_dtype", torch.int32), ("foreach", "yes"),
    ("state_bits", 3), ("state_bits", "8"),
]


@pytest.mark.parametrize("option,value", BAD_OPTIONS, ids=[f"{o}={v}" for o, v in BAD_OPTIONS])
def test_bad_options_raise_value_error_naming_group_and_option(option, value):
    good, bad = make_params([(3, 4), (4, 3)])
    with pytest.raises(ValueError, match=rf"^param_groups\[1\]: {option} "):
        ProjectedAdamW([{"params": [good]}, {"params": [bad], option: value}], lr=1e-3)


def test_bad_defaults_and_combinations():
    (p,) = make_params([(3, 4)])
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: density must be in \(0, 1\], got 1.5"):
        ProjectedAdamW([p], lr=1e-3, density=1.5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: residual='fira' needs projection"):
        ProjectedAdamW([p], lr=1e-3, residual="fira")
    with pytest.raises(ValueError, match=r"param_groups\[0\]: density < 1 cannot"):
        ProjectedAdamW([p], lr=1e-3, projection="random", density=0.5)
    with pytest.raises(TypeError, match="desnity"):
        ProjectedAdamW([p], lr=1e-3, desnity=0.5)
    opt = ProjectedAdamW([p], lr=1e-3)
    with pytest.raises(ValueError, match=r"^param_groups\[1\]: rank "):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))], "rank": -3})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------------- state layout


LAYOUT_MODES = {
    "plain": dict(),
    "plain-foreach": dict(foreach=True),
    "svd": dict(projection="svd", rank=3, update_proj_gap=1),
    "randomized": dict(projection="randomized", rank=3, update_proj_gap=1),
    "random": dict(projection="random", rank=3, update_proj_gap=1),
    "random-tensor": dict(projection="random", rank=1, scale_type="tensor"),
    "fira": dict(projection="svd", rank=3, residual="fira"),
    "fira-randomized": dict(projection="randomized", rank=3, residual="fira"),
    "sparse": dict(density=0.3),
    "projected-sparse": dict(projection="svd", rank=3, density=0.5, update_proj_gap=1),
    "stable-spam": dict(adaptive_clip=True, norm_scaling=True, spike_threshold=50.0, spike_skip_steps=1),
    "stable-spam-svd": dict(projection="svd", rank=3, adaptive_clip=True, norm_scaling=True),
    "bf16": dict(projection="svd", rank=3, dtype=torch.bfloat16),
    "bf16-fp32-state": dict(projection="svd", rank=3, density=0.5, dtype=torch.bfloat16, state_dtype=torch.float32),
    "bf16-fp32-state-plain": dict(dtype=torch.bfloat16, state_dtype=torch.float32, foreach=True),
    # Low-bit moments: every moment here is under 4096 entries and stays in the state dtype; the
    # quantized layouts are checked on larger shapes in tests/test_lowbit.py.
    "8bit": dict(state_bits=8),
    "4bit-foreach-bf16": dict(state_bits=4, foreach=True, dtype=torch.bfloat16),
    "4bit-projected-sparse": dict(state_bits=4, projection="svd", rank=3, density=0.5, update_proj_gap=1),
    "8bit-stable-spam-fp32-state": dict(state_bits=8, adaptive_clip=True, norm_scaling=True, spike_threshold=50.0,
                                        dtype=torch.bfloat16, state_dtype=torch.float32),
}
COUNTERS = {"step", "total_step", "resets"}


@pytest.mark.parametrize("mode", list(LAYOUT_MODES))
def test_state_after_a_step_is_exactly_the_layout(mode):
    from lowrank.optim import state_layout
    from lowrank.optim.projection import project

    options = dict(LAYOUT_MODES[mode])
    dtype = options.pop("dtype", torch.float32)
    shapes = [(12, 20), (20, 12), (3, 20), (6,), (2, 3, 4)]  # (3, 20): rank 3 = min(m, n)
    params = make_params(shapes, dtype=dtype)
    opt = ProjectedAdamW(params, lr=1e-2, weight_decay=0.01, reset_interval=2, **options)
    run(opt, params, make_grads(shapes, 3))  # past a reset (new subset) and projector refreshes
    group = opt.param_groups[0]
    layout_bytes = cache_bytes = 0
    for p in params:
        layout = state_layout(tuple(p.shape), p.dtype, group)
        state = opt.state[p]
        tensors = {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}
        assert tensors == {k: (tuple(s.shape), s.dtype) for k, s in layout.tensors().items()}
        counters = COUNTERS | ({"projector_updates"} if layout.projectors else set())
        assert {k for k, v in state.items() if not isinstance(v, torch.Tensor)} == counters
        assert all(type(state[k]) is int for k in counters)
        assert all(t.device == p.device and t.is_contiguous() for t in state.values() if isinstance(t, torch.Tensor))
        # Independent of the layout: moments have the shape of what enters them.
        if "projector" in state:
            low_shape = tuple(project(torch.zeros(p.shape, dtype=state["projector"].dtype), state["projector"]).shape)
        else:
            low_shape = tuple(p.shape)
        if "subset_indices" in layout.outside:
            period, indices = opt._subsets[p]
            assert period == state["resets"] == 1
            assert (tuple(indices.shape), indices.dtype) == tuple(layout.outside["subset_indices"])
            assert tensors["exp_avg"][0] == (subset_size(math.prod(low_shape), group["density"]),)
        else:
            assert p not in opt._subsets and layout.outside_bytes() == 0
            assert tensors["exp_avg"][0] == low_shape
        layout_bytes += layout.bytes()
        cache_bytes += layout.outside_bytes()
        assert sum(layout.bytes_by_kind().values()) == layout.bytes()
    assert opt.state_bytes().total == layout_bytes
    assert opt.state_bytes().subset_cache == cache_bytes


def test_layout_rules_by_hand():
    from lowrank.optim import ParamStateLayout, TensorSpec, state_layout

    def group(**options):
        opt = ProjectedAdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, **options)
        return opt.param_groups[0]

    f32, bf16 = torch.float32, torch.bfloat16
    scalar = TensorSpec((), f32)
    assert state_layout((12, 20), bf16, group()) == ParamStateLayout(
        moments={"exp_avg": TensorSpec((12, 20), bf16), "exp_avg_sq": TensorSpec((12, 20), bf16)})
    fira = state_layout((12, 20), bf16, group(projection="svd", rank=4, residual="fira", state_dtype=f32))
    assert fira.moments == {"exp_avg": TensorSpec((4, 20), f32), "exp_avg_sq": TensorSpec((4, 20), f32)}
    assert fira.projectors == {"projector": TensorSpec((12, 4), f32)} and fira.scalars == {"limiter_norm": scalar}
    assert fira.bytes_by_kind() == {"moments": 2 * 80 * 4, "projectors": 48 * 4, "scalars": 4}
    assert fira.bytes() == 2 * 80 * 4 + 48 * 4 + 4
    right = state_layout((20, 12), f32, group(projection="random", rank=30))  # rank capped at 12
    assert right.moments["exp_avg"] == TensorSpec((20, 12), f32) and right.projectors["projector"] == ((12, 12), f32)
    sparse = state_layout((20, 12), f32, group(projection="svd", rank=4, density=0.25))
    assert sparse.moments["exp_avg_sq"] == TensorSpec((20,), f32)  # k = round(0.25 · 20·4)
    assert sparse.outside == {"subset_indices": TensorSpec((20,), torch.int32)} and sparse.outside_bytes() == 80
    vector = state_layout((7,), f32, group(projection="svd", density=0.5, adaptive_clip=True, norm_scaling=True))
    assert vector.moments["exp_avg"] == TensorSpec((7,), f32) and not vector.projectors and not vector.outside
    assert vector.scalars == {"max_abs_avg": scalar, "norm_avg": scalar, "norm_sq_avg": scalar}


def test_torch_adamw_state_layout_matches_torch():
    from lowrank.optim import torch_adamw_state_layout

    params = make_params([(6, 9), (9,)], dtype=torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=1e-3)
    run(opt, params, make_grads([(6, 9), (9,)], 1))
    for p in params:
        layout = torch_adamw_state_layout(tuple(p.shape), p.dtype)
        assert {k: (tuple(v.shape), v.dtype) for k, v in opt.state[p].items()} == {
            k: tuple(s) for k, s in layout.tensors().items()}
        assert layout.bytes_by_kind() == {"moments": 2 * 2 * p.numel(), "projectors": 0, "scalars": 4}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(lr=float("inf")), "lr must be a finite number >= 0"),
        (dict(lr=1e-3, eps=float("inf")), "eps must be a finite number >= 0"),
        (dict(lr=1e-3, weight_decay=float("inf")), "weight_decay must be a finite number >= 0"),
        (dict(lr=1e-3, projection="svd", rank=13), r"rank 13 is larger than a 12×20 matrix allows \(at most 12\)"),
    ],
)
def test_values_that_would_train_silently_and_wrongly_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ProjectedAdamW(make_params([(12, 20)]), **options)


def test_an_unknown_group_key_is_refused_with_the_closest_option():
    params = make_params([(4, 5)])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: unknown option 'desnity'; did you mean 'density'\?"):
        ProjectedAdamW([{"params": params, "desnity": 0.5}], lr=1e-3)
    # bookkeeping keys of schedulers and of the restart controller are fine
    ProjectedAdamW([{"params": params, "group_name": "matrix", "base_lr": 1e-3, "initial_lr": 1e-3}], lr=1e-3)


@pytest.mark.parametrize("optimizer_name", ["projected_adamw", "projected_adamw_foreach", "muon"])
@pytest.mark.parametrize("key, value", [("lr", float("nan")), ("lr", float("inf")), ("lr", -1e-3),
                                        ("weight_decay", float("nan")), ("eps", -1.0)])
def test_a_hyperparameter_set_to_nan_or_negative_after_construction_is_refused_at_the_step(optimizer_name, key, value):
    """An LR schedule or user code that sets ``group["lr"] = nan`` after construction used to turn
    every weight NaN in silence at the next step; the step now refuses it in one line, naming the
    group and the value, before any weight moves."""
    from lowrank.errors import UsageError
    from lowrank.optim import Muon

    params = make_params([(6, 9), (9,)])
    if optimizer_name == "muon":
        opt = Muon([{"params": params[:1], "use_muon": True}, {"params": params[1:], "use_muon": False}], lr=1e-3)
    else:
        opt = ProjectedAdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3,
                             foreach=optimizer_name.endswith("foreach"))
    for p, g in zip(params, make_grads([(6, 9), (9,)], 1)[0]):
        p.grad = g
    opt.step()
    before = clone_params(params)
    opt.param_groups[1][key] = value
    with pytest.raises(UsageError, match=rf"^param_groups\[1\]: {key} must be a finite number >= 0 at the step, got "
                                         rf"{value!r}"):
        opt.step()
    with pytest.raises(UsageError, match=rf"^param_groups\[1\]: {key}"):
        opt.step_param(params[1])
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # nothing moved, not even the healthy group
