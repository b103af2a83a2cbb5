"""``lowrank pretrain``'s command line: flags → :class:`~lowrank.run.TrainConfig`, and the
summary table it prints."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any

from ..errors import UsageError
from ..methods import available_methods
from ..run import TrainConfig, pretrain
from .memory_options import add_memory_options

__all__ = ["add_arguments", "run_from_args", "parse_set", "format_summary"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    add = parser.add_argument
    add("--method", default=defaults.method, help=f"preset name ({', '.join(available_methods())}) or a YAML path")
    add("--model", default=defaults.model, help="bundled model (tiny, llama_9m ... llama_7b), a Hugging Face config JSON, or a hub name")
    add("--data", default=defaults.data, help="'builtin' (Python stdlib docstrings), a .txt/.txt.gz/.jsonl/.parquet file or folder, or a hub dataset 'owner/name[:config]'")
    add("--tokenizer", default=None, help="hub name or local path; default: train a byte-level BPE on the training split")
    add("--vocab-size", type=int, default=None, help="vocabulary of the trained BPE (default: the model config's)")
    add("--lr", type=float, default=None, help="override the method's peak learning rate")
    add("--cycle-length", type=int, default=None, help="override the restart period (steps)")
    add_memory_options(parser, batch_size=defaults.batch_size, seq_len=defaults.seq_len, seq_len_help="tokens per sequence",
                       param_dtype=None, param_dtype_help=" (default: the preset's training.param_dtype, fp32)")
    add("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=None)
    budget.add_argument("--max-tokens", type=int, default=None)
    add("--eval-every", type=int, default=defaults.eval_every, help="steps between validation evaluations (0: only at the end)")
    add("--eval-tokens", type=int, default=defaults.eval_tokens, help="validation tokens (chunks spread over the whole validation split)")
    add("--save-every", type=int, default=defaults.save_every, help="steps between checkpoints (0: only at the end)")
    add("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    add("--log-every", type=int, default=defaults.log_every)
    add("--out", default=None, help="run folder (default: runs/<method>-<model>)")
    add("--resume", default=None, help="'latest' (in --out) or a run / checkpoint folder")
    add("--overwrite", action="store_true", help="start afresh in --out, deleting the checkpoints of an earlier run there")
    add("--seed", type=int, default=defaults.seed)
    add("--json-out", default=None, help="also write the final summary as JSON here")
    add("--cache-dir", default=None, help="where the trained tokenizer and token caches live (default: the run folder); share it between runs on one corpus")
    add("--text-field", default=defaults.text_field, help="the column holding the text in .jsonl / .parquet / hub data")
    from ..distributed.strategy import COMMS, STRATEGIES

    add("--strategy", default=defaults.strategy, choices=STRATEGIES,
        help="ddp (default: DDP under torchrun, or one process) or fsdp2 (shard with FSDP2; needs torchrun)")
    add("--comm", default=defaults.comm, choices=COMMS,
        help="DDP gradient communication: PyTorch's bf16/fp16/powersgd hooks, projected (GaLore's R instead of G), "
             "or onebit (1-bit Adam); bytes sent are logged per step")
    add("--freeze-step", type=int, default=None,
        help="--comm onebit / powersgd: full-precision steps before compression starts (1-bit Adam's variance freeze, "
             "PowerSGD's start_powerSGD_iter; default: the schedule's warm-up)")
    add("--dist-timeout", type=float, default=defaults.dist_timeout,
        help="seconds a rank waits for the others before the run ends with a message naming the rank that stopped")
    from ..precision import PRECISIONS

    add("--precision", default="auto", choices=list(PRECISIONS),
        help="compute dtype. auto: with --param-dtype fp32, bf16 autocast on GPU and fp32 on CPU; with --param-dtype bf16, "
             "bf16 on GPU and fp32 computed from the bf16 storage on CPU (CPUs here have no fast bf16 matmul). "
             "fp32 / bf16 force it; bf16-mixed: autocast over fp32 storage")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--compile", action="store_true", help="torch.compile the model")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--no-plot", action="store_true", help="skip the loss-curve PNG")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any preset key, e.g. --set optimizer.weight_decay=0.1 --set restarts.rewarmup_steps=20")


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as dotted overrides; each value is read as YAML (``0.1``, ``5e-3``, ``true``,
    ``[0.9, 0.95]``), as a preset file is."""
    import yaml

    from ..methods.presets import read_yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item}: expected KEY=VALUE, e.g. --set optimizer.lr=0.001")
        try:
            overrides[key.strip()] = read_yaml(value)
        except yaml.YAMLError:
            raise UsageError(f"--set {item}: the value is not valid YAML; quote a string, e.g. --set 'key=\"text\"'") from None
    return overrides


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    # Every option is named after its TrainConfig field (--batch-size → batch_size); the rest by hand.
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(**options, progress=not args.no_progress, plot=not args.no_plot, overrides=parse_set(args.set))
    summary = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary), file=sys.stdout)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    def gib(value):
        return f"{value / 2**30:.3f} GiB" if value is not None else "-"

    rows = [
        ("method", summary["method"]),
        ("model", summary["model"]),
        ("steps / tokens", f"{summary['steps']:,} / {summary['tokens']:,}"),
        ("final train loss", f"{summary['final_train_loss']:.4f}" if summary["final_train_loss"] is not None else "-"),
        ("validation perplexity", f"{summary['val_ppl']:.2f}" if summary["val_ppl"] is not None else "-"),
        ("tokens / s", f"{summary['tokens_per_s']:,.0f}"),
        ("trainable / frozen params", f"{summary['trainable_params']:,} / {summary['frozen_params']:,}"),
        ("optimizer state", gib(summary["optimizer_state_bytes"])),
        ("params + grads + state", gib(summary["model_state_bytes"])),
        (f"peak memory ({summary['peak_memory_kind']})", gib(summary["peak_memory_bytes"])),
        ("allocator peak (one step)", gib(summary.get("allocator_peak_bytes"))),
        ("run folder", summary["run_dir"]),
    ]
    width = max(len(name) for name, _ in rows)
    line = "─" * (width + 3 + max(len(str(value)) for _, value in rows))
    return "\n".join([line] + [f"{name:<{width}} │ {value}" for name, value in rows] + [line])
