"""Analytic memory estimate of training a model with a method, without allocating memory.

The model is built on the ``meta`` device and wrapped by the method's real code
(:mod:`lowrank.memory.build`), so weights and gradients are counted from the real parameter
shapes with :mod:`lowrank.accounting`; the optimizer's state is the sum, parameter by parameter
over the real parameter groups, of the state layouts in :mod:`lowrank.optim.layout` (the tensors
``ProjectedAdamW`` allocates from, and ``torch.optim.AdamW``'s; the sparse-momentum index cache is
``optimizer_extra``) or, for bitsandbytes AdamW8bit, of
:func:`lowrank.memory.peers.adamw8bit_state_bytes`; activations come from the stated formula in
:mod:`lowrank.memory.activations`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ..accounting import buffer_bytes, gradient_bytes, parameter_bytes
from ..errors import UsageError
from ..optim import Muon, ProjectedAdamW
from ..optim.layout import KINDS, muon_state_layout, state_layout, torch_adamw_state_layout
from ..wrap import count_parameters, lowrank_layers
from .activations import ActivationBytes, llama_activation_bytes
from .build import build, check_size, dtype_name, load_config, parse_dtype, resolve
from .peers import adamw8bit_state_bytes
from ..optim import working_set
from ..optim.adam import foreach_chunks
from ..optim.adamw import FOREACH_CHUNK_NUMEL, multi_tensor_step
from ..optim.layout import local_numel
from ..precision import step_dtype

__all__ = ["MemoryEstimate", "estimate", "largest_gradient_bytes", "optimizer_state_layout", "step_working_set"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training set-up at its peak, ``total``: what is held throughout (weights,
    optimizer state and extra) plus the larger of two moments.

    * Early in backward: every saved activation and the logits' gradient are alive; the head's
      gradient (``first_gradient``) comes once the loss's backward has freed its saved
      log-softmax (``activation_detail["log_softmax"]``).
    * The optimizer step: every gradient (``layerwise``: the largest, ``gradients``) and the
      step's working set. With ``layerwise`` the largest parameter (the head or the embedding)
      steps at an end of backward, the head beside the layers' saved tensors
      (``activation_detail["layers"]``), which are then counted too.

    ``total = weights + optimizer_state + optimizer_extra + max(activations + max(0,
    first_gradient − log_softmax), gradients + step_working_set [+ layers])``; backward in between
    trades activations for gradients.

    Attributes:
        weights: parameters (trainable and frozen, e.g. ReLoRA's base) plus buffers (SLTrain's
            int32 sparse indices — memory the method needs — and the rotary tables);
            ``weight_detail`` splits it into trainable and frozen parameters and buffers.
        gradients: one gradient per trainable parameter, in its dtype; with ``layerwise`` (the
            optimizer step inside backward, ``--layerwise-step``) the largest trainable
            parameter's gradient alone (its FSDP2 shard per rank), since each gradient is freed
            once its parameter has stepped (:mod:`lowrank.run.layerwise`).
        optimizer_state: every tensor in ``optimizer.state`` (what ``state_dict`` saves);
            ``optimizer_detail`` splits it into moments, projectors, quantization statistics and
            scalars.
        optimizer_extra: memory the optimizer holds outside its state (the index cache of
            sparse-momentum subsets).
        activations: saved activations and logits for one micro-batch (an estimate; see
            :mod:`lowrank.memory.activations`); ``activation_detail`` breaks it down.
        step_working_set: the optimizer step's own temporaries at their largest
            (:func:`step_working_set`): one parameter's for a per-parameter step, a parameter
            group's denominators for ``torch.optim.AdamW(foreach=True)``; ``None`` for a peer
            optimizer (not modelled: the total then counts none).
        first_gradient: the output head's gradient (its shard under FSDP2), the first one
            backward allocates; 0 when the head is frozen.
    """

    model: str
    method: str
    optimizer: str
    rank: int | None
    weight_dtype: str
    state_dtype: str | None
    batch_size: int
    seq_len: int
    checkpointing: bool
    layerwise: bool
    parameters: int
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer_state: int
    optimizer_extra: int
    activations: int
    step_working_set: int | None = None
    first_gradient: int = 0
    weight_detail: dict[str, int] = field(default_factory=dict)
    optimizer_detail: dict[str, int] = field(default_factory=dict)
    activation_detail: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def model_state(self) -> int:
        """Everything but activations: weights, gradients and the optimizer's memory."""
        return self.weights + self.gradients + self.optimizer_state + self.optimizer_extra

    @property
    def total(self) -> int:
        held = self.weights + self.optimizer_state + self.optimizer_extra
        head_gradient = max(0, self.first_gradient - self.activation_detail.get("log_softmax", 0))
        step = self.gradients + (self.step_working_set or 0)
        if self.layerwise:
            step += self.activation_detail.get("layers", 0)
        return held + max(self.activations + head_gradient, step)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        data["model_state"] = self.model_state
        data["total"] = self.total
        return data


def estimate(
    model_config: str | Path | PretrainedConfig,
    method: str | Path,
    *,
    rank: int | None = None,
    weight_dtype: str | torch.dtype = torch.float32,
    state_dtype: str | torch.dtype | None = None,
    batch_size: int = 1,
    seq_len: int = 2048,
    checkpointing: bool = False,
    layerwise: bool = False,
    world_size: int = 1,
    compute_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    rounding: str = "stochastic",
) -> MemoryEstimate:
    """Estimate the training memory of ``method`` on ``model_config``; allocates nothing.

    With ``world_size`` > 1 the estimate is per rank under FSDP2 (``--strategy fsdp2``,
    :func:`lowrank.distributed.fsdp.fsdp_memory_per_rank`): the rank's shards of weights,
    gradients and optimizer state, plus the largest decoder layer and the root gathered in full
    (``weight_detail["gathered_layer"]`` / ``["gathered_root"]``); activations are per rank
    already (one micro-batch). Under DDP every rank holds the one-process numbers.

    Args:
        model_config: a bundled name (``"llama_1b"``), a Hugging Face config JSON path or a
            ``PretrainedConfig`` of a causal LM.
        method: a preset name (``"galore"``), a preset YAML path, or ``"adamw8bit"``.
        rank: overrides every rank of the preset (factors and gradient projection).
        weight_dtype: parameters and gradients (``--param-dtype``).
        state_dtype: Adam moments (``None``: the parameter dtype, the optimizers' default).
        batch_size, seq_len: one micro-batch.
        checkpointing: activation checkpointing of every decoder layer.
        layerwise: the optimizer step inside backward (``lowrank pretrain --layerwise-step``):
            one gradient alive at a time, the largest counted (:func:`largest_gradient_bytes`),
            with one micro-batch per step and one process or FSDP2; with gradient accumulation
            > 1 or under DDP the whole set is held (said in ``notes``). A peer has no
            per-parameter step: the whole set, with a note.
        world_size: FSDP2 ranks the model is sharded over (1: not sharded).
        compute_dtype: the activations' dtype (``None``: ``weight_dtype``, as on a GPU; a CPU
            computes in fp32 from bf16 storage, :func:`lowrank.precision.compute_dtype`).
        device: where the step runs (``ProjectedAdamW`` batches plain parameters with
            ``torch._foreach_*`` kernels on accelerators, one at a time on a CPU).
        rounding: ``training.bf16_rounding`` (stochastic rounding's draws are a temporary).

    Raises:
        UsageError: unknown method or model, a config that is not a causal LM, a non-positive
            size, or a rank larger than a layer.
    """
    check_size("batch_size", batch_size)
    check_size("seq_len", seq_len)
    weight_dtype = parse_dtype(weight_dtype, "weight_dtype")
    state_dtype = parse_dtype(state_dtype, "state_dtype")
    compute_dtype = parse_dtype(compute_dtype, "compute_dtype") or weight_dtype
    config, model_name = load_config(model_config)
    resolved = resolve(method, rank=rank, weight_dtype=weight_dtype, state_dtype=state_dtype, layerwise=layerwise)
    model, optimizer = build(config, resolved, device="meta", weight_dtype=weight_dtype)
    if optimizer is None:  # a peer: all trainable parameters in one group
        detail = adamw8bit_state_bytes(p for p in model.parameters() if p.requires_grad)
        extra = 0
    else:
        detail, extra = optimizer_state_layout(optimizer, step_dtype=step_dtype(weight_dtype))
    counts = count_parameters(model)
    shard = (0, world_size) if world_size > 1 else None
    working = None if optimizer is None else step_working_set(optimizer, weight_dtype, rounding=rounding,
                                                                  device=torch.device(device), shard=shard)
    activations = model_activations(config, model, compute_dtype, batch_size, seq_len, checkpointing)
    weights, gradients = parameter_bytes(model) + buffer_bytes(model), gradient_bytes(model)
    weight_detail = {
        "trainable": parameter_bytes(model, trainable_only=True),
        "frozen": parameter_bytes(model) - parameter_bytes(model, trainable_only=True),
        "buffers": buffer_bytes(model),
    }
    notes = list(resolved.notes)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size must be a positive integer, got {world_size!r}")
    if world_size > 1:
        if optimizer is None:
            raise UsageError(f"{resolved.name}: the FSDP2 estimate covers lowrank's presets (ProjectedAdamW, torch AdamW), not peers")
        from ..distributed.fsdp import fsdp_memory_per_rank

        try:
            sharded = fsdp_memory_per_rank(model, optimizer, world_size=world_size,
                                           mixed_precision=weight_dtype == torch.bfloat16)
        except ValueError as error:
            raise UsageError(f"{resolved.name}: {error}") from None
        weights = sharded.weights + sharded.gathered_layer + sharded.gathered_root
        gradients = sharded.gradients
        weight_detail = {"shards": sharded.weights, "gathered_layer": sharded.gathered_layer,
                         "gathered_root": sharded.gathered_root}
        scale = sum(detail.values())
        detail = {key: value * sharded.optimizer_state // max(1, scale) for key, value in detail.items()} if scale else detail
        detail[next(iter(detail))] += sharded.optimizer_state - sum(detail.values())  # rounding lands in the first kind
        extra = sharded.optimizer_extra
        notes.append(f"per rank of {world_size} under FSDP2: shards plus the largest decoder layer and the root gathered")
    if resolved.layerwise:
        whole = gradients
        gradients = largest_gradient_bytes(model, world_size)
        notes.append(layerwise_note(gradients, whole, world_size))
    if resolved.method is not None and resolved.method.quant is not None:
        from ..quant import bits_per_weight

        stored = [f"{fmt.label} {bits_per_weight(fmt):.3f} bits per entry" for fmt in resolved.method.quant.formats() if fmt]
        notes.append(f"fake-quantized training: the targeted layers would store {' and '.join(stored)}; the simulation holds "
                     f"{dtype_name(weight_dtype)} weights (counted above)")
    return MemoryEstimate(
        model=model_name,
        method=resolved.name,
        optimizer=resolved.optimizer,
        rank=resolved.rank,
        weight_dtype=dtype_name(weight_dtype),
        state_dtype=dtype_name(state_dtype),
        batch_size=batch_size,
        seq_len=seq_len,
        checkpointing=checkpointing,
        layerwise=resolved.layerwise,
        parameters=counts.total,
        trainable_parameters=counts.trainable,
        weights=weights,
        gradients=gradients,
        weight_detail=weight_detail,
        optimizer_state=sum(detail.values()),
        optimizer_extra=extra,
        activations=activations.total,
        step_working_set=working,
        first_gradient=first_gradient_bytes(model, world_size),
        optimizer_detail=detail,
        activation_detail=activations.to_dict(),
        notes=tuple(notes),
    )


def step_working_set(optimizer: torch.optim.Optimizer, weight_dtype: torch.dtype, *, rounding: str = "stochastic",
                     device: torch.device = torch.device("cpu"), shard: tuple[int, int] | None = None) -> int:
    """The largest working set of one optimizer step of ``optimizer`` (built on the meta device)
    over its parameters, by :mod:`lowrank.optim.working_set`: a parameter stored in bf16 steps in
    fp32 beside its copies (:func:`lowrank.precision.step_from_bf16`); ``ProjectedAdamW``'s plain
    parameters go through the multi-tensor kernels in chunks where it batches them (accelerators,
    or ``foreach=True``); ``torch.optim.AdamW(foreach=True)`` a group at a time. ``shard``: one
    rank's rows under FSDP2."""
    if type(optimizer) is torch.optim.AdamW:
        return working_set.torch_adamw_foreach_bytes(
            [[p for p in group["params"] if p.requires_grad] for group in optimizer.param_groups])
    stepped_in = step_dtype(weight_dtype)
    in_fp32 = stepped_in != weight_dtype  # a copy per parameter, one at a time (never batched)
    largest = 0
    for group in optimizer.param_groups:
        plain = []  # batched by step() with torch._foreach_* kernels (never from bf16: one at a time)
        for p in group["params"]:
            shape = tuple(p.shape)
            numel = local_numel(shape, *(shard or (0, 1)))
            if group.get("use_muon"):
                own = working_set.muon_step_bytes(shape)
            else:
                own = working_set.projected_adamw_step_bytes(shape, group, step_dtype=stepped_in, shard=shard)
                if not in_fp32 and multi_tensor_step(len(shape), numel, group, device.type):
                    plain.append(p)
            during, rounding_pass = working_set.bf16_step_bytes(numel, weight_dtype, rounding)
            largest = max(largest, own + during, rounding_pass)
        size = (group["state_dtype"] or stepped_in).itemsize if not group.get("use_muon") else 0
        for chunk in foreach_chunks(plain, FOREACH_CHUNK_NUMEL):  # the denominators of a chunk at once
            largest = max(largest, size * sum(local_numel(tuple(p.shape), *(shard or (0, 1))) for p in chunk))
    return largest


def first_gradient_bytes(model: nn.Module, world_size: int = 1) -> int:
    """Bytes of the output head's gradient, the first gradient backward allocates (rank 0's shard
    under FSDP2, as :func:`largest_gradient_bytes`); 0 for a frozen or missing head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or not weight.requires_grad:
        return 0
    return local_numel(tuple(weight.shape), 0, world_size) * weight.element_size()


def largest_gradient_bytes(model: nn.Module, world_size: int = 1) -> int:
    """Bytes of the largest trainable parameter's gradient, in its dtype: what the optimizer step
    inside backward holds at most (each gradient is freed once its parameter has stepped). Under
    FSDP2 (``world_size > 1``) the largest shard, rank 0's, sharded as
    :func:`lowrank.distributed.fsdp.fsdp_memory_per_rank` shards the gradient set."""
    return max((local_numel(tuple(p.shape), 0, world_size) * p.element_size() for p in model.parameters() if p.requires_grad),
               default=0)


def layerwise_note(largest: int, whole: int, world_size: int) -> str:
    """What the ``gradients`` term means with ``--layerwise-step``, and when it does not hold."""
    mib = 2**20
    if world_size > 1:
        return (f"--layerwise-step: gradients = the largest trainable parameter's shard of its gradient, "
                f"{largest / mib:.2f} MiB, one alive at a time; with gradient accumulation > 1 the rank's shards of "
                f"every gradient, {whole / mib:.2f} MiB, are held instead (under DDP: every gradient, unsharded)")
    return (f"--layerwise-step: gradients = the largest trainable parameter's gradient, {largest / mib:.2f} MiB, one "
            f"alive at a time; with gradient accumulation > 1 or under DDP the whole set, {whole / mib:.2f} MiB, is "
            "held instead")


def model_activations(config: PretrainedConfig, model: nn.Module, dtype: torch.dtype, batch_size: int,
                      seq_len: int, checkpointing: bool) -> ActivationBytes:
    """:func:`llama_activation_bytes` with the sizes read from ``config`` and the low-rank
    intermediates from the wrapped ``model`` (their ranks summed per decoder layer)."""
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    ranks = sum(layer.rank for layer in lowrank_layers(model).values())
    return llama_activation_bytes(
        batch_size=batch_size,
        seq_len=seq_len,
        hidden_size=hidden,
        # GPT-2 style configs leave the MLP width unset (n_inner=None means 4h).
        intermediate_size=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab_size=config.vocab_size,
        dtype_bytes=dtype.itemsize,
        rank_sum_per_layer=math.ceil(ranks / layers),
        checkpointing=checkpointing,
    )


def optimizer_state_layout(optimizer: torch.optim.Optimizer, step_dtype: torch.dtype | None = None) -> tuple[dict[str, int], int]:
    """Bytes the state of ``optimizer`` (``torch.optim.AdamW``, ``ProjectedAdamW`` or ``Muon``) will hold
    once every parameter has stepped: the sum of :mod:`lowrank.optim.layout` over its parameter
    groups, without stepping. ``step_dtype``: the dtype the optimizer sees the parameters in when
    it is not theirs (fp32 for bf16 storage, which :func:`lowrank.precision.step_bf16` steps in
    fp32, so state kept "in the parameter's dtype" is fp32).

    Returns:
        ``({"moments", "projectors", "scalars"}, extra)`` where ``extra`` is memory held outside
        ``optimizer.state`` (sparse-momentum index caches).
    """
    params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    if isinstance(optimizer, Muon):  # its AdamW groups are ProjectedAdamW's
        layouts = [
            (muon_state_layout if group["use_muon"] else state_layout)(tuple(p.shape), step_dtype or p.dtype, group)
            for p, group in params
        ]
    elif isinstance(optimizer, ProjectedAdamW):
        layouts = [state_layout(tuple(p.shape), step_dtype or p.dtype, group) for p, group in params]
    elif type(optimizer) is torch.optim.AdamW:
        if any(group.get("amsgrad") for group in optimizer.param_groups):
            raise UsageError("AdamW with amsgrad is not modelled by the memory estimator")
        layouts = [torch_adamw_state_layout(tuple(p.shape), step_dtype or p.dtype) for p, _ in params]
    else:
        raise UsageError(f"no memory layout for optimizer {type(optimizer).__name__}")
    detail = dict.fromkeys(KINDS, 0)
    for layout in layouts:
        for kind, n in layout.bytes_by_kind().items():
            detail[kind] += n
    return detail, sum(layout.outside_bytes() for layout in layouts)
