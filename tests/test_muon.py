"""Muon: against torch.optim.Muon and torch.optim.AdamW, its parameter split, state, resets,
memory layout, validation, and low-rank training with RestartController."""

from __future__ import annotations

import io

import pytest
import torch

import lowrank
from lowrank import LowRankConfig
from lowrank.memory.estimate import optimizer_state_layout
from lowrank.optim import Muon, ProjectedAdamW, muon_param_groups
from lowrank.optim.layout import muon_state_layout, state_layout
from lowrank.optim.muon import newton_schulz
from lowrank.restarts import RestartController
from tiny_models import build, tokens

needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

# Muon and torch.optim.Muon run the same bf16 Newton-Schulz on inputs that differ by the factor
# 1/(1 - momentum) (our M <- mu*M + G against torch's EMA). The orthogonalisation removes the scale,
# but the bf16 cast of the scaled input rounds differently: torch's own NS(20x) and NS(x) differ by
# up to 1.6e-2 per entry. With lr 0.02 (lr*adj ~ 0.018) that is ~1e-4 per step; over 10 steps we
# measured at most 9.1e-4 (the parameters move by ~0.1), hence this tolerance.
TORCH_MUON_ATOL = 1.5e-3


def matrix_and_grads(shape, steps, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen).to(dtype)
    return weight, [torch.randn(shape, generator=gen).to(dtype) for _ in range(steps)]


def run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def mixed_params(dtype=torch.float32, seed=0):
    """Two hidden matrices (Muon) and an embedding-like matrix, a bias and a 3-D tensor (AdamW)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 20), (20, 12), (16, 8), (20,), (2, 3, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def mixed_groups(params, **adamw_options):
    return [{"params": params[:2], "use_muon": True}, {"params": params[2:], "use_muon": False, **adamw_options}]


def mixed_grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params] for _ in range(steps)]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ---------------------------------------------------------------------------- against torch


@needs_torch_muon
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)], ids=["m>n", "m<n"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_over_10_steps(shape, nesterov):
    weight, grads = matrix_and_grads(shape, 10)
    ours, ref = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, ns_steps=5)
    run(Muon([{"params": [ours], "use_muon": True}], adjust_lr="match_rms_adamw", **kwargs), [ours], [[g] for g in grads])
    reference = torch.optim.Muon([ref], adjust_lr_fn="match_rms_adamw", **kwargs)
    run(reference, [ref], [[g] for g in grads])
    assert (ref - weight).abs().max() > 50 * TORCH_MUON_ATOL  # it moved much more than the tolerance
    torch.testing.assert_close(ours, ref, atol=TORCH_MUON_ATOL, rtol=0)


@needs_torch_muon
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)], ids=["m>n", "m<n"])
def test_without_momentum_is_bit_identical_to_torch_muon(shape):
    """With momentum 0 both orthogonalise the same G: Newton-Schulz, the lr adjustment and weight
    decay are then the same to the bit."""
    weight, grads = matrix_and_grads(shape, 10)
    ours, ref = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    run(Muon([ours], lr=0.02, weight_decay=0.1, momentum=0.0), [ours], [[g] for g in grads])
    reference = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.0, adjust_lr_fn="match_rms_adamw")
    run(reference, [ref], [[g] for g in grads])
    assert torch.equal(ours, ref)


@needs_torch_muon
def test_momentum_buffer_is_torch_ema_over_one_minus_mu():
    weight, grads = matrix_and_grads((12, 20), 10)
    ours, ref = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    opt, reference = Muon([ours], lr=0.02), torch.optim.Muon([ref], lr=0.02, adjust_lr_fn="match_rms_adamw")
    run(opt, [ours], [[g] for g in grads])
    run(reference, [ref], [[g] for g in grads])
    ema = reference.state[ref]["momentum_buffer"]
    torch.testing.assert_close(opt.state[ours]["momentum_buffer"] * 0.05, ema, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_newton_schulz_orthogonalises_and_ignores_scale(shape):
    x, _ = matrix_and_grads(shape, 0)
    out = newton_schulz(x)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    singular = torch.linalg.svdvals(out.float())
    assert singular.min() > 0.6 and singular.max() < 1.25  # Jordan's coefficients: ~[0.7, 1.2], not exactly 1
    torch.testing.assert_close(newton_schulz(1e3 * x).float(), out.float(), atol=5e-2, rtol=0)


def test_adamw_half_matches_torch_adamw():
    params = mixed_params()
    ref = clone(params[2:])
    grads = mixed_grads(params, 20)
    run(Muon(mixed_groups(params), lr=1e-2, weight_decay=0.1), params, grads)
    run(torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1), ref, [g[2:] for g in grads])
    for got, want in zip(params[2:], ref):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_adamw_half_keeps_projected_adamw_options():
    """An AdamW group with sparse momentum and spike clipping steps exactly as ProjectedAdamW."""
    options = dict(density=0.5, spike_threshold=50.0, spike_skip_steps=2, seed=3)
    params = mixed_params()
    ref = clone(params[2:])
    grads = mixed_grads(params, 12)
    run(Muon(mixed_groups(params, **options), lr=1e-2), params, grads)
    run(ProjectedAdamW(ref, lr=1e-2, **options), ref, [g[2:] for g in grads])
    for got, want in zip(params[2:], ref):
        assert torch.equal(got, want)


def test_lr_set_on_param_groups_reaches_both_halves():
    params = mixed_params()
    optimizer = Muon(mixed_groups(params), lr=1e-2)
    run(optimizer, params, mixed_grads(params, 2))
    before = [p.detach().clone() for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    run(optimizer, params, mixed_grads(params, 1, seed=5))
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_plain_parameter_list_is_split_by_dimension():
    params = mixed_params()
    optimizer = Muon(params, lr=1e-2)
    assert [(g["use_muon"], len(g["params"])) for g in optimizer.param_groups] == [(True, 3), (False, 2)]


# ---------------------------------------------------------------------------- parameter split


def split_names(model, groups):
    names = {id(p): name for name, p in model.named_parameters()}
    return {group["use_muon"]: {names[id(p)] for p in group["params"]} for group in groups}


def test_muon_param_groups_on_llama():
    model = build("llama")
    groups = muon_param_groups(model, muon={"momentum": 0.9}, adamw={"betas": (0.9, 0.95)})
    layers = range(2)
    hidden = {f"model.layers.{i}.self_attn.{x}_proj.weight" for i in layers for x in "qkvo"}
    hidden |= {f"model.layers.{i}.mlp.{x}_proj.weight" for i in layers for x in ("gate", "up", "down")}
    other = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    other |= {f"model.layers.{i}.{norm}.weight" for i in layers for norm in ("input_layernorm", "post_attention_layernorm")}
    assert split_names(model, groups) == {True: hidden, False: other}
    assert groups[0]["momentum"] == 0.9 and groups[1]["betas"] == (0.9, 0.95)
    Muon(groups, lr=1e-3)  # the groups are valid as they are


def test_muon_param_groups_on_gpt2_and_patterns():
    model = build("gpt2")  # tied head: lm_head.weight is wte.weight, listed once
    split = split_names(model, muon_param_groups(model, adamw_names=["*.attn.c_proj.weight"]))
    layers = range(2)
    hidden = ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")
    assert split[True] == {f"transformer.h.{i}.{name}.weight" for i in layers for name in hidden}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_proj.weight"} <= split[False]
    assert all(name.endswith(("bias", "weight")) for name in split[False])


def test_muon_param_groups_on_wrapped_model_puts_factors_in_muon():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4, keep_base=True))
    split = split_names(model, muon_param_groups(model))
    factors = {f"{name}.{f}" for name in lowrank.lowrank_layers(model) for f in "AB"}
    assert split[True] == factors
    assert not any("base_weight" in name for name in split[False])  # frozen: left out


# ---------------------------------------------------------------------------- state


def test_state_round_trips_weights_only_and_resume_is_bit_identical():
    params = mixed_params(dtype=torch.bfloat16)
    grads = mixed_grads(params, 6)
    build_optimizer = lambda ps: Muon(mixed_groups(ps, density=0.5), lr=1e-2, weight_decay=0.1, state_dtype=torch.float32)
    optimizer = build_optimizer(params)
    run(optimizer, params, grads[:3])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_params = clone(params)
    resumed = build_optimizer(resumed_params)
    resumed.load_state_dict(saved)
    assert resumed.state[resumed_params[0]]["momentum_buffer"].dtype == torch.float32  # not cast to bf16
    assert resumed.state[resumed_params[2]]["exp_avg"].dtype == torch.float32
    run(optimizer, params, grads[3:])
    run(resumed, resumed_params, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))
    for a, b in zip(params, resumed_params):
        for key, value in optimizer.state[a].items():
            other = resumed.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_reset_momentum_zeroes_exactly_the_chosen_buffers():
    params = mixed_params()
    optimizer = Muon(mixed_groups(params), lr=1e-2)
    run(optimizer, params, mixed_grads(params, 3))
    before = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()} for p in params}
    chosen = [params[0], params[3]]  # one Muon matrix, one AdamW bias
    optimizer.reset_momentum(chosen)
    assert not optimizer.state[params[0]]["momentum_buffer"].any() and optimizer.state[params[0]]["step"] == 0
    assert not optimizer.state[params[3]]["exp_avg"].any() and not optimizer.state[params[3]]["exp_avg_sq"].any()
    assert optimizer.state[params[3]]["step"] == 0
    for p in params:
        if any(p is c for c in chosen):
            continue
        for key, value in before[p].items():
            now = optimizer.state[p][key]
            assert torch.equal(now, value) if torch.is_tensor(value) else now == value
    with pytest.raises(ValueError, match="not in this optimizer"):
        optimizer.reset_momentum([torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_state_bytes_equal_the_layout(state_dtype):
    params = mixed_params(dtype=torch.bfloat16)
    optimizer = Muon(mixed_groups(params, density=0.5), lr=1e-2, state_dtype=state_dtype)
    detail, extra = optimizer_state_layout(optimizer)  # before any step: from the layout alone
    run(optimizer, params, mixed_grads(params, 2))
    counted = optimizer.state_bytes()
    layouts = [
        [(muon_state_layout if g["use_muon"] else state_layout)(tuple(p.shape), p.dtype, g) for p in g["params"]]
        for g in optimizer.param_groups
    ]
    assert counted.per_group == [sum(layout.bytes() for layout in group) for group in layouts]
    assert counted.total == sum(detail.values()) and counted.subset_cache == extra > 0
    width = (state_dtype or torch.bfloat16).itemsize
    assert counted.per_group[0] == width * (12 * 20 + 20 * 12)  # one buffer like p per matrix


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "option",
    [
        {"projection": "svd"},
        {"rank": 8},
        {"residual": "fira"},
        {"density": 0.25},
        {"spike_threshold": 5000.0},
        {"adaptive_clip": True},
        {"reset_interval": 100},
        {"betas": (0.9, 0.95)},
    ],
)
def test_projected_adamw_options_are_refused_in_muon_groups(option):
    params = mixed_params()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: .* is not a Muon option: ") as error:
        Muon([{"params": params[:2], "use_muon": True, **option}], lr=1e-2)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "group, match",
    [
        ({"use_muon": True, "params_index": [3]}, r"shape \(20,\): put it in a use_muon=False group"),
        ({"use_muon": True, "adjust_lr": "rms"}, "adjust_lr must be one of"),
        ({"use_muon": True, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"use_muon": True, "ns_steps": 0}, "ns_steps must be an integer >= 1"),
        ({"use_muon": False, "momentum": 0.9}, "momentum is a Muon option and this is an AdamW group"),
        ({"use_muon": False, "projection": "nope"}, "projection must be one of"),
        ({"use_muon": 1}, "use_muon must be True or False"),
    ],
)
def test_bad_groups_fail_with_one_line(group, match):
    params = mixed_params()
    group = dict(group)
    chosen = [params[i] for i in group.pop("params_index", [0])]
    with pytest.raises(ValueError, match=match) as error:
        Muon([{"params": chosen, **group}], lr=1e-2)
    assert "\n" not in str(error.value)


def test_inert_projected_adamw_values_are_accepted_in_muon_groups():
    params = mixed_params()
    Muon([{"params": params[:2], "use_muon": True, "projection": None, "density": 1.0}], lr=1e-2)


def test_unknown_adamw_default_is_refused():
    with pytest.raises(TypeError, match="unexpected AdamW option"):
        Muon(mixed_params(), lr=1e-2, adamw={"momentum": 0.9})


# ---------------------------------------------------------------------------- low-rank training


def test_low_rank_model_trains_and_refactorize_resets_factor_momentum():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4)).train()
    optimizer = Muon(muon_param_groups(model), lr=2e-2)
    controller = RestartController(model, optimizer, total_steps=30, cycle_length=10, event="refactorize", reset="changed")
    factors = [p for layer in lowrank.lowrank_layers(model).values() for p in layer.factor_parameters()]
    norms = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    ids = tokens(2, 16)

    def closure():
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss

    losses, events = [], []
    for _ in range(20):
        losses.append(optimizer.step(closure).item())
        event = controller.step()
        if event is not None:
            events.append(event)
            assert event.event == "refactorize" and event.reset_params == len(factors)
            assert all(not optimizer.state[p]["momentum_buffer"].any() and optimizer.state[p]["step"] == 0 for p in factors)
            assert all(optimizer.state[p]["exp_avg"].any() for p in norms)  # AdamW half: not changed, not reset
        for group in optimizer.param_groups:  # the controller's schedule reaches both halves
            assert group["lr"] == pytest.approx(group["base_lr"] * controller.lr_lambda(controller.num_steps))
    assert len(events) == 2
    assert losses[-1] < 0.7 * losses[0]
