"""Bit-identity of ProjectedAdamW and Muon against recorded results.

Each case runs an optimizer for 8 steps on fixed seeds and hashes (sha256) the bytes of every
parameter and every state tensor. ``tests/data/optim_reference.json`` holds the hashes the code
produced before ``optim/`` was split into one module per technique (issue 23); a refactor that
changes one bit of a parameter or of the state fails here. To record new hashes after an intended
change of the numbers: ``LOWRANK_RECORD_OPTIM_REFERENCE=1 python -m pytest tests/test_optim_reference.py``.

The bits depend on torch's CPU kernels (SVD, matrix products, vectorized elementwise ops), so the
file records the torch version and CPU capability it was made with, and the comparison is
skipped on another; ``step_param`` against ``step()`` is compared live, on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lowrank.optim import Muon, ProjectedAdamW

REFERENCE = Path(__file__).parent / "data" / "optim_reference.json"
STEPS = 8
# left-projected, right-projected, a vector, a 3-D tensor; (64, 128) and (128, 256) are big enough
# to quantize (>= 4096 entries, 4-bit blocks of 128 divide them).
SHAPES = [(64, 128), (128, 64), (32,), (4, 3, 5), (128, 256)]

CASES: dict[str, dict] = {
    "plain": {},
    "plain_foreach": {"foreach": True},
    "plain_weight_decay_foreach": {"weight_decay": 0.1, "foreach": True},
    "weight_decay": {"weight_decay": 0.1},
    "svd": {"projection": "svd", "rank": 8, "update_proj_gap": 3, "scale": 0.25},
    "randomized": {"projection": "randomized", "rank": 8, "update_proj_gap": 3, "scale": 0.25, "weight_decay": 0.1},
    "apollo": {"projection": "random", "rank": 8, "update_proj_gap": 3, "scale": 2.0},
    "apollo_mini": {"projection": "random", "rank": 1, "update_proj_gap": 3, "scale_type": "tensor"},
    "fira_svd": {"projection": "svd", "rank": 8, "update_proj_gap": 3, "residual": "fira", "scale": 0.25},
    "fira_randomized": {"projection": "randomized", "rank": 8, "update_proj_gap": 4, "residual": "fira"},
    "sparse": {"density": 0.25, "reset_interval": 3, "weight_decay": 0.1},
    "sparse_projected": {"density": 0.25, "projection": "svd", "rank": 8, "update_proj_gap": 3, "reset_interval": 4},
    "spam": {"spike_threshold": 50.0, "spike_skip_steps": 2, "reset_interval": 5, "reset_warmup": 3},
    "stable_spam": {"adaptive_clip": True, "norm_scaling": True, "spike_threshold": 50.0, "spike_skip_steps": 1},
    "reset_warmup": {"reset_interval": 3, "reset_warmup": 4},
    "reset_warmup_foreach": {"reset_interval": 3, "reset_warmup": 4, "foreach": True},
    "bits8": {"state_bits": 8, "state_dtype": torch.float32},
    "bits4": {"state_bits": 4, "spike_threshold": 50.0, "spike_skip_steps": 2, "reset_interval": 5},
    "bits8_projected": {"state_bits": 8, "projection": "svd", "rank": 32, "update_proj_gap": 3},
    "bits4_sparse": {"state_bits": 4, "density": 0.5},
    "bf16_fp32_state": {"state_dtype": torch.float32, "weight_decay": 0.1, "_dtype": torch.bfloat16},
    "bf16_fp32_state_foreach": {"state_dtype": torch.float32, "foreach": True, "_dtype": torch.bfloat16},
    "bf16_projected_fira": {"state_dtype": torch.float32, "projection": "svd", "rank": 8, "residual": "fira",
                            "update_proj_gap": 3, "_dtype": torch.bfloat16},
    "manual_reset": {"reset_warmup": 3, "_reset_at": 4},
    "manual_reset_sparse_bits8": {"density": 0.5, "state_bits": 8, "_reset_at": 4},
    "muon": {"_muon": True, "weight_decay": 0.1},
    "muon_bf16": {"_muon": True, "_dtype": torch.bfloat16, "state_dtype": torch.float32, "_reset_at": 5},
}


def _gradients(dtype: torch.dtype) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    steps = []
    for step in range(STEPS):
        grads = []
        for shape in SHAPES:
            g = torch.randn(shape, generator=generator)
            if step == 5:  # a spike for the clipping rules
                g.view(-1)[::7] *= 1000.0
            grads.append(g.to(dtype))
        steps.append(grads)
    return steps


def _hash(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_case(options: dict, per_param: bool = False) -> dict[str, str]:
    options = dict(options)
    dtype = options.pop("_dtype", torch.float32)
    reset_at = options.pop("_reset_at", None)
    muon = options.pop("_muon", False)
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]
    if muon:
        matrices = [p for p in params if p.dim() == 2]
        others = [p for p in params if p.dim() != 2]
        optimizer = Muon([{"params": matrices, "use_muon": True}, {"params": others, "use_muon": False}], lr=1e-2,
                         **options)
    else:
        optimizer = ProjectedAdamW(params, lr=1e-2, **options)
    for step, grads in enumerate(_gradients(dtype)):
        if reset_at is not None and step == reset_at:
            optimizer.reset_momentum(params[:2])
        for p, g in zip(params, grads):
            p.grad = g
        if per_param:  # the in-backward entry point, one parameter at a time, in reverse order
            for p in reversed(params):
                optimizer.step_param(p)
        else:
            optimizer.step()
    state = [v for p in params for _, v in sorted(optimizer.state[p].items()) if torch.is_tensor(v)]
    counters = [(k, v) for p in params for k, v in sorted(optimizer.state[p].items()) if not torch.is_tensor(v)]
    return {"params": _hash(params), "state": _hash(state), "counters": repr(counters)}


def _machine() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _recorded() -> dict:
    return json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_is_bit_identical_to_the_recorded_reference(name):
    result = run_case(CASES[name])
    if os.environ.get("LOWRANK_RECORD_OPTIM_REFERENCE"):
        recorded = _recorded()
        recorded[name] = result
        recorded["_machine"] = _machine()
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
        return
    recorded = _recorded()
    if recorded["_machine"] != _machine():
        pytest.skip(f"recorded with {recorded['_machine']}, this is {_machine()}: other kernels, other bits")
    assert result == recorded[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_param_is_step_bit_for_bit(name):
    """``step_param(p)`` for every parameter (in reverse order) gives ``step()``'s bits."""
    assert run_case(CASES[name], per_param=True) == run_case(CASES[name])


@pytest.mark.parametrize("options", [{}, {"foreach": True}, {"projection": "svd", "rank": 4, "update_proj_gap": 2},
                                     {"density": 0.5, "spike_threshold": 50.0, "spike_skip_steps": 1}])
def test_step_in_backward_hook_matches_step(options):
    """An optimizer step inside backward (post-accumulate-grad hooks calling step_param) gives
    the same weights as backward, then step()."""

    def train(in_backward: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
        optimizer = ProjectedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **options)

        def step_now(p: torch.Tensor) -> None:
            optimizer.step_param(p)
            p.grad = None

        if in_backward:
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(step_now)
        data = torch.randn(6, 32, 16, generator=torch.Generator().manual_seed(1))
        for x in data:
            model(x).square().mean().backward()
            if not in_backward:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    for hooked, plain in zip(train(True), train(False)):
        assert torch.equal(hooked, plain)
