"""Train the same model on the same data with the same token budget and schedule for every
contender, and record memory, speed and perplexity side by side.

    python benchmarks/compare.py --suite cpu-small --data ../shared/data/pydocs
    python benchmarks/compare.py --suite cpu-long --data ../shared/data/pydocs --jobs 2
    python benchmarks/compare.py --suite gpu-60m --data ../shared/data/pydocs --contenders adamw,galore-torch

Contenders (``suites.py``): peers through their own PyPI packages (``adamw`` = torch.optim.AdamW,
``galore-torch``, ``fira``, ``apollo-torch``, ``adamw8bit`` = bitsandbytes, ``adam-mini``) and our
presets by name. Every run goes through ``lowrank.train.pretrain`` (peers plug in as the
optimizer) in a fresh subprocess, so peak memory and tokens/s belong to that run alone.

Which runs a suite needs (learning-rate sweeps extended at an edge, the factor/dense lr ratio
sweep, the ablation, repeated seeds) is decided by ``plan.py`` from the runs already finished.

**Resumable.** Each run writes ``benchmarks/results/<suite>/<label>.json`` holding its settings
and their hash; a later invocation reuses every result whose hash matches (a changed setting
runs again), and a run that was interrupted continues from its last checkpoint (``save_every``).
So a suite of many hours can be completed over several sittings; ``<suite>.json`` is rewritten
after every finished run. ``--jobs N`` runs N single-threaded runs side by side.

Periodic events are scaled to the run: a suite sets one ``cycle`` (in steps) and every restart
period (refactorization, ReLoRA merge, SPAM reset) and every projector refresh gap (GaLore, Fira,
APOLLO) is set to it, with post-restart warm-ups scaled by the same factor as the period.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info  # noqa: E402
from peers import PROJECTED_PEERS, build_peer  # noqa: E402
from plan import STAGES, RunSpec, plan  # noqa: E402
from suites import CONTENDERS, PLAN_FIELDS, SUITES, Contender, Suite  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- settings of one run


def scaled_overrides(contender: Contender, suite: Suite) -> dict[str, Any]:
    """Preset keys that put every periodic event of ``contender`` on the suite's clock."""
    from lowrank.methods import load_method

    method = load_method(contender.preset)
    cycle = contender.cycle or suite.cycle
    overrides = method.shortcut_overrides(rank=suite.rank)  # the factors' and the projection's rank
    overrides.pop("lowrank.rank_ratio", None)  # no preset sets one; keep the recorded overrides short
    if method.lowrank is not None and method.lowrank.keep_base and suite.warm_start_fraction:
        overrides["lowrank.warm_start_steps"] = round(suite.warm_start_fraction * suite.steps)
    restarts = method.restarts
    if restarts is not None:
        factor = cycle / restarts.cycle_length
        overrides["restarts.cycle_length"] = cycle
        if restarts.rewarmup_steps:
            overrides["restarts.rewarmup_steps"] = max(1, round(restarts.rewarmup_steps * factor))
        for group in ("matrix", "other"):
            warmup = getattr(method.optimizer, group).get("reset_warmup")
            if warmup:
                overrides[f"optimizer.{group}.reset_warmup"] = max(1, round(warmup * factor))
    if method.optimizer.matrix.get("projection"):
        overrides["optimizer.matrix.update_proj_gap"] = cycle
    return overrides


# Dense presets compared with AdamW at one shared lr, as their papers compare them: their presets
# group the hidden matrices only to give both groups the same SPAM options.
ONE_LR_PRESETS = ("spam", "stable_spam")


def has_ratio(contender: Contender) -> bool:
    """Whether the contender has a ``matrix`` group of ours whose lr ratio can be swept: the
    low-rank family (presets with a ``lowrank`` section) and a dense preset whose hidden matrices
    are a group of their own (``optimizer.target_modules``: the fair full-rank baseline, Muon),
    and the peers with a group of projected matrices (GaLore, Fira, APOLLO:
    ``peers.PROJECTED_PEERS``); not our projected-gradient presets (their matrices' lr is the
    published ``scale``), nor :data:`ONE_LR_PRESETS`."""
    from lowrank.methods import load_method

    if contender.peer is not None:
        return contender.peer in PROJECTED_PEERS
    if contender.preset in ONE_LR_PRESETS:
        return False
    method = load_method(contender.preset, dict(contender.overrides))
    return method.lowrank is not None or (method.optimizer.target_modules is not None
                                          and not method.optimizer.matrix.get("projection"))


def base_lr(contender: Contender) -> float:
    from lowrank.methods import load_method

    return contender.lr if contender.lr is not None else load_method(contender.preset).optimizer.lr


def run_settings(suite_name: str, suite: Suite, spec: RunSpec, data: str) -> dict[str, Any]:
    """Everything that determines a run's result: its hash names the result file's validity.

    Holds the preset as written with every override applied (so editing a preset's YAML re-runs
    what it changes) and the model config, besides the suite's training fields and the run's own
    lr, ratio and seed."""
    from lowrank.models import load_model_config

    contender = CONTENDERS[spec.contender]
    training = {k: v for k, v in asdict(suite).items() if k not in PLAN_FIELDS}
    overrides = scaled_overrides(contender, suite)
    overrides.update(dict(contender.overrides))
    ratio = spec.ratio
    if contender.peer is not None:
        # a peer's ratio goes to its own parameter groups (run_one), not into our preset; at 1 it
        # is the peer as published, with the settings (and hash) its runs had before peers had one
        ratio = None if ratio == 1.0 else ratio
    elif ratio is not None:
        overrides["optimizer.matrix_lr_ratio"] = ratio
    method = preset_as_written(contender.preset, {**overrides, "optimizer.lr": spec.lr})
    return {
        "suite": suite_name,
        "training": training,
        "contender": spec.contender,
        "definition": contender.definition(),
        "lr": spec.lr,
        "matrix_lr_ratio": ratio,
        "seed": spec.seed,
        "overrides": overrides,
        "method": method,
        "model_config": {k: v for k, v in load_model_config(suite.model).to_dict().items() if k != "transformers_version"},
        "data": data,
    }


def preset_as_written(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's YAML sections with the dotted ``overrides`` set: what a run's settings hash
    covers. It depends on what the preset says, not on how :class:`lowrank.methods.Method`
    represents it or on the library's defaults, so result files stay valid across versions of
    the library (every bundled preset writes its schedule and training keys out)."""
    import yaml

    from lowrank.methods.presets import preset_path
    from lowrank.methods.sections import set_dotted

    path = preset_path(preset)
    data = yaml.safe_load(path.read_text()) or {}
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value)
    return {
        "name": path.stem,
        "description": str(data.get("description", "")).strip(),
        "lowrank": data.get("lowrank"),
        "optimizer": data["optimizer"],
        "restarts": data.get("restarts"),
        "schedule": data.get("schedule") or {},
        "training": data.get("training") or {},
    }


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- one run (in a subprocess)


def run_one(settings: dict[str, Any], out_json: Path, work: Path) -> None:
    """Train the run ``settings`` describe (in this process) and write its result JSON; resume
    from the run folder's last checkpoint when it belongs to the same settings."""
    import torch

    from lowrank.checkpoint import list_checkpoints
    from lowrank.errors import UsageError
    from lowrank.train import TrainConfig, pretrain

    digest = settings_hash(settings)
    suite = Suite(**{**asdict(SUITES[settings["suite"]]), **settings["training"]})
    contender = CONTENDERS[settings["contender"]]
    factory = None
    if contender.peer is not None:
        def factory(model, method):
            options = method.optimizer
            return build_peer(contender.peer, model, lr=options.lr, betas=options.betas, weight_decay=options.weight_decay,
                              rank=suite.rank,
                              update_proj_gap=contender.cycle or suite.cycle, scale=contender.peer_scale or 0.25,
                              matrix_lr_ratio=settings["matrix_lr_ratio"] or 1.0)

    run_dir = work / settings["suite"] / out_json.stem
    marker = run_dir / "settings_hash"
    resume = marker.is_file() and marker.read_text().strip() == digest and bool(list_checkpoints(run_dir / "checkpoints"))
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")
    cfg = TrainConfig(
        method=contender.preset, model=suite.model, data=settings["data"], vocab_size=suite.vocab_size, lr=settings["lr"],
        batch_size=suite.batch_size, grad_accum=suite.grad_accum, seq_len=suite.seq_len, max_steps=suite.steps,
        eval_every=suite.eval_every, eval_tokens=suite.eval_tokens, save_every=suite.save_every, keep_checkpoints=1,
        out=str(run_dir), resume="latest" if resume else None, overwrite=not resume, seed=settings["seed"],
        device=suite.device, precision=contender.precision or suite.precision, progress=False, plot=False,
        cache_dir=str(work / settings["suite"] / "cache"), log_every=1, overrides=settings["overrides"],
        optimizer_factory=factory,
    )
    started = time.time()
    load_before = os.getloadavg()
    try:
        try:
            summary = pretrain(cfg)
        except UsageError as error:
            # A peer's optimizer state that weights_only cannot read (galore-torch, Fira and APOLLO
            # keep projector objects in it) cannot be resumed: run it again from the start.
            if not (resume and contender.peer is not None and "is corrupt" in str(error)):
                raise
            print(f"cannot resume {out_json.stem} ({str(error)[:120]}...): starting it again", file=sys.stderr)
            resume = False
            summary = pretrain(replace(cfg, resume=None, overwrite=True))
    except UsageError as error:
        if "diverged" not in str(error):
            raise
        summary = None
        failure = str(error)
    base = {
        "contender": settings["contender"],
        "kind": "peer" if contender.peer else "ours",
        "package": contender.peer,
        "preset": contender.preset,
        "lr": settings["lr"],
        "matrix_lr_ratio": settings["matrix_lr_ratio"],
        "seed": settings["seed"],
        "lr_source": contender.source,
        "overrides": settings["overrides"],
        "settings": settings,
        "settings_hash": digest,
        "resumed": resume,
    }
    if summary is None:
        result = {**base, "failed": True, "reason": failure, "val_ppl": None, "wall_seconds": time.time() - started}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1) + "\n")
        return
    if not suite.keep_checkpoints:  # the comparison needs the logs, not the weights
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    description = json.loads((run_dir / "config.json").read_text()).get("data", {})
    result = {
        **base,
        "val_ppl": summary["val_ppl"],
        "val_loss": summary["val_loss"],
        "final_train_loss": summary["final_train_loss"],
        "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_s_note": "median over steps after the first 3" + (" of the resumed part" if resume else ""),
        "optimizer_state_bytes": summary["optimizer_state_bytes"],
        "model_state_bytes": summary["model_state_bytes"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "peak_memory_kind": summary["peak_memory_kind"],
        "trainable_params": summary["trainable_params"],
        "frozen_params": summary["frozen_params"],
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "valid_selection": description.get("valid_selection"),
        "val_curve": [{"step": r["step"], "tokens": r["tokens"], "val_ppl": r["val_ppl"]} for r in records if "val_ppl" in r],
        "train_curve": [{"step": r["step"], "tokens": r["tokens"], "loss": r["loss"]} for r in steps],
        "events": [r for r in records if "event" in r],
        "wall_seconds": time.time() - started,
        "load_average": {"start": load_before[0], "end": os.getloadavg()[0]},
        "device": summary["device"],
        "torch_threads": torch.get_num_threads(),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")


# ---------------------------------------------------------------------- the suite


def load_results(runs_dir: Path, hashes: dict[str, str]) -> dict[str, dict]:
    """Finished runs by label, for the labels whose file carries the expected settings hash."""
    found = {}
    for label, digest in hashes.items():
        path = runs_dir / f"{label}.json"
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            if record.get("settings_hash") == digest:
                found[label] = record
    return found


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Runner:
    """Plans, launches and collects the runs of one suite (see the module docstring)."""

    def __init__(self, suite_name: str, suite: Suite, data: str, names: list[str], out_dir: Path, work: Path,
                 jobs: int = 1, threads: int = 1, ablation: bool = True, dry_run: bool = False) -> None:
        self.suite_name, self.suite, self.data, self.names = suite_name, suite, data, names
        self.out_dir, self.work, self.jobs, self.threads = out_dir, work, jobs, threads
        self.ablation = ablation and suite.ablation_base in names
        self.dry_run = dry_run
        self.runs_dir = out_dir / suite_name
        every = set(names) | (set(suite.ablation) if self.ablation else set())
        self.base_lrs = {n: base_lr(CONTENDERS[n]) for n in every}
        self.has_ratio = {n: has_ratio(CONTENDERS[n]) for n in every}
        self.specs: dict[tuple, RunSpec] = {}
        self._hashes: dict[tuple, str] = {}
        self.errors: dict[str, int] = {}
        self.started = time.time()

    def _hash(self, spec: RunSpec) -> str:
        if spec.key not in self._hashes:
            self._hashes[spec.key] = settings_hash(run_settings(self.suite_name, self.suite, spec, self.data))
        return self._hashes[spec.key]

    def state(self) -> tuple[list[RunSpec], dict, dict, dict[tuple, dict]]:
        """(needed runs, best settings, ablation settings, results by key) from what is on disk."""
        results: dict[tuple, dict] = {}
        while True:
            records = load_results(self.runs_dir, {s.label: self._hash(s) for s in self.specs.values()})
            results = {spec.key: records[spec.label] for spec in self.specs.values() if spec.label in records}
            needed, best, ablation = plan(self.suite, CONTENDERS, self.names, results, self.base_lrs, self.has_ratio,
                                          ablation=self.ablation)
            new = [s for s in needed if s.key not in self.specs]
            if not new:
                return needed, best, ablation, results
            for spec in new:  # a result of an earlier sitting may already exist for these
                self.specs[spec.key] = spec

    def command(self, spec: RunSpec) -> list[str]:
        settings = run_settings(self.suite_name, self.suite, spec, self.data)
        return [sys.executable, __file__, "--run-one", json.dumps(settings), "--out-json", str(self.runs_dir / f"{spec.label}.json"),
                "--work", str(self.work), "--threads", str(self.threads)]

    def run(self) -> dict[str, Any]:
        running: dict[str, tuple[subprocess.Popen, RunSpec, float]] = {}
        # A SIGTERM (kill, a batch system) must end the runs too, not orphan them: make it an
        # exception so that the `finally` below stops them (they continue from their checkpoints).
        signal.signal(signal.SIGTERM, _interrupt)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        try:
            changed = True
            while True:
                if changed:  # re-plan only when a run has finished: planning reads every result file
                    needed, _, _, _ = self.state()
                    changed = False
                waiting = [s for s in needed if s.label not in running and s.label not in self.errors]
                while waiting and len(running) < self.jobs:
                    spec = waiting.pop(0)
                    print(f"[{(time.time() - self.started) / 60:6.1f} min] start {spec.label} ({STAGES[spec.stage]})", flush=True)
                    log = self.work / self.suite_name / f"{spec.label}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    with open(log, "ab") as handle:  # the child keeps its own descriptor
                        process = subprocess.Popen(self.command(spec), cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
                    running[spec.label] = (process, spec, time.time())
                if not running:
                    break
                time.sleep(2.0)
                for label, (process, spec, began) in list(running.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    del running[label]
                    changed = True
                    minutes = (time.time() - began) / 60
                    if code != 0:
                        self.errors[label] = code
                        print(f"  {label}: exit code {code} after {minutes:.1f} min (log: {self.work / self.suite_name}/{label}.log); "
                              "not retried in this sitting", flush=True)
                    else:
                        record = json.loads((self.runs_dir / f"{label}.json").read_text())
                        outcome = "diverged" if record.get("failed") else f"val ppl {record['val_ppl']:.2f}"
                        print(f"  {label}: {outcome} ({minutes:.1f} min)", flush=True)
                    self.write_combined()
        finally:
            for process, _, _ in running.values():
                process.send_signal(signal.SIGTERM)
            for process, _, _ in running.values():
                process.wait()
        return self.write_combined()

    def write_combined(self) -> dict[str, Any]:
        needed, best, ablation, results = self.state()
        by_name: dict[str, list[dict]] = {}
        for record in results.values():
            by_name.setdefault(record["contender"], []).append(record)
        first_seed = self.suite.seeds[0]

        def entry(name: str, setting: tuple | None) -> dict | None:
            records = by_name.get(name, [])
            sweep = sorted(
                ({"lr": r["lr"], "matrix_lr_ratio": r["matrix_lr_ratio"], "val_ppl": r.get("val_ppl"),
                  "failed": bool(r.get("failed"))} for r in records if r["seed"] == first_seed),
                key=lambda t: (t["matrix_lr_ratio"] or 1.0, t["lr"]))
            if setting is None:
                # the search is still running: its best run so far, so that a report can show where it stands
                finished = [r for r in records if r["seed"] == first_seed and not r.get("failed")
                            and r.get("val_ppl") is not None and math.isfinite(r["val_ppl"])]
                best_so_far = min(finished, key=lambda r: r["val_ppl"]) if finished else None
                return {"complete": False, "sweep": sweep, "best_so_far": best_so_far} if sweep else None
            lr, ratio = setting
            at = [r for r in records if math.isclose(r["lr"], lr, rel_tol=1e-6)
                  and math.isclose(r["matrix_lr_ratio"] or 1.0, ratio or 1.0, rel_tol=1e-6)]
            chosen = next((r for r in at if r["seed"] == first_seed), None)
            if chosen is None:
                return {"complete": False, "sweep": sweep}
            values = {r["seed"]: r.get("val_ppl") for r in at}
            finite = [v for v in values.values() if v is not None and math.isfinite(v)]
            seeds = {
                "seeds": sorted(values),
                "val_ppl": [values[s] for s in sorted(values)],
                "complete": all(s in values for s in self.suite.seeds),
            }
            if finite:
                seeds.update(mean=sum(finite) / len(finite), min=min(finite), max=max(finite))
            return {**chosen, "complete": True, "sweep": sweep, "over_seeds": seeds}

        contenders = {name: e for name in self.names if (e := entry(name, best.get(name))) is not None}
        ablation_rows = {name: e for name, setting in ablation.items() if (e := entry(name, setting)) is not None}
        settings = {k: v for k, v in asdict(self.suite).items()}
        combined = {
            "suite": self.suite_name,
            "settings": settings | {"tokens_per_contender": self.suite.tokens, "seed": first_seed, "data": self.data,
                                    "sweep_factors": list(self.suite.sweep)},
            "machine": machine_info() | {"jobs": self.jobs, "threads_per_run": self.threads},
            "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in results.values()),
            "complete": not needed and not self.errors,
            "pending": [s.label for s in needed],
            "errors": self.errors,
            # Each contender's best (first seed) with its sweep and the spread over seeds.
            "results": {name: e for name, e in contenders.items() if e.get("complete")},
            "incomplete": {name: e for name, e in contenders.items() if not e.get("complete")},
            "ablation": {"base": self.suite.ablation_base, "rows": ablation_rows} if self.ablation else None,
            "sweeps": {name: e["sweep"] for name, e in contenders.items() if len(e["sweep"]) > 1},
        }
        if not self.dry_run:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"{self.suite_name}.json").write_text(json.dumps(combined, indent=1) + "\n")
        return combined


def parse_suite_overrides(items: list[str], suite: Suite) -> Suite:
    """``--suite-set steps=40 --suite-set seeds=0,1``: change fields of a suite for this invocation."""
    fields = {f.name: f for f in dataclasses.fields(Suite)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--suite-set {item}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        current = getattr(suite, key)
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            changes[key] = tuple(kind(v) for v in value.split(",") if v)
        elif isinstance(current, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif current is None:
            changes[key] = value or None
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(suite, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu-small")
    parser.add_argument("--data", help="corpus folder or file (e.g. ../shared/data/pydocs)")
    parser.add_argument("--contenders", default=None, help="comma-separated subset (default: the suite's list)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the suite's ablation runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (each with --threads threads)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--suite-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a suite field for this invocation, e.g. --suite-set steps=40")
    parser.add_argument("--plan", action="store_true", help="print the runs still needed and exit")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="run folders and the shared data cache")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        import torch

        torch.set_num_threads(args.threads or 1)
        run_one(json.loads(args.run_one), Path(args.out_json), Path(args.work))
        return
    if not args.data or (args.data != "builtin" and not Path(args.data).exists()):
        parser.error(f"--data {args.data}: no such file or folder (or 'builtin')")
    data = args.data if args.data == "builtin" else str(Path(args.data).resolve())
    suite = parse_suite_overrides(args.suite_set, SUITES[args.suite])
    names = [n.strip() for n in (args.contenders or ",".join(suite.contenders)).split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    runner = Runner(args.suite, suite, data, names, Path(args.out), Path(args.work), jobs=args.jobs, threads=threads,
                    ablation=not args.no_ablation, dry_run=args.plan)
    if args.plan:
        needed, best, _, results = runner.state()
        print(f"{len(results)} finished, {len(needed)} needed now (later stages are planned as these finish):")
        for spec in needed:
            print(f"  {STAGES[spec.stage]:15s} {spec.label}")
        return
    combined = runner.run()
    state = "complete" if combined["complete"] else f"incomplete ({len(combined['pending'])} pending, {len(combined['errors'])} errors)"
    print(f"{state}; {combined['wall_seconds'] / 60:.1f} min of runs -> {Path(args.out) / (args.suite + '.json')}")
    baseline = combined["results"].get("adamw")
    for name, record in combined["results"].items():
        if record.get("failed"):
            print(f"{name:22s} diverged at every setting")
            continue
        ratio = f" ({record['val_ppl'] / baseline['val_ppl']:.3f}× adamw)" if baseline and not baseline.get("failed") else ""
        print(f"{name:22s} ppl {record['val_ppl']:8.2f}{ratio}  {record['tokens_per_s']:8,.0f} tok/s  "
              f"state {record['model_state_bytes'] / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
