"""Deterministic randomness: every random draw in lowrank is a pure function of integers.

Layers (initialisation, SLTrain's sparse support, the re-initialisation after a ReLoRA merge) and
the optimizer (sparse-momentum subsets, APOLLO projections, range-finder sketches) draw from a CPU
``torch.Generator`` seeded by ``derive_seed(seed, index, counter, stream)``. Nothing random is
stored: a resumed run, or another DDP rank, recomputes the same draw from the same integers with
no communication. Draws happen on the CPU because CUDA and CPU generators give different streams
for the same seed.
"""

from __future__ import annotations

import torch

__all__ = [
    "derive_seed",
    "cpu_generator",
    "subset_size",
    "sample_subset",
    "index_dtype",
    "STREAM_INIT",
    "STREAM_SPARSE_SUPPORT",
    "STREAM_MERGE",
    "STREAM_SUBSET",
    "STREAM_GAUSSIAN",
    "STREAM_SKETCH",
    "STREAM_SPARSE_VALUES",
    "STREAM_FAKE_QUANT",
    "STREAM_BF16_ROUNDING",
    "device_generator",
]

# One stream per kind of draw, so that no two kinds ever share numbers (e.g. the sparse support
# does not change when the initialisation does, nor a subset of period 3 equal a projection of
# refresh 3 for the same parameter).
STREAM_INIT = 1
STREAM_SPARSE_SUPPORT = 2
STREAM_MERGE = 3
STREAM_SUBSET = 4
STREAM_GAUSSIAN = 5
STREAM_SKETCH = 6
STREAM_SPARSE_VALUES = 7
STREAM_FAKE_QUANT = 0x51  # stochastic rounding of fake-quantized activations (lowrank.quant.fake)
STREAM_BF16_ROUNDING = 0x52  # stochastic rounding of updated bf16 parameters (lowrank.precision)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Vigna's SplitMix64 finaliser: consecutive inputs give statistically independent outputs, which
    # plain arithmetic like ``seed + index`` would not.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """Mix non-negative integers into one 63-bit seed (order matters)."""
    h = 0
    for key in keys:
        h = _splitmix64(h ^ (int(key) & _MASK64))
    return h >> 1


def cpu_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(*keys)``."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*keys))


def device_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``derive_seed(*keys)``: drawing on the device where the
    tensor lives (filling a large tensor from a CPU generator and copying it over is slow). CUDA and
    CPU generators give different streams for the same seed; each is reproducible on its own."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_generator(*keys)
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def index_dtype(numel: int) -> torch.dtype:
    """int32 flat indices (4 bytes per entry) whenever they fit."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def subset_size(numel: int, density: float) -> int:
    """Exact number of entries a ``density`` subset keeps: ``round(density · numel)``, at least one."""
    return max(1, min(numel, round(density * numel)))


def sample_subset(numel: int, k: int, *, seed: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """A uniformly random ``k``-subset of ``range(numel)``, sorted, drawn from ``seed`` on the CPU.

    Sorted indices make gathers and scatters sequential in memory (about 5× faster than random
    order on a 4096×11008 matrix). Sampling fills a transient bool mask with uniform draws with
    replacement until it holds exactly ``k`` distinct entries; since the stopping rule only looks
    at counts, the resulting set is uniform over all ``k``-subsets. This is several times cheaper
    than ``torch.randperm(numel)`` and needs no sort. Above half density the complement is drawn
    instead, so the expected number of rounds stays small. Indices are int32 when they fit.
    """
    if not 0 < k <= numel:
        raise ValueError(f"subset size must be in [1, {numel}], got {k}")
    generator = cpu_generator(*seed)
    complement = k > numel // 2
    target = numel - k if complement else k
    mask = torch.zeros(numel, dtype=torch.bool)
    have = 0
    while have < target:
        draws = torch.randint(0, numel, (target - have,), generator=generator)
        mask.index_fill_(0, draws, True)
        have = int(mask.count_nonzero())
    if complement:
        mask.logical_not_()
    return mask.nonzero().squeeze(1).to(index_dtype(numel)).to(device)
