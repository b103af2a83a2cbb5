"""Peer optimizers that are not ``lowrank`` presets but belong in a memory comparison.

Only bitsandbytes' 8-bit AdamW (``adamw8bit``, Dettmers et al. 2022, arXiv 2110.02861): a dense
model whose two Adam moments are stored as blockwise-quantized uint8. bitsandbytes is an optional
dependency, so the state layout is stated here (read from bitsandbytes 0.50,
``bitsandbytes/optim/optimizer.py``, ``Optimizer2State.init_state``) instead of importing it; the
tests check it against a real ``bnb.optim.AdamW8bit`` step, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["PEERS", "Peer", "adamw8bit_state_bytes"]

# ``AdamW8bit(min_8bit_size=4096)``: tensors with fewer elements keep two fp32 moments.
MIN_8BIT_SIZE = 4096
# ``init_state``: ``blocksize = 256``; one fp32 absmax per block and moment.
BLOCK_SIZE = 256
# The signed and unsigned dynamic quantization maps (``create_dynamic_map``: 256 fp32 values
# each). Every 8-bit parameter's state points at the same two tensors, so they count once.
QMAP_BYTES = 2 * 256 * 4


@dataclass(frozen=True)
class Peer:
    name: str
    description: str
    optimizer: str


PEERS: dict[str, Peer] = {
    "adamw8bit": Peer(
        name="adamw8bit",
        description="bitsandbytes AdamW8bit — dense weights, blockwise 8-bit moments (blocks of 256).",
        optimizer="bitsandbytes.optim.AdamW8bit",
    ),
}


def adamw8bit_state_bytes(params: Iterable[torch.Tensor]) -> dict[str, int]:
    """Optimizer-state bytes of ``bnb.optim.AdamW8bit`` over ``params`` after its first step.

    Per parameter of ``n`` elements: ``n ≥ 4096``: two uint8 moments (``2n``) and two fp32 absmax
    vectors of ``ceil(n/256)`` entries; ``n < 4096``: two fp32 moments (``8n``) whatever the
    parameter's dtype. Plus the two shared 256-entry fp32 quantization maps once. The ``step``
    counter is a Python int (not counted); ``unorm_vec`` exists only with ``max_unorm > 0``
    (AdamW8bit's default is 0).

    Returns:
        ``{"moments": ..., "quantization": ...}`` (absmax vectors and maps).
    """
    moments = quantization = 0
    any_8bit = False
    for p in params:
        n = p.numel()
        if n < MIN_8BIT_SIZE:
            moments += 2 * n * 4
        else:
            any_8bit = True
            moments += 2 * n
            quantization += 2 * -(-n // BLOCK_SIZE) * 4
    if any_8bit:
        quantization += QMAP_BYTES
    return {"moments": moments, "quantization": quantization}


def build_adamw8bit(params, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
    """A real ``bnb.optim.AdamW8bit`` (for :func:`lowrank.memory.measure`); needs bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        from ..errors import UsageError

        raise UsageError("--method adamw8bit --measure needs bitsandbytes: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
