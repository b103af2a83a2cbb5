"""How far each method moves the hidden matrices and the embeddings per unit learning rate.

    python benchmarks/diagnose_split.py --data ../shared/data/pydocs [--methods full_rank,low_rank,galore]
        [--lr 1e-3 --steps 600 --out benchmarks/results/split_diagnostics.json]

Issue 21 found full-rank AdamW far behind every memory-efficient method on ``cpu-long`` at one
shared lr (39.32), and much closer once its hidden matrices run at a quarter of the embeddings'
lr (``adamw-split``: 33.16 at lr 2e-3 × 0.25). This measures why: each method trains through
:class:`lowrank.run.Trainer` at the same lr and shape (``cpu-long``'s model, 1,024 tokens per
step), and an optimizer step pre/post hook records, per step,

* ``matrices``: the RMS over the decoder's linear layers of ``‖ΔW‖_F / ‖W‖_F`` (a low-rank
  layer's ``W = s·BA`` through :func:`diagnose_restarts.product_change`, no ``m×n`` matrix formed);
  ``matrix_entries``: the same layers' RMS change per entry, ``‖ΔW‖_F / √(mn)`` (the size of the
  step itself, whatever the weights' size);
* ``embedding``, ``head``: ``‖ΔE‖_F / ‖E‖_F`` of the token embeddings and of the output head;

each divided by its group's lr of that step (so the schedule cancels). Adam moves every entry by
about ``lr`` whatever its scale, so a dense matrix's relative step per unit lr is set by its
entries' size; a factored ``s·BA`` moves through two factors at once, and GaLore scales its
projected update by ``scale`` (0.25). The ratio of a method's matrices to full-rank's, with its
embeddings' ratio beside it, is the implicit matrix/dense lr split the method trains with.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_arguments, write_result  # noqa: E402
from suites import SUITES  # noqa: E402
from diagnose_restarts import product_change  # noqa: E402

from lowrank.run import Trainer  # noqa: E402
from lowrank.run.config import TrainConfig  # noqa: E402
from lowrank.wrap import lowrank_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "split_diagnostics"
PARTS = ("matrices", "matrix_entries", "embedding", "head")


def _relative(before: torch.Tensor, after: torch.Tensor) -> float:
    base = float(before.norm())
    return float((after - before).norm()) / base if base > 0 else float("nan")


class StepSizeTrainer(Trainer):
    """:class:`lowrank.run.Trainer` that records each part's relative step per unit lr (see the
    module docstring); it only observes, so training is the plain trainer's."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.records: list[dict[str, float]] = []
        self._hooks: list[Any] = []
        super().__init__(cfg)

    def _enter(self, phase, *, carry_state: bool = True) -> None:
        super()._enter(phase, carry_state=carry_state)
        for handle in self._hooks:
            handle.remove()
        self.factored = lowrank_layers(self.model)
        factored_names = set(self.factored)
        self.dense = {name: m.weight for name, m in self.model.named_modules()
                      if isinstance(m, nn.Linear) and ".layers." in f".{name}" and
                      not any(name.startswith(f) for f in factored_names)}
        self.embedding = self.model.get_input_embeddings().weight
        self.head = self.model.get_output_embeddings().weight
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        first_matrix = next(iter(self.factored.values())).B if self.factored else next(iter(self.dense.values()))
        self._groups = {"matrices": group_of[id(first_matrix)], "matrix_entries": group_of[id(first_matrix)],
                        "embedding": group_of[id(self.embedding)], "head": group_of[id(self.head)]}
        self._hooks = [self.optimizer.register_step_pre_hook(self._before),
                       self.optimizer.register_step_post_hook(self._after)]

    def _snapshot(self) -> dict[str, Any]:
        return {"factored": {n: (l.B.detach().clone(), l.A.detach().clone()) for n, l in self.factored.items()},
                "dense": {n: w.detach().clone() for n, w in self.dense.items()},
                "embedding": self.embedding.detach().clone(), "head": self.head.detach().clone()}

    def _before(self, optimizer, args, kwargs) -> None:
        self._saved = self._snapshot()

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        saved, matrices, entries = self._saved, [], []
        for name, layer in self.factored.items():
            B0, A0 = saved["factored"][name]
            change, base = product_change(B0, A0, layer.B.detach(), layer.A.detach(), scale=layer.scale,
                                          dtype=torch.float32)
            matrices.append(change / base if base > 0 else float("nan"))
            entries.append(change / math.sqrt(B0.shape[0] * A0.shape[1]))
        for name, w in self.dense.items():
            matrices.append(_relative(saved["dense"][name], w.detach()))
            entries.append(float((w.detach() - saved["dense"][name]).norm()) / math.sqrt(w.numel()))
        steps = {"matrices": math.sqrt(statistics.fmean(v * v for v in matrices)),
                 "matrix_entries": math.sqrt(statistics.fmean(v * v for v in entries)),
                 "embedding": _relative(saved["embedding"], self.embedding.detach()),
                 "head": _relative(saved["head"], self.head.detach())}
        lrs = {part: float(group["lr"]) for part, group in self._groups.items()}
        self.records.append({**{f"{part}_per_lr": steps[part] / lrs[part] for part in PARTS},
                             **{f"{part}_lr": lrs[part] for part in PARTS}})
        self._saved = None


def run_method(name: str, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    cfg = TrainConfig(
        method=name, model=args.model, data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        rank=args.rank, lr=args.lr,
        batch_size=args.batch_size, seq_len=args.seq_len, max_steps=args.steps, eval_every=0,
        eval_tokens=args.eval_tokens, keep_checkpoints=1, out=str(work / name), overwrite=True, seed=args.seed,
        progress=False, plot=False, cache_dir=str(work / "cache"), log_every=1,
        overrides={"optimizer.matrix.update_proj_gap": args.cycle} if name == "galore" else {},
    )
    trainer = StepSizeTrainer(cfg)
    summary = trainer.train()
    records = trainer.records
    segments = {}
    for first in range(0, args.steps, args.segment):
        chunk = records[first:first + args.segment]
        segments[f"{first + 1}-{first + len(chunk)}"] = {
            f"{part}_per_lr": statistics.fmean(r[f"{part}_per_lr"] for r in chunk) for part in PARTS}
    after_warmup = records[args.steps // 10:]
    return {"val_ppl": summary["val_ppl"], "segments": segments,
            "mean": {f"{part}_per_lr": statistics.fmean(r[f"{part}_per_lr"] for r in after_warmup) for part in PARTS},
            "series": {key: [r[key] for r in records] for key in records[0]}}


def sentences(result: dict[str, Any]) -> list[str]:
    methods = result["methods"]
    base = methods.get("full_rank")
    if base is None:
        return []
    lines = []
    for name, m in methods.items():
        if name == "full_rank":
            continue
        ratios = {part: m["mean"][f"{part}_per_lr"] / base["mean"][f"{part}_per_lr"] for part in PARTS}
        lines.append(f"Per unit lr (mean after the warm-up), `{name}` moves its hidden matrices {ratios['matrices']:.2f}× "
                     f"as far as `full_rank` relative to their norm ({ratios['matrix_entries']:.2f}× per entry), its "
                     f"embeddings {ratios['embedding']:.2f}× and its head {ratios['head']:.2f}×: an implicit "
                     f"matrix/dense lr split of {ratios['matrices'] / ratios['embedding']:.2f}.")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--methods", default="full_rank,low_rank,galore")
    add_model_arguments(parser, SUITES["cpu-long"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--segment", type=int, default=200, help="steps per reported segment")
    parser.add_argument("--cycle", type=int, default=200, help="GaLore's projector refresh period")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "diagnose_split"))
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        methods[name] = run_method(name, args)
        print(f"{name}: {json.dumps(methods[name]['mean'])}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    result = {"settings": settings, "methods": methods}
    result["sentences"] = sentences(result)
    path = write_result(NAME, result, args.out)
    for line in result["sentences"]:
        print(line)
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
