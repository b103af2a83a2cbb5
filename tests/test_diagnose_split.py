"""benchmarks/diagnose_split.py on the tiny model: one record per step, and the step sizes are
what Adam's first step makes them (``sign(g)·lr`` per entry), so the measurement itself is right."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import diagnose_split as diag  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def result(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    argv = ["--data", corpus["data"], "--tokenizer", corpus["tokenizer"], "--methods", "full_rank,low_rank,galore",
            "--model", "tiny", "--rank", "4", "--steps", str(STEPS), "--segment", "3", "--batch-size", "2",
            "--seq-len", "32", "--eval-tokens", "1024", "--work", str(folder / "work"), "--out", str(folder),
            "--threads", "0"]
    return diag.main(argv)


def test_one_record_per_step_and_a_sentence_per_method_against_full_rank(result):
    for method in result["methods"].values():
        assert all(len(values) == STEPS for values in method["series"].values())
        assert list(method["segments"]) == ["1-3", "4-6"]
    assert [line.split("`")[1] for line in result["sentences"]] == ["low_rank", "galore"]


def test_adams_first_step_moves_every_dense_matrix_entry_by_lr(result):
    """At step 1, m̂/√v̂ = sign(g): every entry with a gradient moves by exactly lr (no weight decay
    in full_rank), so the per-entry RMS per unit lr is 1."""
    series = result["methods"]["full_rank"]["series"]
    assert series["matrix_entries_per_lr"][0] == pytest.approx(1.0, rel=1e-3)
    # GaLore's projected step is scaled by 0.25 and confined to rank 4: smaller per entry
    assert result["methods"]["galore"]["series"]["matrix_entries_per_lr"][0] < 0.25
