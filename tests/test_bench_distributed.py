"""benchmarks/bench_distributed.py without training: the formula table's byte counts on the tiny
model (meta device) against a hand computation from its shapes, and the README block rendered
from a small synthetic result."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_distributed  # noqa: E402

from lowrank.models import load_model_config  # noqa: E402

WORLD, RANK = 3, 16  # 3 ranks: 1-bit Adam pads to a multiple of 8·3 = 24, which no tiny tensor is


def tiny_shapes() -> dict[str, list[tuple[int, ...]]]:
    """Every parameter of the tiny LLaMA, by kind (configs/models/tiny.json, untied head)."""
    c = load_model_config("tiny")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, c.tie_word_embeddings) == (64, 176, 2, 4096, False)
    h, f, v = 64, 176, 4096
    layer_matrices = [(h, h)] * 4 + [(f, h), (f, h), (h, f)]  # q, k, v, o, gate, up, down (out × in)
    return {"embeddings": [(v, h), (v, h)], "matrices": layer_matrices * 2, "vectors": [(h,)] * 5}  # 2 layer norms × 2 + final


def numel(shape) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


@pytest.fixture(scope="module")
def tiny():
    return bench_distributed.formula_bytes("tiny", WORLD, projected_method="galore", rank=RANK)


def test_formula_bytes_match_a_hand_computation_on_tiny(tiny):
    shapes = tiny_shapes()
    every = [s for kind in shapes.values() for s in kind]
    n = sum(numel(s) for s in every)
    assert n == 624_960 and tiny["parameters"] == n and tiny["projected_rank"] == RANK
    rows = tiny["rows"]
    assert set(rows) == set(bench_distributed.FORMULA_KINDS)

    assert rows["none"]["bytes"] == 4 * n
    assert rows["bf16"]["bytes"] == rows["fp16"]["bytes"] == 2 * n

    # PowerSGD, rank 4: (n + m)·4 entries per matrix where (n + m)·4·2 < n·m (all matrices here),
    # vectors (viewed n × 1, rank 1: 2·(n + 1) > n) in full; fp32.
    r = 4
    low = sum((s[0] + s[1]) * r for s in shapes["embeddings"] + shapes["matrices"])
    assert all((s[0] + s[1]) * r * 2 < numel(s) for s in shapes["embeddings"] + shapes["matrices"])
    assert low == 2 * (4096 + 64) * 4 + 2 * (4 * 128 * 4 + 3 * 240 * 4)
    assert rows["powersgd"]["detail"] == {"full": 4 * 5 * 64, "low_rank": 4 * low}

    # projected (GaLore on the decoder matrices, rank 16): R is r × max(m, n); embeddings, head, norms in full.
    projected = sum(RANK * max(s) for s in shapes["matrices"])
    assert projected == 2 * (4 * 64 * 16 + 3 * 176 * 16)
    full = sum(numel(s) for s in shapes["embeddings"] + shapes["vectors"])
    assert rows["projected"]["detail"] == {"full": 4 * full, "projected": 4 * projected}
    assert rows["projected"]["bytes"] == 2_198_784

    # 1-bit Adam: per tensor ceil(N / 24)·24 / 8 bytes of signs and 4 bytes of scale per rank.
    block = 8 * WORLD
    signs = sum(-(-numel(s) // block) * block // 8 for s in every)
    assert signs == 2 * 32_769 + 2 * (4 * 513 + 3 * 1410 + 2 * 9) + 9
    assert rows["onebit"]["detail"] == {"signs": signs, "scales": 4 * WORLD * len(every)}
    assert rows["onebit"]["bytes"] == 78_399

    for row in rows.values():
        assert row["ratio"] == pytest.approx(row["bytes"] / (4 * n))


def test_fsdp2_traffic_by_hand_on_tiny():
    model, _ = bench_distributed._meta_model("tiny", "full_rank")
    shapes = tiny_shapes()
    layer = sum(numel(s) for s in shapes["matrices"][:7]) + 2 * 64
    root = 2 * 4096 * 64 + 64
    traffic = bench_distributed.fsdp2_traffic(model, 2)
    assert traffic["all_gather"] == pytest.approx(0.5 * 4 * (2 * 2 * layer + root))
    assert traffic["reduce_scatter"] == pytest.approx(0.5 * 4 * 624_960)
    assert traffic["total"] == pytest.approx(2_701_056)


def synthetic(formula) -> dict:
    settings = {"model": "tiny", "vocab_size": 4096, "method": "low_rank", "projected_method": "galore", "rank": 16,
                "steps": 6, "batch_size": 2, "seq_len": 64, "warmup": 2, "nproc": 2, "backend": "gloo", "threads": 1,
                "torch_threads_per_rank": 1, "powersgd_start": 3,
                "formula": {"world_size": WORLD, "dense_method": "full_rank", "projected_method": "galore", "rank": RANK,
                            "powersgd": bench_distributed.powersgd_settings()}}
    estimate = {"total": 3 * 2**20, "model_state": 2**20}
    rows = [
        {"label": "ddp", "title": "DDP", "method": "low_rank", "strategy": "ddp", "comm": "none", "failed": False,
         "tokens_per_s": 12_345.6, "peak_memory_bytes": 500 * 2**20, "bytes_per_step": 4 * 2**20, "bytes_ratio": 1.0,
         "bytes_source": "computed: fp32 gradients", "estimate": {**estimate, "world_size": 1}},
        {"label": "ddp-bf16", "title": "DDP + `--comm bf16`", "method": "low_rank", "strategy": "ddp", "comm": "bf16",
         "failed": False, "tokens_per_s": 11_000.0, "peak_memory_bytes": 501 * 2**20, "bytes_per_step": 2 * 2**20,
         "bytes_ratio": 0.5, "bytes_source": "measured: mean comm_bytes"},
        {"label": "ddp-powersgd", "title": "DDP + `--comm powersgd`", "method": "low_rank", "strategy": "ddp",
         "comm": "powersgd", "failed": True, "reason": "exit code 1"},
        {"label": "fsdp2", "title": "FSDP2", "method": "low_rank", "strategy": "fsdp2", "comm": "none", "failed": False,
         "tokens_per_s": 9_000.0, "peak_memory_bytes": 480 * 2**20, "bytes_per_step": 6 * 2**20, "bytes_ratio": 1.5,
         "bytes_source": "computed: FSDP2 ring traffic", "estimate": {**estimate, "total": 2 * 2**20, "world_size": 2}},
    ]
    machine = {"cpu": "Test CPU", "cpu_count": 2, "torch": "2.x", "load_average": {"start": [1.0, 1, 1], "end": [2.0, 2, 2]}}
    return {"benchmark": "distributed", "machine": machine, "settings": settings, "rows": rows, "formula": formula}


def test_readme_block_from_a_synthetic_result(tiny, tmp_path):
    block = bench_distributed.render_block(synthetic([tiny]))
    lines = block.splitlines()
    assert lines[0].startswith("2 CPU ranks on gloo") and "`tiny`, vocabulary 4,096" in lines[0]
    assert "| DDP | `low_rank` | 12,346 | 4.00 MiB | 1.000× | computed |" in lines
    assert "| DDP + `--comm bf16` | `low_rank` | 11,000 | 2.00 MiB | 0.500× | measured |" in lines
    assert "| DDP + `--comm powersgd` | `low_rank` | failed (exit code 1) | - | - | - |" in lines
    assert "| FSDP2 | `low_rank` | 500.00 MiB | 2.00 MiB | 1.00 MiB |" not in lines  # the measured RSS is FSDP2's own
    assert "| FSDP2 | `low_rank` | 480.00 MiB | 2.00 MiB | 1.00 MiB |" in lines
    assert "| DDP | `low_rank` | 500.00 MiB | 3.00 MiB | 1.00 MiB |" in lines
    formula = [line for line in lines if line.startswith("| `projected` |")]
    assert len(formula) == 1 and formula[0].endswith(f"| 2.1 MiB ({2_198_784 / 2_499_840:.3f}×) |")
    assert "| none (DDP) |" in block and "w = 3" in block and "rank 16" in block

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- distributed -->\nold\n<!-- /distributed -->\n\nafter\n")
    assert bench_distributed.update_readme(readme, block)
    assert readme.read_text() == f"# x\n\n<!-- distributed -->\n{block}\n<!-- /distributed -->\n\nafter\n"
    assert bench_distributed.update_readme(readme, block)  # idempotent
    assert readme.read_text() == f"# x\n\n<!-- distributed -->\n{block}\n<!-- /distributed -->\n\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not bench_distributed.update_readme(plain, block) and plain.read_text() == "no markers\n"
