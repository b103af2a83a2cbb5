"""FSDP2 for wrapped models: sharding, layer events on sharded factors, and per-rank memory.

FSDP2 is PyTorch's ``torch.distributed.fsdp.fully_shard``: each parameter becomes a ``DTensor``
sharded on dim 0 over a 1-D device mesh (torch.chunk's split: ``ceil(rows / world)`` rows per
rank, :func:`lowrank.optim.layout.shard_range`); a module's parameters are all-gathered before
its forward and backward and freed after, and gradients are reduce-scattered. Buffers are not
sharded: every rank holds all of them (SLTrain's ``sparse_indices``, ``num_merges``, the rotary
tables). Nothing here re-implements FSDP; this module only decides what to shard and makes the
low-rank pieces work on shards:

* :func:`shard_model` — ``fully_shard`` on every decoder layer, then on the root (so the root
  unit holds the embeddings, the final norm and the head). Decoder layers are found generically:
  the modules whose class is named in the model's ``_no_split_modules`` (the Hugging Face list of
  blocks that must not be split: ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``GPT2Block``),
  else the children of the model's largest ``nn.ModuleList``.
  ``LowRankLinear`` trains under it in every mode: ``A``, ``B``, a frozen ``base_weight`` and the
  1-D ``sparse_values`` are sharded like any parameter (the frozen base gets no gradient and no
  reduce-scatter); the layer's forward runs on the gathered (whole) tensors, so SLTrain's
  ``SparseLinearFunction`` sees the whole ``sparse_values`` and the whole ``sparse_indices``
  buffer, and its gradient for ``sparse_values`` is reduce-scattered like the others.
* :func:`sharded_layer_events` — refactorization and ReLoRA merge on sharded factors (below);
  :class:`lowrank.restarts.RestartController` calls it when a layer's factors are DTensors.
* :func:`fsdp_memory_per_rank` — per-rank bytes under FSDP2 for the memory estimator.

The optimizer side (``ProjectedAdamW`` on DTensor parameters) is in :mod:`lowrank.optim.adamw`;
checkpoints (DCP) in :mod:`lowrank.distributed.dcp`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..layers import LowRankLinear
from ..linalg import balanced_factors, kaiming_uniform_, work_dtype
from ..optim import Muon, ProjectedAdamW
from ..optim.layout import local_numel, shard_range, state_layout, torch_adamw_state_layout
from ..seeding import STREAM_MERGE, cpu_generator
from ..wrap import unwrap_model

__all__ = [
    "decoder_layers",
    "shard_model",
    "is_sharded",
    "sharded_layer_event",
    "sharded_layer_events",
    "ShardedMemory",
    "fsdp_memory_per_rank",
    "local_numel",
    "LAYER_EVENTS",
]

LAYER_EVENTS = ("refactorize", "merge")


# ---------------------------------------------------------------------- sharding


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks :func:`shard_model` shards one by one, in module order.

    The modules whose class name is in ``model._no_split_modules`` (Hugging Face's list of
    blocks not to split across devices, e.g. ``model.model.layers[i]`` for LLaMA and Qwen2,
    ``model.transformer.h[i]`` for GPT-2); for a model without that list, the children of its
    largest ``nn.ModuleList``; else none (only the root is sharded).
    """
    model = unwrap_model(model)
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names and module is not model]
    if layers:
        return layers
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(
    model: nn.Module, *, mesh: DeviceMesh | None = None, mixed_precision: bool, reshard_after_forward: bool | None = None
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it.

    ``fully_shard`` on every decoder layer (:func:`decoder_layers`), then on the root. Call it
    after wrapping (``lowrank.wrap`` / ``apply_method``), with the model on its device, before
    building the optimizer (FSDP2 replaces the parameters by DTensor parameters), on every rank
    with the same model.

    Args:
        mesh: a 1-D device mesh; default: all ranks of the default process group on the model's
            device type (``init_device_mesh``).
        mixed_precision: bf16 parameters for compute with fp32 gradient reduction
            (``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``; the
            sharded parameters, gradients and optimizer state stay fp32), for accelerators;
            ``False``: everything in the parameters' dtype (fp32 on the CPU).
        reshard_after_forward: FSDP2's option for the decoder layers (``None``: its default,
            ``True``; the root keeps its parameters between forward and backward).
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError("shard_model: pass the bare model, not a DDP/DataParallel wrapper (FSDP2 replaces DDP)")
    if mesh is None:
        if not dist.is_initialized():
            raise ValueError("shard_model needs a process group (torch.distributed.init_process_group, or torchrun) or a mesh")
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_model supports a 1-D device mesh (FSDP), got {mesh.ndim}-D (HSDP is not supported)")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    options = {} if reshard_after_forward is None else {"reshard_after_forward": reshard_after_forward}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, **options)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(layer: nn.Module) -> bool:
    """Whether ``layer``'s parameters are FSDP2 shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in layer.parameters(recurse=False))


# ---------------------------------------------------------------------- layer events


@torch.no_grad()
def sharded_layer_events(items: Sequence[tuple[LowRankLinear, str]]) -> list[torch.Tensor | float]:
    """Refactorize or merge FSDP2-sharded ``LowRankLinear`` layers; every rank must call it with
    the same ``(layer, event)`` list (``event`` in :data:`LAYER_EVENTS`).

    Both events need the whole factors. Layers are taken ``world`` at a time; layer ``i`` of the
    list has owner rank ``i mod world`` (round-robin). For each batch every rank all-gathers the
    batch's ``A`` and ``B`` (``DTensor.full_tensor()``: ``(m + n)·r`` entries per layer), each
    owner computes its layer's event with the one-process math, all owners at once, and
    broadcasts the result; every rank then writes its rows back into its shards. So all ranks
    end bit-identical to what one process computes from the same whole factors:

    * ``refactorize`` (Glentis et al. 2025, arXiv 2505.22922; :func:`lowrank.linalg.balanced_factors`,
      as :meth:`LowRankLinear.refactorize`): broadcast ``B'`` (``m × r``), ``A'`` (``r × n``)
      and ``σ`` (``r``); returns ``σ``.
    * ``merge`` (ReLoRA, Lialin et al. 2023, arXiv 2307.05695, as :meth:`LowRankLinear.merge`):
      the owner computes ``s·BA`` in the work dtype and broadcasts it (``m × n``); every rank adds
      its rows to its shard of ``W0`` (elementwise, so bit-identical to the one-process sum; the
      base itself is never gathered), increments ``num_merges``, draws the new ``A`` from
      ``(seed, merge count)`` (a CPU draw, the same on every rank) and keeps its rows, and zeroes
      its rows of ``B``; returns ``‖s·BA‖``.

    Communication per event: one all-gather of the factors and one broadcast of the result per
    layer; a merge's broadcast is ``m × n`` (the size of the layer's base), a refactorization's
    ``(m + n)·r + r``.
    """
    results: list[torch.Tensor | float] = []
    if not items:
        return results
    for layer, event in items:
        if event not in LAYER_EVENTS:
            raise ValueError(f"event must be one of {', '.join(LAYER_EVENTS)}, got {event!r}")
        if not isinstance(layer.A, DTensor) or not isinstance(layer.B, DTensor):
            raise ValueError("sharded_layer_events needs layers sharded with FSDP2 (shard_model); call layer.refactorize() / "
                             "layer.merge() on a plain layer")
        if event == "merge" and layer.base_weight is None:
            raise ValueError("merge needs a frozen base: build the layers with keep_base=True (LowRankConfig(keep_base=True))")
    mesh = items[0][0].A.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    for start in range(0, len(items), world):
        batch = items[start : start + world]
        # Collectives first (every rank, in order), then each owner computes: all at once.
        factors = [(layer.B.full_tensor(), layer.A.full_tensor()) for layer, _ in batch]
        outcomes = [_compute_event(layer, event, *factors[owner]) if owner == rank else None
                    for owner, (layer, event) in enumerate(batch)]
        del factors
        for owner, ((layer, event), outcome) in enumerate(zip(batch, outcomes)):
            outcome = outcome if outcome is not None else _empty_outcome(layer, event)
            for tensor in outcome:
                dist.broadcast(tensor, group=mesh.get_group(), group_src=owner)
            results.append(_write_event(layer, event, outcome))
    return results


def sharded_layer_event(layer: LowRankLinear, event: str) -> torch.Tensor | float:
    """One layer's event (:func:`sharded_layer_events` with one item; owner rank 0)."""
    return sharded_layer_events([(layer, event)])[0]


def _compute_event(layer: LowRankLinear, event: str, B: torch.Tensor, A: torch.Tensor) -> list[torch.Tensor]:
    """The owner's share: the one-process math on the whole factors."""
    if event == "refactorize":
        new_B, new_A, sigma = balanced_factors(B, A)
        return [new_B.contiguous(), new_A.contiguous(), sigma.contiguous()]
    work = work_dtype(A.dtype)
    return [(layer.scale * (B.to(work) @ A.to(work))).contiguous()]


def _empty_outcome(layer: LowRankLinear, event: str) -> list[torch.Tensor]:
    """Receive buffers shaped like :func:`_compute_event`'s result."""
    device = layer.A.to_local().device
    if event == "refactorize":
        return [torch.empty(tuple(layer.B.shape), dtype=layer.B.dtype, device=device),
                torch.empty(tuple(layer.A.shape), dtype=layer.A.dtype, device=device),
                torch.empty(layer.rank, dtype=torch.float32, device=device)]
    return [torch.empty(layer.out_features, layer.in_features, dtype=work_dtype(layer.A.dtype), device=device)]


def _write_rows(param: DTensor, whole: torch.Tensor) -> None:
    """Copy this rank's rows of ``whole`` into ``param``'s local shard."""
    mesh = param.device_mesh
    start, rows = shard_range(param.shape[0], mesh.get_local_rank(), mesh.size())
    param.to_local().copy_(whole[start : start + rows])


def _write_event(layer: LowRankLinear, event: str, outcome: list[torch.Tensor]) -> torch.Tensor | float:
    if event == "refactorize":
        new_B, new_A, sigma = outcome
        _write_rows(layer.B, new_B)
        _write_rows(layer.A, new_A)
        return sigma
    (update,) = outcome
    base = layer.base_weight
    start, rows = shard_range(base.shape[0], base.device_mesh.get_local_rank(), base.device_mesh.size())
    base.to_local().add_(update[start : start + rows].to(base.dtype))
    layer.num_merges += 1
    fresh_A = torch.empty(tuple(layer.A.shape), dtype=layer.A.dtype)
    kaiming_uniform_(fresh_A, cpu_generator(layer.seed, STREAM_MERGE, int(layer.num_merges)))
    _write_rows(layer.A, fresh_A)
    layer.B.to_local().zero_()
    return float(update.norm())


# ---------------------------------------------------------------------- memory


@dataclass(frozen=True)
class ShardedMemory:
    """Bytes one rank holds when training under FSDP2 (:func:`fsdp_memory_per_rank`).

    Attributes:
        weights: this rank's shards of every parameter (trainable and frozen, in their storage
            dtype: FSDP2 keeps the sharded parameters in the original dtype also with mixed
            precision) plus every buffer whole (buffers are not sharded).
        gradients: this rank's shards of the trainable parameters' gradients (their dtype; the
            reduce-scatter output).
        optimizer_state: this rank's optimizer state: the state layouts' shard view
            (:func:`lowrank.optim.layout.state_layout` with ``shard=(rank, world)``).
        optimizer_extra: memory the optimizer holds outside its state (the shard view's
            sparse-momentum index slice).
        gathered_layer: the largest decoder layer's parameters in full, in the all-gather dtype
            (bf16 with mixed precision): the all-gather buffer while that layer runs.
        gathered_root: the root unit's own parameters (embeddings, final norm, head) in full:
            FSDP2 keeps the root gathered from its forward to its backward.
    """

    world_size: int
    rank: int
    weights: int
    gradients: int
    optimizer_state: int
    optimizer_extra: int
    gathered_layer: int
    gathered_root: int

    @property
    def total(self) -> int:
        """Shards plus the root and one decoder layer gathered. Not included: activations, the
        layer's unsharded gradients during its backward (another ``gathered_layer`` of the
        trainable parameters before the reduce-scatter), the next layer's all-gather when FSDP2
        prefetches it (on accelerators), and a projector refresh's gathered gradient (one whole
        matrix on its owner rank, every ``update_proj_gap`` steps)."""
        return (self.weights + self.gradients + self.optimizer_state + self.optimizer_extra + self.gathered_layer
                + self.gathered_root)

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def fsdp_memory_per_rank(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, world_size: int, rank: int = 0, mixed_precision: bool = False
) -> ShardedMemory:
    """Per-rank bytes of training ``model`` with ``optimizer`` under :func:`shard_model`.

    ``model``: the wrapped but not yet sharded model (real, or built on the ``meta`` device as
    the memory estimator does, :mod:`lowrank.memory.build`); ``optimizer``: a
    ``lowrank.optim.ProjectedAdamW`` or ``torch.optim.AdamW`` over its parameters (its groups'
    options decide the layouts; nothing is allocated). Rank 0 holds the largest shards
    (torch.chunk gives the first ranks ``ceil(rows / world)`` rows), so the default ``rank=0`` is
    the per-rank peak. Sparse-momentum slices are counted at their expected size (see
    :mod:`lowrank.optim.layout`, shard view).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got {world_size} and {rank}")
    model = unwrap_model(model)
    shard = (rank, world_size)
    weights = sum(local_numel(tuple(p.shape), *shard) * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    gradients = sum(local_numel(tuple(p.shape), *shard) * p.element_size() for p in model.parameters() if p.requires_grad)
    state = extra = 0
    if isinstance(optimizer, Muon):
        raise ValueError("fsdp_memory_per_rank: Muon is not supported under FSDP2 here (its Newton–Schulz step needs whole "
                         "matrices); use ProjectedAdamW or torch.optim.AdamW")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(optimizer, ProjectedAdamW):
                layout = state_layout(tuple(p.shape), p.dtype, group, shard=shard)
            elif isinstance(optimizer, torch.optim.AdamW):
                layout = torch_adamw_state_layout(tuple(p.shape), p.dtype, shard=shard)
            else:
                raise ValueError(f"fsdp_memory_per_rank knows the state of ProjectedAdamW and torch.optim.AdamW, not "
                                 f"{type(optimizer).__name__}")
            state += layout.bytes()
            extra += layout.outside_bytes()

    def gathered(params: list[nn.Parameter]) -> int:
        return sum(p.numel() * (2 if mixed_precision and p.is_floating_point() else p.element_size()) for p in params)

    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    largest = max((gathered(list(layer.parameters())) for layer in layers), default=0)
    root = gathered([p for p in model.parameters() if id(p) not in in_layers])
    return ShardedMemory(world_size=world_size, rank=rank, weights=weights, gradients=gradients, optimizer_state=state,
                         optimizer_extra=extra, gathered_layer=largest, gathered_root=root)
