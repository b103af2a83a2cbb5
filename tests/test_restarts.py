"""RestartController: events on the right steps, momentum reset for exactly the changed
parameters, and a learning rate that follows the jagged cosine."""

import math

import pytest
import torch

import lowrank
from lowrank import LowRankConfig
from lowrank.optim import ProjectedAdamW
from lowrank.restarts import RestartController, jagged_cosine
from tiny_models import build, tokens


def train_steps(model, optimizer, controller, steps, ids):
    events = []
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        events.append(controller.step())
    return events


def moments(optimizer, param):
    state = optimizer.state[param]
    return state["exp_avg"], state["exp_avg_sq"]


def test_jagged_cosine_formula():
    kwargs = dict(total_steps=100, warmup_steps=10, min_lr_ratio=0.1, cycle_length=30, rewarmup_steps=5)
    assert jagged_cosine(0, **kwargs) == pytest.approx(0.1)
    assert jagged_cosine(9, **kwargs) == pytest.approx(1.0)

    def envelope(step):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))

    assert jagged_cosine(20, **kwargs) == pytest.approx(envelope(20))
    # After the restart at step 30: linear ramp over 5 steps to the envelope.
    for offset in range(5):
        assert jagged_cosine(30 + offset, **kwargs) == pytest.approx(envelope(30 + offset) * (offset + 1) / 5)
    assert jagged_cosine(35, **kwargs) == pytest.approx(envelope(35))
    assert jagged_cosine(99, **kwargs) == pytest.approx(envelope(99))
    # No re-warm-up before the first cycle completes (that is the initial warm-up's job).
    assert jagged_cosine(12, **{**kwargs, "warmup_steps": 0}) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 12 / 100)))


def wrapped_with_controller(optimizer_cls, **controller_options):
    """A wrapped tiny LLaMA, its optimizer and controller, its factors and its other parameters."""
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4)).train()
    optimizer = optimizer_cls(model.parameters(), lr=1e-3)
    controller = RestartController(model, optimizer, total_steps=20, cycle_length=3, **controller_options)
    factors = [p for layer in lowrank.lowrank_layers(model).values() for p in (layer.A, layer.B)]
    others = [p for p in model.parameters() if all(p is not f for f in factors)]
    return model, optimizer, controller, factors, others


@pytest.mark.parametrize("optimizer_cls", [ProjectedAdamW, torch.optim.AdamW])
def test_factor_reset_without_an_event_zeroes_only_the_factor_moments(optimizer_cls):
    """reset='factors', event='none': the ablation's "momentum reset only" leaves weights as they are."""
    model, optimizer, controller, factors, others = wrapped_with_controller(optimizer_cls, event="none", reset="factors")
    ids = tokens(2, 16)
    train_steps(model, optimizer, controller, 2, ids)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    weights = [p.detach().clone() for p in model.parameters()]
    before = [[m.clone() for m in moments(optimizer, p)] for p in others]
    event = controller.step()
    assert event is not None and event.event == "none" and event.reset_params == len(factors)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    for p in factors:
        assert all(torch.count_nonzero(m) == 0 for m in moments(optimizer, p))
    for p, saved in zip(others, before):
        assert all(torch.equal(a, b) for a, b in zip(moments(optimizer, p), saved))
    with pytest.raises(ValueError, match="reset='factors' needs a wrapped model"):
        RestartController(build("llama"), optimizer, total_steps=5, cycle_length=2, event="none", reset="factors")


@pytest.mark.parametrize("optimizer_cls", [ProjectedAdamW, torch.optim.AdamW])
def test_refactorize_event_resets_exactly_the_factors(optimizer_cls):
    model, optimizer, controller, factors, others = wrapped_with_controller(optimizer_cls, event="auto", reset="changed")
    ids = tokens(2, 16)
    factors = {id(p) for p in factors}
    events = train_steps(model, optimizer, controller, 2, ids)
    assert events == [None, None]
    before = {id(p): [m.clone() for m in moments(optimizer, p)] for p in others}
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    products = {n: (l.B @ l.A).detach().clone() for n, l in lowrank.lowrank_layers(model).items()}
    after_step = {id(p): [m.clone() for m in moments(optimizer, p)] for p in others}
    event = controller.step()
    assert event is not None and event.step == 3 and event.event == "refactorize"
    assert event.reset_params == len(factors)
    for layer in lowrank.lowrank_layers(model).values():
        for p in (layer.A, layer.B):
            assert all(torch.count_nonzero(m) == 0 for m in moments(optimizer, p))
    for p in others:  # untouched by the reset
        for m_after, m_now in zip(after_step[id(p)], moments(optimizer, p)):
            assert torch.equal(m_after, m_now)
        assert any(not torch.equal(a, b) for a, b in zip(before[id(p)], moments(optimizer, p)))
    # The refactorization itself happened (balanced factors, same product).
    for name, layer in lowrank.lowrank_layers(model).items():
        torch.testing.assert_close(layer.B @ layer.A, products[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.B.T @ layer.B, layer.A @ layer.A.T, rtol=1e-3, atol=1e-5)
    events = train_steps(model, optimizer, controller, 6, ids)
    assert [e.step for e in events if e] == [6, 9]


def test_merge_event_and_learning_rate_restart():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4, keep_base=True, init="kaiming")).train()
    optimizer = ProjectedAdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    controller = RestartController(model, optimizer, total_steps=12, cycle_length=4, event="auto", reset="changed",
                                   warmup_steps=2, rewarmup_steps=2, min_lr_ratio=0.1)
    ids = tokens(2, 16)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        event = controller.step()
        if event:
            assert event.event == "merge"
            assert all(torch.count_nonzero(layer.B) == 0 for layer in lowrank.lowrank_layers(model).values())
    expected = [0.01 * controller.lr_lambda(step) for step in range(11)]
    assert lrs == pytest.approx(expected)
    assert lrs[4] < lrs[5] and lrs[4] == pytest.approx(0.5 * 0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 10))))
    assert [e.step for e in controller.history] == [4, 8]
    assert all(int(layer.num_merges) == 2 for layer in lowrank.lowrank_layers(model).values())


def test_reset_all_without_layer_events():
    model = build("llama").train()
    optimizer = ProjectedAdamW(model.parameters(), lr=1e-3)
    controller = RestartController(model, optimizer, total_steps=10, cycle_length=2, event="none", reset="all")
    ids = tokens(2, 8)
    events = train_steps(model, optimizer, controller, 2, ids)
    assert events[1].reset_params == len(list(model.parameters()))
    assert all(torch.count_nonzero(moments(optimizer, p)[0]) == 0 for p in model.parameters())


def test_state_dict_round_trip():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4)).train()
    optimizer = ProjectedAdamW(model.parameters(), lr=1e-3)
    controller = RestartController(model, optimizer, total_steps=50, cycle_length=5, warmup_steps=3)
    train_steps(model, optimizer, controller, 7, tokens(2, 8))
    state = controller.state_dict()
    assert state == {"num_steps": 7, "num_restarts": 1}
    fresh_optimizer = ProjectedAdamW(model.parameters(), lr=1e-3)
    fresh = RestartController(model, fresh_optimizer, total_steps=50, cycle_length=5, warmup_steps=3)
    fresh.load_state_dict(state)
    assert fresh.num_steps == 7 and fresh.num_restarts == 1
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_bad_arguments():
    model = build("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="needs a wrapped model"):
        RestartController(model, optimizer, total_steps=10, event="refactorize")
    with pytest.raises(ValueError, match="event must be one of"):
        RestartController(model, optimizer, total_steps=10, event="svd")
    with pytest.raises(ValueError, match="rewarmup_steps .* shorter than cycle_length"):
        RestartController(model, optimizer, total_steps=10, cycle_length=5, rewarmup_steps=5, event="none")
    wrapped = lowrank.wrap(build("llama"), LowRankConfig(rank=4))
    with pytest.raises(ValueError, match="keep_base=True"):
        RestartController(wrapped, torch.optim.AdamW(wrapped.parameters()), total_steps=10, event="merge")
    with pytest.raises(TypeError, match="cannot reset the momentum of SGD"):
        RestartController(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, cycle_length=1,
                          event="none", reset="all").restart()


@pytest.mark.parametrize("optimizer_cls", [ProjectedAdamW, torch.optim.AdamW])
def test_reset_of_the_first_moment_only_keeps_v_and_the_bias_correction(optimizer_cls):
    """reset_moments='first' (a remedy for the sign(g)-sized first update after a full reset):
    the factors' exp_avg is zeroed, their exp_avg_sq and step count go on; the first update after
    it is (1 − β₁)·g/(√v̂ + ε), against sign(g)·lr-sized after a full reset."""
    model, optimizer, controller, factors, _ = wrapped_with_controller(optimizer_cls, event="none", reset="factors",
                                                                       reset_moments="first")
    ids = tokens(2, 16)
    train_steps(model, optimizer, controller, 2, ids)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    saved = {id(p): (optimizer.state[p]["exp_avg_sq"].clone(), int(optimizer.state[p]["step"])) for p in factors}
    event = controller.step()
    assert event is not None and event.reset_params == len(factors)
    for p in factors:
        state = optimizer.state[p]
        assert torch.count_nonzero(state["exp_avg"]) == 0
        assert torch.equal(state["exp_avg_sq"], saved[id(p)][0]) and int(state["step"]) == saved[id(p)][1]
    # the next step of a factor, by the formula (lr from the controller's schedule, no weight decay)
    p = factors[0]
    before, v = p.detach().clone(), saved[id(p)][0]
    model(ids, labels=ids).loss.backward()
    grad = p.grad.clone()
    optimizer.step()
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    t = saved[id(p)][1] + 1
    m_hat = (1 - beta1) * grad / (1 - beta1**t)
    v_hat = (beta2 * v + (1 - beta2) * grad**2) / (1 - beta2**t)
    lr = optimizer.param_groups[0]["lr"]
    torch.testing.assert_close(p.detach(), before - lr * m_hat / (v_hat.sqrt() + 1e-8), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="reset_moments must be one of both, first"):
        RestartController(model, optimizer, total_steps=5, cycle_length=2, reset_moments="second")


def factor_pairs(model):
    return [(layer.B, layer.A) for layer in lowrank.lowrank_layers(model).values()]


@pytest.mark.parametrize("optimizer_cls", [ProjectedAdamW, torch.optim.AdamW])
@pytest.mark.parametrize("reset, reset_moments", [("none", "both"), ("changed", "first")])
def test_rotate_moments_carries_the_kept_moments_into_the_refactorized_coordinates(optimizer_cls, reset, reset_moments):
    """rotate_moments: each refactorized layer's kept moments become m·T, v·(T∘T) for B and T·m,
    (T∘T)·v for A, with T the layer's gradient maps (lowrank.linalg.refactorization_maps) from its
    factors before and after; reset_moments='first' zeroes m first. Step counts go on."""
    from lowrank.linalg import refactorization_maps

    model, optimizer, controller, factors, _ = wrapped_with_controller(
        optimizer_cls, event="refactorize", reset=reset, reset_moments=reset_moments, rotate_moments=True)
    ids = tokens(2, 16)
    train_steps(model, optimizer, controller, 2, ids)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    before = {id(p): (p.detach().clone(), *(m.clone() for m in moments(optimizer, p)), int(optimizer.state[p]["step"]))
              for p in factors}
    event = controller.step()
    assert event is not None and event.event == "refactorize" and event.rotated_params == len(factors)
    for B, A in factor_pairs(model):
        b_map, a_map = refactorization_maps(before[id(B)][0], before[id(A)][0], B.detach(), A.detach())
        for param, expected_m, expected_v in (
                (B, before[id(B)][1] @ b_map, before[id(B)][2] @ b_map.square()),
                (A, a_map @ before[id(A)][1], a_map.square() @ before[id(A)][2])):
            m, v = moments(optimizer, param)
            if reset_moments == "first":
                assert torch.count_nonzero(m) == 0
            else:
                torch.testing.assert_close(m, expected_m, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(v, expected_v, rtol=1e-5, atol=1e-12)
            assert int(optimizer.state[param]["step"]) == before[id(param)][3]


def test_rotate_moments_resets_a_layer_whose_product_lost_rank():
    """A zero column of B: no map from the new coordinates to the old, so that layer's moments are
    reset in full (and its step count restarts) while the other layers' are carried."""
    model, optimizer, controller, factors, _ = wrapped_with_controller(ProjectedAdamW, reset_moments="first",
                                                                       rotate_moments=True)
    ids = tokens(2, 16)
    train_steps(model, optimizer, controller, 2, ids)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    (B, A), *others = factor_pairs(model)
    with torch.no_grad():
        B[:, 0] = 0.0
    event = controller.step()
    assert event.rotated_params == len(factors) - 2
    for param in (B, A):
        assert all(torch.count_nonzero(m) == 0 for m in moments(optimizer, param))
        assert optimizer.state[param]["step"] == 0
    assert all(torch.count_nonzero(moments(optimizer, b)[1]) > 0 for b, _ in others)


def test_rotate_moments_refuses_what_it_cannot_serve():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="reset_moments='both' keeps none"):
        RestartController(model, adamw, total_steps=10, rotate_moments=True)
    with pytest.raises(ValueError, match="event='none' has none"):
        RestartController(model, adamw, total_steps=10, event="none", reset="none", rotate_moments=True)
    with pytest.raises(ValueError, match="amsgrad's running maximum"):
        RestartController(model, torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True), total_steps=10,
                          reset="none", rotate_moments=True)
    with pytest.raises(ValueError, match=r"moments are sparse \(density=0.5\)"):
        RestartController(model, ProjectedAdamW(model.parameters(), lr=1e-3, density=0.5), total_steps=10,
                          reset_moments="first", rotate_moments=True)
    with pytest.raises(ValueError, match="SGD has no moments"):
        RestartController(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, reset="none",
                          rotate_moments=True)
