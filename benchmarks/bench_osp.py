"""Quantization readiness of a suite's trained models (issue 13): does Outlier-Safe Pre-Training
leave a model with fewer outliers that loses less under quantization, and do ApiQ and its
saliency-aware regularizer beat round-to-nearest post-training quantization?

    python benchmarks/bench_osp.py --data ../shared/data/pydocs [--suite cpu-osp] [--results benchmarks/results]
        [--work /work/bench-work] [--bits 2,3] [--calib-tokens 16384] [--eval-tokens N] [--steps 100]

For every finished run of the suite (``<results>/<suite>/<label>.json`` written by
``compare.py``, not failed, with its run folder ``<work>/<suite>/<label>`` holding a checkpoint
of the same settings hash):

1. **quant-eval** of its final checkpoint (:func:`lowrank.quant.evaluate.evaluate_quantization`;
   the model as deployed: low-rank factors merged, OSP folded): excess kurtosis and max |x| of
   the decoder layers' outputs, validation ppl in full precision and under W4 / W3 / W2 (RTN,
   symmetric absmax per group of ``--group-size`` = 128 input channels) and W4A4 / W8A8 (the same
   weights and each linear layer's input per token), every linear layer but the head, and each
   scheme's gap (quantized / full-precision ppl). Validation tokens: the run's own tokenizer
   (``<run>/tokenizer``) on the chunks training evaluated (``build_data(..., max_valid_tokens=`` the
   suite's ``eval_tokens)``, checked against the run's recorded selection hash), or an evenly
   spaced subset of them when ``--eval-tokens`` is smaller.
2. **PTQ** of the ``--ptq-contenders`` runs (``adamw``, ``osp``; the best run of each):
   :func:`lowrank.quant.ptq.quantize` at each of ``--bits`` with ``rtn``, ``apiq`` and
   ``apiq+saliency`` (the same calibration batches from the training split, the same seed, rank,
   steps and learning rate), and the validation ppl of each result on the same chunks.
3. Writes ``<results>/osp.json`` (settings, machine incl. load average, per run the training
   result's val ppl / tokens/s / optimizer-state bytes, the quant-eval numbers, the PTQ table) and
   the plot ``docs/osp_ppl_vs_bits.png`` (``--plot``), and prints a short table.
   ``benchmarks/osp_report.py`` renders the README block from the JSON (``render_block``).

**Group size on the suite's model.** LLaMA-20M's MLP is 688 wide (2⁴·43), which 128 does not
divide. Quant-eval then uses *flat* groups of 128 (128 consecutive entries of the row-major
weight, :class:`lowrank.quant.formats.QuantFormat` ``flat=True``): identical to per-row groups
for every layer whose input dimension 128 divides (q, k, v, o, gate, up) and 128-entry groups
spanning rows in ``down_proj``, so the bits per weight stay those of g128. PTQ (``quantize``)
uses the same groups (flat where 128 does not divide a layer), asymmetric min–max as ApiQ (and
the ``quantize`` default); the JSON and the README block say which.

**Defaults**, sized for 2 CPU cores and one thread (``--threads 1``): ``--eval-tokens`` = the
suite's ``eval_tokens`` (65,536 on cpu-osp: the very chunks training evaluated, so the
full-precision ppl equals the run's final val ppl), ``--calib-tokens 16384`` (16 batches of
8 × 128), ``--steps 100`` retraining steps per decoder block (``quantize``'s default is 200, where
λ was tuned; 100 saves ~5 minutes here), ``--rank 16`` (the rank λ was tuned at, on a 128-wide
model; ApiQ's 64 at hidden 4096 is r/d = 1/64, 16 at hidden 256 is 1/16; the factors add
``bits_per_weight.with_factors_bf16`` − base ≈ 1.6 bits per weight, recorded), ``--bits 2,3``.

**Running time on cpu-osp** (estimated from the FLOPs and cpu-long's ~2,800 training tokens/s per
thread, not measured): each quant-eval is 7 forward passes over 65,536 tokens, ~1 min per run,
~6 min for the 5 runs; each ApiQ run is 4 blocks × (statistics over the calibration set +
100 steps of forward/backward on 1,024 tokens) plus a validation pass, ~1–1.5 min, and each RTN
run ~15 s: ~10–12 min for the 12 quantize runs. About 15–20 minutes in all on an otherwise idle
machine; ``osp.json`` records the seconds of every step.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, comma_names, machine_info, write_result  # noqa: E402
from osp_report import PTQ_METHODS, plot, text_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLOT = ROOT / "docs" / "osp_ppl_vs_bits.png"


# ---------------------------------------------------------------------- finding the runs


def finished_runs(results: Path, suite: str, work: Path) -> tuple[list[dict], list[dict]]:
    """``(runs, skipped)``: every result JSON of ``<results>/<suite>/`` that finished and whose run
    folder still holds a checkpoint of the same settings, as ``{"label", "record", "run_dir"}``, in
    the suite's contender order; and ``{"label", "reason"}`` for the others."""
    runs, skipped = [], []
    for path in sorted((results / suite).glob("*.json")):
        label = path.stem
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            skipped.append({"label": label, "reason": f"unreadable result file ({error})"})
            continue
        run_dir = work / suite / label
        marker = run_dir / "settings_hash"
        if record.get("failed") or record.get("val_ppl") is None:
            reason = f"the run failed ({record.get('reason', 'no val_ppl')})"
        elif not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").glob("step_*")):
            reason = f"no checkpoint in {run_dir}"
        elif marker.is_file() and record.get("settings_hash") and marker.read_text().strip() != record["settings_hash"]:
            reason = f"{run_dir} belongs to other settings (settings_hash differs): a re-run is under way"
        elif not (run_dir / "tokenizer").is_dir():
            reason = f"no tokenizer folder in {run_dir}"
        else:
            runs.append({"label": label, "record": record, "run_dir": run_dir})
            continue
        skipped.append({"label": label, "reason": reason})
    order = _contender_order(suite)
    runs.sort(key=lambda r: (order.get(r["record"].get("contender"), len(order)), r["label"]))
    return runs, skipped


def _contender_order(suite: str) -> dict[str, int]:
    try:
        from suites import SUITES
    except ImportError:
        return {}
    return {name: i for i, name in enumerate(SUITES[suite].contenders)} if suite in SUITES else {}


def _training(record: dict) -> dict:
    """The suite's training settings as the run recorded them (``settings.training``)."""
    training = dict((record.get("settings") or {}).get("training") or {})
    for key in ("seq_len", "batch_size", "eval_tokens"):
        if not isinstance(training.get(key), int):
            raise SystemExit(f"{record.get('contender')}: the result file has no settings.training.{key}")
    return training


# ---------------------------------------------------------------------- formats


def _linear_inputs(model) -> list[int]:
    """Input widths of the layers quant-eval and quantize touch (PEFT's "all-linear": not the head)."""
    from lowrank.wrap import match_target_modules

    return sorted({model.get_submodule(name).in_features for name in match_target_modules(model, "all-linear")})


def quant_eval_schemes(group_size: int, widths: list[int]) -> tuple[dict, bool]:
    """:func:`lowrank.quant.evaluate.default_schemes` at ``group_size``, with flat weight groups
    when ``group_size`` does not divide every input width (module docstring); and whether flat."""
    from lowrank.quant.evaluate import default_schemes

    flat = any(width % group_size for width in widths)
    return default_schemes(group_size, flat=flat), flat


# ---------------------------------------------------------------------- one run


def _sha1(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.contiguous().numpy().tobytes()).hexdigest()


def _subset(valid: torch.Tensor, tokens: int | None) -> tuple[torch.Tensor, str | None]:
    """``valid`` itself, or ``tokens // seq_len`` of its rows evenly spaced."""
    seq_len = valid.shape[1]
    if tokens is None or tokens >= valid.numel():
        return valid, None
    count = max(1, tokens // seq_len)
    rows = torch.linspace(0, len(valid) - 1, count).round().long().unique()
    return valid[rows], f"{len(rows)} of the {len(valid)} chunks training evaluated, evenly spaced"


def evaluate_run(run: dict, args, ptq: bool) -> dict:
    """Quant-eval (and, with ``ptq``, the PTQ table) of one run; the ``runs[]`` entry of osp.json."""
    from lowrank.cli.quant import load_model_for_quant
    from lowrank.data import build_data
    from lowrank.integrations.export import find_checkpoint
    from lowrank.quant.evaluate import as_batches, evaluate_quantization, validation_loss
    from lowrank.quant.ptq import quantize
    from lowrank.run.folder import CheckpointMeta

    record, run_dir = run["record"], run["run_dir"]
    training = _training(record)
    seq_len, batch_size = training["seq_len"], args.batch_size or training["batch_size"]
    started = time.perf_counter()
    checkpoint = find_checkpoint(run_dir)
    model, _, info = load_model_for_quant(str(run_dir), tokenizer=str(run_dir / "tokenizer"), device="cpu")
    bundle = build_data(args.data, seq_len=seq_len, batch_size=batch_size, seed=args.seed, tokenizer=info["tokenizer"],
                        cache_dir=args.work / args.suite / "cache", max_valid_tokens=training["eval_tokens"])
    trained_on = (record.get("valid_selection") or {}).get("sha1")
    valid_sha1 = _sha1(bundle.valid)
    valid, subset = _subset(bundle.valid, args.eval_tokens)
    widths = _linear_inputs(model)
    schemes, flat = quant_eval_schemes(args.group_size, widths)
    print(f"[{run['label']}] quant-eval on {valid.numel():,} tokens ...", flush=True)
    result = evaluate_quantization(model, valid, batch_size=batch_size, schemes=schemes)
    fp_ppl = result["schemes"]["fp"]["ppl"]
    result["gaps"] = {label: row["ppl"] / fp_ppl for label, row in result["schemes"].items() if label != "fp"}
    eval_seconds = time.perf_counter() - started
    entry = {
        "label": run["label"],
        "contender": record.get("contender", run["label"]),
        "preset": record.get("preset"),
        "lr": record.get("lr"),
        "seed": record.get("seed"),
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint),
        "checkpoint_step": CheckpointMeta.read(checkpoint).step,
        "training": {
            "steps": record.get("steps"),
            "val_ppl": record["val_ppl"],
            "val_loss": record.get("val_loss"),
            "tokens_per_s": record.get("tokens_per_s"),
            "optimizer_state_bytes": record.get("optimizer_state_bytes"),
            "model_state_bytes": record.get("model_state_bytes"),
        },
        "eval": {
            "tokens": int(valid.numel()),
            "chunks": int(valid.shape[0]),
            "valid_sha1": valid_sha1,
            "same_chunks_as_training": None if trained_on is None else valid_sha1 == trained_on,
            "subset": subset,
            "fp_ppl_over_training_ppl": fp_ppl / record["val_ppl"],
        },
        "linear_input_widths": widths,
        "quant_eval": result,
        "ptq": None,
        "seconds": {"quant_eval": round(eval_seconds, 1)},
    }
    if entry["checkpoint_step"] != record.get("steps"):
        print(f"[{run['label']}] note: checkpoint step {entry['checkpoint_step']} vs {record.get('steps')} steps trained")
    if entry["eval"]["same_chunks_as_training"] is False:
        print(f"[{run['label']}] warning: the validation chunks differ from the ones training evaluated (another --data?)")
    if ptq:
        count = math.ceil(args.calib_tokens / (batch_size * seq_len))
        calibration = torch.cat([next(bundle.train) for _ in range(count)])
        batches = as_batches(valid, batch_size)
        group = args.group_size  # flat: as quant_eval_schemes decided it for these widths
        rows = []
        for bits in args.bits:
            for method in args.methods:
                print(f"[{run['label']}] quantize {bits}-bit {method} ...", flush=True)
                begun = time.perf_counter()
                quantized, report = quantize(model, calibration, bits=bits, group_size=group, flat=flat, rank=args.rank,
                                             method=method,
                                             steps=args.steps, symmetric=args.ptq_symmetric, batch_size=batch_size,
                                             seed=args.seed)
                loss = validation_loss(quantized, batches)
                blocks = report["blocks"]
                layers = report["layers"].values()
                rows.append({
                    "bits": bits,
                    "method": method,
                    "format": report["format"],
                    "bits_per_weight": report["bits_per_weight"],
                    "rank": report["rank"],
                    "retraining": report["retraining"],
                    "calibration_loss": report["calibration_loss"],
                    "layer_output_error": {"rtn": _mean([l["rtn_error"] for l in layers]),
                                           "apiq_init": _mean([l["apiq_error"] for l in layers])} if layers else None,
                    "block_error": {"initial": _mean([b["initial"] for b in blocks]),
                                    "final": _mean([b["final"] for b in blocks])} if blocks else None,
                    "val_loss": loss,
                    "val_ppl": math.exp(loss),
                    "gap": math.exp(loss) / fp_ppl,
                    "seconds": round(time.perf_counter() - begun, 1),
                })
                print(f"[{run['label']}]   ppl {rows[-1]['val_ppl']:.3f} ({rows[-1]['gap']:.3f}× fp) in {rows[-1]['seconds']:.0f} s",
                      flush=True)
                del quantized, report
                gc.collect()
        entry["ptq"] = {"fp_ppl": fp_ppl, "group_size": group,
                        "calibration": {"tokens": int(calibration.numel()), "batches": count, "sha1": _sha1(calibration)},
                        "results": rows}
        entry["seconds"]["ptq"] = round(sum(r["seconds"] for r in rows), 1)
    return entry


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", required=True, help="the corpus the suite trained on (as given to compare.py --data)")
    add("--suite", default="cpu-osp")
    add("--results", type=Path, default=RESULTS, help="where compare.py wrote <suite>/<label>.json; osp.json goes here")
    add("--work", type=Path, default=Path("/work/bench-work"), help="compare.py --work: run folders <work>/<suite>/<label>")
    add("--plot", type=Path, default=DEFAULT_PLOT, help="the PNG to write")
    add("--bits", type=_ints, default=[2, 3], help="PTQ bit widths (comma-separated)")
    add("--methods", type=comma_names, default=list(PTQ_METHODS), help="PTQ methods (comma-separated)")
    add("--ptq-contenders", type=comma_names, default=["adamw", "osp"], help="contenders to PTQ (the best run of each)")
    add("--calib-tokens", type=int, default=16_384, help="calibration tokens from the training split")
    add("--eval-tokens", type=int, default=None,
        help="validation tokens, at most the suite's eval_tokens (default: all of them, the chunks training evaluated)")
    add("--steps", type=int, default=100, help="ApiQ retraining steps per decoder block")
    add("--rank", type=int, default=16, help="rank of the PTQ factors")
    add("--group-size", type=int, default=128, help="quant-eval weight group (flat where it does not divide a layer)")
    add("--ptq-symmetric", action="store_true", help="symmetric PTQ grid (default asymmetric min-max, as ApiQ)")
    add("--batch-size", type=int, default=None, help="sequences per forward (default: the suite's)")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from lowrank.quant.formats import INT_BITS

    if any(b not in INT_BITS for b in args.bits):
        parser.error(f"--bits must be among {', '.join(map(str, INT_BITS))}")
    if any(m not in PTQ_METHODS for m in args.methods):
        parser.error(f"--methods must be among {', '.join(PTQ_METHODS)}")
    for option in ("calib_tokens", "steps", "rank", "group_size", "threads"):
        if getattr(args, option) < (0 if option == "steps" else 1):
            parser.error(f"--{option.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from lowrank.quant.ptq import DEFAULT_LAMBDA, DEFAULT_LR

    started, load_start = time.perf_counter(), os.getloadavg()
    runs, skipped = finished_runs(args.results, args.suite, args.work)
    for item in skipped:
        print(f"skipped {item['label']}: {item['reason']}")
    if not runs:
        raise SystemExit(f"no finished run with a checkpoint in {args.results / args.suite} / {args.work / args.suite}")
    best: dict[str, dict] = {}
    for run in runs:
        contender = run["record"].get("contender")
        if contender in args.ptq_contenders and (contender not in best or run["record"]["val_ppl"] < best[contender]["record"]["val_ppl"]):
            best[contender] = run
    ptq_labels = {run["label"] for run in best.values()}
    from lowrank.errors import UsageError

    entries = []
    for run in runs:
        try:
            entries.append(evaluate_run(run, args, ptq=run["label"] in ptq_labels))
        except UsageError as error:  # e.g. a group size that fits no layer: say so, go on with the others
            print(f"skipped {run['label']}: {error}")
            skipped.append({"label": run["label"], "reason": str(error)})
    if not entries:
        raise SystemExit("no run could be evaluated: " + "; ".join(f"{s['label']}: {s['reason']}" for s in skipped))

    first = entries[0]
    training = _training(runs[0]["record"])
    schemes = first["quant_eval"]["schemes"]
    ptq_group = args.group_size
    ptq_flat = any(width % ptq_group for width in first["linear_input_widths"])
    asym = "symmetric absmax" if args.ptq_symmetric else "asymmetric min–max"
    data = {
        "suite": args.suite,
        "machine": {**machine_info(), "load_average": {"start": list(load_start), "end": list(os.getloadavg())}},
        "settings": {
            "data": str(args.data),
            "results": str(args.results / args.suite),
            "work": str(args.work / args.suite),
            "training": {k: training.get(k) for k in ("model", "steps", "seq_len", "batch_size", "eval_tokens", "precision")},
            "eval": {"tokens": first["eval"]["tokens"], "chunks": first["eval"]["chunks"], "seq_len": training["seq_len"],
                     "subset": first["eval"]["subset"], "batch_size": args.batch_size or training["batch_size"]},
            "quant_eval": {
                "group_size": args.group_size,
                "flat_groups": any("flat" in (row["weights"] or "") for row in schemes.values()),
                "weights": f"RTN int, symmetric absmax, groups of {args.group_size}"
                           + (" (flat: spanning rows where it does not divide a layer's input)"
                              if any("flat" in (row["weights"] or "") for row in schemes.values()) else ""),
                "activations": "per token, symmetric absmax (W4A4: int4, W8A8: int8)",
                "schemes": {label: {"weights": row["weights"], "activations": row["activations"],
                                    "bits_per_weight": row["bits_per_weight"]} for label, row in schemes.items()},
            },
            "ptq": {
                "contenders": args.ptq_contenders,
                "runs": sorted(ptq_labels),
                "bits": args.bits,
                "methods": args.methods,
                "group_size": ptq_group,
                "symmetric": args.ptq_symmetric,
                "flat_groups": ptq_flat,
                "format_note": f"{asym} int per group of {ptq_group}" + (" (flat where it does not divide a layer)" if ptq_flat else ""),
                "format_short": f"{'sym' if args.ptq_symmetric else 'asym'} g{ptq_group}" + ("-flat" if ptq_flat else ""),
                "rank": args.rank,
                "steps": args.steps,
                "lr": DEFAULT_LR,
                "saliency_lambda": DEFAULT_LAMBDA,
                "saliency": "activation",
                "calibration_tokens": next((e["ptq"]["calibration"]["tokens"] for e in entries if e["ptq"]), args.calib_tokens),
                "seed": args.seed,
            },
            "threads": args.threads,
        },
        "runs": entries,
        "skipped": skipped,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    try:
        data["plot"] = str(args.plot.resolve().relative_to(ROOT))
    except ValueError:
        data["plot"] = str(args.plot)
    plot(data, args.plot)
    path = write_result("osp", data, out_dir=args.results)
    print(text_table(data))
    print(f"wrote {path} and {args.plot} in {data['seconds_total'] / 60:.1f} min")
    return data


if __name__ == "__main__":
    main()
