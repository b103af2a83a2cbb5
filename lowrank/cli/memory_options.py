"""The options that set a run's memory, defined once for ``lowrank pretrain`` and ``lowrank memory``:
the same names, choices and meanings in both, so an estimate is asked for with the very flags the
run takes (``lowrank memory ... --param-dtype bf16 --activation-checkpointing --layerwise-step``).

Only the defaults differ, and the caller gives them: a training run's micro-batch and sequence
against an estimate's one sequence of the model's length. The FSDP2 ranks are the one setting
named differently, because a training run takes them from ``torchrun`` (``--strategy fsdp2``)
and an estimate from ``--fsdp2 RANKS``.
"""

from __future__ import annotations

import argparse

from ..precision import PARAM_DTYPES

__all__ = ["add_memory_options", "param_dtype_name"]

# The storage dtypes lowrank pretrain runs, by their short names, and the torch names they stand for.
_LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def param_dtype_name(value: str) -> str:
    """``--param-dtype``'s value as one of :data:`lowrank.precision.PARAM_DTYPES`' names
    (``bfloat16`` → ``bf16``)."""
    name = _LONG_NAMES.get(value, value)
    if name not in PARAM_DTYPES:
        raise argparse.ArgumentTypeError(
            f"invalid choice {value!r}: lowrank pretrain stores parameters in {' or '.join(PARAM_DTYPES)}")
    return name


def add_memory_options(parser: argparse.ArgumentParser, *, batch_size: int, seq_len: int | None, seq_len_help: str,
                       param_dtype: str | None, param_dtype_help: str = "", older_spellings: bool = False) -> None:
    """``--rank``, ``--param-dtype``, ``--batch-size``, ``--seq-len``, ``--activation-checkpointing``
    and ``--layerwise-step``, with the caller's defaults. Their destinations are the
    :class:`~lowrank.run.TrainConfig` fields of the same names. ``older_spellings``: also accept
    ``--weight-dtype`` and ``--checkpointing`` (``lowrank memory``'s first names)."""
    add = parser.add_argument
    add("--rank", type=int, default=None, help="override the method's rank (factors and/or gradient projection)")
    add("--param-dtype", *(["--weight-dtype"] if older_spellings else []), dest="param_dtype", type=param_dtype_name,
        default=param_dtype, metavar="{" + ",".join(PARAM_DTYPES) + "}",
        help="storage of parameters and gradients. bf16: the optimizer computes in fp32 per tensor and writes back with "
             "stochastic rounding (training.bf16_rounding); activations are computed in bf16 on a GPU and in fp32 on a "
             "CPU (no fast bf16 matmul there)" + param_dtype_help)
    add("--batch-size", type=int, default=batch_size, help="micro-batch size per process")
    add("--seq-len", type=int, default=seq_len, help=seq_len_help)
    add("--activation-checkpointing", *(["--checkpointing"] if older_spellings else []), dest="activation_checkpointing",
        action="store_true",
        help="recompute every decoder layer in backward (non-reentrant): keeps one input per layer instead of its "
             "activations, for one extra forward per layer")
    add("--layerwise-step", action="store_true",
        help="update each parameter inside backward as soon as its gradient is complete and free the gradient (no full "
             "gradient set held; one process and FSDP2; DDP composes with --comm none/bf16/fp16/powersgd but holds its "
             "buckets, and gradient accumulation > 1 holds the whole set). Clipping uses the previous step's global norm; "
             "a non-finite gradient skips that parameter's update")
