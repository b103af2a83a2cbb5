"""lowrank.optim.working_set: the bytes one optimizer step allocates, stated per term, equal the
allocator's own events (the torch profiler's memory records) for every optimizer mode; and the
memory estimate's total, which adds the largest of them to the model state, equals the measured
peak of a step whose activations are negligible."""

import gc

import pytest
import torch
import torch.autograd.profiler as profiler

from lowrank.accounting import profiled_allocation_rises
from lowrank.memory import estimate, measure_method
from lowrank.optim import Muon, ProjectedAdamW
from lowrank.optim.working_set import BLAS_PACKING_BYTES, bf16_step_bytes, muon_step_bytes, projected_adamw_step_bytes, torch_adamw_foreach_bytes
from lowrank.precision import step_from_bf16
from test_optim_reference import CASES

# The measured rise also holds the step's scalars and index lists: a few KiB.
SLACK = 64 * 1024
# Both orientations of a matrix (left / right projection) and one with more entries than the block
# codec's piece (2**22), whose temporaries are then bounded by the piece.
SHAPES = [(256, 2048), (2048, 256), (2304, 2048)]
ADAMW_CASES = sorted(name for name, case in CASES.items()
                     if not case.get("_muon") and "_reset_at" not in case and not case.get("foreach"))


def _measured_step(p: torch.Tensor, step) -> int:
    """Bytes allocated at the peak of ``step()`` beyond what was live before it, at the fourth step:
    the state exists and the cases' events fall there (a projector refresh with
    ``update_proj_gap=3``, a new sparse subset with ``reset_interval=3``)."""
    def annotated():
        with profiler.record_function("Optimizer.step#test.step"):
            step()
    for _ in range(3):
        annotated()
    gc.collect()
    _, rises = profiled_allocation_rises(annotated)
    return rises[0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ADAMW_CASES)
def test_projected_adamw_step_allocates_the_stated_bytes(name, shape):
    case = CASES[name]
    dtype = case.get("_dtype", torch.float32)
    options = {key: value for key, value in case.items() if not key.startswith("_")}
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    p.grad = torch.randn(shape).to(dtype)
    optimizer = ProjectedAdamW([p], lr=1e-3, **options)
    if dtype == torch.float32:
        step = lambda: optimizer.step_param(p)  # noqa: E731
    else:  # bf16 storage: updated in fp32 and rounded back, as the trainer does
        step = lambda: step_from_bf16(optimizer.step_param, p, "stochastic", None)  # noqa: E731
    measured = _measured_step(p, step)
    during, rounding = bf16_step_bytes(p.numel(), dtype, "stochastic")
    stated = max(projected_adamw_step_bytes(shape, optimizer.param_groups[0], step_dtype=torch.float32) + during, rounding)
    assert stated - SLACK <= measured <= stated + SLACK, f"measured {measured} bytes, stated {stated}"


@pytest.mark.parametrize("shape", [(256, 2048), (1024, 1024), (2048, 1024)], ids=lambda s: "x".join(map(str, s)))
def test_muon_step_allocates_at_most_the_stated_bytes(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    optimizer = Muon([{"params": [p], "use_muon": True}], lr=1e-3)
    measured = _measured_step(p, lambda: optimizer.step_param(p))
    stated = muon_step_bytes(shape)
    # the BLAS's packing workspace is stated as an upper bound: another BLAS may pack less or not at all
    packing = BLAS_PACKING_BYTES * min(shape) ** 2 // 4
    assert stated - packing - SLACK <= measured <= stated + SLACK, f"measured {measured} bytes, stated {stated}"


def test_torch_foreach_adamw_allocates_a_group_of_denominators():
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(1024, 512), (512,), (2048, 256)]]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, foreach=True)
    measured = _measured_step(params[0], optimizer.step)
    assert abs(measured - torch_adamw_foreach_bytes([params])) <= SLACK


@pytest.mark.parametrize("method", ["full_rank", "low_rank", "galore", "lowrank_sparse_8bit", "muon"])
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("tokens,checkpointing", [((1, 4), False), ((8, 64), False), ((8, 64), True)],
                         ids=["step-sets-the-peak", "activations-set-it", "checkpointed-activations-set-it"])
def test_estimated_total_is_the_measured_peak(method, weight_dtype, layerwise, tokens, checkpointing):
    # 1 × 4 tokens: the activations are a few KiB, so the peak is the model state plus the step's
    # working set; 8 × 64 tokens: the tiny model's logits (vocabulary 4096) make the start of
    # backward the peak, before any gradient but the head's exists.
    batch_size, seq_len = tokens
    options = dict(rank=8, weight_dtype=weight_dtype, batch_size=batch_size, seq_len=seq_len, layerwise=layerwise,
                   checkpointing=checkpointing)
    estimated = estimate("tiny", method, compute_dtype="float32", **options)
    measured = measure_method("tiny", method, steps=2, **options)
    step_sets_it = estimated.step_working_set > estimated.activations
    assert step_sets_it == (batch_size == 1)
    # within the activation formula's accuracy (tests/test_memory.py: 2 % of the saved tensors)
    assert measured.peak == pytest.approx(estimated.total, rel=0.02), (measured.peak, estimated.total)
