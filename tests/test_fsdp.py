"""FSDP2 (torch.distributed.fsdp.fully_shard) for low-rank models and ProjectedAdamW, and DCP
checkpoints, on 2 CPU ranks over gloo (tests/dist/fsdp_worker.py, one spawn for the whole file).

Every case of tests/dist/fsdp_cases.py trains the same global batches on one process and on two
FSDP2 ranks; losses and final parameters agree to float tolerance (the ranks sum gradients and
projections in another order), layer events are bit-identical to the one-process event computed
from the same whole factors, replicated optimizer state is bit-identical across ranks, and
checkpoints written by DCP resume on 2 ranks bit-identically and on 1 rank within tolerance.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "dist"))

import fsdp_cases as cases  # noqa: E402

from lowrank.distributed.dcp import (  # noqa: E402
    SafeFileSystemReader,
    dcp_to_state_dict,
    export_model_weights,
    is_sharded_checkpoint,
)
from lowrank.distributed.fsdp import decoder_layers, fsdp_memory_per_rank  # noqa: E402
from lowrank.optim.layout import shard_range, state_layout  # noqa: E402

# Float tolerance between one process and two ranks: the ranks reduce gradients (and left
# projections) in another order, ~1e-7 relative per step, amplified a little by Adam.
ATOL = 2e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    references = {name: cases.run_case(case) for name, case in cases.CASES.items()}
    one = cases.dcp_run(cases.DCP_CASE, range(cases.DCP_STEPS), save=out / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "tests" / "dist" / "fsdp_worker.py"), str(out), one["checkpoint"]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-6000:]
    sharded = torch.load(out / "fsdp.pt", weights_only=True)
    return {"references": references, "sharded": sharded, "one": one, "out": out}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def align_factor_signs(reference: dict, other: dict) -> dict:
    """``other`` with the sign of each refactorized direction matched to ``reference``.

    A balanced refactorization comes from an SVD, whose singular vectors are defined up to sign:
    two runs whose factors differ by float rounding may get ``(u_i, v_i)`` and ``(−u_i, −v_i)``
    (the same product and the same layer function; training stays mirrored, since Adam is
    elementwise). Row ``i`` of ``A`` and column ``i`` of ``B`` are flipped together where they
    point the other way.
    """
    aligned = dict(other)
    for name in reference:
        if not name.endswith(".A") or name[:-2] + ".B" not in reference:
            continue
        flip = torch.where((reference[name] * other[name]).sum(dim=1) < 0, -1.0, 1.0)
        aligned[name] = other[name] * flip[:, None]
        aligned[name[:-2] + ".B"] = other[name[:-2] + ".B"] * flip[None, :]
    return aligned


@pytest.mark.parametrize("name", list(cases.CASES))
def test_fsdp_matches_one_process(runs, name):
    reference, sharded = runs["references"][name], runs["sharded"][name]
    assert sharded["losses"] == pytest.approx(reference["losses"], abs=ATOL)
    assert max_difference(align_factor_signs(reference["parameters"], sharded["parameters"]), reference["parameters"]) < ATOL
    assert all(sharded["replicated_agree"]) and len(sharded["replicated_agree"]) == cases.STEPS
    case = cases.CASES[name]
    if case.event != "none":  # every layer's event fired, bit-identical to the one-process event
        assert [e["step"] for e in sharded["events"]] == [cases.CYCLE] * len(sharded["events"]) and sharded["events"]
        assert {e["event"] for e in sharded["events"]} == {case.event}
        assert all(e["identical"] for e in sharded["events"]), [e for e in sharded["events"] if not e["identical"]]
    assert sharded["events"] == [] or case.event != "none"


def test_mixed_precision_trains_and_merges(runs):
    """bf16 parameters for compute, fp32 gradient reduction: the losses follow fp32 to bf16
    rounding, and the merge event is still computed once from the (fp32) sharded factors."""
    reference, sharded = runs["references"]["relora"], runs["sharded"]["relora_bf16"]
    assert sharded["losses"] == pytest.approx(reference["losses"], abs=2e-2)
    assert sharded["events"] and all(e["identical"] for e in sharded["events"])
    assert all(v.dtype == torch.float32 for k, v in sharded["parameters"].items() if v.is_floating_point())


def test_activation_checkpointing_keeps_the_sharded_run(runs):
    """FSDP2 with every decoder layer recomputed in backward (FSDP2's all-gather hooks stay
    outside the checkpoint) = FSDP2 without: bit-identical, as the same kernels run in the same
    order (tests/test_checkpointing.py)."""
    plain, recomputed = runs["sharded"]["low_rank_refactorize"], runs["sharded"]["low_rank_checkpointed"]
    assert recomputed["mlp_runs"] == 2 * plain["mlp_runs"] == 2 * 2 * cases.STEPS  # 2 layers, run twice per step
    assert recomputed["losses"] == plain["losses"]
    assert all(torch.equal(recomputed["parameters"][k], v) for k, v in plain["parameters"].items())


def test_stable_spam_statistics_are_global(runs):
    reference, sharded = runs["references"]["stable_spam"]["statistics"], runs["sharded"]["stable_spam"]["statistics"]
    assert reference.keys() == sharded.keys() and len(reference) > 10
    for name, stats in reference.items():
        assert stats.keys() == {"max_abs_avg", "norm_avg", "norm_sq_avg"}
        for key, value in stats.items():
            torch.testing.assert_close(sharded[name][key], value, rtol=1e-5, atol=0, msg=f"{name} {key}")


def test_sparse_subsets_concatenate_to_the_one_process_subset(runs, tmp_path):
    reference = runs["references"]["sparse_momentum"]["subsets"]
    assert reference and runs["sharded"]["sparse_momentum"]["subsets"].keys() == reference.keys()
    for name, indices in reference.items():  # world size 2: the two slices, in rank order
        assert torch.equal(runs["sharded"]["sparse_momentum"]["subsets"][name], indices), name
    # world size 1 under FSDP2 (a one-rank process group in this process)
    from torch.distributed.device_mesh import init_device_mesh

    from lowrank.distributed.fsdp import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        single = cases.run_case(cases.CASES["sparse_momentum"], lambda model: shard_model(model, mesh=mesh, mixed_precision=False))
    finally:
        dist.destroy_process_group()
    assert single["subsets"].keys() == reference.keys()
    assert all(torch.equal(single["subsets"][name], indices) for name, indices in reference.items())
    reference_parameters = runs["references"]["sparse_momentum"]["parameters"]
    assert max_difference(align_factor_signs(reference_parameters, single["parameters"]), reference_parameters) < ATOL


def test_dcp_resume_on_two_ranks_is_bit_identical(runs):
    dcp = runs["sharded"]["dcp"]
    uninterrupted, resumed = dcp["uninterrupted"], dcp["resumed_2_from_2"]
    assert resumed["losses"] == uninterrupted["losses"][cases.DCP_SAVE_AT:]
    assert all(torch.equal(resumed["parameters"][k], v) for k, v in uninterrupted["parameters"].items())
    # and the sharded run agrees with one process
    assert uninterrupted["losses"] == pytest.approx(runs["one"]["losses"], abs=ATOL)
    assert max_difference(uninterrupted["parameters"], runs["one"]["parameters"]) < ATOL


def test_dcp_reshards_between_one_and_two_ranks(runs):
    dcp = runs["sharded"]["dcp"]
    # 2 ranks → 1 rank: a plain model and optimizer, no process group
    checkpoint = dcp["uninterrupted"]["checkpoint"]
    resumed_1 = cases.dcp_run(cases.DCP_CASE, range(cases.DCP_SAVE_AT, cases.DCP_STEPS), resume=checkpoint)
    assert resumed_1["losses"] == pytest.approx(dcp["uninterrupted"]["losses"][cases.DCP_SAVE_AT:], abs=ATOL)
    assert max_difference(resumed_1["parameters"], dcp["uninterrupted"]["parameters"]) < ATOL
    # 1 rank → 2 ranks
    one = runs["one"]
    assert dcp["resumed_2_from_1"]["losses"] == pytest.approx(one["losses"][cases.DCP_SAVE_AT:], abs=ATOL)
    assert max_difference(dcp["resumed_2_from_1"]["parameters"], one["parameters"]) < ATOL


def test_dcp_checkpoint_layout_conversion_and_weights_only(runs):
    checkpoint = Path(runs["sharded"]["dcp"]["uninterrupted"]["checkpoint"])
    root = checkpoint.parent
    assert checkpoint.name == f"step_{cases.DCP_SAVE_AT:08d}" and (root / "latest").read_text().strip() == checkpoint.name
    assert is_sharded_checkpoint(checkpoint) and not list(root.glob(".tmp-*"))
    assert sorted(p.name for p in (checkpoint / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for name in ("optimizer_meta.pt", "trainer_state.pt"):
        torch.load(checkpoint / name, weights_only=True)
    # the whole model, from the files alone, equals the sharded model at the save
    saved = runs["sharded"]["dcp"]["uninterrupted"]["saved"]
    full = dcp_to_state_dict(checkpoint)
    assert set(saved) <= set(full)
    assert all(torch.equal(full[name], saved[name]) for name in saved)
    weights = load_file(export_model_weights(checkpoint))
    assert weights.keys() == full.keys() and all(torch.equal(weights[k], full[k]) for k in full)
    # the metadata is read by a restricted unpickler: a pickle that calls a function is refused
    evil = checkpoint.parent / "evil"
    (evil / "dcp").mkdir(parents=True)
    (evil / "dcp" / ".metadata").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        SafeFileSystemReader(evil / "dcp").read_metadata()


def test_layout_shard_view_and_memory_per_rank():
    case = cases.CASES["galore"]
    model = cases.build_model(cases.Case(lowrank={"rank": 8, "sparse_density": 0.05}))
    optimizer = cases.build_optimizer(model, cases.Case(lowrank={"rank": 8}, factors={"density": 0.25}))
    for group in optimizer.param_groups:
        for p in group["params"]:
            whole = state_layout(tuple(p.shape), p.dtype, group)
            parts = [state_layout(tuple(p.shape), p.dtype, group, shard=(r, 2)) for r in range(2)]
            for key, spec in whole.moments.items():  # the ranks' parts add up to the whole
                assert sum(part.moments[key].numel() for part in parts) == pytest.approx(spec.numel(), abs=1)
    galore = cases.build_model(case)
    galore_optimizer = cases.build_optimizer(galore, case)
    for group in galore_optimizer.param_groups:
        for p in group["params"]:
            if p.dim() == 2 and group["projection"]:
                local = state_layout(tuple(p.shape), p.dtype, group, shard=(0, 2)).moments["exp_avg"].shape
                r = min(group["rank"], min(p.shape))
                # left (m < n): R = PᵀG replicated; right: R's rows follow G's
                assert local == ((r, p.shape[1]) if p.shape[0] < p.shape[1] else (shard_range(p.shape[0], 0, 2)[1], r))
    memory = [fsdp_memory_per_rank(model, optimizer, world_size=2, rank=r) for r in range(2)]
    alone = fsdp_memory_per_rank(model, optimizer, world_size=1)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert sum(m.weights for m in memory) == alone.weights + buffers  # buffers are not sharded
    assert sum(m.gradients for m in memory) == alone.gradients
    assert abs(sum(m.optimizer_state for m in memory) - alone.optimizer_state) <= 64
    layer = max(sum(p.numel() for p in block.parameters()) for block in decoder_layers(model))
    assert memory[0].gathered_layer == layer * 4 and memory[0].total > memory[0].weights
    assert fsdp_memory_per_rank(model, optimizer, world_size=2, mixed_precision=True).gathered_layer == layer * 2
