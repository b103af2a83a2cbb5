"""bf16 parameter storage: the rounding that writes fp32 results back, and fp32 compute from bf16
storage on devices without fast bf16 matrix kernels.

Three rules, each in one place:

* **Storage** (:func:`store_parameters`): with ``param_dtype = bf16`` every floating parameter —
  trainable or frozen (ReLoRA's ``W0``, SLTrain's sparse values) — is held in bfloat16, and
  autograd gives each gradient its parameter's dtype. Buffers keep their dtype: the rotary
  frequencies stay fp32, as in the fp32 run (a bf16 ``inv_freq`` would blur positions).
* **Rounding** (:func:`round_to_bf16`): the optimizer computes a parameter's new value in fp32
  and writes it back with *stochastic rounding* (default) or round-to-nearest. Stochastic
  rounding adds a uniform random integer in ``[0, 2¹⁶)`` to the fp32 bit pattern and truncates the
  low 16 bits, so ``E[bf16(w)] = w``: an update smaller than half a bf16 ulp (≈ 2⁻⁹·|w|) still
  moves the weight on average, where round-to-nearest drops it every time (Zamirai et al. 2020,
  "Revisiting BFloat16 Training"; torchao's ``_AdamW(bf16_stochastic_round=True)``). The draws
  come from a generator seeded by the caller (run seed, step, parameter index), so a resumed run
  rounds exactly as the uninterrupted one.
* **Compute** (:func:`compute_dtype`, :func:`compute_in`): on a GPU, bf16 storage computes in bf16.
  A CPU without bf16 matrix kernels runs a bf16 matmul ~130× slower than fp32 (0.4 vs 51
  GFLOP/s, one thread, 1024×4096×1024), so there the model computes in fp32 from the bf16 storage:
  embeddings emit fp32 and every linear layer casts its stored weight to its input's dtype inside
  :func:`linear`, which saves the *stored* weight for backward (no fp32 copy outlives the
  layer's forward) and returns the weight's gradient in the storage dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .seeding import STREAM_BF16_ROUNDING, device_generator

__all__ = ["PARAM_DTYPES", "step_dtype", "ROUNDINGS", "PRECISIONS", "param_dtype", "compute_dtype", "store_parameters", "compute_in",
           "linear", "embedding", "round_to_bf16", "stochastic_round_to_bf16", "step_from_bf16", "step_bf16",
           "rounding_generator"]

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``--param-dtype``: how parameters and their gradients are stored."""

ROUNDINGS = ("stochastic", "nearest")
"""``training.bf16_rounding``: how an fp32 result is written back into a bf16 parameter."""

PRECISIONS = ("auto", "fp32", "bf16", "bf16-mixed")
"""``--precision``, the compute dtype: ``auto`` picks by device and storage (:func:`compute_dtype`);
``fp32`` computes in fp32 (from bf16 storage too); ``bf16`` computes in bf16 (bf16 storage, or
autocast over fp32 storage); ``bf16-mixed`` is autocast to bf16 over fp32 storage."""

# Entries of one rounding draw: bounds the int32 noise tensor to 64 MiB for any parameter size.
ROUND_CHUNK = 1 << 24


def param_dtype(name: str) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` → the storage dtype, or a one-line error naming the choices."""
    if name not in PARAM_DTYPES:
        raise UsageError(f"--param-dtype must be one of {', '.join(PARAM_DTYPES)}, got {name!r}")
    return PARAM_DTYPES[name]


def compute_dtype(device: torch.device, storage: torch.dtype, precision: str) -> tuple[torch.dtype, bool]:
    """``(dtype the model computes in, whether that is autocast over fp32 storage)``.

    ``auto``: bf16 storage computes in bf16 on CUDA and in fp32 elsewhere (no fast CPU bf16
    matmul); fp32 storage computes in fp32, with bf16 autocast on CUDA (the mixed-precision recipe).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    if storage == torch.bfloat16:
        if precision == "auto":
            return (torch.bfloat16 if cuda else torch.float32), False
        # bf16-mixed over bf16 storage: autocast to the dtype the weights already have is bf16 compute
        return (torch.float32 if precision == "fp32" else torch.bfloat16), False
    if precision == "fp32" or (precision == "auto" and not cuda):
        return torch.float32, False
    return torch.bfloat16, True


@torch.no_grad()
def store_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating-point parameter of ``model`` to ``dtype`` in place; buffers keep theirs."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


class _StoredWeightLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` computed in ``x``'s dtype from a weight stored in another dtype.

    Saves ``x`` and the stored ``W`` (not a cast copy), recasts ``W`` in backward, and returns the
    weight's and bias's gradients in their storage dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = (flat.T @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in ``x``'s dtype whatever the weight's storage dtype (exactly ``F.linear`` when
    the dtypes agree, so the fp32 path is unchanged)."""
    if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        return F.linear(x, weight, bias)
    return _StoredWeightLinear.apply(x, weight, bias)


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


class _StoredTableEmbedding(torch.autograd.Function):
    """Rows of a table stored in bf16, returned in ``dtype``; backward sums each row's gradient in
    ``dtype`` (over the distinct ids only, so no dense fp32 table is made) and rounds it once."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, dtype):
        ctx.save_for_backward(ids)
        ctx.table = (weight.shape, weight.dtype, weight.device)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight).to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        shape, dtype, device = ctx.table
        rows, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        sums = grad_out.new_zeros(rows.numel(), shape[1]).index_add_(0, inverse, grad_out.reshape(-1, shape[1]))
        if ctx.padding_idx is not None:
            sums[rows == ctx.padding_idx] = 0  # nn.Embedding's padding row gets no gradient
        grad_weight = torch.zeros(shape, dtype=dtype, device=device)
        grad_weight[rows] = sums.to(dtype)
        return None, grad_weight, None, None


def embedding(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``module(ids)`` in ``module.compute_dtype`` (set by :func:`compute_in`; unset: the table's
    dtype). The options LLaMA-style models do not use (``max_norm``, ``scale_grad_by_freq``,
    sparse gradients) take nn.Embedding's own path and a cast."""
    dtype = getattr(module, "compute_dtype", module.weight.dtype)
    if dtype == module.weight.dtype or module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        return nn.Embedding.forward(module, ids).to(dtype)
    return _StoredTableEmbedding.apply(ids, module.weight, module.padding_idx, dtype)


def _embedding_forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return embedding(module, ids)


def _embedding_output_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.to(module.compute_dtype)


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make ``model`` compute in ``dtype`` whatever its parameters' storage dtype.

    Embeddings give their rows in ``dtype`` (the one point where the data enters; plain
    ``nn.Embedding`` through :func:`embedding`, which also sums its gradient in ``dtype``; any other
    embedding class by a cast of its output); plain ``nn.Linear`` modules compute through
    :func:`linear`; our own layers (``LowRankLinear``, fake-quantized and OSP layers) call
    :func:`linear` and :func:`embedding` themselves. Norms need nothing: LLaMA's
    RMSNorm computes in fp32 and multiplies by its weight in the input's dtype by promotion.
    Idempotent, and kept by ``copy.deepcopy``. Call it again after anything that changes a
    module's class in place (fake quantization, OSP): a plain linear layer's forward is set on the
    instance, so a module whose class has since changed gets its class's own forward back here.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.compute_dtype = dtype
            if not getattr(module, "_lowrank_compute_hook", False):
                module.register_forward_hook(_embedding_output_hook)
                module._lowrank_compute_hook = True
        own = vars(module).get("forward")
        for plain, forward in ((nn.Linear, _linear_forward), (nn.Embedding, _embedding_forward)):
            if type(module) is plain and own is None:
                module.forward = forward.__get__(module)
            elif own is not None and getattr(own, "__func__", None) is forward and type(module) is not plain:
                del module.forward
    return model


def round_to_bf16(value: torch.Tensor, rounding: str, generator: torch.Generator | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` (fp32) as bf16: ``"nearest"`` (round-to-nearest-even) or ``"stochastic"``;
    ``out``: a bf16 tensor of ``value``'s shape to write into (the parameter's storage)."""
    if rounding == "nearest":
        return value.to(torch.bfloat16) if out is None else out.copy_(value)
    if rounding != "stochastic":
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return stochastic_round_to_bf16(value, generator, out)


def stochastic_round_to_bf16(value: torch.Tensor, generator: torch.Generator | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased rounding of an fp32 tensor to bf16 (see the module docstring).

    Adding ``u ∈ [0, 2¹⁶)`` to the bit pattern carries into bit 16 with probability equal to the
    discarded fraction, so the result rounds away from zero with that probability; a carry that
    reaches the exponent gives the next binade, as it should. Non-finite entries are rounded to
    nearest (their bit patterns carry no fraction to round). Drawn in chunks of 2²⁴ entries.
    ``out``: a contiguous bf16 tensor of ``value``'s shape to write into.
    """
    if value.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes fp32 values, got {value.dtype}")
    flat = value.reshape(-1)
    if out is None:
        out = torch.empty(value.shape, dtype=torch.bfloat16, device=value.device)
    result, out = out, out.view(-1)
    for start in range(0, flat.numel(), ROUND_CHUNK):
        piece = flat[start : start + ROUND_CHUNK]
        noise = torch.randint(0, 1 << 16, piece.shape, dtype=torch.int32, device=piece.device, generator=generator)
        bits = piece.view(torch.int32).add(noise).bitwise_and_(-65536)  # -65536 = 0xFFFF0000 as int32
        rounded = bits.view(torch.float32)
        rounded = torch.where(torch.isfinite(piece), rounded, piece)
        out[start : start + ROUND_CHUNK] = rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero
    return result


def step_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype the optimizer steps a parameter stored in ``storage`` in, and creates its state in:
    fp32 for half-precision storage (:func:`step_from_bf16` updates an fp32 copy), else ``storage``."""
    return torch.float32 if storage in (torch.bfloat16, torch.float16) else storage


@torch.no_grad()
def step_from_bf16(step_param, param: torch.Tensor, rounding: str, generator: torch.Generator | None,
                   grad: torch.Tensor | None = None) -> None:
    """Update one bf16 parameter in fp32 and write it back rounded (``grad``: default ``param.grad``).

    ``step_param(param, grad, value=work)`` is the optimizer's per-parameter update (the same
    function its ``step()`` runs), here applied to ``work``, an fp32 copy of the parameter, from
    the gradient in fp32: the update — weight decay, moments, projection, everything — is computed
    in fp32 and the optimizer's state is created in fp32; then the new value is rounded once into
    the bf16 storage (:func:`round_to_bf16`). Only one parameter's fp32 copy exists at a time.
    The parameter itself never changes dtype: that would drop its gradient accumulator, and with
    it the hooks DDP registered there (its ranks would stop averaging gradients).
    """
    grad = param.grad if grad is None else grad
    work = param.detach().float()  # an FSDP2 shard stays a DTensor: the optimizer reads its placement
    step_param(param, grad.float(), value=work)
    target = _local(param.detach())
    if target.is_contiguous():
        round_to_bf16(_local(work), rounding, generator, out=target)
    else:
        target.copy_(round_to_bf16(_local(work), rounding, generator))


def _local(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 (DTensor) parameter's local shard, where the rounding happens; else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def rounding_generator(param: torch.Tensor, rounding: str, *, seed: int, step: int, index: int) -> torch.Generator | None:
    """The generator of parameter ``index``'s stochastic-rounding draws at run step ``step``
    (``None`` for round-to-nearest): seeded from ``(seed, STREAM_BF16_ROUNDING, step, index)`` —
    the same on every DDP rank and after a resume — and, for an FSDP2 shard, its rank, so the
    shards of one parameter do not repeat each other's noise."""
    if rounding != "stochastic":
        return None
    keys = (seed, STREAM_BF16_ROUNDING, step, index)
    placements = getattr(param, "placements", None)
    if placements is not None:  # a DTensor: its shard's coordinate on the mesh
        keys += (param.device_mesh.get_rank(),)
    return device_generator(_local(param).device, *keys)


def step_bf16(optimizer: torch.optim.Optimizer, rounding: str, *, seed: int, step: int) -> None:
    """``optimizer.step()`` for bf16 parameters: :func:`step_from_bf16` on every parameter with a
    gradient, in parameter-group order, through the optimizer's per-parameter ``step_param``.

    The rounding noise of parameter ``i`` at run step ``step`` comes from
    :func:`rounding_generator`, so ranks stay identical and a resumed run is bit-identical.
    """
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                generator = rounding_generator(param, rounding, seed=seed, step=step, index=index)
                step_from_bf16(optimizer.step_param, param, rounding, generator)
            index += 1
