"""Block-wise dynamic quantization of Adam's moments to 8 or 4 bits, as pure tensor functions.

The scheme of bitsandbytes' 8-bit optimizers (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861) and torchao's low-bit optimizers
(``torchao.optim``: 8-bit after bitsandbytes, 4-bit after Li et al. 2023, "Memory Efficient
Optimizers with 4-bit States", arXiv 2309.01507). A tensor is flattened and cut into blocks of
``B`` consecutive entries (``B = 256`` for 8 bits, ``128`` for 4 bits; :data:`BLOCK_SIZES`);
each block keeps one fp32 scale ``a = max|x|`` over the block (its absmax) and, per entry, the
index ``c`` of the code-book value ``q[c]`` nearest to ``x / a``:

    quantize:    ``a_b = max_{i in b} |x_i|``,  ``c_i = argmin_c |x_i / a_b − q[c]|``
    dequantize:  ``x̃_i = q[c_i] · a_b``

so the error of an entry is at most half the largest gap of the code book times its block's
absmax (up to ``absmax/16`` near zero for the 4-bit unsigned map, which has no zero). The code
books (:func:`code_book`) are:

* **8-bit, signed** (first moment ``m``) and **unsigned** (second moment ``v``): the dynamic-
  exponent data type of :func:`create_dynamic_map` (``max_exponent_bits=7``), i.e.
  ``bitsandbytes.functional.create_dynamic_map(signed)``, which is also
  ``torchao.optim.subclass_8bit``'s map (the two are equal value for value: the tests check it).
* **4-bit, signed** (``m``): ``create_dynamic_map(signed=True, max_exponent_bits=3,
  total_bits=4)``, torchao's ``subclass_4bit.get_qmap_signed`` (its version of the function
  drops bitsandbytes' zero padding so 4-bit maps can be built).
* **4-bit, unsigned** (``v``): what torchao uses, the *linear* map without zero
  ``q = (1/16, 2/16, …, 16/16)`` (``subclass_4bit.get_qmap_unsigned``, from the "power-1"
  second-moment map of Li et al.'s ``lpmm`` code). Leaving zero out is their fix of the
  zero-point problem: a second moment rounded to 0 would turn ``m / sqrt(v)`` into a huge
  update. The consequence, kept here as in torchao: once a block has a non-zero absmax, none of
  its ``v`` entries dequantizes below ``absmax / 16``.

Rounding is to the nearest code-book value, ties to the larger one (torchao's
``quantize_8bit_with_qmap`` / ``quantize_4bit_with_qmap`` binary search; bitsandbytes' CPU
kernel, a BinSearch lookup, misses the nearest value for some entries near zero, which the tests
measure). 4-bit codes are packed two
per byte, the first of a pair in the high nibble (torchao's ``(c[0::2] << 4) | c[1::2]``).
8-bit tensors may end in a partial block (bitsandbytes' ``ceil(n / 256)`` blocks); 4-bit ones
must fill whole blocks (torchao keeps such tensors in full precision instead; here it is an
error, see :func:`check_quantizable`). Tensors with fewer than :data:`MIN_QUANTIZED_NUMEL` = 4096
entries are not quantized at all (bitsandbytes' ``min_8bit_size``, torchao's threshold).

Why not torchao's ``OptimState8bit`` / ``OptimState4bit`` tensor subclasses (torchao 0.18,
tried on the CPU with our moment shapes): they implement only ``copy_`` and out-of-place
``lerp`` among the arithmetic, so the in-place ``lerp_``, ``mul_``, ``addcmul_``, ``zero_`` and
``sqrt`` of the optimizer raise ``NotImplementedError`` (and 4-bit ``index_select``); a flat
sparse-momentum vector whose size 256 does not divide gets ``numel // 256`` scales and fails
in ``copy_``; ``numel() * element_size()`` reports the fp32 appearance size (32 768 bytes for a
64×128 moment holding 8 320), which would break ``state_bytes()``; and
``torch.load(weights_only=True)`` of a state holding them fails in a process that has not
imported torchao (it registers them as safe globals on import), while torchao is an optional,
test-only dependency of this package. So the state holds plain ``uint8`` codes and ``float32``
absmax tensors, and these functions convert.
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = [
    "BITS",
    "BLOCK_SIZES",
    "MIN_QUANTIZED_NUMEL",
    "check_quantizable",
    "code_book",
    "codes_numel",
    "create_dynamic_map",
    "dequantize_blockwise",
    "is_quantized",
    "num_blocks",
    "quantize_blockwise",
]

BITS = (8, 4)
# Entries per absmax block: bitsandbytes' ``blocksize=256`` for 8-bit states, torchao's
# ``block_size=128`` for 4-bit ones.
BLOCK_SIZES = {8: 256, 4: 128}
# Smaller tensors keep full-precision moments (bitsandbytes' ``min_8bit_size``, torchao's 4096).
MIN_QUANTIZED_NUMEL = 4096


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> list[float]:
    """The dynamic-exponent quantization map (Dettmers 2016, arXiv 1511.04561), sorted.

    bitsandbytes' ``functional.create_dynamic_map`` as torchao restates it in
    ``torchao.optim.quant_utils`` (without the zero padding, so that 4-bit maps exist). With
    ``s = total_bits − 1`` bits besides the sign, exponent level ``i = 0 … E−1``
    (``E = max_exponent_bits``) holds the midpoints of ``linspace(0.1, 1, 2^(i+s−E) + 1)`` (twice
    as many, ``2^(i+s−E+1) + 1`` points, when unsigned) scaled by ``10^(i−E+1)``, and their
    negatives when signed; ``2^(s−E) − 1`` extra linear points at the top level fill the code
    when ``s > E``; then ``0`` and ``1``. Returns ``2^total_bits`` values in ``[-1, 1]``.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    levels = [(i, 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1)
              for i in range(max_exponent_bits)]
    if additional_items > 0:
        levels.append((max_exponent_bits - 1, additional_items + 1))
    for i, points in levels:
        boundaries = torch.linspace(0.1, 1, points, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()  # an fp32 product, as in both libraries
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"create_dynamic_map({signed}, {max_exponent_bits}, {total_bits}) gives {len(data)} values")
    return sorted(data)


@lru_cache(maxsize=None)
def _code_book_cpu(bits: int, signed: bool) -> torch.Tensor:
    if bits == 8:
        values = create_dynamic_map(signed)
    elif bits == 4:
        values = create_dynamic_map(True, 3, 4) if signed else torch.linspace(0, 1, 17)[1:].tolist()
    else:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return torch.tensor(values, dtype=torch.float32)


_DEVICE_BOOKS: dict[tuple[int, bool, torch.device], torch.Tensor] = {}


def code_book(bits: int, signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sorted ``2^bits`` fp32 values a code stands for (module docstring), on ``device``.

    Built once per ``(bits, signed, device)`` and shared: a constant of the format, not
    optimizer state (2 × 256 + 2 × 16 fp32 values in all).
    """
    key = (bits, signed, torch.device(device))
    book = _DEVICE_BOOKS.get(key)
    if book is None:
        book = _DEVICE_BOOKS[key] = _code_book_cpu(bits, signed).to(key[2])
    return book


@lru_cache(maxsize=None)
def _midpoints(bits: int, signed: bool, device: torch.device) -> torch.Tensor:
    book = code_book(bits, signed, device)
    return (book[:-1] + book[1:]) / 2


def is_quantized(numel: int, bits: int | None) -> bool:
    """Whether a moment of ``numel`` entries is stored in ``bits`` (``None``: never)."""
    return bits is not None and numel >= MIN_QUANTIZED_NUMEL


def num_blocks(numel: int, bits: int) -> int:
    """``ceil(numel / B)`` absmax scales."""
    return -(-numel // BLOCK_SIZES[bits])


def codes_numel(numel: int, bits: int) -> int:
    """Bytes of codes: ``ceil(numel · bits / 8)``."""
    return -(-numel * bits // 8)


def check_quantizable(numel: int, bits: int) -> None:
    """Raise ``ValueError`` if ``numel`` entries cannot be stored in ``bits`` (4-bit: whole blocks)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    block = BLOCK_SIZES[bits]
    if bits == 4 and numel % block:
        raise ValueError(f"4-bit blocks of {block} entries must divide the size, {numel} is not a multiple of {block}")


# Entries per piece of work in quantize / dequantize: the temporaries (scaled values, int32 and
# int64 code indices, padding) are bounded by this, not by the tensor; pieces are whole blocks, so
# the result is the same bits as one pass.
PIECE_NUMEL = 1 << 22


def _pieces(numel: int, bits: int):
    """``(first block, last block, first entry, end entry)`` of each piece of whole blocks."""
    block = BLOCK_SIZES[bits]
    per_piece = max(1, PIECE_NUMEL // block)
    blocks = num_blocks(numel, bits)
    for b0 in range(0, blocks, per_piece):
        b1 = min(blocks, b0 + per_piece)
        yield b0, b1, b0 * block, min(numel, b1 * block)


def quantize_blockwise(x: torch.Tensor, bits: int, signed: bool,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantization of ``x`` (any shape, read flat in fp32): ``(codes, absmax)``.

    ``absmax`` (``(num_blocks,)`` fp32) is ``max|x|`` per block of ``BLOCK_SIZES[bits]`` entries;
    ``codes`` (``(codes_numel,)`` uint8) are the indices of the code-book values nearest to
    ``x / absmax`` (a zero block scales by 1 and encodes its zeros), packed two per byte for
    4 bits. Formula, rounding and sources: module docstring. ``out``: write into these
    ``(codes, absmax)`` instead of new tensors. Computed a piece of whole blocks at a time
    (:data:`PIECE_NUMEL`), so the temporaries do not scale with ``x``.
    """
    check_quantizable(x.numel(), bits)
    flat = x.reshape(-1)
    n, block = flat.numel(), BLOCK_SIZES[bits]
    if out is None:
        out = (torch.empty(codes_numel(n, bits), dtype=torch.uint8, device=flat.device),
               torch.empty(num_blocks(n, bits), dtype=torch.float32, device=flat.device))
    codes, absmax = out
    midpoints = _midpoints(bits, signed, flat.device)
    for b0, b1, e0, e1 in _pieces(n, bits):
        piece = flat[e0:e1].float()
        padded = torch.nn.functional.pad(piece, (0, (b1 - b0) * block - (e1 - e0))).view(b1 - b0, block)
        scale = padded.abs().amax(dim=1)
        absmax[b0:b1] = scale
        scaled = (padded / torch.where(scale > 0, scale, 1.0).unsqueeze(1)).clamp_(-1.0, 1.0)
        # Index of the nearest value: the number of midpoints at or below the input (ties upward).
        piece_codes = torch.bucketize(scaled.view(-1)[: e1 - e0], midpoints, right=True, out_int32=True).to(torch.uint8)
        if bits == 4:  # whole blocks of an even size: e0, e1 even
            codes[e0 // 2 : e1 // 2] = (piece_codes[0::2] << 4) | piece_codes[1::2]
        else:
            codes[e0:e1] = piece_codes
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool, numel: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: the flat fp32 tensor ``q[c_i] · absmax_b`` of ``numel``
    entries (unpacking 4-bit codes high nibble first). All-zero codes and absmax give zeros.
    Decoded a piece of whole blocks at a time, into one new fp32 tensor."""
    book = code_book(bits, signed, codes.device)
    block = BLOCK_SIZES[bits]
    values = torch.empty(numel, dtype=torch.float32, device=codes.device)
    for b0, b1, e0, e1 in _pieces(numel, bits):
        if bits == 4:
            packed = codes[e0 // 2 : e1 // 2]
            piece_codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).view(-1)
        else:
            piece_codes = codes[e0:e1]
        piece = torch.nn.functional.pad(book[piece_codes.long()], (0, (b1 - b0) * block - (e1 - e0))).view(b1 - b0, block)
        values[e0:e1] = piece.mul_(absmax[b0:b1].unsqueeze(1)).view(-1)[: e1 - e0]
    return values


def decode_state(codes: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool,
                 shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A quantized state tensor (``codes`` and block ``absmax`` as the optimizer stores them) as a
    new fp32 tensor of ``shape``, to update in place and write back with :func:`encode_state_`."""
    numel = 1
    for size in shape:
        numel *= size
    return dequantize_blockwise(codes, absmax, bits, signed, numel).view(shape)


def encode_state_(codes: torch.Tensor, absmax: torch.Tensor, value: torch.Tensor, bits: int, signed: bool) -> None:
    """Requantize the fp32 ``value`` into the stored ``codes`` and ``absmax``, in place."""
    quantize_blockwise(value, bits, signed, out=(codes, absmax))
