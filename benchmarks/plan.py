"""Which runs a suite needs, given the runs that have finished: a pure function of the two.

The plan for every contender, in stages (a stage starts when the one before it has finished):

0. **lr sweep**: ``published lr × suite.sweep`` (or the published lr alone for an unswept
   contender), ratio at its default, first seed.
1. **edge extension**: while the best learning rate is the lowest (highest) one tried, try one
   more point a sweep step beyond it, at most ``suite.max_extend`` times per side.
2. **ratio sweep** (contenders with a matrix/dense split): a pattern search from the best
   learning rate over the dense lr (embeddings, head, norms: ``lr``) and the hidden matrices' lr
   (``lr × matrix_lr_ratio``), one step (the ratio sweep's) up and down each with the other held,
   moving to a better neighbour up to ``suite.split_moves`` times (:func:`_split_search`).
3. **ablation**: the ablation contenders at ``suite.ablation_base``'s best (lr, ratio).
4. **seeds**: each contender's best setting with every other seed of the suite; 5. the same for
   the ablation contenders at their (shared) setting.

A failed (diverged) run counts as worse than any finished one. Re-planning after every finished
run is cheap, so the runner simply asks again; a suite interrupted at any point continues from
what is on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from suites import Contender, Suite

__all__ = ["RunSpec", "plan", "best_setting", "STAGES"]

STAGES = ("lr sweep", "edge extension", "ratio sweep", "ablation", "seeds", "ablation seeds")


@dataclass(frozen=True, order=True)
class RunSpec:
    """One training run of a suite. ``ratio`` is ``None`` for contenders without a factor group."""

    stage: int
    contender: str
    lr: float
    ratio: float | None
    seed: int

    @property
    def label(self) -> str:
        parts = [self.contender, f"lr{self.lr:g}"]
        if self.ratio is not None and self.ratio != 1.0:
            parts.append(f"ratio{self.ratio:g}")
        if self.seed:
            parts.append(f"seed{self.seed}")
        return "-".join(parts)

    @property
    def key(self) -> tuple:
        """Identity of the run, without the stage that asked for it."""
        return (self.contender, round_setting(self.lr), None if self.ratio is None else round_setting(self.ratio), self.seed)


def round_setting(x: float) -> float:
    # 1.5e-3 × 0.5 × 2 must be the same run as 1.5e-3.
    return float(f"{x:.6g}")


def run_score(record: dict | None) -> float:
    if record is None or record.get("failed") or record.get("val_ppl") is None or not math.isfinite(record["val_ppl"]):
        return math.inf
    return record["val_ppl"]


def _step(factors: tuple[float, ...]) -> float:
    """The sweep's multiplicative step (2 for 0.5 / 1 / 2)."""
    ordered = sorted(factors)
    return ordered[1] / ordered[0] if len(ordered) > 1 else 2.0


def _grid_with_extension(values: list[float], score, step: float, initial: list[float], max_extend: int) -> tuple[float | None, list[float]]:
    """``(best value or None while points are missing, points still to run)`` for one sweep axis."""
    missing = [v for v in values if score(v) is None]
    if missing:
        return None, missing
    best = min(values, key=lambda v: (score(v), abs(math.log(v))))
    low, high = min(values), max(values)
    if math.isinf(score(best)):
        return best, []  # everything failed: nothing to extend from
    below = sum(1 for v in values if v < min(initial) * (1 - 1e-9))
    above = sum(1 for v in values if v > max(initial) * (1 + 1e-9))
    if best == low and below < max_extend:
        return None, [round_setting(low / step)]
    if best == high and above < max_extend:
        return None, [round_setting(high * step)]
    return best, []


def ratio_step(ratio_sweep: tuple[float, ...]) -> float:
    """The split search's multiplicative step for a suite's ``ratio_sweep`` (2 for ``(0.5, 2.0)``)."""
    return _step(tuple(sorted({1.0, *ratio_sweep})))


def split_neighbours(lr: float, ratio: float, step: float) -> list[tuple[float, float]]:
    """The four ``(lr, ratio)`` points next to one in the split search: the dense lr ``lr`` × and
    ÷ ``step`` with the matrices' lr ``lr × ratio`` held, then the matrices' lr × and ÷ ``step``."""
    dense, matrix = lr, lr * ratio
    around = [(dense * step, matrix), (dense / step, matrix), (dense, matrix * step), (dense, matrix / step)]
    return [(round_setting(d), round_setting(m / d)) for d, m in around]


def _split_search(best_lr: float, score, step: float, max_moves: int) -> tuple[tuple | None, list[tuple]]:
    """``(best (lr, ratio) or None while points are missing, (lr, ratio) points still to run)``:
    a pattern search over the dense lr ``d = lr`` and the hidden matrices' lr ``m = lr × ratio``.

    One lr for both (the lr sweep's best, ratio 1) is a compromise between what the matrices
    tolerate and what the embeddings, head and norms want, and either may be the one that holds
    it back (issue 21: AdamW cannot raise its embeddings' lr without destabilising its matrices).
    So both axes are tried: ``d × step``, ``d / step`` with ``m`` held, and ``m × step``,
    ``m / step`` with ``d`` held. While a neighbour beats the centre the search moves there (at
    most ``max_moves`` times) and tries its neighbours; points already run are not run again."""
    centre = (round_setting(best_lr), 1.0)
    if math.isinf(score(*centre)):
        return centre, []  # every lr failed: nothing to search from
    for move in range(max_moves + 1):
        points = split_neighbours(*centre, step)
        missing = [p for p in points if score(*p) is None]
        if missing:
            return None, missing
        best = min([centre, *points], key=lambda p: (score(*p), p != centre))
        if best == centre or move == max_moves:
            return best, []
        centre = best
    raise AssertionError("unreachable")


@dataclass
class _Axis:
    """Results of one contender, looked up by (lr, ratio, seed)."""

    results: dict[tuple, dict]
    contender: str

    def get(self, lr: float, ratio: float | None, seed: int) -> dict | None:
        return self.results.get((self.contender, round_setting(lr), None if ratio is None else round_setting(ratio), seed))


def best_setting(
    name: str, contender: Contender, suite: Suite, results: dict[tuple, dict], base_lr: float, has_ratio: bool
) -> tuple[tuple[float, float | None] | None, list[RunSpec]]:
    """The best ``(lr, ratio)`` of a contender at the suite's first seed once its sweep is
    complete (else ``None``), and the runs still needed to get there."""
    seed = suite.seeds[0]
    axis = _Axis(results, name)
    swept = suite.sweep_all or contender.sweep
    initial = sorted({round_setting(base_lr * f) for f in suite.sweep}) if swept else [round_setting(base_lr)]
    default_ratio = 1.0 if has_ratio else None
    tried_lrs = sorted({key[1] for key in results if key[0] == name and key[2] == default_ratio and key[3] == seed} | set(initial))

    def lr_score(lr):
        record = axis.get(lr, default_ratio, seed)
        return None if record is None else run_score(record)

    step = _step(suite.sweep) if swept else 2.0
    best_lr, needed = _grid_with_extension(tried_lrs, lr_score, step, initial, suite.max_extend if swept else 0)
    if best_lr is None:
        stage = 0 if any(v in initial for v in needed) else 1
        return None, [RunSpec(stage, name, lr, default_ratio, seed) for lr in needed]
    if not (has_ratio and suite.ratio_sweep):
        return (best_lr, default_ratio), []

    if name in suite.no_ratio_sweep:
        return (best_lr, default_ratio), []
    step = ratio_step(suite.ratio_sweep)

    def split_score(lr, ratio):
        record = axis.get(lr, ratio, seed)
        return None if record is None else run_score(record)

    split, needed = _split_search(best_lr, split_score, step, suite.split_moves)
    if split is None:
        return None, [RunSpec(2, name, lr, ratio, seed) for lr, ratio in needed]
    # The overall best over everything tried at this seed (a ratio may beat the lr sweep's best).
    candidates = [(key[1], key[2]) for key in results if key[0] == name and key[3] == seed]
    best = min(candidates, key=lambda lr_ratio: run_score(axis.get(*lr_ratio, seed)))
    return best, []


def plan(suite: Suite, contenders: dict[str, Contender], names: list[str], results: dict[tuple, dict],
         base_lrs: dict[str, float], has_ratio: dict[str, bool], *, ablation: bool = True
         ) -> tuple[list[RunSpec], dict[str, tuple | None], dict[str, tuple]]:
    """``(runs still needed now in priority order, best (lr, ratio) per contender so far,
    the setting of each ablation contender)``.

    ``results`` maps :attr:`RunSpec.key` to finished run records (``val_ppl``, or ``failed``);
    ``base_lrs`` and ``has_ratio`` describe each contender (the lr its sweep centres on; whether
    its preset has a factor group whose ratio can be swept). The ablation runs once
    ``suite.ablation_base`` (which must be among ``names``) has its best setting; an ablation
    run that is also a point of a contender's own sweep is the same run and is done once.
    """
    needed: list[RunSpec] = []
    best: dict[str, tuple | None] = {}
    for name in names:
        setting, runs = best_setting(name, contenders[name], suite, results, base_lrs[name], has_ratio[name])
        best[name] = setting
        needed += runs
    settings: dict[str, tuple] = {}
    base = best.get(suite.ablation_base) if ablation and suite.ablation_base else None
    if base is not None:
        lr, ratio = base
        for name in suite.ablation:
            settings[name] = (lr, ratio if has_ratio[name] else None)
            needed.append(RunSpec(3, name, *settings[name], suite.seeds[0]))
    repeats = [(4, name, setting) for name, setting in best.items() if setting is not None]
    repeats += [(5, name, setting) for name, setting in settings.items()]
    for stage, name, (lr, ratio) in repeats:
        needed += [RunSpec(stage, name, lr, ratio, seed) for seed in suite.seeds[1:]]
    unique: dict[tuple, RunSpec] = {}
    for spec in sorted(needed):
        if spec.key not in results:
            unique.setdefault(spec.key, spec)
    return list(unique.values()), best, settings
