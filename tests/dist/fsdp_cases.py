"""The training cases of tests/test_fsdp.py, runnable on one process or on FSDP2 ranks.

Every case trains the tiny LLaMA of tests/tiny_models.py for a few steps on the same global
batches (each rank takes its slice of the batch), with ProjectedAdamW and a RestartController;
the one-process run and the FSDP2 run must agree. Used by the test itself (the one-process
references, the one-rank resume) and by tests/dist/fsdp_worker.py (the ranks).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: tiny_models

import tiny_models  # noqa: E402

from lowrank.layers import LowRankLinear  # noqa: E402
from lowrank.optim import ProjectedAdamW  # noqa: E402
from lowrank.optim.shard import sparse_rows  # noqa: E402
from lowrank.restarts import RestartController  # noqa: E402
from lowrank.wrap import LowRankConfig, lowrank_layers, wrap  # noqa: E402

GLOBAL_BATCH, SEQ_LEN, STEPS, CYCLE = 4, 16, 6, 3
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Case:
    """A model (dense, or wrapped with ``lowrank``), its optimizer groups and its restarts."""

    lowrank: dict | None = None  # LowRankConfig keywords; None: a dense model
    groups: tuple[tuple[tuple[str, ...], dict], ...] = ()  # (module-name suffixes, options): dense target groups
    factors: dict = field(default_factory=dict)  # options of the low-rank factors' group
    other: dict = field(default_factory=dict)  # options of every other parameter
    event: str = "none"
    reset: str = "none"
    cycle: int | None = CYCLE
    lr: float = 3e-3
    weight_decay: float = 0.0
    checkpointing: bool = False  # every decoder layer recomputed in backward (lowrank.checkpointing)


CASES = {
    "dense_adamw": Case(other={"foreach": True}, weight_decay=0.1, cycle=None),
    "low_rank_refactorize": Case(lowrank={"rank": 8, "sparse_density": 0.05}, event="refactorize", reset="changed"),
    "galore": Case(groups=((ATTENTION + MLP, {"projection": "svd", "rank": 4, "update_proj_gap": CYCLE, "scale": 0.25}),)),
    "fira": Case(groups=((ATTENTION + MLP, {"projection": "randomized", "rank": 4, "update_proj_gap": CYCLE,
                                             "residual": "fira", "scale": 0.25}),)),
    "apollo_mini": Case(groups=((ATTENTION + MLP, {"projection": "random", "rank": 4, "update_proj_gap": CYCLE,
                                                    "scale_type": "tensor"}),)),
    "sparse_momentum": Case(lowrank={"rank": 8}, factors={"density": 0.25, "spike_threshold": 5000.0, "spike_skip_steps": 1},
                            event="refactorize", reset="changed"),
    "relora": Case(lowrank={"rank": 8, "keep_base": True}, event="merge", reset="changed"),
    "stable_spam": Case(other={"adaptive_clip": True, "norm_scaling": True}, cycle=None),
    # low_rank_refactorize with its layers recomputed in backward
    "low_rank_checkpointed": Case(lowrank={"rank": 8, "sparse_density": 0.05}, event="refactorize", reset="changed",
                                  checkpointing=True),
}

# Sparse momentum on both sides of the projection, sparse and dense moments: every way the
# optimizer state is laid out under FSDP2. Checkpointed after DCP_SAVE_AT steps, inside the
# second sparse period (so the ranks' slices differ from a fresh optimizer's) and between two
# projector refreshes.
DCP_CASE = Case(groups=((ATTENTION, {"projection": "svd", "rank": 4, "update_proj_gap": 2, "density": 0.5}),
                        (MLP, {"density": 0.25, "reset_interval": 2, "norm_scaling": True})), cycle=None)
DCP_STEPS, DCP_SAVE_AT = 5, 3


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def build_model(case: Case) -> torch.nn.Module:
    model = tiny_models.build("llama", seed=0)
    if case.lowrank is not None:
        wrap(model, LowRankConfig(**case.lowrank))
    if case.checkpointing:
        from lowrank.checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model.train())  # transformers recomputes only in training mode
    # MLP runs, counted: a recomputed layer runs twice per step (a pre-hook: the recomputation
    # stops inside the MLP, at its last saved tensor)
    model.mlp_runs = [0]
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: model.mlp_runs.__setitem__(0, model.mlp_runs[0] + 1))
    return model


def build_optimizer(model: torch.nn.Module, case: Case) -> ProjectedAdamW:
    """Parameter groups in a fixed order (the seeds depend on it), the same with and without FSDP2."""
    taken: set[int] = set()
    groups = []
    if case.lowrank is not None:
        factors = [p for layer in lowrank_layers(model).values() for p in (layer.A, layer.B) if p.requires_grad]
        groups.append({"params": factors, **case.factors})
        taken |= {id(p) for p in factors}
    for suffixes, options in case.groups:
        params = [m.weight for name, m in model.named_modules() if name.endswith(suffixes) and hasattr(m, "weight")]
        groups.append({"params": params, **options})
        taken |= {id(p) for p in params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups.append({"params": rest, **case.other})
    return ProjectedAdamW(groups, lr=case.lr, weight_decay=case.weight_decay, seed=7)


def build_controller(model, optimizer, case: Case, total: int) -> RestartController:
    return RestartController(model, optimizer, total_steps=total, cycle_length=case.cycle, event=case.event,
                             reset=case.reset, warmup_steps=1)


def batch(step: int) -> torch.Tensor:
    """This rank's slice of the global batch of optimizer step ``step``."""
    rank, size = world()
    ids = tiny_models.tokens(GLOBAL_BATCH, SEQ_LEN, seed=1000 + step)
    per_rank = GLOBAL_BATCH // size
    return ids[rank * per_rank : (rank + 1) * per_rank]


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered when it is a DTensor), detached, on the CPU."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {name: whole(p) for name, p in model.named_parameters()}
    state.update({name: whole(b) for name, b in model.named_buffers() if "num_merges" in name})
    return state


def replicated_state_hash(optimizer: ProjectedAdamW) -> str:
    """sha256 of every plain (replicated) optimizer state tensor: projectors, left-projected
    moments, scalars, all equal on every rank (not the ranks' slices of sparse moments)."""
    digest = hashlib.sha256()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                if not torch.is_tensor(value) or isinstance(value, DTensor):
                    continue
                if key.startswith("exp_avg") and sparse_rows(p.shape, group):
                    continue  # this rank's slice of the subset
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plain_reference_event(layer: LowRankLinear, before: dict[str, torch.Tensor], event: str) -> dict[str, torch.Tensor]:
    """What one process computes from the same whole factors: a plain copy of ``layer`` with
    ``before`` loaded, then its own refactorize() / merge()."""
    plain = LowRankLinear(layer.in_features, layer.out_features, layer.rank, alpha=layer.alpha, bias=layer.bias is not None,
                          keep_base=layer.base_weight is not None, seed=layer.seed)
    with torch.no_grad():
        for name, value in before.items():
            getattr(plain, name).copy_(value)
    if event == "merge":
        plain.merge()
    else:
        plain.refactorize()
    return {name: getattr(plain, name).detach().clone() for name in before}


def layer_tensors(layer: LowRankLinear) -> dict[str, torch.Tensor]:
    names = ["A", "B"] + (["base_weight", "num_merges"] if layer.base_weight is not None else [])
    return {name: whole(getattr(layer, name)) for name in names}


def train(model, optimizer, controller, steps: range, *, check_events: bool = False) -> dict:
    """Train ``steps`` (global step numbers); return the global losses and, with
    ``check_events``, for every layer event whether the result equals the one-process event
    computed from the same whole factors, and whether replicated state agrees across ranks."""
    rank, size = world()
    losses, events, agreement = [], [], []
    kinds = {}
    for step in steps:
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        due = check_events and controller.is_restart_step(controller.num_steps + 1) and controller.event != "none"
        before = {}
        if due:
            for name, layer in lowrank_layers(model).items():
                kinds[name] = "merge" if layer.base_weight is not None and controller.event in ("merge", "auto") else "refactorize"
                before[name] = layer_tensors(layer)
        controller.step()
        for name, layer in lowrank_layers(model).items() if due else ():
            after = layer_tensors(layer)
            expected = plain_reference_event(layer, before[name], kinds[name])
            events.append({"step": step + 1, "layer": name, "event": kinds[name],
                           "identical": all(torch.equal(after[k], expected[k]) for k in expected)})
        total = loss.detach().clone()
        if size > 1:
            dist.all_reduce(total)
            hashes = [None] * size
            dist.all_gather_object(hashes, replicated_state_hash(optimizer))
            agreement.append(len(set(hashes)) == 1)
        losses.append(float(total) / size)
    return {"losses": losses, "events": events, "replicated_agree": agreement}


def run_case(case: Case, shard=None) -> dict:
    """A whole case: ``shard(model)`` (FSDP2) or a plain model; the losses, event checks, final
    whole parameters and the Stable-SPAM statistics."""
    model = build_model(case)
    if shard is not None:
        shard(model)
    optimizer = build_optimizer(model, case)
    controller = build_controller(model, optimizer, case, STEPS)
    result = train(model, optimizer, controller, range(STEPS), check_events=True)
    result["mlp_runs"] = model.mlp_runs[0]
    result["parameters"] = full_parameters(model)
    result["subsets"] = subsets(model, optimizer)
    names = {id(p): name for name, p in model.named_parameters()}
    result["statistics"] = {names[id(p)]: {key: whole(value) for key, value in state.items()
                                            if key in ("max_abs_avg", "norm_avg", "norm_sq_avg")}
                            for p, state in optimizer.state.items() if "norm_avg" in state or "max_abs_avg" in state}
    return result


def subsets(model: torch.nn.Module, optimizer: ProjectedAdamW) -> dict[str, torch.Tensor]:
    """Each sparse-momentum parameter's current subset: the ranks' slices, concatenated in rank order."""
    rank, size = world()
    found = {}
    for name, p in model.named_parameters():
        if p not in optimizer.state:
            continue
        indices = optimizer.subset_indices(p)
        if indices is None:
            continue
        parts = [indices.cpu()]
        if size > 1 and sparse_rows(p.shape, optimizer._group_of(p)):  # else replicated: rank 0's is all
            parts = [None] * size
            dist.all_gather_object(parts, indices.cpu())
        found[name] = torch.cat(parts)
    return found


def dcp_run(case: Case, steps: range, *, shard=None, resume=None, save=None) -> dict:
    """Train ``steps`` of the DCP case; ``resume``: load a sharded checkpoint first; ``save``: a
    ``checkpoints`` folder to save into after step DCP_SAVE_AT. Returns the losses, the whole
    parameters at the end (and at the save)."""
    from lowrank.distributed.dcp import load_sharded_checkpoint, save_sharded_checkpoint

    model = build_model(case)
    if shard is not None:
        shard(model)
    optimizer = build_optimizer(model, case)
    controller = build_controller(model, optimizer, case, DCP_STEPS)
    if resume is not None:
        extra = load_sharded_checkpoint(resume, model, optimizer)
        controller.load_state_dict(extra["controller"])
        assert extra["step"] == steps.start, (extra, steps)
    result = {"losses": [], "saved": None}
    for step in steps:
        result["losses"] += train(model, optimizer, controller, range(step, step + 1))["losses"]
        if save is not None and step + 1 == DCP_SAVE_AT:
            result["checkpoint"] = str(save_sharded_checkpoint(save, model, optimizer, {"step": DCP_SAVE_AT,
                                                               "controller": controller.state_dict()}))
            result["saved"] = full_parameters(model)
    result["parameters"] = full_parameters(model)
    return result
