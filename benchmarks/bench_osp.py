"""Quantization readiness of a suite's trained models (issue 13): does Outlier-Safe Pre-Training
leave a model with fewer outliers that loses less under quantization, and do ApiQ and its
saliency-aware regularizer beat round-to-nearest post-training quantization?

    python benchmarks/bench_osp.py --data ../shared/data/pydocs [--suite cpu-osp] [--results benchmarks/results]
        [--work /work/bench-work] [--bits 2,3] [--calib-tokens 16384] [--eval-tokens N] [--steps 100] [--epochs 20]

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
   :func:`lowrank.quant.ptq.quantize` at each of ``--bits``, one row per
   :data:`osp_report.PTQ_VARIANTS`: ``rtn``; ``apiq (ours)`` and ``apiq (published)`` (our recipe
   and ApiQ's released one, :data:`lowrank.quant.recipes.RECIPES`); ``apiq+saliency (ours)`` (our
   regularizer form with our recipe) and ``apiq+saliency (published)`` (the published
   Fisher-weighted form with the released recipe). Every row calibrates on the same tokens from
   the training split with the same seed and rank; our recipe runs ``--steps`` steps per block on
   batches of the suite's size, the published one ``--epochs`` (its 20) epochs of one-sequence
   steps. Then the validation ppl of each result on the same chunks.
   Quant-eval also records the excess kurtosis by OSP's own protocol (``kurtosis_osp``: each
   token alone, embedding output + layers 1…L−1 + the final-normed state; its verdict uses it).
3. Writes ``<results>/osp.json`` (settings, machine incl. load average, per run the training
   result's val ppl / tokens/s / optimizer-state bytes, the quant-eval numbers, the PTQ table) and
   the plot ``docs/osp_ppl_vs_bits.png`` (``--plot``), and prints a short table.
   ``benchmarks/osp_report.py`` renders the README block from the JSON (``render_block``).

**Group size on the suite's model.** LLaMA-20M's MLP is 688 wide (2⁴·43), which 128 does not
divide. Quant-eval then uses *flat* groups of 128 (128 consecutive entries of the row-major
weight, :class:`lowrank.quant.formats.QuantFormat` ``flat=True``): identical to per-row groups
for every layer whose input dimension 128 divides (q, k, v, o, gate, up) and 128-entry groups
spanning rows in ``down_proj``, so the bits per weight stay those of g128. PTQ uses each
recipe's group (ours 128; published 64 at 2 bits, 128 at 3) unless ``--ptq-group-size`` is
given, flat where it does not divide a layer, asymmetric min–max; the JSON and the README block
say which (the published 2-bit rows store 0.14 more bits per weight for their smaller groups: 2.281 vs 2.141).

**Defaults**, sized for 2 CPU cores and one thread (``--threads 1``): ``--eval-tokens`` = the
suite's ``eval_tokens`` (65,536 on cpu-osp: the very chunks training evaluated, so the
full-precision ppl equals the run's final val ppl), ``--calib-tokens 16384`` (16 batches of
8 × 128; the published recipe's 262,144 would take hours here), ``--steps 100`` retraining steps
per decoder block for our recipe (``quantize``'s default is 200), ``--epochs`` 20 for the
published recipe (128 one-sequence steps each: 2,560 steps per block), ``--rank 16`` (the rank λ
was tuned at, on a 128-wide model; ApiQ's 64 at hidden 4096 is r/d = 1/64, 16 at hidden 256 is
1/16; the factors add ``bits_per_weight.with_factors_bf16`` − base ≈ 1.6 bits per weight,
recorded), ``--bits 2,3``.

**Running time on cpu-osp** (from the last run's seconds, ``osp.json``: quant-eval ~70 s per run,
an RTN row ~14 s, an ApiQ row with 100 steps of 8 × 128 tokens ~70 s; and from steps timed on a
randomly initialised llama_20m, one thread, a loaded machine: a learned-clipping step of our
recipe ~0.2 s, a published-recipe step of one 128-token sequence ~0.1 s, of which ~22 ms is
re-quantizing the block's weights with the current clipping): quant-eval ~6 min for the 5 runs
(+ ~10 s each for OSP's protocol); per PTQ'd contender and bit width ~14 s (rtn), ~3 min (the two
rows with our recipe) and ~25 min (the two published rows: 2,560 steps per block × 4 blocks; the
saliency one spends 75 % of them on the cheap weight-preservation steps). About 2 hours in all on
one thread (``--epochs 5``: about 50 minutes); ``osp.json`` records the seconds of every step.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from osp_report import PTQ_METHODS, PTQ_VARIANTS, plot, text_table  # noqa: E402

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
    from lowrank.quant.evaluate import as_batches, evaluate_quantization, hidden_state_statistics, validation_loss
    from lowrank.quant.ptq import RECIPES, quantize
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
    # OSP's own protocol too (each token alone, embedding + final-normed states): the paper's numbers use it.
    reference = hidden_state_statistics(model, as_batches(valid, batch_size), protocol="osp")
    result["kurtosis_osp"], result["max_abs_osp"] = reference["kurtosis"], reference["max_abs"]
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
        rows = []
        for bits in args.bits:
            for variant in args.methods:
                spec = PTQ_VARIANTS[variant]
                recipe = spec.get("recipe", "ours")
                group = args.ptq_group_size or RECIPES[recipe].group_size[bits]
                published = recipe != "ours"
                print(f"[{run['label']}] quantize {bits}-bit {variant} ...", flush=True)
                begun = time.perf_counter()
                # Ours: the bench's steps and batches of the suite's size; published: the recipe's
                # epochs over one-sequence batches. The same calibration tokens for every row.
                quantized, report = quantize(model, calibration, bits=bits, recipe=recipe, method=spec["method"],
                                             saliency=spec.get("saliency"), group_size=group,
                                             flat=any(width % group for width in widths), rank=args.rank,
                                             steps=None if published else args.steps, epochs=args.epochs if published else None,
                                             batch_size=None if published else batch_size, symmetric=args.ptq_symmetric,
                                             seed=args.seed)
                loss = validation_loss(quantized, batches)
                blocks = report["blocks"]
                layers = report["layers"].values()
                rows.append({
                    "bits": bits,
                    "variant": variant,
                    "method": spec["method"],
                    "recipe": recipe,
                    "group_size": group,
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
        entry["ptq"] = {"fp_ppl": fp_ppl, "group_size": args.ptq_group_size,
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
    add("--methods", type=comma_names, default=list(PTQ_METHODS),
        help=f"PTQ rows (comma-separated), among: {', '.join(PTQ_METHODS)}")
    add("--ptq-contenders", type=comma_names, default=["adamw", "osp"], help="contenders to PTQ (the best run of each)")
    add("--calib-tokens", type=int, default=16_384, help="calibration tokens from the training split")
    add("--eval-tokens", type=int, default=None,
        help="validation tokens, at most the suite's eval_tokens (default: all of them, the chunks training evaluated)")
    add("--steps", type=int, default=100, help="retraining steps per decoder block of the rows with our recipe")
    add("--epochs", type=int, default=None,
        help="epochs over the calibration set of the rows with the published recipe (default: its 20)")
    add("--ptq-group-size", type=int, default=None,
        help="PTQ weight group (default: each recipe's: ours 128, published 64 at 2 bits; flat where it does not divide a layer)")
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
    for option in ("calib_tokens", "steps", "rank", "group_size", "threads", "epochs", "ptq_group_size"):
        value = getattr(args, option)
        if value is not None and value < (0 if option in ("steps", "epochs") else 1):
            parser.error(f"--{option.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from lowrank.quant.ptq import RECIPES

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
    widths = first["linear_input_widths"]
    groups = {recipe: {bits: args.ptq_group_size or RECIPES[recipe].group_size[bits] for bits in args.bits}
              for recipe in sorted({PTQ_VARIANTS[v].get("recipe", "ours") for v in args.methods})}
    ptq_flat = any(width % g for per_bits in groups.values() for g in per_bits.values() for width in widths)
    asym = "symmetric absmax" if args.ptq_symmetric else "asymmetric min–max"
    group_text = "; ".join(f"{'published' if recipe != 'ours' else 'ours'}: " + ", ".join(
        f"{g} at {bits} bits" for bits, g in per_bits.items()) for recipe, per_bits in groups.items())
    ours, apiq = RECIPES["ours"], RECIPES["apiq"]
    recipe_note = (f"our recipe {args.steps} retraining steps per block (batches of {args.batch_size or training['batch_size']} "
                   f"sequences, lr {ours.lr:g} cosine, relative block error, LoRA scale {ours.scale:g}, closed-form init, learned "
                   f"clipping); the published recipe (ApiQ's script) {args.epochs or apiq.epochs} epochs over one-sequence "
                   f"batches (lr {apiq.lr:g} constant, wd {apiq.weight_decay:g}, MSE + aug loss, scale {apiq.scale:g}, B = 0 init, "
                   f"learned clipping lr {apiq.clip_lr:g}); saliency λ {ours.saliency_lambda:g}, ours |W|·‖X_j‖ every step, "
                   f"published g²·(Q(W) − W)² in the first {ours.weight_preservation:.0%} of the steps")
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
                "group_size": groups,
                "symmetric": args.ptq_symmetric,
                "flat_groups": ptq_flat,
                "format_note": f"{asym} int, groups ({group_text})" + (" flat where they do not divide a layer" if ptq_flat else ""),
                "format_short": f"{'sym' if args.ptq_symmetric else 'asym'}" + ("-flat" if ptq_flat else ""),
                "rank": args.rank,
                "steps": args.steps,
                "epochs": args.epochs or apiq.epochs,
                "recipes": {name: dataclasses.asdict(RECIPES[name]) for name in groups},
                "recipe_note": recipe_note,
                "kurtosis": "both protocols: ours (decoder layer outputs, full context) and OSP's (each token alone; "
                            "embedding output, layers 1..L-1, final-normed last state); the kurtosis verdict uses OSP's",
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
