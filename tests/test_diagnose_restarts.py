"""benchmarks/diagnose_restarts.py on the tiny model: every series has one value per step, events
fall on the cycle, the effective update is measured on the product (a refactorization alone
changes it by ~0), Adam's normalised direction is ±1 per entry right after a reset, sparse
momentum updates about its density of the factor entries, and the figure is written."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import diagnose_restarts as diag  # noqa: E402

from lowrank import LowRankLinear  # noqa: E402

STEPS, CYCLE = 12, 4


def test_product_change_matches_the_dense_product_and_ignores_a_refactorization():
    torch.manual_seed(0)
    layer = LowRankLinear(48, 40, 6, alpha=12, bias=False)
    B0, A0 = layer.B.detach().clone(), layer.A.detach().clone()
    # an optimizer-like step: the Gram route equals the dense norms
    B1, A1 = B0 + 1e-3 * torch.randn_like(B0), A0 + 1e-3 * torch.randn_like(A0)
    change, base = diag.product_change(B0, A0, B1, A1, scale=layer.scale)
    dense_change = float((layer.scale * (B1.double() @ A1.double() - B0.double() @ A0.double())).norm())
    dense_base = float((layer.scale * (B0.double() @ A0.double())).norm())
    assert change == pytest.approx(dense_change, rel=1e-9) and base == pytest.approx(dense_base, rel=1e-9)
    assert diag.effective_update(B0, A0, B1, A1) == pytest.approx(dense_change / dense_base, rel=1e-9)
    assert diag.product_change(B0, A0, B1, A1, scale=layer.scale, dtype=torch.float32)[0] == pytest.approx(dense_change, rel=1e-4)
    # a refactorization alone: the factors change a lot, the product does not
    layer.refactorize()
    assert float((layer.B.detach() - B0).norm() / B0.norm()) > 0.1
    assert diag.effective_update(B0, A0, layer.B, layer.A) < 1e-5


@pytest.fixture(scope="module")
def result(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diagnose")
    argv = ["--data", corpus["data"], "--tokenizer", corpus["tokenizer"], "--methods",
            "low_rank,low_rank_restarts,lowrank_sparse,low_rank_restarts-rotate",
            "--model", "tiny", "--rank", "4", "--steps", str(STEPS), "--cycle", str(CYCLE), "--batch-size", "2",
            "--seq-len", "32", "--eval-tokens", "1024", "--work", str(folder / "work"), "--out", str(folder / "diag.json"),
            "--figure", str(folder / "diag.png"), "--threads", "0"]
    data = diag.main(argv)
    return data, folder


def test_every_series_has_one_value_per_step_and_events_fall_on_the_cycle(result):
    data, folder = result
    assert json.loads((folder / "diag.json").read_text())["methods"].keys() == data["methods"].keys()
    for name, method in data["methods"].items():
        series = method["series"]
        assert set(series) == set(diag.SERIES)
        for key, values in series.items():
            assert len(values) == STEPS, (name, key)
            if key != "predicted_decrease" and key != "predicted_decrease_per_lr":
                assert all(v is not None for v in values), (name, key)
        assert series["step"] == list(range(1, STEPS + 1))
        assert all(v > 0 for v in series["effective_update"])
        assert list(method["summary"]["segments"]) == ["1-4", "5-8", "9-12"]
        assert method["final"]["val_ppl"] > 1
    assert data["methods"]["low_rank"]["summary"]["event_steps"] == []
    for name in ("low_rank_restarts", "lowrank_sparse"):
        events = data["methods"][name]["events"]
        assert [e["step"] for e in events] == [4, 8]
        for event in events:
            assert event["event"] == "refactorize"
            assert event["event_product_change"] < 1e-5  # measured on the product: the refactorization keeps it
            assert event["balance_after"] == pytest.approx(1.0, abs=1e-4)  # balanced: ‖B‖ = ‖A‖
            assert event["window"]["steps"][0] == 1 and event["window"]["steps"][-1] == STEPS
            assert set(event["after_vs_before"]) == set(diag.EVENT_METRICS)
        # the before/after means stop at the neighbouring events
        assert [e["compared_steps"] for e in events] == [{"before": [1, 4], "after": [5, 8]},
                                                         {"before": [5, 8], "after": [9, 12]}]


def test_adam_direction_is_unit_right_after_a_reset(result):
    data, _ = result
    for name in ("low_rank_restarts", "lowrank_sparse"):
        series = data["methods"][name]["series"]
        for event_step in (4, 8):
            after = event_step  # 0-based index of step event_step + 1
            assert series["adam_step"][after] == 1
            assert series["adam_direction_rms"][after] == pytest.approx(1.0, abs=5e-3), name
            assert series["adam_direction_rms"][after - 1] < 0.9  # before the reset: momentum has averaged signs
            assert data["methods"][name]["events"][event_step // CYCLE - 1]["first_step_after"]["adam_direction_rms"] \
                == pytest.approx(1.0, abs=5e-3)
    # without a reset the direction shrinks below 1 (momentum averages signs) and Adam's count runs on
    plain = data["methods"]["low_rank"]["series"]
    assert plain["adam_step"] == list(range(1, STEPS + 1)) and plain["adam_direction_rms"][-1] < 0.99


def test_a_suite_variant_runs_with_its_overrides_and_its_remedy_shows(result):
    """``low_rank_restarts-rotate`` (benchmarks/suites.py: reset m, carry v into the new basis): the
    preset with the contender's overrides; after each event Adam's count goes on and the first
    update is (1 − β₁)·g/√v̂-sized (m rebuilds from zero), not the sign(g) of a full reset."""
    data, _ = result
    variant = data["methods"]["low_rank_restarts-rotate"]
    assert variant["settings"]["reset_moments"] == "first" and variant["settings"]["rotate_moments"]
    assert variant["settings"]["overrides"]["restarts.rotate_moments"] is True
    series = variant["series"]
    for event_step in (4, 8):
        assert series["adam_step"][event_step] == event_step + 1
        assert series["adam_direction_rms"][event_step] < 0.5
    assert any("reset of m (v rotated)" in sentence for sentence in data["sentences"])


def test_sparse_momentum_updates_its_density(result):
    data, _ = result
    sparse = data["methods"]["lowrank_sparse"]
    density = sparse["settings"]["density"]
    assert density == 0.25
    assert all(v == pytest.approx(density, abs=0.01) for v in sparse["series"]["updated_fraction"])
    assert all(v > 0.99 for v in data["methods"]["low_rank"]["series"]["updated_fraction"])
    comparison = data["comparisons"]["lowrank_sparse_vs_low_rank"]
    assert comparison["updated_fraction"] == pytest.approx(density, abs=0.01)
    assert 0 < comparison["effective_update_ratio"] < 1  # fewer entries move
    assert "lowrank_sparse_vs_low_rank_restarts" in data["comparisons"]


def test_summary_sentences_and_figure(result):
    data, folder = result
    sentences = diag.summarize(data)
    assert sentences == data["sentences"] == diag.summarize(folder / "diag.json")
    assert all(isinstance(s, str) and s for s in sentences)
    text = "\n".join(sentences)
    assert "refactorization + momentum reset at step 4" in text
    ratio = data["comparisons"]["lowrank_sparse_vs_low_rank"]["effective_update_ratio"]
    assert f"its effective update is {ratio:.3g} of low_rank's" in text  # computed, not typed
    png = folder / "diag.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
