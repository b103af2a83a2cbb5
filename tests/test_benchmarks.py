"""The benchmark pipeline end to end on the smoke suite: every contender (peers through their own
packages, our presets) trains through the same trainer, results carry the required metrics, and
the report renders the README table and the plots."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402
import plan  # noqa: E402
import report  # noqa: E402
from suites import CONTENDERS, SUITES  # noqa: E402

REQUIRED = ("val_ppl", "tokens_per_s", "optimizer_state_bytes", "model_state_bytes", "peak_memory_bytes")


def test_scaled_overrides_put_every_event_on_the_suite_clock():
    suite = SUITES["cpu-small"]
    restarts = compare.scaled_overrides(CONTENDERS["low_rank_restarts"], suite)
    assert restarts == {"lowrank.rank": 96, "restarts.cycle_length": 40, "restarts.rewarmup_steps": 2}
    spam = compare.scaled_overrides(CONTENDERS["spam"], suite)
    assert spam["restarts.cycle_length"] == 40 and spam["optimizer.matrix.reset_warmup"] == 12  # 150 × 40/500
    galore = compare.scaled_overrides(CONTENDERS["galore"], suite)
    assert galore == {"optimizer.matrix.rank": 96, "optimizer.matrix.update_proj_gap": 40}
    assert compare.scaled_overrides(CONTENDERS["adamw"], suite) == {}
    # cpu-long: ReLoRA's full-rank warm start for a quarter of the run; the ablation's own periods
    long = SUITES["cpu-long"]
    relora = compare.scaled_overrides(CONTENDERS["relora"], long)
    assert relora["lowrank.warm_start_steps"] == 500 and relora["restarts.cycle_length"] == 200
    assert relora["restarts.rewarmup_steps"] == 20  # ReLoRA's 100 of 1000 steps, at period 200
    assert compare.scaled_overrides(CONTENDERS["low_rank_restarts@400"], long)["restarts.cycle_length"] == 400


def simulate(suite, names, ppl, max_rounds=50):
    """Drive the planner with a fake trainer ``ppl(name, lr, ratio, seed)`` until nothing is needed."""
    results, history = {}, []
    base_lrs = {n: compare.base_lr(CONTENDERS[n]) for n in [*names, *suite.ablation]}
    ratios = {n: compare.has_ratio(CONTENDERS[n]) for n in base_lrs}
    for _ in range(max_rounds):
        needed, best, ablation = plan.plan(suite, CONTENDERS, names, results, base_lrs, ratios)
        if not needed:
            return results, best, ablation, history
        history.append(needed)
        for spec in needed:
            value = ppl(spec.contender, spec.lr, spec.ratio, spec.seed)
            results[spec.key] = {"failed": True} if value is None else {"val_ppl": value}
    raise AssertionError("the plan did not converge")


def test_plan_extends_at_an_edge_sweeps_the_ratio_runs_the_ablation_and_the_seeds():
    import math

    suite = SUITES["cpu-long"]
    optimum = {"adamw": 5e-3, "low_rank": 1.5e-3}

    def ppl(name, lr, ratio, seed):
        if name == "adamw" and lr > 1.5e-2:
            return None  # diverged
        centre = optimum.get(name, 1.5e-3)
        return 100 + 10 * math.log(lr / centre) ** 2 + 5 * math.log(ratio or 1.0) ** 2 + 0.1 * seed

    results, best, ablation, history = simulate(suite, ["adamw", "low_rank"], ppl)
    tried = sorted(lr for (name, lr, ratio, seed) in results if name == "adamw" and seed == 0)
    # 0.5/1/2 × 1e-3, the best (2e-3) at the upper edge → 4e-3; still the edge, but one extension per side
    assert tried == pytest.approx([5e-4, 1e-3, 2e-3, 4e-3])
    assert best["adamw"] == (4e-3, None)
    lr_ratio = sorted((lr, ratio) for (name, lr, ratio, seed) in results if name == "low_rank" and seed == 0)
    # from the best lr (1.5e-3) the dense lr and the matrices' lr each move a step with the other
    # held; no neighbour wins, so the search stops there. Keys are rounded.
    assert lr_ratio == [(7.5e-4, 1.0), (7.5e-4, 2.0), (1.5e-3, 0.5), (1.5e-3, 1.0), (1.5e-3, 2.0), (3e-3, 0.5),
                        (3e-3, 1.0)]
    assert best["low_rank"] == (1.5e-3, 1.0)
    # the ablation at low_rank's best; seeds for every best and every ablation row
    assert set(ablation) == set(suite.ablation) and all(s == (1.5e-3, 1.0) for s in ablation.values())
    for name in ["adamw", "low_rank", *suite.ablation]:
        lr, ratio = (best | ablation)[name]
        assert {seed for (n, l, r, seed) in results if n == name and l == lr and r == ratio} == {0, 1, 2}
    # stages come in order: the sweep first, the repeats last
    assert [spec.stage for spec in history[0]] == [0] * 6 and max(spec.stage for spec in history[-1]) >= 4
    # a diverged point beyond the edge ends the extension, even with extensions to spare
    wide = dataclasses.replace(suite, max_extend=3, ablation=(), ablation_base=None, ratio_sweep=(), seeds=(0,))
    results, best, _, _ = simulate(wide, ["adamw"], lambda name, lr, ratio, seed: None if lr > 3e-3 else 100 - lr * 1000)
    assert sorted(lr for (_, lr, _, _) in results) == [5e-4, 1e-3, 2e-3, 4e-3]
    assert best["adamw"] == (2e-3, None) and results[("adamw", 4e-3, None, 0)] == {"failed": True}


def test_ratio_search_finds_a_split_that_one_shared_lr_misses():
    """Issue 21's fair baseline: when the dense parameters want 4× the lr the matrices tolerate, the
    lr sweep at ratio 1 settles between the two (2e-3); the search over the dense and the matrices'
    lr moves to the better neighbour (matrices at 1e-3), then once more (dense at 4e-3), stops
    where no neighbour is better, runs no point twice, and leaves contenders in ``no_ratio_sweep``
    at ratio 1."""
    import math

    suite = dataclasses.replace(SUITES["cpu-long"], ablation=(), ablation_base=None, seeds=(0,),
                                no_ratio_sweep=("low_rank",))
    assert suite.split_moves == 6
    dense_best, matrix_best = 4e-3, 1e-3

    def ppl(name, lr, ratio, seed):
        return 100 + 10 * math.log(lr / dense_best) ** 2 + 20 * math.log(lr * (ratio or 1.0) / matrix_best) ** 2

    results, best, _, history = simulate(suite, ["adamw-split", "low_rank"], ppl)
    assert best["adamw-split"] == (4e-3, 0.25)  # dense 4e-3, matrices 1e-3
    searched = [(spec.lr, spec.ratio) for specs in history for spec in specs if spec.stage == 2]
    assert len(searched) == len(set(searched))
    # two moves, then the optimum's own neighbours (two of them new) confirm it
    assert sorted(searched) == [(1e-3, 2.0), (2e-3, 0.25), (2e-3, 0.5), (2e-3, 2.0), (4e-3, 0.125), (4e-3, 0.25),
                                (4e-3, 0.5), (8e-3, 0.125)]
    # with one move allowed the search stops at the second centre's best neighbour, unconfirmed
    one = dataclasses.replace(suite, split_moves=1)
    _, best, _, history = simulate(one, ["adamw-split"], ppl)
    assert best["adamw-split"] == (4e-3, 0.25)
    assert len([spec for specs in history for spec in specs if spec.stage == 2]) == 6
    assert {ratio for (name, _, ratio, _) in results if name == "low_rank"} == {1.0}



def _record(name, kind, ppl, state, tps=1000.0):
    return {"contender": name, "kind": kind, "val_ppl": ppl, "model_state_bytes": state * 2**20, "tokens_per_s": tps}


def test_sweep_line_says_whether_the_split_searchs_best_is_confirmed_by_its_neighbours():
    def run(lr, ratio, val_ppl):
        return {"lr": lr, "matrix_lr_ratio": ratio, "val_ppl": val_ppl}

    settings = {"ratio_sweep": [0.5, 2.0]}
    # best 4e-3 x0.25 (dense 4e-3, matrices 1e-3); its neighbours in (dense, matrix) space
    tries = [run(2e-3, 1.0, 40.0), run(4e-3, 0.25, 30.0), run(8e-3, 0.125, 31.0), run(2e-3, 0.5, 33.0),
             run(4e-3, 0.5, 32.0)]
    line = report._split_check(tries, settings)
    assert line == "**the best is not confirmed**: 1 of its neighbours not run (0.004 ×0.125)"
    tries.append(run(4e-3, 0.125, 30.5))
    assert report._split_check(tries, settings) == "the best is confirmed by its four neighbours"
    # a diverged neighbour counts as run; a diverged point is never the best
    tries[2] = {"lr": 8e-3, "matrix_lr_ratio": 0.125, "failed": True}
    assert report._split_check(tries, settings) == "the best is confirmed by its four neighbours"


def test_targets_judge_our_best_memory_efficient_contender_against_the_peers():
    results = {
        "adamw": _record("adamw", "peer", 100.0, 400),
        "galore-torch": _record("galore-torch", "peer", 104.0, 300),
        "fira": _record("fira", "peer", 102.0, 300),
        # Lowest perplexity of ours, but not memory-efficient: must not be picked.
        "spam": _record("spam", "ours", 90.0, 400),
        "low_rank": _record("low_rank", "ours", 103.0, 250, tps=900.0),
        "sltrain": _record("sltrain", "ours", 120.0, 200),
    }
    sweeps = {name: [{"lr": 1e-3}, {"lr": 2e-3}] for name in ("adamw", "galore-torch", "fira")}
    lines = report.targets({"results": results, "settings": {"model": "llama_60m"}, "sweeps": sweeps})
    assert lines[0].startswith("Our best memory-efficient contender here is `low_rank` (val ppl 103.00")
    galore, fira, adamw, speed = lines[1:]
    assert "103.00 vs 104.00 (met)" in galore and "250.0 vs 300.0 MiB (met)" in galore
    assert "103.00 vs 102.00 (**not met**)" in fira
    assert "(`adamw`, 100.00): 1.030× (met)" in adamw
    assert "0.90× (**not met**" in speed
    # AdamW with the matrix/dense split is full-rank (never "memory-efficient", even when its state
    # bytes round below plain AdamW's) and, when better, is the reference of the 10 % target
    split = {**results, "adamw-split": _record("adamw-split", "ours", 95.0, 399)}
    lines = report.targets({"results": split, "settings": {"model": "llama_60m"}, "sweeps": sweeps})
    assert "`low_rank`" in lines[0]
    assert any("(`adamw-split`, 95.00): 1.084× (met)" in line for line in lines)
    assert report.targets({"results": {"adamw": results["adamw"]}, "settings": {"model": "x"}}) == []
    # peers run at one lr (cpu-small): no perplexity verdict against them, and a line saying why
    lines = report.targets({"results": results, "settings": {"model": "llama_60m"}, "sweeps": {"fira": sweeps["fira"]}})
    assert not any("vs 104.00" in line or "within 10 %" in line for line in lines)  # galore-torch's, adamw's
    assert any("vs `fira`: perplexity 103.00 vs 102.00" in line for line in lines)  # fira was swept
    assert lines[-1].startswith("- perplexity against `galore-torch`, `adamw`: not judged, each ran at one lr")

def test_eight_bit_cost_is_taken_at_the_same_lr():
    """An 8-bit contender is compared with its base's run at the same lr, not with the base's best."""
    def record(name, lr, val_ppl, state, sweep):
        return {"contender": name, "lr": lr, "val_ppl": val_ppl, "optimizer_state_bytes": state,
                "sweep": [{"lr": a, "val_ppl": b} for a, b in sweep]}

    results = {
        "lowrank_sparse": record("lowrank_sparse", 6e-3, 53.26, 4 * 2**20, [(1.5e-3, 64.92), (6e-3, 53.26)]),
        "lowrank_sparse_8bit": record("lowrank_sparse_8bit", 1.5e-3, 65.01, 2**20, [(1.5e-3, 65.01)]),
        "low_rank": record("low_rank", 1.5e-3, 65.30, 4 * 2**20, [(1.5e-3, 65.30)]),
        "low_rank-8bit": record("low_rank-8bit", 3e-3, 66.0, 2**20, [(3e-3, 66.0)]),
    }
    head, low_rank, sparse = report.low_bit_pairs({"results": results})
    assert head == "The cost of 8-bit moments (same preset):"
    assert "val ppl 65.01 vs 64.92 (+0.1 %)" in sparse and "at its best lr, 0.006: 53.26" in sparse
    assert "(0.25×)" in sparse
    assert "66.00 vs 65.30" in low_rank and "was not run at this lr: its best, at 0.0015, is compared" in low_rank


def run_suite(corpus, tmp_path, *extra):
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--suite", "smoke", "--data", corpus["data"],
         "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work"), "--threads", "1", *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_suite_speed_measures_each_contender_in_rounds_and_the_report_uses_it(corpus, tmp_path):
    """bench_suite_speed runs every contender once per round through the suite's own path; the
    report then shows those quiet figures instead of the ones the busy suite runs recorded."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_suite_speed.py"), "--suite", "smoke",
                          "--data", corpus["data"], "--contenders", "adamw,low_rank", "--steps", "6", "--rounds", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    speed = json.loads((tmp_path / "smoke-speed.json").read_text())
    adamw, low_rank = speed["contenders"]["adamw"], speed["contenders"]["low_rank"]
    assert len(adamw["per_round"]) == len(low_rank["per_round"]) == 2 and min(adamw["per_round"]) > 0
    assert adamw["vs_adamw_per_round"] == [1.0, 1.0]
    assert low_rank["vs_adamw_per_round"] == pytest.approx([a / b for a, b in zip(low_rank["per_round"], adamw["per_round"])])

    combined = {"results": {"adamw": _record("adamw", "peer", 40.0, 80, tps=999.0),
                            "low_rank": _record("low_rank", "ours", 33.0, 60, tps=1.0),
                            "relora": _record("relora", "ours", 50.0, 60, tps=7.0)}}
    quiet = report.with_quiet_speed(combined, speed)
    assert quiet["results"]["adamw"]["tokens_per_s"] == adamw["tokens_per_s"]
    assert quiet["results"]["low_rank"]["tokens_per_s"] == low_rank["tokens_per_s"]
    assert quiet["results"]["relora"]["tokens_per_s"] == 7.0  # not measured: its own runs' figure, named as such
    assert "except `relora` (from its own runs)" in report._speed_text(quiet)
    assert report.with_quiet_speed(combined, None) is combined
    assert "from the runs themselves" in report._speed_text(combined)


def test_preset_lines_name_a_preset_whose_setting_is_not_the_best_found():
    """Built on the presets as they are (issue 21 moves their lr and ratio with the evidence)."""
    from lowrank.methods import load_method

    def run(lr, ratio, ppl):
        return {"lr": lr, "matrix_lr_ratio": ratio, "val_ppl": ppl}

    def preset(name):
        optimizer = load_method(name).optimizer
        return optimizer.lr, optimizer.matrix_lr_ratio

    low_rank, sparse = preset("low_rank"), preset("lowrank_sparse")
    other = (sparse[0] / 2, 1.0)  # a setting that is not lowrank_sparse's preset
    combined = {
        "results": {"adamw": _record("adamw", "peer", 39.3, 80) | run(1e-3, None, 39.3),
                    "low_rank": _record("low_rank", "ours", 31.73, 60) | run(*low_rank, 31.73),
                    "lowrank_sparse": _record("lowrank_sparse", "ours", 31.77, 50) | run(*other, 31.77),
                    "relora": _record("relora", "ours", 49.9, 60) | run(1e-3, 1.0, 49.9)},
        "sweeps": {"adamw": [run(1e-3, None, 39.3), run(2e-3, None, 50.0)],
                   "low_rank": [run(*low_rank, 31.73), run(low_rank[0] * 2, 1.0, 33.9), run(low_rank[0], 1.0, 33.5)],
                   "lowrank_sparse": [run(*sparse, 35.42), run(*other, 31.77)],
                   "relora": [run(1e-3, 1.0, 49.9)]},  # not swept: nothing to say
    }
    lines = report.preset_lines(combined)
    assert lines[1:] == [f"- `low_rank`: the preset ({report._point(run(*low_rank, 31.73))}) is the best setting here.",
                         f"- `lowrank_sparse`: **the preset ({report._point(run(*sparse, 35.42))}) is not the best "
                         f"setting here**: {report._point(run(*other, 31.77))}."]
    assert "×" in lines[1]  # the presets carry a matrix/dense split now
    # a suite that never ran the preset's setting says so rather than judging it
    combined["sweeps"]["lowrank_sparse"] = [run(*other, 31.77), run(other[0] * 2, 1.0, 33.0)]
    assert report.preset_lines(combined)[2] == (f"- `lowrank_sparse`: the preset ({sparse[0]:g} ×{sparse[1]:g}) "
                                                f"was not run here; this suite's best: {report._point(run(*other, 31.77))}.")


def test_sweep_lines_list_the_shared_lr_first_then_the_split_points_by_the_matrices_lr():
    def point(lr, ratio, ppl):
        return {"lr": lr, "matrix_lr_ratio": ratio, "val_ppl": ppl}

    sweeps = {"adamw-split": [point(1e-3, 0.5, 35.36), point(5e-4, 1.0, 43.33), point(1e-3, 1.0, 39.47),
                              point(1e-3, 2.0, 52.8), point(2e-3, 0.25, None)],
              "adamw": [point(2e-3, None, 49.99), point(1e-3, None, 39.32)]}
    lines = report.sweep_lines({"sweeps": sweeps})
    # split points by the matrices' lr (5e-4, 5e-4, 2e-3), then the dense lr
    assert lines[1] == ("- `adamw-split`: 0.0005 → 43.33, 0.001 → 39.47; split: 0.001 ×0.5 → 35.36, "
                        "0.002 ×0.25 → diverged, 0.001 ×2 → 52.80; **the best is not confirmed**: 1 of its "
                        "neighbours not run (0.001 ×0.25).")
    assert lines[2] == "- `adamw`: 0.001 → 39.32, 0.002 → 49.99."


def test_smoke_suite_runs_every_kind_of_contender_and_reports(corpus, tmp_path):
    names = "adamw,galore-torch,adamw8bit,low_rank_restarts,lowrank_sparse"
    result = run_suite(corpus, tmp_path, "--contenders", names, "--jobs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    combined = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert combined["complete"] and set(combined["results"]) == set(names.split(","))
    for name, record in combined["results"].items():
        assert all(record[key] > 0 for key in REQUIRED), name
        assert record["tokens"] == 8 * 4 * 32 and len(record["val_curve"]) == 2
        assert record["valid_selection"]["chunks"] == 1024 // 32 and len(record["valid_selection"]["sha1"]) == 40
    # every contender is evaluated on the same validation tokens
    assert len({r["valid_selection"]["sha1"] for r in combined["results"].values()}) == 1
    # Peers through their packages; ours by preset; the sweep kept three learning rates (or one more at an edge).
    assert combined["results"]["galore-torch"]["package"] == "galore-torch"
    assert combined["results"]["lowrank_sparse"]["kind"] == "ours"
    lrs = sorted(run["lr"] for run in combined["sweeps"]["lowrank_sparse"])
    assert lrs[:3] == pytest.approx([0.00075, 0.0015, 0.003]) or lrs[1:] == pytest.approx([0.00075, 0.0015, 0.003])
    assert [e["step"] for e in combined["results"]["low_rank_restarts"]["events"]] == [4]
    # 8-bit moments and sparse momentum hold less state than AdamW's two fp32 moments.
    adamw = combined["results"]["adamw"]["optimizer_state_bytes"]
    assert combined["results"]["adamw8bit"]["optimizer_state_bytes"] < adamw / 2

    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench:smoke -->\nold\n<!-- /bench:smoke -->\nafter\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--suite", "smoke",
                          "--results", str(tmp_path / "results"), "--readme", str(readme), "--docs", str(tmp_path / "docs")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = readme.read_text()
    assert text.startswith("before\n<!-- bench:smoke -->\n") and text.endswith("<!-- /bench:smoke -->\nafter\n")
    assert "| `adamw` | peer | 0.001 |" in text and "(1.00×)" in text and "old" not in text
    assert "Sweeps (first seed" in text and "\n- `lowrank_sparse`: 0.00075 → " in text and "Our best memory-efficient contender" in text
    for png in ("smoke_val_ppl.png", "smoke_memory_vs_ppl.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:4] == b"\x89PNG"


def test_suite_reuses_finished_runs_and_reruns_changed_settings(corpus, tmp_path):
    """Resumable: a second invocation starts nothing; a changed training setting runs again."""
    args = ("--contenders", "low_rank", "--suite-set", "seeds=0,1")
    first = run_suite(corpus, tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count(" start ") == 2  # the published lr, then its second seed
    combined = json.loads((tmp_path / "results" / "smoke.json").read_text())
    seeds = combined["results"]["low_rank"]["over_seeds"]
    assert seeds["seeds"] == [0, 1] and seeds["min"] <= seeds["mean"] <= seeds["max"] and seeds["complete"]
    files = {p.name: p.read_bytes() for p in (tmp_path / "results" / "smoke").glob("*.json")}
    again = run_suite(corpus, tmp_path, *args)
    assert again.returncode == 0 and " start " not in again.stdout, again.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "results" / "smoke").glob("*.json")} == files
    changed = run_suite(corpus, tmp_path, *args, "--suite-set", "eval_every=2")
    assert changed.returncode == 0 and changed.stdout.count(" start ") == 2, changed.stdout
    record = json.loads((tmp_path / "results" / "smoke" / "low_rank-lr0.0015.json").read_text())
    assert [p["step"] for p in record["val_curve"]] == [2, 4, 6, 8]


def test_a_contender_whose_search_is_running_is_reported_at_its_best_so_far(tmp_path):
    """While a sweep or split search is unfinished, the combined results carry its best run so far;
    the table lists it marked, and a claim about it stays undecided."""
    suite = dataclasses.replace(SUITES["smoke"], sweep=(0.5, 1.0, 2.0), sweep_all=True, seeds=(0,), ablation=(),
                                ablation_base=None)
    runner = compare.Runner("smoke", suite, "corpus", ["adamw", "low_rank"], tmp_path, tmp_path / "work", dry_run=True)
    needed, *_ = runner.state()
    (tmp_path / "smoke").mkdir()
    values = {"adamw": [50.0, 45.0, 48.0], "low_rank": [40.0, 35.0]}  # low_rank's third lr has not run
    for name, ppls in values.items():
        for spec, value in zip([s for s in needed if s.contender == name], ppls):
            record = _record(name, "ours" if name == "low_rank" else "peer", value, 50) | {
                "lr": spec.lr, "matrix_lr_ratio": spec.ratio, "seed": spec.seed, "settings_hash": runner._hash(spec),
                "optimizer_state_bytes": 1, "peak_memory_bytes": 1, "val_curve": []}
            (tmp_path / "smoke" / f"{spec.label}.json").write_text(json.dumps(record))
    combined = runner.write_combined()
    assert "low_rank" not in combined["results"] and combined["incomplete"]["low_rank"]["best_so_far"]["val_ppl"] == 35.0
    assert combined["results"]["adamw"]["val_ppl"] == 45.0  # its sweep is complete: the best of three
    table = report.table(combined)
    assert "| `low_rank` (search running) | ours |" in table and table.index("low_rank") < table.index("`adamw`")
    combined["results"]["low_rank_restarts"] = combined["results"]["adamw"] | {"contender": "low_rank_restarts"}
    claim = next(line for line in report.evidence(combined) if "beats plain low-rank" in line)
    assert "**not decided (one seed" in claim and "`low_rank` (search running) 35.00" in claim


def _seeded(name, kind, values, state=100, **extra):
    record = _record(name, kind, values[0], state)
    record["over_seeds"] = {"val_ppl": list(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return record | {"optimizer_state_bytes": 1, "peak_memory_bytes": 1, "lr": 1e-3, "matrix_lr_ratio": None, **extra}


def test_claims_are_decided_only_when_seed_ranges_separate():
    results = {
        "adamw": _seeded("adamw", "peer", [100, 101, 102], 400),
        "low_rank": _seeded("low_rank", "ours", [110, 112, 111], 200, matrix_lr_ratio=1.0),
        "low_rank_restarts": _seeded("low_rank_restarts", "ours", [105, 106, 107], 200, matrix_lr_ratio=1.0),
        "galore-torch": _seeded("galore-torch", "peer", [106.5, 104, 109], 300),
        "fira": _record("fira", "peer", 120.0, 300),
    }
    assert report.compare_claim(results["low_rank_restarts"], results["low_rank"]) == "holds"
    assert report.compare_claim(results["low_rank"], results["low_rank_restarts"]) == "does not hold"
    assert report.compare_claim(results["low_rank_restarts"], results["galore-torch"]).startswith("not decided (seed ranges")
    assert report.compare_claim(results["low_rank_restarts"], results["fira"]).startswith("not decided (one seed")
    lines = report.evidence({"results": results})
    assert "plain low-rank (arXiv 2505.22922): **holds** — `low_rank_restarts` 106.00 (105.00–107.00)" in lines[1]
    assert "Full-rank training remains best: **holds**" in lines[3]
    # the full-rank family's better member (the fair split baseline) is what the claim compares
    split = _seeded("adamw-split", "ours", [95, 96, 97], 400)
    lines = report.evidence({"results": {**results, "adamw-split": split}})
    assert "remains best: **holds** — `adamw-split` 96.00 (95.00–97.00) (the better of `adamw`, `adamw-split`) " \
           "vs the best other, `low_rank_restarts`" in lines[3]
    # SPAM trains every weight in full: it is full-rank training, never "the best other"
    spam = _seeded("spam", "ours", [103, 103.5, 104], 400)
    lines = report.evidence({"results": {**results, "spam": spam}})
    assert "`adamw` 101.00 (100.00–102.00) (the better of `adamw`, `spam`) vs the best other, " \
           "`low_rank_restarts`" in lines[3]
    combined = {"results": results, "settings": {"rank": 64}, "ablation": {"base": "low_rank", "rows": {
        "low_rank_reset": {**_seeded("low_rank_reset", "ours", [121, 121]), "complete": True}}}}
    rows = report.ablation_table(combined)
    assert rows[-1] == "| `low_rank_reset` | 64 |  | ✓ | 200 | 121.00 | +9.0 % |"
    # the rank variant: its own rank (from its contender's overrides), nothing else changed
    combined["ablation"]["rows"]["low_rank@r128"] = {**_seeded("low_rank@r128", "ours", [99, 101]), "complete": True}
    assert report.ablation_table(combined)[-1] == "| `low_rank@r128` | 128 |  |  | — | 100.00 (99.00–101.00) | -9.9 % |"
    del combined["ablation"]["rows"]["low_rank@r128"]
    # the reset remedies: a row each, and a verdict against the full reset at the same setting
    combined["ablation"]["rows"].update({
        name: {**_seeded(name, "ours", values), "complete": True} for name, values in (
            ("low_rank_restarts", [105, 106]), ("low_rank_restarts-rotate", [101, 102]), ("low_rank_restarts-first", [104, 107]))})
    rows = report.ablation_table(combined)
    assert "| `low_rank_restarts-rotate` | 64 | ✓ | m only (v rotated) | 200 | 101.50 (101.00–102.00) | -8.6 % |" in rows
    lines = report.evidence(combined)
    assert "- Reset remedy `low_rank_restarts-rotate` (m only (v rotated)) beats the full reset: **holds**" in lines[-1]
    assert "`low_rank_restarts-first` (m only (v kept)) beats the full reset: **not decided (seed ranges overlap)**" in lines[-2]


def test_gpu_quick_script_dry_run(corpus):
    """benchmarks/gpu_quick.sh --dry-run trains (2 CPU steps), evaluates and reports the GPU suite's
    contenders: the device command is ready before a device is lent."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DATA": corpus["data"], "CONTENDERS": "adamw,low_rank_restarts"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_quick.sh"), "--dry-run"], capture_output=True, text=True,
                            timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run complete" in result.stdout
    assert SUITES["gpu-60m-quick"].model == "llama_60m" and SUITES["gpu-60m-quick"].precision == "bf16-mixed"


def test_bench_fit_trains_a_row_with_lowrank_pretrain(tmp_path):
    """``bench_fit.py --pretrain``: a real ``lowrank pretrain`` run per row (here the tiny model),
    recorded with its per-step losses, the allocator's peak of its second step and the estimate
    for the same options, and rendered in the README block."""
    import bench_fit

    settings = {"model": "tiny", "method": "lowrank_sparse_8bit", "option": "bf16+ckpt+layerwise", "rank": 8,
                **bench_fit.OPTIONS["bf16+ckpt+layerwise"]._asdict(), "seq_len": 32, "batch_size": 1, "steps": 3,
                "device": "cpu", "lr": 5e-4, "threads": 1}
    row = bench_fit.pretrain_row(settings, tmp_path / "run")
    assert len(row["losses"]) == 3 and all(map(lambda x: x == x, row["losses"]))
    assert row["allocator_peak"] > row["estimate"]["weights"] + row["estimate"]["optimizer_state"] > 0
    assert row["estimate"]["layerwise"] and row["estimate"]["checkpointing"] and row["estimate"]["weight_dtype"] == "bfloat16"
    assert row["full_rank_estimate"] > row["estimate"]["total"]
    block = bench_fit.render({"rows": {}, "trained": {"cpu/tiny": row}, "machine": {"cpu": "test"}})
    assert "| tiny | `lowrank_sparse_8bit` (rank 8) | bf16+ckpt+layerwise | 32 |" in block


def test_bench_fit_records_a_row_too_large_for_the_machine_without_running_it(tmp_path, monkeypatch):
    """A row whose estimate exceeds the machine's memory is recorded as not measured, with the
    reason, instead of swapping or being killed; rendered as such; tried again on a larger machine."""
    import argparse

    import bench_fit

    monkeypatch.setattr(bench_fit, "memory_bytes", lambda: 2**30)  # a 1 GiB machine
    run = subprocess.run

    def no_rows(command, *a, **k):
        if "--row" in command:
            pytest.fail("the row must not be run")
        return run(command, *a, **k)

    monkeypatch.setattr(bench_fit.subprocess, "run", no_rows)
    args = argparse.Namespace(models=["llama_350m"], methods=["full_rank"], options=["fp32"], seq_len=256, batch_size=1,
                              steps=2, device="cpu")
    path = tmp_path / "fit.json"
    bench_fit.run_rows(args, path)
    row = json.loads(path.read_text())["rows"]["cpu/llama_350m/full_rank/fp32"]
    assert row["measured"] is None and "exceeds 85% of this machine's 1.0 GiB" in row["not_measured"]
    assert row["estimate_cpu"]["total"] > 2**30
    assert "not measured: the estimate" in bench_fit.render(json.loads(path.read_text()) | {"machine": {"cpu": "test"}})


def test_report_compares_bf16_storage_with_fp32_at_the_same_lr():
    def run(name, ppl_value, lr, overrides):
        return {**_record(name, "ours", ppl_value, 100), "lr": lr, "overrides": overrides,
                "sweep": [{"lr": lr, "val_ppl": ppl_value}]}

    bf16 = {"training.param_dtype": "bf16"}
    results = {"x-fp32": run("x-fp32", 100.0, 3e-3, {}),
               "x-bf16": run("x-bf16", 101.0, 3e-3, {**bf16, "training.bf16_rounding": "stochastic"}),
               "x-bf16-nearest": run("x-bf16-nearest", 110.0, 3e-3, {**bf16, "training.bf16_rounding": "nearest"}),
               "adamw-bf16": run("adamw-bf16", 90.0, 1e-3, {}),  # autocast, not storage: not compared
               "adamw": run("adamw", 89.0, 1e-3, {})}
    lines = report.bf16_pairs({"results": results})
    assert lines[1:] == [
        "- `x-bf16-nearest` (nearest rounding) vs `x-fp32` (fp32) at lr 0.003: val ppl 110.00 vs 100.00 (+10.0 %).",
        "- `x-bf16` (stochastic rounding) vs `x-fp32` (fp32) at lr 0.003: val ppl 101.00 vs 100.00 (+1.0 %)."]


def test_projected_peers_get_the_matrix_lr_split_and_keep_their_published_runs():
    """GaLore / Fira take parameter groups, so their projected matrices can run at lr × ratio like our
    presets' (issue 21's fair comparison). At ratio 1 a run's settings (and hash) are those of the
    runs made before peers had a ratio; other ratios go to the peer's groups, not into our preset."""
    from peers import build_peer
    from plan import RunSpec
    from tiny_models import build

    assert compare.has_ratio(CONTENDERS["galore-torch"]) and compare.has_ratio(CONTENDERS["fira"])
    assert not compare.has_ratio(CONTENDERS["adamw"]) and not compare.has_ratio(CONTENDERS["adamw8bit"])
    # our dense presets: the fair full-rank baseline and Muon split; SPAM / Stable-SPAM keep one lr
    # (their papers' comparison), though their presets group the hidden matrices too
    assert compare.has_ratio(CONTENDERS["adamw-split"]) and compare.has_ratio(CONTENDERS["muon"])
    assert not any(compare.has_ratio(CONTENDERS[n]) for n in ("spam", "stable_spam", "spam-int4", "stable_spam-int4"))
    suite = SUITES["cpu-long"]
    published = compare.run_settings("cpu-long", suite, RunSpec(0, "galore-torch", 5e-3, 1.0, 0), "data")
    assert published["matrix_lr_ratio"] is None and "optimizer.matrix_lr_ratio" not in published["overrides"]
    assert compare.settings_hash(published) == compare.settings_hash(
        compare.run_settings("cpu-long", suite, RunSpec(0, "galore-torch", 5e-3, None, 0), "data"))
    split = compare.run_settings("cpu-long", suite, RunSpec(2, "galore-torch", 5e-3, 2.0, 0), "data")
    assert split["matrix_lr_ratio"] == 2.0 and "optimizer.matrix_lr_ratio" not in split["overrides"]
    model = build("llama")
    for peer in ("galore-torch", "fira"):
        optimizer = build_peer(peer, model, lr=1e-3, rank=4, matrix_lr_ratio=2.0)
        assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 2e-3]
        assert all("rank" in group for group in optimizer.param_groups[1:])
    with pytest.raises(ValueError, match="'adamw' has one parameter group"):
        build_peer("adamw", model, lr=1e-3, matrix_lr_ratio=2.0)
