"""The optimizer step inside backward (``--layerwise-step``, :mod:`lowrank.run.layerwise`).

* Every optimizer mode (the cases of tests/test_optim_reference.py: plain, foreach, projected,
  APOLLO, Fira, sparse momentum, SPAM / Stable-SPAM, 8-/4-bit moments, bf16 storage, manual
  resets, Muon) gives the ordinary step's weights and state bit for bit, with and without
  gradient accumulation.
* Gradients are freed as they are used: the live ``.grad`` bytes never exceed the largest
  parameter's (the ordinary step holds all of them).
* Clipping uses the previous step's global norm (the first step unclipped); a non-finite
  gradient leaves its parameter and state untouched and makes the step's norm NaN.
* ``lowrank pretrain --layerwise-step`` = the ordinary trainer bit for bit (restarts, accumulation,
  bf16 storage), resumes bit-identically with clipping on, and refuses what it cannot run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_optim_reference import CASES
from test_train import config as train_config
from test_train import losses

from lowrank.errors import UsageError
from lowrank.optim import Muon, ProjectedAdamW
from lowrank.precision import compute_in, store_parameters
from lowrank.run.layerwise import CLIP_EPS, LayerwiseStep
from lowrank.run.step import optimizer_step
from lowrank.train import pretrain

STEPS = 4
SEED = 7


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    """Two matrices large enough for 4-bit blocks (>= 4096 entries) and their bias vectors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    store_parameters(model, dtype)
    if dtype != torch.float32:
        compute_in(model, torch.float32)
    return model


def make_optimizer(model: torch.nn.Module, options: dict) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if options.get("_muon"):
        rest = {k: v for k, v in options.items() if not k.startswith("_")}
        return Muon([{"params": [p for p in params if p.dim() == 2], "use_muon": True},
                     {"params": [p for p in params if p.dim() != 2], "use_muon": False}], lr=1e-2, **rest)
    return ProjectedAdamW(params, lr=1e-2, **{k: v for k, v in options.items() if not k.startswith("_")})


def batches(steps: int, accum: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    data = []
    for step in range(steps):
        micro = [torch.randn(8, 64, generator=generator) for _ in range(accum)]
        if step == 2:  # a spike for the spike-clipping modes
            micro[0][0] *= 1000.0
        data.append(micro)
    return data


def train(options: dict, *, layerwise: bool, accum: int = 1, clip: float = 0.0, steps: int = STEPS, observe=None):
    """``steps`` steps of ``model(x).square().mean()``; returns (model, optimizer, grad norms)."""
    dtype = options.get("_dtype", torch.float32)
    reset_at = options.get("_reset_at")
    model = make_model(dtype)
    optimizer = make_optimizer(model, options)
    params = list(model.parameters())
    if observe is not None:  # registered first: sees each gradient before the step frees it
        for p in params:
            p.register_post_accumulate_grad_hook(observe)
    stepper = None
    if layerwise:
        stepper = LayerwiseStep(optimizer, storage=dtype, rounding="stochastic", seed=SEED, grad_clip=clip)
        stepper.hook_parameters()
    norms = []
    for step, micro in enumerate(batches(steps, accum)):
        if reset_at is not None and step == reset_at:
            optimizer.reset_momentum(params[:2])
        for i, x in enumerate(micro):
            if stepper is not None and i == accum - 1:
                stepper.arm(step)
            (model(x).square().mean() / accum).backward()
        if stepper is not None:
            norms.append(stepper.finish())
        else:
            if clip:
                norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
            optimizer_step(optimizer, storage=dtype, rounding="stochastic", seed=SEED, step=step)
            optimizer.zero_grad(set_to_none=True)
    return model, optimizer, norms


def snapshot(model, optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        state = optimizer.state.get(p, {})
        tensors += [v.clone() for _, v in sorted(state.items()) if torch.is_tensor(v)]
    return tensors


def assert_bit_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layerwise_step_is_the_ordinary_step_bit_for_bit(name):
    options = CASES[name]
    hooked = train(options, layerwise=True)
    plain = train(options, layerwise=False)
    assert_bit_identical(snapshot(*hooked[:2]), snapshot(*plain[:2]))
    assert all(p.grad is None for p in hooked[0].parameters())


@pytest.mark.parametrize("name", ["plain", "svd", "sparse", "bits8", "fira_svd", "muon", "bf16_projected_fira"])
def test_layerwise_step_with_accumulation_steps_once_per_step(name):
    options = CASES[name]
    assert_bit_identical(snapshot(*train(options, layerwise=True, accum=3)[:2]),
                         snapshot(*train(options, layerwise=False, accum=3)[:2]))


def live_gradient_peak(layerwise: bool) -> tuple[int, list[int]]:
    model = make_model(torch.float32)
    peak = 0

    def observe(p):
        nonlocal peak
        peak = max(peak, sum(q.grad.numel() * q.grad.element_size() for q in model.parameters() if q.grad is not None))

    # the observer must see this model's parameters: build the run around the same model
    optimizer = make_optimizer(model, {})
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(observe)
    if layerwise:
        stepper = LayerwiseStep(optimizer, storage=torch.float32, rounding="stochastic", seed=SEED, grad_clip=0)
        stepper.hook_parameters()
    for step, (x,) in enumerate(batches(2, 1)):
        if layerwise:
            stepper.arm(step)
        model(x).square().mean().backward()
        if layerwise:
            stepper.finish()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return peak, [p.numel() * p.element_size() for p in model.parameters()]


def test_gradients_are_not_all_alive_at_once():
    peak, sizes = live_gradient_peak(layerwise=True)
    assert peak == max(sizes)  # one parameter's gradient at a time (the largest is 128×64 fp32)
    peak, sizes = live_gradient_peak(layerwise=False)
    assert peak == sum(sizes)  # the ordinary step holds every gradient until step()


def test_clipping_uses_the_previous_steps_global_norm():
    """Step t's gradients are scaled by min(1, c / (‖g_{t−1}‖ + eps)); step 1 is not clipped."""
    clip = 0.05
    hooked_model, _, norms = train({}, layerwise=True, clip=clip, steps=3)
    # The reference: ordinary steps on gradients scaled by hand with the previous step's norm.
    model = make_model(torch.float32)
    optimizer = make_optimizer(model, {})
    params = list(model.parameters())
    previous = None
    seen = []
    for (x,) in batches(3, 1):
        model(x).square().mean().backward()
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        seen.append(norm)
        scale = 1.0 if previous is None else min(1.0, clip / (previous + CLIP_EPS))
        for p in params:
            p.grad.mul_(scale)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        previous = norm
    assert all(n > clip for n in seen[:2])  # so the clip is active at steps 2 and 3
    assert norms == pytest.approx(seen, rel=1e-6)
    for a, b in zip(hooked_model.parameters(), params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # ... and differs from clipping nothing, and from clipping with the current norm
    unclipped = train({}, layerwise=False, steps=3)[0]
    current = train({}, layerwise=False, clip=clip, steps=3)[0]
    for other in (unclipped, current):
        assert not all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(hooked_model.parameters(), other.parameters()))


def test_a_nonfinite_gradient_never_reaches_its_parameter():
    model = make_model(torch.float32)
    optimizer = make_optimizer(model, {"weight_decay": 0.1})
    params = list(model.parameters())
    poisoned = params[2]  # the second matrix

    def poison(p):
        if p is poisoned and armed_step[0] == 1:
            p.grad[0, 0] = float("nan")

    armed_step = [None]
    for p in params:
        p.register_post_accumulate_grad_hook(poison)  # before the step's hooks: they see the NaN
    stepper = LayerwiseStep(optimizer, storage=torch.float32, rounding="stochastic", seed=SEED, grad_clip=1.0)
    stepper.hook_parameters()
    norms = []
    for step, (x,) in enumerate(batches(3, 1)):
        if step == 1:
            before = [p.detach().clone() for p in params]
            state_before = {k: v.clone() for k, v in optimizer.state[poisoned].items() if torch.is_tensor(v)}
            counters_before = {k: v for k, v in optimizer.state[poisoned].items() if not torch.is_tensor(v)}
        armed_step[0] = step
        stepper.arm(step)
        model(x).square().mean().backward()
        norms.append(stepper.finish())
        if step == 1:
            assert stepper.skipped == [2]
            assert torch.equal(poisoned, before[2])
            assert all(torch.equal(v, optimizer.state[poisoned][k]) for k, v in state_before.items())
            assert counters_before == {k: v for k, v in optimizer.state[poisoned].items() if not torch.is_tensor(v)}
            assert all(not torch.equal(p, b) for i, (p, b) in enumerate(zip(params, before)) if i != 2)
    assert math.isfinite(norms[0]) and math.isnan(norms[1]) and math.isfinite(norms[2])
    assert stepper.previous_norm == norms[2]
    assert all(torch.isfinite(p).all() for p in params)


# ---------------------------------------------------------------------- the trainer


def config(corpus, tmp_path, **kwargs):
    """test_train's tiny run, with restarts, 7 steps of 2 sequences."""
    return train_config(corpus, tmp_path, **{"method": "low_rank_restarts", "batch_size": 2, "max_steps": 7,
                                             "eval_tokens": 1024, **kwargs})


RESTARTS = {"restarts.cycle_length": 3, "restarts.rewarmup_steps": 1, "training.grad_clip": 0}


@pytest.mark.parametrize("extra", [dict(grad_accum=2), dict(param_dtype="bf16", method="lowrank_sparse")],
                         ids=["restarts_accumulation", "bf16_sparse"])
def test_pretrain_layerwise_equals_the_ordinary_step(corpus, tmp_path, extra):
    ordinary = pretrain(config(corpus, tmp_path / "ordinary", overrides=RESTARTS, **extra))
    layerwise = pretrain(config(corpus, tmp_path / "layerwise", overrides=RESTARTS, layerwise_step=True, **extra))
    assert layerwise["layerwise_step"] and not ordinary["layerwise_step"]
    assert layerwise["parameter_hashes"] == ordinary["parameter_hashes"]
    assert losses(layerwise["run_dir"]) == losses(ordinary["run_dir"])


def test_pretrain_layerwise_resume_is_bit_identical_with_clipping(corpus, tmp_path):
    """The clip of the step after the resume needs the norm of the step before it: carried in the checkpoint."""
    options = dict(layerwise_step=True, save_every=4, overrides={**RESTARTS, "training.grad_clip": 0.1})
    full = pretrain(config(corpus, tmp_path / "full", **options))
    step4 = Path(full["run_dir"]) / "checkpoints" / "step_00000004"
    resumed = pretrain(config(corpus, tmp_path / "resumed", resume=str(step4), **options))
    assert resumed["parameter_hashes"] == full["parameter_hashes"]
    assert losses(resumed["run_dir"])[-3:] == losses(full["run_dir"])[-3:]
    state = torch.load(step4 / "trainer_state.pt", weights_only=True)
    assert state["layerwise"]["previous_norm"] > 0.1  # the clip was active


def test_pretrain_layerwise_refusals_are_one_line(corpus, tmp_path):
    with pytest.raises(UsageError, match="no per-parameter step"):
        pretrain(config(corpus, tmp_path, layerwise_step=True,
                        optimizer_factory=lambda model, method: torch.optim.SGD(model.parameters(), lr=0.1)))
    with pytest.raises(UsageError, match="--layerwise-step with --compile"):
        pretrain(config(corpus, tmp_path, layerwise_step=True, compile=True))
