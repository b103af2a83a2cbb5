"""What weight refactorization, momentum reset and sparse momentum do to low-rank training, measured.

    python benchmarks/diagnose_restarts.py --data ../shared/data/pydocs \\
        --methods low_rank,low_rank_restarts,low_rank_refactorize,low_rank_reset,lowrank_sparse \\
        [--model llama_20m --vocab-size 4096 --rank 64 --batch-size 8 --seq-len 128 --steps 600 \\
         --cycle 200 --lr 1.5e-3 --out benchmarks/results/restart_diagnostics.json \\
         --figure docs/restart_diagnostics.png]

The benchmark paper (Glentis et al. 2025, arXiv 2505.22922) adds, every 200 steps, a balanced
refactorization ``B ← UΣ^½, A ← Σ^½Vᵀ`` (the product ``s·BA`` is unchanged) and a reset of the
factors' Adam moments. Each method here trains through :class:`lowrank.run.Trainer` itself (a
subclass that only observes: optimizer step pre/post hooks, a wrapper around the restart
controller's ``step``, and ``_train_step``'s return values); nothing about the training changes.

Recorded per optimizer step ``t`` (one value per step; ``None`` where a step was skipped):

* ``loss``, ``lr`` (the factors' group, the lr this step used), ``grad_norm`` (pre-clip total);
* ``effective_update``: the RMS over the low-rank layers of ``‖Δ(s·BA)‖_F / ‖s·BA‖_F`` for the
  optimizer's update of this step (measured between the optimizer step's pre and post hooks, so a
  refactorization that follows it is not mixed in; that is measured on its own, per event).
  No ``m×n`` matrix is formed: with ``ΔB = B₁−B₀``, ``ΔA = A₁−A₀``,
  ``B₁A₁ − B₀A₀ = ΔB·A₁ + B₀·ΔA = X·Y`` with ``X = [ΔB, B₀]`` (``m×2r``) and ``Y = [A₁; ΔA]``
  (``2r×n``), and ``‖XY‖_F² = tr(XᵀX · YYᵀ) = Σ (XᵀX)∘(YYᵀ)``: two ``2r×2r`` Gram matrices,
  ``4r²(m+n)`` multiply-adds, no cancellation of large terms for an optimizer step (the inputs
  are the differences). ``‖B₀A₀‖_F² = Σ (B₀ᵀB₀)∘(A₀A₀ᵀ)`` reuses blocks of the same Grams
  (``A₀A₀ᵀ = A₁A₁ᵀ − A₁ΔAᵀ − ΔAA₁ᵀ + ΔAΔAᵀ``). Per-step values use float32; an event's change
  (large ``ΔA``, ``ΔB`` whose product terms cancel) uses float64, so a refactorization reads
  ~1e-7 (float32 rounding of the factors), not noise of the Gram arithmetic;
* ``effective_update_per_lr``: the same divided by ``lr`` (separates the LR re-warm-up after an
  event from what the event does to the step size of the product);
* ``factor_balance``: mean over layers of ``‖B‖_F / ‖A‖_F`` at the end of the step (after an
  event, if one ran); a balanced refactorization sets it to 1;
* ``mean_abs_dA``, ``mean_abs_dB``: the optimizer step's mean per-entry change of the factors,
  pooled over every layer's entries. With Adam it is about ``lr`` whatever the factor's scale,
  which is why the split of ``s·BA`` between ``B`` and ``A`` sets the product's step size;
* ``adam_direction_rms``: RMS of Adam's normalised update ``m̂/(√v̂+ε)`` over the factors' moment
  entries (the kept entries for sparse momentum), from the state after the step; on the first
  step after a reset ``m̂/√v̂ = sign(g)``: 1 per entry;
* ``adam_step``: the smallest bias-correction count among the factors (drops to 1 after a reset);
* ``updated_fraction``: the fraction of factor entries the step changed (sparse momentum: about
  its density, with no weight decay);
* ``predicted_decrease``: the first-order loss decrease of the factors' update,
  ``−⟨∇L, Δθ⟩`` over ``A`` and ``B`` with the unclipped gradient (the hooks see the clipped one;
  it is divided by the clip coefficient): the step size *along the gradient*, where a sparse
  update of density ``d`` counts ``~d`` while its Frobenius norm counts ``~√d``;
  ``predicted_decrease_per_lr`` divides it by ``lr``.

Per event (every restart of the controller): its kind, the product's own relative change
(``event_product_change``, RMS over layers), the balance before and after, the means of every
series over the 10 steps after it vs the 10 before (and their ratio; never past a neighbouring
event), the effective update per unit lr on the first step after vs that pre-event mean, how many steps the
effective update per unit lr stays above its pre-event mean, and a window of the 20 steps before
and after. Per method: mean effective update per cycle (steps 1–200 / 201–400 / 401–600 at the
defaults), final train loss and validation perplexity. Across methods: each sparse-momentum
method's effective update and predicted decrease relative to ``low_rank`` (and to
``low_rank_restarts``, which differs from ``lowrank_sparse`` only by the sparse momentum and the
spike clipping) at the same lr. :func:`summarize` turns these numbers into sentences.

``--cycle`` sets ``restarts.cycle_length`` of the methods that have restarts and scales their
re-warm-up (10 steps at period 200) as ``benchmarks/compare.py`` does. At the defaults a method
takes about 5 minutes on one core of this machine (LLaMA-20M shape, 600 steps of 1024 tokens;
the measurements add a few percent), so the five presets take ~25–30 minutes.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_arguments, machine_info  # noqa: E402
from suites import CONTENDERS, SUITES  # noqa: E402

from lowrank.methods import available_methods, load_method  # noqa: E402
from lowrank.run import Trainer  # noqa: E402
from lowrank.run.config import TrainConfig  # noqa: E402
from lowrank.wrap import lowrank_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "low_rank,low_rank_restarts,low_rank_refactorize,low_rank_reset,lowrank_sparse"
SERIES = ("step", "loss", "lr", "grad_norm", "effective_update", "effective_update_per_lr", "factor_balance",
          "mean_abs_dA", "mean_abs_dB", "adam_direction_rms", "adam_step", "updated_fraction", "predicted_decrease",
          "predicted_decrease_per_lr")
EVENT_METRICS = ("effective_update", "effective_update_per_lr", "loss", "adam_direction_rms", "mean_abs_dA",
                 "mean_abs_dB", "factor_balance", "grad_norm", "predicted_decrease_per_lr")
WINDOW = 20  # steps kept before and after each event
COMPARE = 10  # steps averaged before and after each event

__all__ = ["product_change", "effective_update", "DiagnosticTrainer", "run_method", "analyse", "summarize", "plot",
           "main"]


# ---------------------------------------------------------------------- the product's change


@torch.no_grad()
def product_change(B0: torch.Tensor, A0: torch.Tensor, B1: torch.Tensor, A1: torch.Tensor, *, scale: float = 1.0,
                   dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """``(‖s(B₁A₁ − B₀A₀)‖_F, ‖s·B₀A₀‖_F)`` from ``2r×2r`` Gram matrices, never the ``m×n`` product.

    ``B₁A₁ − B₀A₀ = [ΔB, B₀] · [A₁; ΔA] = X·Y`` and ``‖XY‖_F² = Σ (XᵀX)∘(YYᵀ)`` (``YYᵀ`` is
    symmetric); ``‖B₀A₀‖_F² = Σ (B₀ᵀB₀)∘(A₀A₀ᵀ)`` from blocks of the same two Grams.
    """
    B0, A0, B1, A1 = (t.detach().to(dtype) for t in (B0, A0, B1, A1))
    r = B0.shape[1]
    X = torch.cat([B1 - B0, B0], dim=1)
    Y = torch.cat([A1, A1 - A0], dim=0)
    gx, gy = X.T @ X, Y @ Y.T
    change_sq = float((gx * gy).sum())
    a0_gram = gy[:r, :r] - gy[:r, r:] - gy[r:, :r] + gy[r:, r:]
    base_sq = float((gx[r:, r:] * a0_gram).sum())
    return abs(scale) * math.sqrt(max(change_sq, 0.0)), abs(scale) * math.sqrt(max(base_sq, 0.0))


def effective_update(B0: torch.Tensor, A0: torch.Tensor, B1: torch.Tensor, A1: torch.Tensor, *,
                     dtype: torch.dtype = torch.float64) -> float:
    """``‖Δ(s·BA)‖_F / ‖s·BA‖_F`` of a layer whose factors went from ``(B0, A0)`` to ``(B1, A1)``
    (the scale ``s`` cancels); see :func:`product_change`."""
    change, base = product_change(B0, A0, B1, A1, dtype=dtype)
    return change / base if base > 0 else float("nan")


def _rms(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------- the observing trainer


class DiagnosticTrainer(Trainer):
    """:class:`lowrank.run.Trainer` that records the measurements of this module's docstring.

    It observes only: a step pre-hook snapshots the factors, a post-hook measures the optimizer's
    update (the gradients are still there: ``zero_grad`` follows the step), a wrapper around
    ``controller.step`` measures an event's own change of the product, and ``_train_step`` adds
    loss, lr and gradient norm. Training is the plain trainer's, bit for bit.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._hooks: list[Any] = []
        self._current: dict[str, Any] = {}
        super().__init__(cfg)

    # -------------------------------------------------------------- installing the probes

    def _enter(self, phase, *, carry_state: bool = True) -> None:
        super()._enter(phase, carry_state=carry_state)
        for handle in self._hooks:
            handle.remove()
        self.layers = lowrank_layers(self.model)
        self.factors = [p for layer in self.layers.values() for p in (layer.B, layer.A)]
        self._group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        self._hooks = [self.optimizer.register_step_pre_hook(self._before_optimizer),
                       self.optimizer.register_step_post_hook(self._after_optimizer)]
        controller_step = self.controller.step

        def observed_step():
            due = self.controller.is_restart_step(self.controller.num_steps + 1)
            before = self._snapshot() if due else None
            record = controller_step()
            if record is not None:
                self._record_event(record, before)
            return record

        self.controller.step = observed_step

    def _snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (layer.B.detach().clone(), layer.A.detach().clone()) for name, layer in self.layers.items()}

    # -------------------------------------------------------------- the optimizer's update

    def _before_optimizer(self, optimizer, args, kwargs) -> None:
        self._before = self._snapshot()
        if self.factors:
            self._current["lr"] = float(self._group_of[id(self.factors[0])]["lr"])

    @torch.no_grad()
    def _after_optimizer(self, optimizer, args, kwargs) -> None:
        if not self.layers:
            return
        relative, sum_dA, sum_dB, n_A, n_B, changed, inner = [], 0.0, 0.0, 0, 0, 0, 0.0
        for name, layer in self.layers.items():
            B0, A0 = self._before[name]
            B1, A1 = layer.B.detach(), layer.A.detach()
            change, base = product_change(B0, A0, B1, A1, scale=layer.scale, dtype=torch.float32)
            relative.append(change / base if base > 0 else float("nan"))
            dA, dB = A1 - A0, B1 - B0
            sum_dA += float(dA.abs().sum())
            sum_dB += float(dB.abs().sum())
            n_A += dA.numel()
            n_B += dB.numel()
            changed += int((dA != 0).sum()) + int((dB != 0).sum())
            for p, delta in ((layer.A, dA), (layer.B, dB)):
                if p.grad is not None:
                    inner += float((p.grad.to(delta.dtype) * delta).sum())
        self._current.update(effective_update=_rms(relative), mean_abs_dA=sum_dA / n_A, mean_abs_dB=sum_dB / n_B,
                             updated_fraction=changed / (n_A + n_B), clipped_inner=inner, **self._adam_direction())
        self._before = None

    def _adam_direction(self) -> dict[str, float | None]:
        """RMS of ``m̂/(√v̂+ε)`` over the factors' moment entries, and their smallest Adam count."""
        total, count, steps = 0.0, 0, []
        for p in self.factors:
            state = self.optimizer.state.get(p, {})
            m, v = state.get("exp_avg"), state.get("exp_avg_sq")
            if m is None or v is None or not m.is_floating_point() or "step" not in state:
                continue
            t = float(state["step"])
            if t <= 0:
                continue
            group = self._group_of[id(p)]
            beta1, beta2 = group["betas"]
            m_hat = m.float() / (1.0 - beta1**t)
            v_hat = v.float() / (1.0 - beta2**t)
            direction = m_hat / (v_hat.sqrt() + group["eps"])
            total += float(direction.square().sum())
            count += direction.numel()
            steps.append(t)
        if not count:
            return {"adam_direction_rms": None, "adam_step": None}
        return {"adam_direction_rms": math.sqrt(total / count), "adam_step": min(steps)}

    # -------------------------------------------------------------- events

    def _balance(self) -> float | None:
        if not self.layers:
            return None
        return statistics.fmean(float(layer.B.detach().norm() / layer.A.detach().norm()) for layer in self.layers.values())

    def _record_event(self, record, before) -> None:
        changes = []
        if before is not None:
            for name, layer in self.layers.items():
                B0, A0 = before[name]
                changes.append(effective_update(B0, A0, layer.B, layer.A, dtype=torch.float64))
        balance_before = (statistics.fmean(float(B.norm() / A.norm()) for B, A in before.values())
                          if before else None)
        self.events.append({"step": record.step, "event": record.event, "reset_params": record.reset_params,
                            "mean_top_singular_value": record.mean_top_singular_value,
                            "event_product_change": _rms(changes) if changes else None,
                            "event_product_change_max": max(changes) if changes else None,
                            "balance_before": balance_before, "balance_after": self._balance()})

    # -------------------------------------------------------------- one step

    def _train_step(self) -> tuple[float, float, float]:
        self._current = {}
        loss, grad_norm, lr = super()._train_step()
        current = self._current
        lr_used = current.get("lr", lr)
        grad_norm = float(grad_norm)
        clip = self.method.training.grad_clip
        coefficient = min(1.0, clip / (grad_norm + 1e-6)) if clip else 1.0
        inner = current.get("clipped_inner")
        decrease = -inner / coefficient if inner is not None and coefficient > 0 else None
        update = current.get("effective_update")
        self.records.append({
            "step": self.step, "loss": loss, "lr": lr_used, "grad_norm": grad_norm,
            "effective_update": update,
            "effective_update_per_lr": update / lr_used if update is not None and lr_used > 0 else None,
            "factor_balance": self._balance(),
            "mean_abs_dA": current.get("mean_abs_dA"), "mean_abs_dB": current.get("mean_abs_dB"),
            "adam_direction_rms": current.get("adam_direction_rms"), "adam_step": current.get("adam_step"),
            "updated_fraction": current.get("updated_fraction"),
            "predicted_decrease": decrease,
            "predicted_decrease_per_lr": decrease / lr_used if decrease is not None and lr_used > 0 else None,
        })
        return loss, grad_norm, lr


# ---------------------------------------------------------------------- one method


def method_preset(name: str) -> tuple[str, dict[str, Any]]:
    """``(preset, its overrides)`` for ``name``: a preset, or one of ``benchmarks/suites.py``'s variants
    of ours (e.g. ``low_rank_restarts-rotate``: the preset with the contender's ``overrides``)."""
    if name not in available_methods() and name in CONTENDERS and CONTENDERS[name].peer is None:
        return CONTENDERS[name].preset, dict(CONTENDERS[name].overrides)
    return name, {}


def method_overrides(name: str, cycle: int | None) -> dict[str, Any]:
    """The variant's own overrides (:func:`method_preset`), ``restarts.cycle_length`` = ``cycle`` and
    the re-warm-ups scaled with it (as compare.py)."""
    preset, overrides = method_preset(name)
    method = load_method(preset, overrides)
    restarts = method.restarts
    if restarts is None or cycle is None:
        return overrides
    factor = cycle / restarts.cycle_length
    overrides["restarts.cycle_length"] = cycle
    if restarts.rewarmup_steps:
        overrides["restarts.rewarmup_steps"] = min(cycle - 1, max(1, round(restarts.rewarmup_steps * factor)))
    for group in ("matrix", "other"):
        warmup = getattr(method.optimizer, group).get("reset_warmup")
        if warmup:
            overrides[f"optimizer.{group}.reset_warmup"] = max(1, round(warmup * factor))
    return overrides


def run_method(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``name`` with the settings of ``args``; its settings, per-step series and events."""
    work = Path(args.work)
    # every method's factors at the same lr (the presets' own ratios differ: issue 21 tuned each)
    overrides = {**method_overrides(name, args.cycle), "optimizer.matrix_lr_ratio": args.matrix_lr_ratio}
    cfg = TrainConfig(
        method=method_preset(name)[0], model=args.model, data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        rank=args.rank, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, max_steps=args.steps,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, keep_checkpoints=1, out=str(work / name),
        overwrite=True, seed=args.seed, device=args.device, precision=args.precision, progress=False, plot=False,
        cache_dir=str(work / "cache"), log_every=1, overrides=overrides,
    )
    trainer = DiagnosticTrainer(cfg)
    summary = trainer.train()
    method = trainer.method
    restarts = method.restarts
    series = {key: [record[key] for record in trainer.records] for key in SERIES}
    return {
        "settings": {
            "overrides": overrides, "lr": method.optimizer.lr, "optimizer": method.optimizer.name,
            "density": float(method.optimizer.matrix.get("density", 1.0)),
            "spike_threshold": float(method.optimizer.matrix.get("spike_threshold", 0.0)),
            "cycle_length": restarts.cycle_length if restarts else None,
            "event": restarts.event if restarts else None, "reset": restarts.reset if restarts else None,
            "rewarmup_steps": restarts.rewarmup_steps if restarts else 0,
            "reset_moments": restarts.reset_moments if restarts else None,
            "rotate_moments": bool(restarts and restarts.rotate_moments),
            "reset_warmup": int(method.optimizer.matrix.get("reset_warmup", 0)),
            "layers": len(trainer.layers), "rank": args.rank,
        },
        "series": series,
        "events": trainer.events,
        "final": {key: summary.get(key) for key in ("final_train_loss", "val_loss", "val_ppl", "skipped_steps",
                                                     "tokens_per_s", "optimizer_state_bytes")},
    }


# ---------------------------------------------------------------------- analysis


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return statistics.fmean(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _segments(steps: int, cycle: int | None) -> list[tuple[int, int]]:
    length = cycle or steps
    return [(start, min(start + length - 1, steps)) for start in range(1, steps + 1, length)]


def analyse(method: dict[str, Any], steps: int, cycle: int | None) -> dict[str, Any]:
    """Segment means and the before/after comparison of every event, added to ``method``."""
    series = method["series"]
    index = {s: i for i, s in enumerate(series["step"])}

    def values(key: str, first: int, last: int) -> list:
        return [series[key][index[s]] for s in range(max(1, first), min(last, steps) + 1) if s in index]

    segments = {}
    for first, last in _segments(steps, cycle):
        segments[f"{first}-{last}"] = {key: _mean(values(key, first, last)) for key in
                                       ("effective_update", "effective_update_per_lr", "predicted_decrease_per_lr",
                                        "loss", "factor_balance", "updated_fraction", "adam_direction_rms")}
    event_steps = [e["step"] for e in method["events"]]
    for number, event in enumerate(method["events"]):
        e = event["step"]
        previous = event_steps[number - 1] if number > 0 else 0
        following = event_steps[number + 1] if number + 1 < len(event_steps) else steps + 1
        # the COMPARE steps before and after, never reaching past the neighbouring events
        first, last = max(previous + 1, e - COMPARE + 1), min(following, e + COMPARE, steps)
        event["compared_steps"] = {"before": [first, e], "after": [e + 1, last]}
        comparison = {}
        for key in EVENT_METRICS:
            before, after = _mean(values(key, first, e)), _mean(values(key, e + 1, last))
            comparison[key] = {"before": before, "after": after, "ratio": _ratio(after, before)}
        event["after_vs_before"] = comparison
        level = comparison["effective_update_per_lr"]["before"]
        elevated = 0
        for value in values("effective_update_per_lr", e + 1, following - 1):
            if level is None or value is None or value <= level:
                break
            elevated += 1
        event["elevated_steps"] = elevated
        first_after = index.get(e + 1)
        event["first_step_after"] = ({key: series[key][first_after] for key in ("adam_direction_rms", "adam_step",
                                                                               "effective_update_per_lr", "lr")}
                                     if first_after is not None else None)
        if event["first_step_after"] is not None:
            event["first_step_after"]["effective_update_per_lr_ratio"] = _ratio(
                event["first_step_after"]["effective_update_per_lr"], level)
        window_steps = list(range(max(1, e - WINDOW), min(steps, e + WINDOW) + 1))
        event["window"] = {"steps": window_steps, **{key: [series[key][index[s]] for s in window_steps]
                                                     for key in ("loss", "lr", "effective_update", "effective_update_per_lr",
                                                                 "adam_direction_rms", "factor_balance")}}
    series_update = [v for v in series["effective_update"] if v is not None]
    method["summary"] = {
        "segments": segments,
        "mean_effective_update": _mean(series_update),
        "mean_effective_update_per_lr": _mean(series["effective_update_per_lr"]),
        "mean_predicted_decrease_per_lr": _mean(series["predicted_decrease_per_lr"]),
        "mean_updated_fraction": _mean(series["updated_fraction"]),
        "mean_abs_dA_per_lr": _mean([d / lr for d, lr in zip(series["mean_abs_dA"], series["lr"]) if d is not None and lr]),
        "mean_abs_dB_per_lr": _mean([d / lr for d, lr in zip(series["mean_abs_dB"], series["lr"]) if d is not None and lr]),
        "factor_balance_first": next((v for v in series["factor_balance"] if v is not None), None),
        "factor_balance_last": next((v for v in reversed(series["factor_balance"]) if v is not None), None),
        "event_steps": event_steps,
    }
    return method


def compare_sparse(methods: dict[str, dict[str, Any]], steps: int, cycle: int | None) -> dict[str, Any]:
    """Each sparse-momentum method against ``low_rank`` and ``low_rank_restarts`` at the same lr."""
    out = {}
    for name, method in methods.items():
        if method["settings"]["density"] >= 1.0:
            continue
        for reference in ("low_rank", "low_rank_restarts"):
            other = methods.get(reference)
            if other is None or other["settings"]["lr"] != method["settings"]["lr"]:
                continue
            a, b = method["series"], other["series"]
            first_event = min(method["summary"]["event_steps"] + other["summary"]["event_steps"] + [steps])

            def mean_over(series, key, last):
                return _mean([v for s, v in zip(series["step"], series[key]) if s <= last])

            entry = {"density": method["settings"]["density"], "lr": method["settings"]["lr"],
                     "updated_fraction": method["summary"]["mean_updated_fraction"],
                     "reference_updated_fraction": other["summary"]["mean_updated_fraction"],
                     "steps_before_first_event": first_event}
            for key in ("effective_update", "effective_update_per_lr", "predicted_decrease_per_lr"):
                entry[f"{key}_ratio"] = _ratio(_mean(a[key]), _mean(b[key]))
                entry[f"{key}_ratio_before_first_event"] = _ratio(mean_over(a, key, first_event),
                                                                  mean_over(b, key, first_event))
            entry["segments"] = {label: _ratio(segment["effective_update"],
                                               other["summary"]["segments"][label]["effective_update"])
                                 for label, segment in method["summary"]["segments"].items()}
            out[f"{name}_vs_{reference}"] = entry
    return out


# ---------------------------------------------------------------------- sentences


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}g}"


def _event_name(settings: dict[str, Any], kind: str) -> str:
    reset = settings.get("reset")
    carried = " rotated" if settings.get("rotate_moments") else " kept"
    if kind == "refactorize":
        if reset in ("changed", "factors", "all"):
            if settings.get("reset_moments") == "first":
                return f"refactorization + reset of m (v{carried})"
            warmup = settings.get("reset_warmup")
            return "refactorization + momentum reset" + (f" ({warmup}-step update warm-up)" if warmup else "")
        return f"refactorization (moments{carried})"
    if kind == "merge":
        return "merge + momentum reset" if reset not in (None, "none") else "merge"
    return "momentum reset" if reset not in (None, "none") else "restart"


def summarize(result: dict[str, Any] | str | Path) -> list[str]:
    """Plain sentences from the numbers of a result (a dict as :func:`main` returns, or its JSON file)."""
    if not isinstance(result, dict):
        result = json.loads(Path(result).read_text())
    sentences = []
    methods = result["methods"]
    for name, method in methods.items():
        summary, settings = method["summary"], method["settings"]
        segments = summary["segments"]
        labels = " / ".join(segments)
        means = " / ".join(_fmt(s["effective_update"]) for s in segments.values())
        per_lr = " / ".join(_fmt(s["effective_update_per_lr"]) for s in segments.values())
        sentences.append(
            f"{name}: the effective update ‖Δ(sBA)‖/‖sBA‖ (RMS over {settings['layers']} layers) averages {means} in "
            f"steps {labels} ({per_lr} per unit lr); final val ppl {_fmt(method['final'].get('val_ppl'), 4)}.")
        sentences.append(
            f"{name}: per entry the optimizer moves A by {_fmt(summary['mean_abs_dA_per_lr'])}·lr and B by "
            f"{_fmt(summary['mean_abs_dB_per_lr'])}·lr on average, while the factor balance ‖B‖/‖A‖ goes from "
            f"{_fmt(summary['factor_balance_first'])} (step 1) to {_fmt(summary['factor_balance_last'])} (end).")
        for event in method["events"]:
            compare = event.get("after_vs_before", {})
            per = compare.get("effective_update_per_lr", {})
            raw = compare.get("effective_update", {})
            loss = compare.get("loss", {})
            first = event.get("first_step_after") or {}
            what = _event_name(settings, event["event"])
            loss_change = (loss["after"] - loss["before"]) if loss.get("after") is not None and loss.get("before") is not None else None
            span = event.get("compared_steps") or {"before": [event["step"], event["step"]], "after": [event["step"] + 1] * 2}
            n_before = span["before"][1] - span["before"][0] + 1
            n_after = span["after"][1] - span["after"][0] + 1
            sentences.append(
                f"{name}, {what} at step {event['step']}: the product changes by {_fmt(event.get('event_product_change'), 2)} "
                f"(relative) at the event; the effective update per unit lr is ×{_fmt(first.get('effective_update_per_lr_ratio'))} "
                f"of its mean over the {n_before} steps before on the first step after, ×{_fmt(per.get('ratio'))} over the "
                f"{n_after} steps after (raw ×{_fmt(raw.get('ratio'))}, with the lr schedule), and stays above the pre-event "
                f"level for {event.get('elevated_steps')} steps; Adam's m̂/√v̂ RMS is "
                f"{_fmt(compare.get('adam_direction_rms', {}).get('before'))} before and {_fmt(first.get('adam_direction_rms'))} "
                f"on the first step after; ‖B‖/‖A‖ {_fmt(event.get('balance_before'))} → {_fmt(event.get('balance_after'))}; "
                f"mean loss {_fmt(loss.get('before'), 4)} before vs {_fmt(loss.get('after'), 4)} after "
                f"({'+' if (loss_change or 0) >= 0 else ''}{_fmt(loss_change, 2)}).")
    for key, entry in result.get("comparisons", {}).items():
        name, reference = key.split("_vs_")
        decrease = entry.get("predicted_decrease_per_lr_ratio")
        sentences.append(
            f"{name} updates {_fmt(entry['updated_fraction'])} of the factor entries per step (density "
            f"{_fmt(entry['density'])}; {reference}: {_fmt(entry['reference_updated_fraction'])}); its effective update is "
            f"{_fmt(entry['effective_update_ratio'])} of {reference}'s at the same lr ({_fmt(entry['effective_update_per_lr_ratio'])} "
            f"per unit lr; {_fmt(entry['effective_update_ratio_before_first_event'])} before the first event) and its first-order "
            f"loss decrease per unit lr {_fmt(decrease)} of {reference}'s"
            + (f", like a {_fmt(1 / decrease, 2)}× smaller factor learning rate." if decrease else "."))
    ranked = sorted(((m["final"].get("val_ppl"), name) for name, m in methods.items() if m["final"].get("val_ppl")))
    if ranked:
        sentences.append("Final val ppl, best first: " + ", ".join(f"{name} {_fmt(ppl, 4)}" for ppl, name in ranked) + ".")
    return sentences


# ---------------------------------------------------------------------- figure


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Effective update per step (log y) and factor balance per step, events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), dpi=120, sharex=True)
    events = sorted({e["step"] for m in result["methods"].values() for e in m["events"]})
    for name, method in result["methods"].items():
        series = method["series"]
        points = [(s, v) for s, v in zip(series["step"], series["effective_update"]) if v is not None and v > 0]
        if points:
            top.plot(*zip(*points), linewidth=0.9, label=name)
        balance = [(s, v) for s, v in zip(series["step"], series["factor_balance"]) if v is not None]
        if balance:
            bottom.plot(*zip(*balance), linewidth=1.2, label=name)
    for axis in (top, bottom):
        for i, step in enumerate(events):
            axis.axvline(step, color="gray", linestyle=":", linewidth=0.8, label="event" if i == 0 and axis is top else None)
    top.set_yscale("log")
    bottom.set_yscale("log")
    top.set_ylabel("effective update ‖Δ(sBA)‖/‖sBA‖\n(RMS over layers)")
    bottom.set_ylabel("factor balance ‖B‖/‖A‖\n(mean over layers)")
    bottom.set_xlabel("step")
    settings = result["settings"]
    top.set_title(f"{settings['model']}, rank {settings['rank']}, lr {settings['lr']:g}, cycle {settings['cycle']}")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="corpus folder (train.txt / valid.txt, or .gz)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated presets, or variants of ours named in benchmarks/suites.py (low_rank_restarts-rotate)")
    add_model_arguments(parser, SUITES["cpu-long"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--cycle", type=int, default=200, help="restarts.cycle_length of the methods with restarts")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--matrix-lr-ratio", type=float, default=1.0,
                        help="the factors' lr as a multiple of --lr, the same for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="0: evaluate at the end only")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "diagnose_restarts"), help="run folders and data cache")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "restart_diagnostics.json"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "restart_diagnostics.png"))
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {}
    for name in args.methods:
        methods[name] = analyse(run_method(name, args), args.steps, args.cycle)
        print(f"{name}: done, val ppl {_fmt(methods[name]['final'].get('val_ppl'), 4)}", flush=True)
    settings = {key: getattr(args, key) for key in ("data", "model", "vocab_size", "tokenizer", "rank", "batch_size",
                                                     "seq_len", "steps", "cycle", "lr", "seed", "eval_tokens", "device",
                                                     "precision", "threads")}
    settings["methods"] = args.methods
    settings["segments"] = [f"{a}-{b}" for a, b in _segments(args.steps, args.cycle)]
    result = {"benchmark": "restart_diagnostics", "machine": machine_info(), "settings": settings,
              "methods": methods, "comparisons": compare_sparse(methods, args.steps, args.cycle)}
    result["sentences"] = summarize(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = _finite(result)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    plot(result, args.figure)
    for sentence in result["sentences"]:
        print(sentence)
    print(f"-> {out}, {args.figure}")
    return result


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (JSON has no NaN) and tensors as lists."""
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _finite(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    main()
