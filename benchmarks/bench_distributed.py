"""Multi-process training on CPU: what each ``--strategy`` / ``--comm`` costs in throughput, bytes
on the wire and memory, and what each ``--comm`` would send for LLaMA-1B and LLaMA-7B.

    python benchmarks/bench_distributed.py --data ../shared/data/pydocs [--model llama_20m] [--steps 30]
        [--batch-size 4] [--seq-len 256] [--out benchmarks/results] [--work runs/bench/distributed] [--readme README.md]
    python benchmarks/bench_distributed.py --render --readme README.md   # only re-render the README block from the JSON
    python benchmarks/bench_distributed.py --data ... --dry-run          # print the command lines and the formula table

**Measured** (:data:`ROWS`, each a separate ``torchrun --standalone --nproc_per_node 2 -m lowrank
pretrain`` on gloo, ``OMP_NUM_THREADS=--threads`` per rank): DDP without a hook, DDP with each
``--comm`` (``bf16``, ``fp16``, ``powersgd``, ``onebit`` on ``--method``, default ``low_rank``, a
plain-Adam method 1-bit Adam accepts; ``projected`` and its own DDP baseline on
``--projected-method``, default ``galore``, since it needs a GaLore-style projection:
:func:`lowrank.distributed.strategy.check_comm`), and ``--strategy fsdp2`` on ``--method``. Per row:

* tokens/s: the run's ``summary.json`` ``tokens_per_s`` (both ranks' tokens over rank 0's median
  step time after the first 3 steps);
* bytes sent per rank per step: the mean of ``metrics.jsonl``'s ``comm_bytes`` over the steps after
  ``--warmup`` (what the hook hands to its collectives, :mod:`lowrank.distributed.comm`; at 2 ranks
  a ring all-reduce sends exactly that much per rank). DDP without a hook logs nothing (the
  strategy only counts with ``--comm``): its figure is computed, the fp32 gradients of the
  trainable parameters (:func:`lowrank.accounting.gradient_bytes`, DDP's all-reduce payload).
  FSDP2 logs nothing either: its figure is the ideal ring traffic per rank computed from the
  shapes (:func:`fsdp2_traffic`: each decoder layer all-gathered before its forward and again
  before its backward, the root unit once, the gradients reduce-scattered; each collective sends
  ``(w − 1)/w`` of the full tensor per rank; padding ignored);
* peak memory: ``summary.json`` ``peak_memory_bytes`` (rank 0's peak resident set on CPU, Python
  and libraries included) for DDP and FSDP2, next to :func:`lowrank.memory.estimate` per rank
  (``world_size=1`` under DDP, ``2`` under FSDP2, as ``lowrank memory --fsdp2 2``), which counts
  tensors only.

**Threads.** ``OMP_NUM_THREADS`` is set as asked, but on CPU
:func:`lowrank.distributed.setup.init_distributed` then calls ``torch.set_num_threads(cpu_count //
ranks)`` whatever it says; the JSON records both (``threads``, ``torch_threads_per_rank``). On a
2-core machine with 2 ranks both are 1.

``--warmup`` (default a third of ``--steps``, at most 10) is the ``--freeze-step`` of the ``onebit``
and ``powersgd`` rows (1-bit Adam's variance freeze, PowerSGD's ``start_powerSGD_iter``), so that
both compress within a short run. GaLore's projector is refreshed at step 1 and then every
``update_proj_gap`` (200) steps: the ``projected`` row's mean is the between-refreshes figure.

**PowerSGD** on gloo: ``lowrank`` finishes each DDP bucket's hook before the next starts (PyTorch's
``powerSGD_hook`` alone lets the ranks interleave the buckets' collectives differently, and gloo
aborts; :func:`lowrank.distributed.comm._one_bucket_at_a_time`), so its tokens/s here include that
serialisation.

**Formula** (:func:`formula_bytes`, no training, models built on the ``meta`` device): what each
``--comm`` hands to its collectives per step for ``--formula-models`` (LLaMA-1B and 7B), at
``--formula-world`` ranks, with the code's own rules: the byte counters of
:mod:`lowrank.distributed.comm` run on one bucket of the dense model's gradients (fp32 ``4·N``;
``bf16`` / ``fp16`` ``2·N``; PowerSGD's per-matrix ``(n + m)·r·4`` where PyTorch's
``_should_compress`` says so, ``r`` = our ``matrix_approximation_rank``), the ``projected`` hook's
own choice of matrices (``R = PᵀG``, ``4·r·max(m, n)`` between refreshes, ``r`` the preset's rank)
and 1-bit Adam's wire format (``padded_numel(N, w)/8 + 4·w`` per tensor, after the freeze).

Writes ``<out>/distributed.json`` (settings, machine, per row the command, every number and where
it came from, the formula table) and, with ``--readme``, the block between ``<!-- distributed -->``
and ``<!-- /distributed -->`` (:func:`render_block`).

**Running time** (llama_20m, vocab 4096, 30 steps of 4 × 256 per rank, one thread per rank on 2
cores; estimated, not measured): ~0.5–1 s per step, plus ~12–15 s of torchrun and import start-up
and a few seconds of evaluation and checkpoint per run (measured on the tiny model: 13–18 s per
3-step run), so ~30–60 s per row, 5–10 minutes for the 8 rows, plus ~1 minute for the BPE once
unless ``--tokenizer`` reuses one.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, comma_names, machine_info, replace_readme_block, write_result  # noqa: E402
from lowrank.run.metrics import read_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "distributed"
MARKERS = ("<!-- distributed -->", "<!-- /distributed -->")
FORMULA_KINDS = ("none", "bf16", "fp16", "powersgd", "projected", "onebit")


@dataclass(frozen=True)
class Row:
    """One measured configuration: ``role`` says which method it runs (``--method`` or ``--projected-method``)."""

    label: str
    role: str
    strategy: str
    comm: str

    def title(self) -> str:
        if self.strategy == "fsdp2":
            return "FSDP2"
        return "DDP" if self.comm == "none" else f"DDP + `--comm {self.comm}`"


ROWS = (
    Row("ddp", "base", "ddp", "none"),
    Row("ddp-bf16", "base", "ddp", "bf16"),
    Row("ddp-fp16", "base", "ddp", "fp16"),
    Row("ddp-powersgd", "base", "ddp", "powersgd"),
    Row("ddp-onebit", "base", "ddp", "onebit"),
    Row("fsdp2", "base", "fsdp2", "none"),
    Row("ddp-projected-baseline", "projected", "ddp", "none"),
    Row("ddp-projected", "projected", "ddp", "projected"),
)


# ---------------------------------------------------------------------- formulas (meta device)


class _MetaBucket:
    """The part of ``torch.distributed.GradBucket`` that :mod:`lowrank.distributed.comm`'s byte
    counters read: one bucket holding every gradient (bucketing changes no total)."""

    def __init__(self, gradients: list[torch.Tensor]) -> None:
        self._gradients = gradients
        dtype = gradients[0].dtype if gradients else torch.float32
        self._buffer = torch.empty(sum(g.numel() for g in gradients), dtype=dtype, device="meta")

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._gradients

    def is_last(self) -> bool:
        return True


def _meta_model(model_config, method: str, rank: int | None = None):
    from lowrank.memory.build import build, load_config, resolve

    config, _ = load_config(model_config)
    return build(config, resolve(method, rank=rank), device="meta")


def powersgd_settings() -> dict[str, Any]:
    """Our PowerSGD wiring (:data:`lowrank.distributed.comm.POWERSGD_DEFAULTS`) over PyTorch's
    ``PowerSGDState`` defaults (``min_compression_rate``)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from lowrank.distributed.comm import POWERSGD_DEFAULTS

    defaults = {name: p.default for name, p in inspect.signature(PowerSGDState.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {"min_compression_rate": defaults["min_compression_rate"],
            "pytorch_matrix_approximation_rank": defaults["matrix_approximation_rank"], **POWERSGD_DEFAULTS}


def comm_bytes(model: torch.nn.Module, kind: str, world_size: int, optimizer=None) -> dict[str, int]:
    """What ``--comm kind`` hands to its collectives in one step (after PowerSGD's vanilla phase,
    between projector refreshes, after 1-bit Adam's freeze), by category, for the trainable
    parameters of ``model`` (on any device, ``meta`` included); ``optimizer``: the GaLore-style
    ``ProjectedAdamW`` over them, for ``projected``."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from lowrank.distributed.comm import (POWERSGD_DEFAULTS, CommStats, _bucket_bytes, _powersgd_bytes,
                                          _ProjectedHook)
    from lowrank.distributed.onebit import onebit_bytes
    from lowrank.optim import projection as proj

    params = [p for p in model.parameters() if p.requires_grad]
    bucket = _MetaBucket([torch.empty(p.shape, dtype=p.dtype, device="meta") for p in params])
    if kind in ("none", "bf16", "fp16"):
        return _bucket_bytes(None if kind == "none" else 2)(bucket)
    if kind == "powersgd":
        state = PowerSGDState(process_group=None, **POWERSGD_DEFAULTS)
        state.iter = state.start_powerSGD_iter
        return _powersgd_bytes(state)(bucket)
    if kind == "onebit":
        return onebit_bytes([p.numel() for p in params], world_size)
    if kind == "projected":
        if optimizer is None:
            raise ValueError("comm_bytes(..., 'projected') needs the GaLore-style optimizer")
        names = {id(p): name for name, p in model.named_parameters()}
        hook = _ProjectedHook(optimizer, names, None, CommStats("projected", world_size))
        full = projected = 0
        for p in params:
            options = hook.projected.get(id(p))
            if options is None:
                full += p.numel() * p.element_size()
                continue
            rank = proj.effective_rank(p.shape, options["rank"])
            basis = torch.empty(min(p.shape), rank, dtype=p.dtype, device="meta")
            projected += proj.project(torch.empty(p.shape, dtype=p.dtype, device="meta"), basis).numel() * p.element_size()
        return {"full": full, "projected": projected}
    raise ValueError(f"unknown --comm {kind!r}; expected one of {', '.join(FORMULA_KINDS)}")


def fsdp2_traffic(model: torch.nn.Module, world_size: int) -> dict[str, float]:
    """Ideal ring traffic per rank of one FSDP2 step under :func:`lowrank.distributed.fsdp.shard_model`
    (parameters' own dtype, no mixed precision, padding ignored): ``(w − 1)/w`` of each decoder
    layer's parameters twice (all-gather before forward and before backward, ``reshard_after_forward``),
    of the root unit's once (kept from forward to backward), and of the trainable gradients
    (reduce-scatter)."""
    from lowrank.distributed.fsdp import decoder_layers
    from lowrank.wrap import unwrap_model

    model = unwrap_model(model)
    share = (world_size - 1) / world_size
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    layer_bytes = sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
    root_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_layers)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    detail = {"all_gather": share * (2 * layer_bytes + root_bytes), "reduce_scatter": share * grad_bytes}
    return {**detail, "total": detail["all_gather"] + detail["reduce_scatter"]}


def formula_bytes(model_config, world_size: int, *, dense_method: str = "full_rank",
                  projected_method: str = "galore", rank: int | None = None) -> dict[str, Any]:
    """The formula table's numbers for one model (:func:`comm_bytes` per ``--comm`` kind on the
    dense model's gradients; ``projected`` with ``projected_method`` at ``rank``, default its preset's)."""
    from lowrank.memory.build import load_config, resolve

    config, name = load_config(model_config)
    dense, _ = _meta_model(config, dense_method)
    galore, optimizer = _meta_model(config, projected_method, rank)
    numel = sum(p.numel() for p in dense.parameters() if p.requires_grad)
    rows = {}
    for kind in FORMULA_KINDS:
        detail = comm_bytes(galore if kind == "projected" else dense, kind, world_size,
                            optimizer if kind == "projected" else None)
        rows[kind] = {"bytes": sum(detail.values()), "detail": detail}
    base = rows["none"]["bytes"]
    for row in rows.values():
        row["ratio"] = row["bytes"] / base
    return {"model": name, "parameters": numel, "world_size": world_size, "dense_method": dense_method,
            "projected_method": projected_method, "projected_rank": resolve(projected_method, rank=rank).rank,
            "rows": rows}


# ---------------------------------------------------------------------- the runs


def _method(args, row: Row) -> str:
    return args.method if row.role == "base" else args.projected_method


def pretrain_argv(args, row: Row, run_dir: Path) -> list[str]:
    """``lowrank pretrain`` arguments of one row."""
    argv = ["pretrain", "--method", _method(args, row), "--model", args.model, "--data", str(args.data),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--max-steps", str(args.steps),
            "--eval-every", "0", "--eval-tokens", str(args.eval_tokens), "--save-every", "0", "--log-every", "1",
            "--out", str(run_dir), "--overwrite", "--cache-dir", str(args.work / "cache"), "--device", "cpu",
            "--seed", str(args.seed), "--no-progress", "--no-plot", "--json-out", str(run_dir / "summary.json")]
    if args.tokenizer:
        argv += ["--tokenizer", str(args.tokenizer)]
    if args.vocab_size:
        argv += ["--vocab-size", str(args.vocab_size)]
    if args.rank:
        argv += ["--rank", str(args.rank)]
    if row.strategy != "ddp":
        argv += ["--strategy", row.strategy]
    if row.comm != "none":
        argv += ["--comm", row.comm]
    if row.comm in ("onebit", "powersgd"):
        argv += ["--freeze-step", str(args.warmup)]
    return argv


def powersgd_start(args) -> int:
    """The step PowerSGD starts compressing at in the PowerSGD row."""
    from lowrank.distributed.strategy import powersgd_start_step

    return powersgd_start_step(args.warmup)


def command(args, row: Row, run_dir: Path) -> list[str]:
    """The torchrun command line of one row (``python -m torch.distributed.run`` is ``torchrun``)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    return [*launcher, "-m", "lowrank", *pretrain_argv(args, row, run_dir)]


def _shown(argv: list[str]) -> str:
    """A command line as a person would type it (``torchrun`` for the launcher)."""
    text = shlex.join(argv)
    return text.replace(shlex.join([sys.executable, "-m", "torch.distributed.run"]), "torchrun", 1)


def _vocab_size(run_dir: Path) -> int | None:
    """The vocabulary the run's model had (the tokenizer's size, in the checkpoint's meta.json)."""
    from lowrank.integrations.export import find_checkpoint
    from lowrank.run.folder import CheckpointMeta

    try:
        return int(CheckpointMeta.read(find_checkpoint(run_dir)).model_config["vocab_size"])
    except Exception:  # noqa: BLE001 - a run without a checkpoint: the caller falls back
        return None


def check_rows(args, rows: list[Row]) -> None:
    """Every row's method, rank and ``--comm`` on the model, before any run starts (the checks
    ``lowrank pretrain`` would make after each torchrun start-up): a one-line exit otherwise."""
    from lowrank.distributed.strategy import check_comm
    from lowrank.errors import UsageError
    from lowrank.methods import load_method

    for row in rows:
        try:
            _meta_model(args.model, _method(args, row), args.rank)
            check_comm(row.comm, row.strategy, load_method(_method(args, row)).with_overrides({}, rank=args.rank))
        except UsageError as error:
            raise SystemExit(f"row {row.label}: {error}") from None


def run_row(args, row: Row) -> dict[str, Any]:
    """Train one row and read back its numbers (a failed run is recorded, not raised)."""
    run_dir = args.work / row.label
    argv = command(args, row, run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = args.work / f"{row.label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{row.label}] {_shown(argv)}", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        try:
            rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=args.run_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.perf_counter() - started, 1)
    entry: dict[str, Any] = {"label": row.label, "title": row.title(), "method": _method(args, row), "strategy": row.strategy,
                             "comm": row.comm, "command": _shown(argv), "log": str(log), "seconds": seconds}
    if row.comm == "powersgd":
        entry["powersgd_start"] = powersgd_start(args)
        if entry["powersgd_start"] >= args.steps:
            entry["note"] = f"PowerSGD's vanilla phase (it compresses after its first {entry['powersgd_start']} steps)"
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        tail = log.read_text()[-2000:] if log.is_file() else ""
        entry.update(failed=True, reason=f"exit code {rc}" if rc is not None else f"timed out after {args.run_timeout} s",
                     log_tail=tail)
        print(f"[{row.label}] FAILED ({entry['reason']}); see {log}", flush=True)
        return entry
    summary = json.loads(summary_path.read_text())
    steps = [r for r in read_records(run_dir / "metrics.jsonl") if "loss" in r]
    after = [r for r in steps if r["step"] > args.warmup]
    logged = [r["comm_bytes"] for r in steps if "comm_bytes" in r]
    entry.update({
        "failed": False,
        "summary": {key: summary.get(key) for key in (
            "tokens_per_s", "peak_memory_bytes", "peak_memory_kind", "trainable_params", "frozen_params", "world_size",
            "strategy", "comm", "comm_bytes_total", "final_train_loss", "val_ppl", "steps", "tokens", "parameter_hashes")},
        "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_s_after_warmup": statistics.median(r["tokens_per_s"] for r in after) if after else None,
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "vocab_size": _vocab_size(run_dir),
        "comm_bytes_per_step": logged,
    })
    counted = [r["comm_bytes"] for r in after if "comm_bytes" in r]
    if counted:
        entry["bytes_per_step"] = statistics.fmean(counted)
        entry["bytes_source"] = f"measured: mean comm_bytes of steps {args.warmup + 1}-{args.steps} (metrics.jsonl)"
    print(f"[{row.label}] {entry['tokens_per_s']:,.0f} tokens/s, peak {entry['peak_memory_bytes'] / 2**20:,.0f} MiB, "
          f"{seconds:.0f} s", flush=True)
    return entry


def computed_numbers(args, entries: list[dict]) -> None:
    """Bytes per step of the rows that log none (DDP without a hook, FSDP2) and the memory
    estimates of the rows without ``--comm``, from the runs' own model (its vocabulary)."""
    from lowrank.accounting import gradient_bytes
    from lowrank.memory import estimate
    from lowrank.models import load_model_config

    vocab = next((e["vocab_size"] for e in entries if e.get("vocab_size")), None)
    config = load_model_config(args.model, **({"vocab_size": vocab} if vocab else {}))
    for entry in entries:
        if entry.get("failed"):
            continue
        model, _ = _meta_model(config, entry["method"], args.rank)
        if entry.get("bytes_per_step") is None and entry["comm"] == "none":
            if entry["strategy"] == "fsdp2":
                traffic = fsdp2_traffic(model, args.nproc)
                entry["bytes_per_step"] = traffic["total"]
                entry["bytes_detail"] = traffic
                entry["bytes_source"] = ("computed: FSDP2 ring traffic per rank, (w-1)/w x (decoder layers' parameters x 2 "
                                         "+ root's + gradients), fp32")
            else:
                entry["bytes_per_step"] = gradient_bytes(model)
                entry["bytes_source"] = "computed: fp32 gradients of the trainable parameters (DDP's all-reduce; no hook logs it)"
        if entry["comm"] == "none":
            world = args.nproc if entry["strategy"] == "fsdp2" else 1
            e = estimate(config, entry["method"], rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len,
                         world_size=world)
            entry["estimate"] = {"world_size": world, "total": e.total, "model_state": e.model_state,
                                 "weights": e.weights, "gradients": e.gradients, "optimizer_state": e.optimizer_state,
                                 "optimizer_extra": e.optimizer_extra, "activations": e.activations,
                                 "weight_detail": e.weight_detail}
    for entry in entries:
        baseline = next((b for b in entries if not b.get("failed") and b["method"] == entry.get("method")
                         and b["strategy"] == "ddp" and b["comm"] == "none"), None)
        if entry.get("bytes_per_step") is not None and baseline is not None:
            entry["bytes_ratio"] = entry["bytes_per_step"] / baseline["bytes_per_step"]


# ---------------------------------------------------------------------- the README block


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.2f} MiB"


def _size(value: float) -> str:
    if value >= 2**30:
        return f"{value / 2**30:,.2f} GiB"
    return f"{value / 2**20:,.1f} MiB"


def measured_table(data: dict) -> list[str]:
    lines = ["| configuration | method | tokens/s | sent per rank per step | vs DDP (same method) | bytes from |",
             "|---|---|---:|---:|---:|---|"]
    for row in data["rows"]:
        if row.get("failed"):
            lines.append(f"| {row['title']} | `{row['method']}` | failed ({row['reason']}) | - | - | - |")
            continue
        ratio = row.get("bytes_ratio")
        source = row.get("bytes_source", "-").split(":")[0] + (f"; {row['note']}" if row.get("note") else "")
        lines.append(f"| {row['title']} | `{row['method']}` | {row['tokens_per_s']:,.0f} | {_mib(row.get('bytes_per_step'))} | "
                     f"{'-' if ratio is None else f'{ratio:.3f}×'} | {source} |")
    return lines


def memory_table(data: dict) -> list[str]:
    rows = [r for r in data["rows"] if not r.get("failed") and r.get("estimate") and r["method"] == data["settings"]["method"]]
    if not rows:
        return []
    lines = ["| strategy | method | peak RSS, rank 0 (measured) | estimate per rank: total | of which weights + gradients + optimizer |",
             "|---|---|---:|---:|---:|"]
    for row in rows:
        e = row["estimate"]
        lines.append(f"| {row['title']} | `{row['method']}` | {_mib(row['peak_memory_bytes'])} | {_mib(e['total'])} | "
                     f"{_mib(e['model_state'])} |")
    return lines


def formula_table(data: dict) -> list[str]:
    formulas = data["formula"]
    if not formulas:
        return []
    what = {
        "none": "fp32 gradients, `4·N` (DDP, no hook)",
        "bf16": "bf16 gradients, `2·N`",
        "fp16": "fp16 gradients, `2·N`",
        "powersgd": "P and Q per compressed matrix, `4·(n+m)·r`; vectors in full",
        "projected": "`R = PᵀG`, `4·r·max(m,n)` per projected matrix; the rest in full",
        "onebit": "packed signs + one fp32 scale per chunk, `N'/8 + 4·w` per tensor",
    }
    settings = data["settings"]["formula"]
    header = "| `--comm` | what travels | " + " | ".join(f"{f['model']} ({f['parameters'] / 1e9:.2f} B params)" for f in formulas) + " |"
    lines = [header, "|---|---|" + "---:|" * len(formulas)]
    for kind in FORMULA_KINDS:
        label = "none (DDP)" if kind == "none" else f"`{kind}`"
        cells = [f"{_size(f['rows'][kind]['bytes'])} ({f['rows'][kind]['ratio']:.3f}×)" for f in formulas]
        lines.append(f"| {label} | {what[kind]} | " + " | ".join(cells) + " |")
    psgd = settings["powersgd"]
    lines += ["", (f"Per step and rank, counted as `comm_bytes` counts (the payload handed to the collectives; a ring "
                   f"all-reduce sends 2(w−1)/w of it per rank, {2 * (settings['world_size'] - 1) / settings['world_size']:.2f}× "
                   f"at w = {settings['world_size']}), for the dense model's gradients (`{settings['dense_method']}`). PowerSGD: "
                   f"rank {psgd['matrix_approximation_rank']} (our default; PyTorch's is "
                   f"{psgd['pytorch_matrix_approximation_rank']}), a matrix compressed when "
                   f"`(n+m)·r·{psgd['min_compression_rate']:g} < n·m`, after `--freeze-step` (default: the LR warm-up; "
                   f"before it: `4·N`). `projected`: `{settings['projected_method']}` at rank {formulas[0]['projected_rank']} "
                   f"(the preset's), between projector refreshes (refresh steps send `4·N`). `onebit`: after 1-bit Adam's "
                   f"freeze (before: `4·N`), `N' = ceil(N/8w)·8w`, w = {settings['world_size']}.")]
    return lines


def settings_line(data: dict) -> str:
    s, machine = data["settings"], data["machine"]
    load = machine.get("load_average") or {}
    load_text = f", load average {load['start'][0]:.1f} → {load['end'][0]:.1f}" if load else ""
    vocab = f", vocabulary {s['vocab_size']:,}" if s.get("vocab_size") else ""
    return (f"{s['nproc']} CPU ranks on gloo, one `torchrun --standalone --nproc_per_node {s['nproc']} -m lowrank pretrain` "
            f"per row: `{s['model']}`{vocab}, {s['steps']} steps of {s['batch_size']} × {s['seq_len']} tokens per rank, "
            f"`OMP_NUM_THREADS={s['threads']}` ({s['torch_threads_per_rank']} torch thread(s) per rank). tokens/s: both ranks "
            f"(`summary.json`); bytes: mean `comm_bytes` of steps {s['warmup'] + 1}–{s['steps']} (1-bit Adam freezes at step "
            f"{s['warmup']}, PowerSGD compresses after step {s['powersgd_start']}, GaLore refreshes its projector at step 1 "
            f"only), computed for DDP without "
            f"a hook (fp32 gradients) and FSDP2 (ring traffic from the shapes); at 2 ranks a ring all-reduce sends its "
            f"payload once per rank. {machine['cpu']} ({machine['cpu_count']} cores){load_text}, torch {machine['torch']}; "
            f"`python benchmarks/bench_distributed.py`, `benchmarks/results/distributed.json`.")


def render_block(data: dict) -> str:
    """The README block: settings, the measured table, DDP vs FSDP2 memory, the formula table."""
    memory = memory_table(data)
    sections = [[settings_line(data)], measured_table(data)]
    if memory:
        sections.append(["Peak memory per rank, DDP vs FSDP2 (measured: the process's peak resident set, Python and "
                         "libraries included; estimate: `lowrank memory` tensors only, `--fsdp2 "
                         f"{data['settings']['nproc']}` for FSDP2):", "", *memory])
    formula = formula_table(data)
    if formula:
        sections.append(["What each `--comm` sends per step at scale (computed from the parameter shapes with the code's "
                         "own rules, not measured):", "", *formula])
    return "\n\n".join("\n".join(section) for section in sections if section)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the ``<!-- distributed -->`` block; False when the README has no markers."""
    return replace_readme_block(readme, *MARKERS, block)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", default=None, help="corpus (e.g. ../shared/data/pydocs); required unless --render")
    add("--model", default="llama_20m")
    add("--method", default="low_rank", help="method of every row but the projected pair (onebit needs plain Adam)")
    add("--projected-method", default="galore", help="method of --comm projected and its DDP baseline (GaLore-style)")
    add("--rank", type=int, default=None, help="override every method's rank (default: the presets')")
    add("--steps", type=int, default=30)
    add("--batch-size", type=int, default=4, help="sequences per rank per step")
    add("--seq-len", type=int, default=256)
    add("--warmup", type=int, default=None,
        help="steps left out of the byte means; PowerSGD's start_powerSGD_iter and 1-bit Adam's --freeze-step "
             "(default: a third of --steps, 2 to 10)")
    add("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    add("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    add("--vocab-size", type=int, default=4096, help="BPE vocabulary (the CPU suites' 4096; 0: the model config's)")
    add("--tokenizer", default=None, help="a trained tokenizer to reuse (default: train one, cached in <work>/cache)")
    add("--eval-tokens", type=int, default=8192, help="validation tokens at the end of each run")
    add("--seed", type=int, default=0)
    add("--rows", type=comma_names, default=[r.label for r in ROWS], help=f"rows to run ({', '.join(r.label for r in ROWS)})")
    add("--formula-models", type=comma_names, default=["llama_1b", "llama_7b"])
    add("--formula-world", type=int, default=8, help="ranks of the formula table (1-bit Adam's padding and scales)")
    add("--formula-rank", type=int, default=None, help="projected rank of the formula table (default: the preset's)")
    add("--work", type=Path, default=ROOT / "runs" / "bench" / NAME, help="run folders, logs and the data cache")
    add("--out", type=Path, default=RESULTS, help=f"folder of {NAME}.json")
    add("--readme", type=Path, default=None, help="README whose <!-- distributed --> block to replace")
    add("--render", action="store_true", help=f"only render the block from <out>/{NAME}.json")
    add("--dry-run", action="store_true", help="print the command lines and the formula table; train nothing")
    add("--run-timeout", type=int, default=1800, help="seconds one run may take")
    args = parser.parse_args(argv)
    if not args.render and not args.data:
        parser.error("--data is required (unless --render)")
    unknown = sorted(set(args.rows) - {r.label for r in ROWS})
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(r.label for r in ROWS)}")
    for option in ("steps", "batch_size", "seq_len", "threads", "eval_tokens", "formula_world", "run_timeout"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    if args.nproc < 2:
        parser.error("--nproc must be at least 2 (a communication benchmark)")
    if args.warmup is None:
        args.warmup = max(1, min(10, args.steps // 3))
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    args.work = args.work.resolve()
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    path = args.out / f"{NAME}.json"
    if args.render:
        data = json.loads(path.read_text())
    else:
        started, load_start = time.perf_counter(), os.getloadavg()
        rows = [r for r in ROWS if r.label in args.rows]
        formula = [formula_bytes(model, args.formula_world, projected_method=args.projected_method, rank=args.formula_rank)
                   for model in args.formula_models]
        if args.dry_run:
            for row in rows:
                print(_shown(command(args, row, args.work / row.label)))
            print("\n".join(formula_table({"formula": formula, "settings": {"formula": _formula_settings(args)}})))
            return {"formula": formula}
        check_rows(args, rows)
        entries = [run_row(args, row) for row in rows]
        computed_numbers(args, entries)
        data = {
            "settings": {
                "model": args.model, "vocab_size": next((e["vocab_size"] for e in entries if e.get("vocab_size")), None),
                "method": args.method, "projected_method": args.projected_method, "rank": args.rank,
                "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup,
                "nproc": args.nproc, "backend": "gloo", "threads": args.threads, "powersgd_start": powersgd_start(args),
                # lowrank.distributed.setup.init_distributed sets each CPU rank's torch threads itself
                "torch_threads_per_rank": max(1, (os.cpu_count() or 1) // args.nproc),
                "eval_tokens": args.eval_tokens, "seed": args.seed, "data": str(args.data), "work": str(args.work),
                "host_cpu_count": os.cpu_count(), "torch": torch.__version__,
                "formula": _formula_settings(args),
            },
            "rows": entries,
            "formula": formula,
            "seconds_total": round(time.perf_counter() - started, 1),
        }
        data["machine"] = {**machine_info(), "load_average": {"start": list(load_start), "end": list(os.getloadavg())}}
        path = write_result(NAME, data, out_dir=args.out)
        data = json.loads(path.read_text())
        print(f"wrote {path} in {data['seconds_total'] / 60:.1f} min")
    block = render_block(data)
    print(block)
    if args.readme and update_readme(args.readme, block):
        print(f"\nupdated the {NAME} block of {args.readme}")
    return data


def _formula_settings(args) -> dict[str, Any]:
    return {"world_size": args.formula_world, "dense_method": "full_rank", "projected_method": args.projected_method,
            "rank": args.formula_rank, "powersgd": powersgd_settings()}


if __name__ == "__main__":
    main()
