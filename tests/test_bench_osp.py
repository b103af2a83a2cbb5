"""benchmarks/bench_osp.py end to end on a tiny stand-in of the cpu-osp suite: two 20-step
`lowrank pretrain` runs (AdamW's full_rank preset and OSP) laid out as compare.py lays out a
suite's results and run folders, then quant-eval, PTQ, osp.json, the plot and the README block."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_osp  # noqa: E402
import osp_report  # noqa: E402

from lowrank.cli import main as lowrank_main  # noqa: E402

SUITE, SEQ_LEN, BATCH, EVAL_TOKENS, STEPS = "cpu-osp", 32, 4, 512, 20
SCHEMES = ("fp", "w4", "w3", "w2", "w4a4", "w8a8")


def train(corpus, work: Path, label: str, method: str) -> Path:
    run = work / SUITE / label
    rc = lowrank_main([
        "pretrain", "--method", method, "--model", "tiny", "--data", corpus["data"], "--tokenizer", corpus["tokenizer"],
        "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--max-steps", str(STEPS), "--save-every", str(STEPS),
        "--eval-every", "0", "--eval-tokens", str(EVAL_TOKENS), "--lr", "3e-3", "--out", str(run),
        "--cache-dir", str(work / SUITE / "cache"), "--json-out", str(run / "summary.json"), "--no-progress", "--no-plot",
    ])
    assert rc == 0
    return run


def fake_result(results: Path, run: Path, contender: str, preset: str) -> None:
    """The fields of a compare.py result file that bench_osp reads."""
    summary = json.loads((run / "summary.json").read_text())
    description = json.loads((run / "config.json").read_text())["data"]
    digest = f"hash-{contender}"
    (run / "settings_hash").write_text(digest + "\n")
    record = {
        "contender": contender, "preset": preset, "lr": 3e-3, "seed": 0, "settings_hash": digest,
        "settings": {"suite": SUITE, "training": {"model": "tiny", "steps": STEPS, "seq_len": SEQ_LEN, "batch_size": BATCH,
                                                  "eval_tokens": EVAL_TOKENS, "precision": "fp32"}},
        **{key: summary[key] for key in ("val_ppl", "val_loss", "tokens_per_s", "optimizer_state_bytes", "model_state_bytes",
                                         "steps")},
        "valid_selection": description["valid_selection"],
    }
    (results / SUITE).mkdir(parents=True, exist_ok=True)
    (results / SUITE / f"{run.name}.json").write_text(json.dumps(record, indent=1))


@pytest.fixture(scope="module")
def bench(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-osp")
    work, results = tmp / "work", tmp / "results"
    for contender, preset in (("adamw", "full_rank"), ("osp", "osp")):
        fake_result(results, train(corpus, work, f"{contender}-lr0.003", preset), contender, preset)
    (results / SUITE / "muon-lr0.001.json").write_text(json.dumps({"contender": "muon", "failed": True, "reason": "diverged",
                                                                 "val_ppl": None}))
    data = bench_osp.main([
        "--data", corpus["data"], "--suite", SUITE, "--results", str(results), "--work", str(work),
        "--plot", str(tmp / "osp_ppl_vs_bits.png"), "--group-size", "16", "--rank", "4", "--steps", "3",
        "--calib-tokens", "256", "--bits", "2,3", "--epochs", "1", "--ptq-group-size", "16",
    ])
    return {"data": data, "results": results, "plot": tmp / "osp_ppl_vs_bits.png"}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_osp_json_has_every_field_and_sane_numbers(bench):
    written = json.loads((bench["results"] / "osp.json").read_text())
    assert written["benchmark"] == "osp" and written["suite"] == SUITE
    machine = written["machine"]
    assert {"cpu", "cpu_count", "torch_threads", "torch"} <= set(machine)
    assert len(machine["load_average"]["start"]) == 3 and len(machine["load_average"]["end"]) == 3
    settings = written["settings"]
    assert settings["eval"]["tokens"] == EVAL_TOKENS and settings["eval"]["subset"] is None
    assert settings["ptq"]["bits"] == [2, 3] and settings["ptq"]["methods"] == list(osp_report.PTQ_METHODS)
    assert set(settings["ptq"]["group_size"]) == {"ours", "apiq"}
    assert all(g == 16 for per_bits in settings["ptq"]["group_size"].values() for g in per_bits.values())
    assert settings["ptq"]["rank"] == 4 and settings["ptq"]["steps"] == 3 and settings["ptq"]["epochs"] == 1
    assert settings["ptq"]["recipes"]["apiq"]["loss"] == "mse" and "published" in settings["ptq"]["recipe_note"]
    assert set(settings["quant_eval"]["schemes"]) == set(SCHEMES)
    assert [s["label"] for s in written["skipped"]] == ["muon-lr0.001"]
    assert [r["contender"] for r in written["runs"]] == ["adamw", "osp"]  # the suite's contender order

    for run in written["runs"]:
        training = run["training"]
        assert all(finite(training[k]) for k in ("val_ppl", "tokens_per_s", "optimizer_state_bytes"))
        assert run["checkpoint_step"] == STEPS and Path(run["checkpoint"]).is_dir()
        # the very chunks training evaluated: the deployed (folded) model's fp ppl is the run's own
        assert run["eval"]["same_chunks_as_training"] is True
        assert run["eval"]["fp_ppl_over_training_ppl"] == pytest.approx(1.0, rel=1e-3)
        q = run["quant_eval"]
        assert finite(q["kurtosis"]) and q["kurtosis"] >= 0 and finite(q["max_abs"]) and q["max_abs"] > 0
        assert finite(q["kurtosis_osp"]) and q["kurtosis_osp"] >= 0 and q["kurtosis_osp"] != q["kurtosis"]
        assert len(q["layers"]) == 2 and q["tokens"] == EVAL_TOKENS
        assert set(q["schemes"]) == set(SCHEMES) and set(q["gaps"]) == set(SCHEMES) - {"fp"}
        assert all(finite(row["ppl"]) and finite(row["loss"]) for row in q["schemes"].values())
        ppl = {label: row["ppl"] for label, row in q["schemes"].items()}
        assert ppl["w2"] >= ppl["w4"] >= 0.99 * ppl["fp"], ppl
        assert q["gaps"]["w4"] == pytest.approx(ppl["w4"] / ppl["fp"])

        ptq = run["ptq"]
        assert ptq is not None and ptq["fp_ppl"] == pytest.approx(ppl["fp"])
        assert ptq["calibration"]["tokens"] >= 256
        assert sorted((r["bits"], r["variant"]) for r in ptq["results"]) == sorted(
            (b, v) for b in (2, 3) for v in osp_report.PTQ_METHODS)
        for row in ptq["results"]:
            assert finite(row["val_ppl"]) and finite(row["gap"]) and finite(row["bits_per_weight"]["base"])
            assert row["format"].startswith(f"int{row['bits']}-g16")
            assert (row["block_error"] is None) == (row["method"] == "rtn")
            settings_used = row["retraining"]["settings"]
            if row["variant"].endswith("(published)"):
                assert row["recipe"] == "apiq" and settings_used["loss"] == "mse" and row["retraining"]["steps_per_block"] == 8
            if row["variant"].startswith("apiq+saliency"):
                assert row["retraining"]["saliency"] == ("fisher" if row["recipe"] == "apiq" else "activation")
    # every run calibrates on the same tokens (same tokenizer, same seed)
    assert len({run["ptq"]["calibration"]["sha1"] for run in written["runs"]}) == 1


def test_plot_exists(bench):
    assert bench["plot"].is_file() and bench["plot"].stat().st_size > 10_000


def test_render_block_has_both_tables_and_a_verdict_per_direction(bench):
    block = osp_report.render_block(bench["data"])
    assert "| contender | val ppl (training) |" in block and "W4A4 gap" in block and "excess kurtosis (OSP protocol)" in block
    assert "| bits | method | `adamw` ppl (× fp) | `osp` ppl (× fp) |" in block
    assert "| 2 | apiq+saliency (published) |" in block and "| 2 | apiq (ours) |" in block and "| 3 | rtn |" in block
    lines = block.splitlines()
    for claim in ("OSP has lower excess kurtosis than AdamW (OSP's protocol", "OSP loses less perplexity", "ApiQ with our recipe",
                  "ApiQ with its released recipe", "Our saliency form", "published saliency-aware regularizer"):
        line = next(line for line in lines if line.startswith("- ") and claim in line)
        assert any(word in line for word in ("reproduces", "does not reproduce", "not decided", "mixed")), line
    osp_run = next(r for r in bench["data"]["runs"] if r["contender"] == "osp")
    assert osp_report._num(osp_run["quant_eval"]["kurtosis"]) in block  # numbers come from the JSON
    assert osp_report._num(osp_run["quant_eval"]["kurtosis_osp"]) in block
    assert "osp_ppl_vs_bits.png" in block
    assert "adamw" in osp_report.text_table(bench["data"])


def test_group_sizes_on_the_suite_model_shape():
    # LLaMA-20M: inputs 256 (attention, gate/up) and 688 (down): g128 only as flat groups (PTQ the same)
    schemes, flat = bench_osp.quant_eval_schemes(128, [256, 688])
    assert flat and schemes["fp"] is None and schemes["w4a4"].weights.flat and schemes["w4a4"].activations.group_size == -1
    schemes, flat = bench_osp.quant_eval_schemes(128, [256, 512])
    assert not flat and not schemes["w2"].weights.flat


def test_eval_token_subset_keeps_spread_rows_of_the_training_chunks():
    valid = torch.arange(40 * 8).reshape(40, 8)
    same, note = bench_osp._subset(valid, None)
    assert same is valid and note is None
    part, note = bench_osp._subset(valid, 10 * 8)
    assert part.shape == (10, 8) and part[0, 0] == 0 and part[-1, 0] == 39 * 8 and "10 of the 40" in note
