"""Train the same model on the same data with the same seed, token budget and schedule for every
contender, one after the other, and record memory, speed and perplexity side by side.

    python benchmarks/compare.py --suite cpu-small --data ../shared/data/pydocs
    python benchmarks/compare.py --suite gpu-60m --data ../shared/data/pydocs --contenders adamw,galore-torch,low_rank_restarts

Contenders: peers through their own PyPI packages (``adamw`` = torch.optim.AdamW, ``galore-torch``,
``fira``, ``apollo-torch``, ``adamw8bit`` = bitsandbytes, ``adam-mini``) and our presets by name.
Every run goes through ``lowrank.train.pretrain`` (peers plug in as the optimizer), in a fresh
subprocess so that peak memory and tokens/s belong to that run alone. Writes one JSON per run to
``benchmarks/results/<suite>/`` and the combined ``benchmarks/results/<suite>.json``.

Periodic events are scaled to the run: a suite sets one ``cycle`` (in steps) and every restart
period (refactorization, ReLoRA merge, SPAM reset) and every projector refresh gap (GaLore, Fira,
APOLLO) is set to it, with post-restart warm-ups scaled by the same factor as the period. The
papers' 200/500/1000-step periods assume runs of 10k+ steps; kept as published, a short run would
see no restart at all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Suite:
    """One benchmark configuration: model, data shape, budget and the event clock."""

    model: str
    vocab_size: int
    seq_len: int
    batch_size: int
    steps: int
    cycle: int
    rank: int
    eval_every: int
    eval_tokens: int
    device: str
    precision: str
    grad_accum: int = 1
    note: str = ""

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len * self.grad_accum


SUITES = {
    # Seconds per contender: exercises every code path (tests use it), measures nothing.
    "smoke": Suite(model="tiny", vocab_size=512, seq_len=32, batch_size=4, steps=8, cycle=4, rank=8,
                   eval_every=4, eval_tokens=1024, device="cpu", precision="fp32", note="tiny model, smoke test only"),
    # ~17M parameters (LLaMA-35M shape, vocabulary 8192): 160 steps × 1024 tokens per contender,
    # 15 runs in about 45 minutes on 2 CPU cores.
    "cpu-small": Suite(model="llama_35m", vocab_size=8192, seq_len=128, batch_size=8, steps=160, cycle=40, rank=96,
                       eval_every=40, eval_tokens=16384, device="cpu", precision="fp32",
                       note="LLaMA-35M shape (hidden 384, 6 layers) with an 8192-token BPE: 16.9M parameters"),
    # The papers' shapes for one GPU (bf16 autocast), about 10 minutes per contender on an H100.
    "gpu-60m": Suite(model="llama_60m", vocab_size=32000, seq_len=256, batch_size=128, steps=2000, cycle=200, rank=128,
                     eval_every=200, eval_tokens=1_000_000, device="cuda", precision="bf16-mixed",
                     note="GaLore's LLaMA-60M; 65.5M tokens per contender"),
    "gpu-130m": Suite(model="llama_130m", vocab_size=32000, seq_len=256, batch_size=128, steps=2000, cycle=200, rank=256,
                      eval_every=200, eval_tokens=1_000_000, device="cuda", precision="bf16-mixed",
                      note="GaLore's LLaMA-130M; 65.5M tokens per contender"),
}


@dataclass(frozen=True)
class Contender:
    """A preset of ours, or a peer optimizer on the dense model (``preset="full_rank"``)."""

    preset: str
    peer: str | None = None
    lr: float | None = None  # published best; None → the preset's own (also published), or a sweep
    sweep: bool = False  # no published learning rate: try lr × SWEEP and keep the best
    peer_scale: float | None = None
    source: str = ""


SWEEP = (0.5, 1.0, 2.0)

CONTENDERS = {
    "adamw": Contender("full_rank", peer="adamw", lr=1e-3, source="GaLore paper, full-rank 60M"),
    "galore-torch": Contender("full_rank", peer="galore-torch", lr=1e-2, peer_scale=0.25, source="GaLore paper, 60M"),
    "fira": Contender("full_rank", peer="fira", lr=1e-2, peer_scale=0.25, source="Fira paper, 60M"),
    "apollo-torch": Contender("full_rank", peer="apollo-torch", lr=1e-2, peer_scale=1.0, source="APOLLO paper, 60M"),
    "adamw8bit": Contender("full_rank", peer="adamw8bit", lr=1e-3, source="AdamW's (8-bit Adam is a drop-in)"),
    "adam-mini": Contender("full_rank", peer="adam-mini", lr=1e-3, source="AdamW's (Adam-mini recommends AdamW's lr)"),
    "low_rank": Contender("low_rank", source="benchmark paper script"),
    "low_rank_restarts": Contender("low_rank_restarts", source="benchmark paper"),
    "relora": Contender("relora", source="ReLoRA paper"),
    "sltrain": Contender("sltrain", source="SLTrain paper"),
    "galore": Contender("galore", source="GaLore paper (our implementation)"),
    "spam": Contender("spam", source="SPAM paper"),
    "lowrank_sparse": Contender("lowrank_sparse", sweep=True, source="ours: no published value, swept"),
}


# ---------------------------------------------------------------------- one run


def scaled_overrides(contender: Contender, suite: Suite) -> dict[str, Any]:
    """Preset keys that put every periodic event of ``contender`` on the suite's clock."""
    from lowrank.methods import load_method

    method = load_method(contender.preset)
    overrides: dict[str, Any] = {}
    if method.lowrank is not None:
        overrides["lowrank.rank"] = suite.rank
    restarts = method.restarts or {}
    if restarts.get("cycle_length"):
        factor = suite.cycle / restarts["cycle_length"]
        overrides["restarts.cycle_length"] = suite.cycle
        if restarts.get("rewarmup_steps"):
            overrides["restarts.rewarmup_steps"] = max(1, round(restarts["rewarmup_steps"] * factor))
        for group in ("matrix", "other"):
            warmup = (method.optimizer.get(group) or {}).get("reset_warmup")
            if warmup:
                overrides[f"optimizer.{group}.reset_warmup"] = max(1, round(warmup * factor))
    matrix = method.optimizer.get("matrix") or {}
    if matrix.get("projection"):
        overrides["optimizer.matrix.rank"] = suite.rank
        overrides["optimizer.matrix.update_proj_gap"] = suite.cycle
    return overrides


def run_one(name: str, lr: float | None, suite_name: str, data: str, out_json: Path, work: Path, seed: int) -> None:
    """Train contender ``name`` (in this process) and write its result JSON."""
    import torch

    from lowrank.train import TrainConfig, pretrain

    suite, contender = SUITES[suite_name], CONTENDERS[name]
    overrides = scaled_overrides(contender, suite)
    factory = None
    if contender.peer is not None:
        from peers import build_peer

        def factory(model, method):
            settings = method.optimizer
            return build_peer(contender.peer, model, lr=float(settings["lr"]), betas=tuple(settings.get("betas", (0.9, 0.999))),
                              weight_decay=float(settings.get("weight_decay", 0.0)), rank=suite.rank,
                              update_proj_gap=suite.cycle, scale=contender.peer_scale or 0.25)

    run_dir = work / suite_name / f"{name}-lr{lr:g}" if lr is not None else work / suite_name / name
    cfg = TrainConfig(
        method=contender.preset, model=suite.model, data=data, vocab_size=suite.vocab_size, lr=lr,
        batch_size=suite.batch_size, grad_accum=suite.grad_accum, seq_len=suite.seq_len, max_steps=suite.steps,
        eval_every=suite.eval_every, eval_tokens=suite.eval_tokens, out=str(run_dir), overwrite=True, seed=seed,
        device=suite.device, precision=suite.precision, progress=False, plot=False, cache_dir=str(work / suite_name / "cache"),
        log_every=1, overrides=overrides, optimizer_factory=factory,
    )
    started = time.time()
    summary = pretrain(cfg)
    # The comparison needs the logs, not the weights (~200 MB per run at cpu-small).
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    result = {
        "contender": name,
        "kind": "peer" if contender.peer else "ours",
        "package": contender.peer,
        "preset": contender.preset,
        "lr": lr if lr is not None else _preset_lr(contender.preset),
        "lr_source": contender.source,
        "overrides": overrides,
        "val_ppl": summary["val_ppl"],
        "val_loss": summary["val_loss"],
        "final_train_loss": summary["final_train_loss"],
        "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_s_note": "median over steps after the first 3",
        "optimizer_state_bytes": summary["optimizer_state_bytes"],
        "model_state_bytes": summary["model_state_bytes"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "peak_memory_kind": summary["peak_memory_kind"],
        "trainable_params": summary["trainable_params"],
        "frozen_params": summary["frozen_params"],
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "val_curve": [{"step": r["step"], "tokens": r["tokens"], "val_ppl": r["val_ppl"]} for r in records if "val_ppl" in r],
        "train_curve": [{"step": r["step"], "tokens": r["tokens"], "loss": r["loss"]} for r in steps],
        "events": [r for r in records if "event" in r],
        "wall_seconds": time.time() - started,
        "device": summary["device"],
        "torch_threads": torch.get_num_threads(),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")


def _preset_lr(preset: str) -> float:
    from lowrank.methods import load_method

    return float(load_method(preset).optimizer["lr"])


# ---------------------------------------------------------------------- the suite


def run_suite(suite_name: str, data: str, names: list[str], out_dir: Path, work: Path, seed: int) -> dict[str, Any]:
    suite = SUITES[suite_name]
    runs_dir = out_dir / suite_name
    runs: dict[str, list[dict]] = {}
    started = time.time()
    for name in names:
        contender = CONTENDERS[name]
        base = contender.lr if contender.lr is not None else _preset_lr(contender.preset)
        lrs = [base * factor for factor in SWEEP] if contender.sweep else [contender.lr]
        for lr in lrs:
            label = f"{name}-lr{lr:g}" if contender.sweep else name
            out_json = runs_dir / f"{label}.json"
            command = [sys.executable, __file__, "--run-one", name, "--suite", suite_name, "--data", data,
                       "--out-json", str(out_json), "--work", str(work), "--seed", str(seed)]
            if lr is not None:
                command += ["--lr", repr(lr)]
            print(f"[{time.time() - started:7.0f}s] {label} ...", flush=True)
            result = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if result.returncode != 0:
                print(f"  {label} failed with exit code {result.returncode}; recorded as failed", flush=True)
                runs.setdefault(name, []).append({"contender": name, "lr": lr, "failed": True, "exit_code": result.returncode})
                continue
            record = json.loads(out_json.read_text())
            runs.setdefault(name, []).append(record)
            print(f"  val ppl {record['val_ppl']:.2f}, {record['tokens_per_s']:,.0f} tok/s, "
                  f"optimizer state {record['optimizer_state_bytes'] / 2**20:.1f} MiB ({record['wall_seconds']:.0f}s)", flush=True)
    best = {}
    for name, records in runs.items():
        ok = [r for r in records if not r.get("failed") and math.isfinite(r["val_ppl"])]
        best[name] = min(ok, key=lambda r: r["val_ppl"]) if ok else records[0]
    combined = {
        "suite": suite_name,
        "settings": asdict(suite) | {"tokens_per_contender": suite.tokens, "seed": seed, "data": data, "sweep_factors": SWEEP},
        "machine": machine_info(),
        "wall_seconds": time.time() - started,
        "results": best,
        "sweeps": {name: [{"lr": r["lr"], "val_ppl": r.get("val_ppl")} for r in records] for name, records in runs.items()
                   if len(records) > 1},
    }
    (out_dir / f"{suite_name}.json").write_text(json.dumps(combined, indent=1) + "\n")
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu-small")
    parser.add_argument("--data", required=True, help="corpus folder or file (e.g. ../shared/data/pydocs)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="run folders and the shared data cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not Path(args.data).exists():
        parser.error(f"--data {args.data}: no such file or folder")
    data = str(Path(args.data).resolve())
    if args.run_one:
        run_one(args.run_one, args.lr, args.suite, data, Path(args.out_json), Path(args.work), args.seed)
        return
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    combined = run_suite(args.suite, data, names, Path(args.out), Path(args.work), args.seed)
    print(f"done in {combined['wall_seconds'] / 60:.1f} min -> {Path(args.out) / (args.suite + '.json')}")
    baseline = combined["results"].get("adamw")
    for name, record in combined["results"].items():
        if record.get("failed"):
            print(f"{name:18s} failed")
            continue
        ratio = f" ({record['val_ppl'] / baseline['val_ppl']:.3f}× adamw)" if baseline and not baseline.get("failed") else ""
        print(f"{name:18s} ppl {record['val_ppl']:8.2f}{ratio}  {record['tokens_per_s']:8,.0f} tok/s  "
              f"state {record['model_state_bytes'] / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
