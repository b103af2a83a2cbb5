"""1-bit compression with error feedback, as pure tensor functions (Tang et al. 2021, "1-bit Adam",
section 3.2; DeepSpeed's ``compressed_allreduce``): a tensor travels as its packed signs and one
scale per chunk (``‖x‖₁/n``, ours, or ``‖x‖₂/√n``, the paper's), the worker and the server each
keeping the error of their compression and adding it to the next message. :mod:`.onebit` builds
1-bit Adam on them; :func:`onebit_bytes` is the one statement of its wire size.
"""

import functools

import torch
import torch.distributed as dist

__all__ = ["SCALES", "SCALE_DEFAULT", "compress_chunks", "compressed_allreduce", "kept_entries", "onebit_bytes",
           "pack_signs", "padded_numel", "scaled_sign", "server_reduce", "unpack_signs", "worker_compress"]

_SCALE_BYTES = 4  # one fp32 per chunk
SCALES = ("l1", "l2")  # the compressor's scale: ours (‖x‖₁/n) or the paper's and DeepSpeed's (‖x‖₂/√n)
SCALE_DEFAULT = "l1"


@functools.cache
def _bit_weights(device: torch.device) -> torch.Tensor:
    """``1, 2, 4, ..., 128``: bit ``k`` of a byte holds entry ``k``."""
    return torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=device)


# ---------------------------------------------------------------------- the compressor, pure functions


def padded_numel(numel: int, world_size: int) -> int:
    """``N' = ceil(N / 8w) · 8w``: ``w`` chunks of whole bytes of signs."""
    block = 8 * world_size
    return -(-numel // block) * block


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` at 1 bit per entry (bit set for ``x ≥ 0``), 8 to a ``uint8``, along the last dim
    (a multiple of 8)."""
    bits = (x >= 0).to(torch.uint8).unflatten(-1, (-1, 8))
    return (bits * _bit_weights(x.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """The ``±1`` fp32 signs of :func:`pack_signs`' bytes (8 per byte, last dim)."""
    bits = packed.unsqueeze(-1).bitwise_and(_bit_weights(packed.device)).ne(0)
    return bits.flatten(-2).float().mul_(2).sub_(1)


def kept_entries(numel: int, world_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``N'`` fp32 weights of the entries a tensor of ``numel`` entries really sends: ``1`` for
    its entries (those where ``mask`` is true, when given: ``numel`` booleans), ``0`` for the
    padding and the masked entries, which are left out of every scale and kept at zero in both
    error buffers."""
    keep = torch.zeros(padded_numel(numel, world_size), device=mask.device if mask is not None else None)
    if mask is None:
        keep[:numel] = 1
    else:
        keep[:numel] = mask.reshape(-1)
    return keep


def compress_chunks(rows: torch.Tensor, counts: torch.Tensor | list[int], scale: str = SCALE_DEFAULT,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``C`` of each row of ``rows`` (``k × C`` fp32; row ``j`` has ``counts[j]`` real entries, the
    rest zeros): ``(packed signs k × C/8, scales k, decoded k × C)``. ``scale``: ``"l1"`` (ours,
    ``‖row‖₁ / count``, the scaled sign closest to the row in ℓ2) or ``"l2"`` (the paper's and
    DeepSpeed's, ``‖row‖₂ / sqrt(count)``)."""
    real = torch.as_tensor(counts, dtype=rows.dtype, device=rows.device).clamp_min(1)
    if scale == "l1":
        scales = rows.abs().sum(1).div_(real)
    elif scale == "l2":
        scales = rows.norm(dim=1).div_(real.sqrt())
    else:
        raise ValueError(f"onebit_scale must be one of {', '.join(SCALES)}, got {scale!r}")
    packed = pack_signs(rows)
    return packed, scales, unpack_signs(packed).mul_(scales.unsqueeze(1))


def scaled_sign(x: torch.Tensor, scale: str = SCALE_DEFAULT) -> torch.Tensor:
    """``C(x)`` over the whole of ``x`` (``sign(0) = +1``), for reference: ``‖x‖₁/numel · sign(x)``
    (``"l1"``) or ``‖x‖₂/sqrt(numel) · sign(x)`` (``"l2"``)."""
    size = x.abs().sum() / x.numel() if scale == "l1" else x.norm() / x.numel() ** 0.5
    return torch.where(x >= 0, 1.0, -1.0).mul_(size)


def worker_compress(x: torch.Tensor, error: torch.Tensor, world_size: int, keep: torch.Tensor | None = None,
                    scale: str = SCALE_DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 for one tensor ``x`` (``N`` entries): ``y = (x + e)·keep``, ``e ← y − C(y)`` (zero where
    ``keep`` is) in place on ``error`` (``N'``); returns ``C(y)`` as ``(packed signs w × C/8, scales w)``,
    row ``i`` for server ``i``. ``keep``: :func:`kept_entries` (default: every real entry)."""
    numel = x.numel()
    keep = kept_entries(numel, world_size).to(x.device) if keep is None else keep
    y = error.clone()
    y[:numel].add_(x.reshape(-1))
    y.mul_(keep)
    rows = keep.view(world_size, -1)
    packed, scales, decoded = compress_chunks(y.view(world_size, -1), rows.sum(1), scale)
    torch.sub(y, decoded.view(-1), out=error)
    error.mul_(keep)
    return packed, scales


def server_reduce(packed: torch.Tensor, scales: torch.Tensor, error: torch.Tensor, keep: torch.Tensor | int,
                  scale: str = SCALE_DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 for one chunk: the ``w`` ranks' ``C(y)_i`` (``packed`` ``w × C/8``, ``scales`` ``w``),
    ``z = (mean + e_i)·keep``, ``e_i ← z − C(z)`` in place on ``error`` (``C``); returns ``C(z)`` as
    ``(packed 1 × C/8, scale 1)``. ``keep``: the chunk's slice of :func:`kept_entries`, or the
    number of real entries at its start."""
    if isinstance(keep, int):
        count = keep
        keep = torch.zeros_like(error)
        keep[:count] = 1
    z = unpack_signs(packed).mul_(scales.unsqueeze(1)).mean(0)
    z.add_(error).mul_(keep)
    out_packed, out_scale, decoded = compress_chunks(z.unsqueeze(0), keep.sum().view(1), scale)
    torch.sub(z, decoded.view(-1), out=error)
    error.mul_(keep)
    return out_packed, out_scale


def _segments(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows of ``[signs | fp32 scale as 4 bytes]``, the wire format."""
    return torch.cat([packed, scales.contiguous().view(torch.uint8).view(-1, _SCALE_BYTES)], dim=1)


def _split(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return segments[:, :-_SCALE_BYTES], segments[:, -_SCALE_BYTES:].contiguous().view(torch.float32).view(-1)


def compressed_allreduce(
    tensors: list[torch.Tensor],
    worker_errors: list[torch.Tensor],
    server_errors: list[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    *,
    masks: list[torch.Tensor | None] | None = None,
    scale: str = SCALE_DEFAULT,
) -> dict[str, int]:
    """Replace each of ``tensors`` (fp32) by the 1-bit compressed mean over the ranks (module
    docstring), with one all-to-all and one all-gather for all of them; returns the counted bytes
    ``{"signs": Σ N'/8, "scales": Σ 4w}``. ``masks``: per tensor, the entries that travel (the
    others decode to exactly 0; ``None``: all), the same on every rank."""
    group = group or dist.group.WORLD
    world, rank = group.size(), group.rank()
    masks = masks or [None] * len(tensors)
    keeps = [kept_entries(x.numel(), world, m).to(x.device) for x, m in zip(tensors, masks)]
    send = torch.cat([_segments(*worker_compress(x, e, world, k, scale))
                      for x, e, k in zip(tensors, worker_errors, keeps)], dim=1)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # row j of send goes to rank j
    results, offset = [], 0
    for e, k in zip(server_errors, keeps):
        width = e.numel() // 8 + _SCALE_BYTES
        packed, scales = _split(received[:, offset : offset + width])
        results.append(_segments(*server_reduce(packed, scales, e, k.view(world, -1)[rank], scale)))
        offset += width
    mine = torch.cat(results, dim=1).view(-1)
    gathered = torch.empty(world * mine.numel(), dtype=torch.uint8, device=mine.device)
    dist.all_gather_into_tensor(gathered, mine, group=group)
    gathered = gathered.view(world, -1)  # row j: server j's chunks
    offset = 0
    for x, e, k in zip(tensors, server_errors, keeps):
        width = e.numel() // 8 + _SCALE_BYTES
        packed, scales = _split(gathered[:, offset : offset + width])
        decoded = unpack_signs(packed).mul_(scales.unsqueeze(1)).view(-1).mul_(k)
        x.copy_(decoded[: x.numel()].view_as(x))
        offset += width
    return onebit_bytes([x.numel() for x in tensors], world)


def onebit_bytes(numels: list[int], world: int) -> dict[str, int]:
    """What :func:`compressed_allreduce` hands to its collectives for tensors of ``numels``
    entries at ``world`` ranks: packed signs (``padded_numel/8``) and one fp32 scale per chunk."""
    return {"signs": sum(padded_numel(n, world) // 8 for n in numels), "scales": _SCALE_BYTES * world * len(numels)}
