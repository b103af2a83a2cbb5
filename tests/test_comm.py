"""Communication hooks and 1-bit Adam (lowrank.distributed.comm / .onebit).

The distributed tests share one run of ``tests/dist/comm_ranks.py``: 2 CPU ranks on gloo train a
tiny MLP (16→32→32→8, per-rank batches) under each hook; each test checks one part of what the
ranks saved. Bytes are checked three ways: the hook's own count, the formula (computed here from
the shapes), and the input bytes of the collectives the ranks really issued.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank.distributed.comm import CommStats, register_comm_hook, ring_bytes
from lowrank.distributed.onebit import (
    OneBitAdam,
    compress_chunks,
    pack_signs,
    padded_numel,
    scaled_sign,
    server_reduce,
    unpack_signs,
    worker_compress,
)
from lowrank.optim import ProjectedAdamW

SCRIPT = Path(__file__).parent / "dist" / "comm_ranks.py"
sys.path.insert(0, str(SCRIPT.parent))
import comm_ranks as ranks  # noqa: E402

W = ranks.WORLD
SHAPES = [tuple(p.shape) for p in ranks.make_model().parameters()]  # 32×16, 32, 32×32, 32, 8×32, 8
NUMELS = [math.prod(s) for s in SHAPES]
FP32 = 4 * sum(NUMELS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W)]


def test_every_hook_keeps_the_ranks_identical_and_trains(runs):
    _, (rank0, rank1) = runs
    for name, result in rank0.items():
        assert all(torch.equal(a, b) for a, b in zip(result["params"], rank1[name]["params"])), name
        assert all(math.isfinite(x) for x in result["losses"]), name
        assert result["losses"][-1] < result["losses"][0], name


# ---------------------------------------------------------------------- projected (GaLore)


def projected_step_bytes(refresh: bool) -> int:
    """Refresh: every gradient in full. Otherwise the GaLore matrices travel as R: 32×16 (m ≥ n) as
    G P, 32×4; 8×32 (m < n) as Pᵀ G, 4×32 — r/min(m, n) of their bytes; Fira's 32×32 and the biases
    in full."""
    if refresh:
        return FP32
    r = 4
    galore = [SHAPES[0], SHAPES[4]]
    projected = sum(r * max(m, n) for m, n in galore)
    assert projected == sum(math.prod(s) * r / min(s) for s in galore)
    return 4 * (projected + sum(NUMELS) - sum(math.prod(s) for s in galore))


@pytest.mark.parametrize("name", ["projected", "projected_buckets"])
def test_projected_equals_uncompressed_ddp(runs, name):
    """Final weights after 7 steps with refreshes at steps 0, 3 and 6 equal those of the plain
    all-reduce to float reduction order (measured max |Δ| ~5e-8 on weights of size ~0.3)."""
    _, (rank0, _) = runs
    for reference, projected in zip(rank0["none"]["params"], rank0[name]["params"]):
        torch.testing.assert_close(projected, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["projected", "projected_buckets"])
def test_projected_bytes_per_step(runs, name):
    _, (rank0, _) = runs
    result = rank0[name]
    expected = [projected_step_bytes(step % ranks.GAP == 0) for step in range(ranks.STEPS)]
    assert expected[:3] == [7456, 5408, 5408]
    assert result["log"] == expected
    assert [m["all_reduce"] for m in result["measured"]] == expected
    assert result["sent_full"] == {"2.weight": "Fira's residual G - P Pᵀ G needs the full gradient"}
    assert rank0["none"]["log"] == [FP32] * ranks.STEPS
    if name == "projected_buckets":
        assert result["buckets"] > 1  # several buckets, in DDP's (reversed, rebuilt) order


# ---------------------------------------------------------------------- PyTorch's hooks


def powersgd_step_bytes(rank: int, min_compression_rate: float = 2) -> int:
    """PowerSGD: each gradient as n × m (shape[0] × rest); P and Q ((n + m)·r') when that is
    below n·m / min_compression_rate, else in full."""
    elements = 0
    for shape in SHAPES:
        n, m = shape[0], math.prod(shape[1:])
        r = min(n, m, rank)
        elements += (n + m) * r if (n + m) * r * min_compression_rate < n * m else n * m
    return 4 * elements


@pytest.mark.parametrize("kind, expected", [("bf16", [FP32 // 2] * 3), ("fp16", [FP32 // 2] * 3),
                                            ("powersgd", [FP32, FP32] + [powersgd_step_bytes(2)] * 3)])
def test_pytorch_hooks_bytes_per_step(runs, kind, expected):
    _, (rank0, _) = runs
    result = rank0[kind]
    assert result["log"] == expected
    assert [m["all_reduce"] for m in result["measured"]] == expected
    if kind == "powersgd":
        assert expected[-1] == 1504 and result["detail"][-1] == {"full": 4 * 72, "low_rank": 4 * 304}


def test_powersgd_with_several_buckets(runs):
    """Several DDP buckets on gloo: the same bytes as one bucket, ranks identical, the loss falls. (PyTorch's
    ``powerSGD_hook`` alone interleaves the buckets' collectives differently on the two ranks
    here and gloo aborts: "Received data size doesn't match expected size".)"""
    _, (rank0, rank1) = runs
    result = rank0["powersgd_buckets"]
    assert result["buckets"] > 1
    assert result["log"] == rank0["powersgd"]["log"]
    assert all(torch.equal(a, b) for a, b in zip(result["params"], rank1["powersgd_buckets"]["params"]))
    # (not the one-bucket run's weights: PowerSGD's random Q is drawn per tensor in bucket order)
    assert all(math.isfinite(x) for x in result["losses"]) and result["losses"][-1] < result["losses"][0]


# ---------------------------------------------------------------------- 1-bit Adam, 2 ranks


def onebit_step_bytes() -> int:
    """Per tensor ceil(N / 8w)·8w / 8 bytes of signs and one fp32 scale per chunk (w)."""
    return sum(padded_numel(n, W) // 8 + 4 * W for n in NUMELS)


def test_onebit_bytes_per_step(runs):
    _, (rank0, _) = runs
    result = rank0["onebit"]
    compressed = onebit_step_bytes()
    assert compressed == 282
    padding = sum(padded_numel(n, W) - n for n in NUMELS) / 8
    assert compressed == FP32 / 32 + 4 * W * len(NUMELS) + padding  # 1/32 of fp32, the scales, the padding
    assert result["log"] == [FP32] * ranks.FREEZE + [compressed] * (ranks.ONEBIT_STEPS - ranks.FREEZE)
    after = result["measured"][ranks.FREEZE:]
    assert all(m == {"all_reduce": 0, "all_to_all_single": compressed, "all_gather_single": compressed // W} for m in after)
    assert result["detail"][-1] == {"signs": 234, "scales": 48}
    assert ring_bytes(compressed, W) == compressed  # 2(w-1)/w = 1 for two ranks


def test_onebit_loss_falls(runs):
    _, (rank0, _) = runs
    losses = rank0["onebit"]["losses"]
    assert losses[-1] < 0.1 * losses[0]
    assert losses[-1] < losses[ranks.FREEZE]  # also while compressed


def test_onebit_resume_is_bit_identical(runs):
    out, per_rank = runs
    for rank, result in enumerate(per_rank):
        saved = torch.load(out / f"onebit_rank{rank}.pt", weights_only=True)
        assert {"worker_error", "server_error"} <= set(saved["optimizer"]["state"][0])
        whole, resumed = result["onebit"], result["onebit_resumed"]
        assert all(torch.equal(a, b) for a, b in zip(whole["params"], resumed["params"]))
        assert resumed["losses"] == whole["losses"][ranks.RESUME_AT:]
        for index, state in whole["state"].items():
            for key, value in state.items():
                other = resumed["state"][index][key]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)


# ---------------------------------------------------------------------- the compressor, one process


def test_compressor_is_the_scaled_sign_with_bits_packed():
    x = torch.tensor([0.5, -2.0, 0.0, 1.5, -0.25, 3.0, -1.0, 0.75, 2.0, -0.5, 0.1, -0.1, 0.0, 4.0, -4.0, 1.0])
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == x.numel() // 8
    assert packed[0].item() == 0b10101101  # bit k of byte b is entry 8b + k, set for x >= 0
    signs = torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(packed), signs)
    expected = signs * x.abs().sum() / x.numel()
    assert torch.equal(scaled_sign(x), expected)
    # per chunk, over the real entries only (the zero padding does not dilute the scale)
    rows = torch.zeros(2, 8)
    rows[0], rows[1, :5] = x[:8], x[8:13]
    _, scales, decoded = compress_chunks(rows, [8, 5])
    torch.testing.assert_close(scales, torch.stack([x[:8].abs().mean(), x[8:13].abs().mean()]))
    torch.testing.assert_close(decoded[1, :5], scaled_sign(x[8:13]))


def test_worker_and_server_error_feedback_follow_their_formulas():
    torch.manual_seed(0)
    n, w = 37, 2  # padded to 48, chunks of 24 (real: 24 and 13)
    chunk = padded_numel(n, w) // w
    xs = [torch.randn(n), torch.randn(n)]
    worker_errors = [torch.zeros(padded_numel(n, w)) for _ in range(w)]
    server_errors = [torch.zeros(chunk) for _ in range(w)]
    counts = [24, 13]

    def C(v):  # noqa: N802 - the paper's name
        return scaled_sign(v) if v.numel() else v

    for _ in range(3):  # the errors carry over from step to step
        sent, expected_sent = [], []
        for x, e in zip(xs, worker_errors):
            y = torch.cat([x, torch.zeros(padded_numel(n, w) - n)]) + e
            compressed = torch.cat([C(y[:24]), C(y[24:37])])
            expected_error = torch.cat([y[:37] - compressed, torch.zeros(11)])
            sent.append(worker_compress(x, e, w))
            expected_sent.append(compressed)
            torch.testing.assert_close(e, expected_error)  # e ← x + e − C(x + e)
        decoded_total = []
        for i in range(w):  # rank i serves chunk i
            packed = torch.stack([s[0][i] for s in sent])
            scales = torch.stack([s[1][i] for s in sent])
            real = counts[i]
            part = slice(0, 24) if i == 0 else slice(24, 37)
            z = torch.stack([c[part] for c in expected_sent]).mean(0) + server_errors[i][:real].clone()
            out_packed, out_scale = server_reduce(packed, scales, server_errors[i], real)
            decoded = (unpack_signs(out_packed) * out_scale).view(-1)[:real]
            torch.testing.assert_close(decoded, C(z))
            torch.testing.assert_close(server_errors[i][:real], z - C(z))  # e_i ← z − C(z)
            assert not server_errors[i][real:].any()
            decoded_total.append(decoded)
        assert torch.cat(decoded_total).shape == (n,)


# ---------------------------------------------------------------------- OneBitAdam, one process


def test_onebit_warmup_is_adamw_then_v_is_frozen():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    b.data.copy_(a.data)
    onebit = OneBitAdam([a], lr=1e-2, weight_decay=0.1, freeze_step=4)
    adamw = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(4):
        g = torch.randn(6, 4)
        a.grad, b.grad = g.clone(), g.clone()
        onebit.step()
        adamw.step()
    assert torch.equal(a, b)  # bit-identical warm-up
    frozen_v = onebit.state[a]["exp_avg_sq"].clone()
    assert not onebit.in_warmup(a)
    before = a.detach().clone()
    g = torch.randn(6, 4)
    a.grad = g
    onebit.step()
    state = onebit.state[a]
    assert torch.equal(state["exp_avg_sq"], frozen_v)
    m = state["exp_avg"]
    step_size = 1e-2 / (1 - 0.9**5)
    expected = before * (1 - 1e-2 * 0.1) - step_size * m / (frozen_v.sqrt() / math.sqrt(1 - 0.999**4) + 1e-8)
    torch.testing.assert_close(a.detach(), expected)
    assert onebit.comm_stats.log == [0] * 5  # one process: nothing sent


def test_onebit_momentum_reset_restarts_the_warmup():
    p = nn.Parameter(torch.randn(8, 8))
    optimizer = OneBitAdam([p], lr=1e-3, freeze_step=2, reset_interval=5)
    for _ in range(3):
        p.grad = torch.randn(8, 8)
        optimizer.step()
    assert not optimizer.in_warmup(p)
    optimizer.reset_momentum([p])
    assert optimizer.in_warmup(p) and optimizer.state[p]["step"] == 0 and not optimizer.state[p]["exp_avg_sq"].any()
    p.grad = torch.randn(8, 8)
    optimizer.step()
    assert optimizer.state[p]["step"] == 1 and optimizer.in_warmup(p)
    p.grad = torch.randn(8, 8)
    optimizer.step()
    assert optimizer.state[p]["step"] == 2 and optimizer.state[p]["total_step"] == 5
    assert optimizer.in_warmup(p)  # the scheduled reset (reset_interval 5) is due: the warm-up restarts
    p.grad = torch.randn(8, 8)
    optimizer.step()
    assert optimizer.state[p]["resets"] == 2 and optimizer.state[p]["step"] == 1


# ---------------------------------------------------------------------- bad input


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))


def one_line_error(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_projected_needs_galore_style_projection():
    model = mlp()
    message = one_line_error(lambda: register_comm_hook(model, "projected", optimizer=ProjectedAdamW(model.parameters(), lr=1e-3)))
    assert "--comm projected needs GaLore-style projection" in message
    fira = ProjectedAdamW([{"params": [model[0].weight], "projection": "svd", "rank": 2, "residual": "fira"}], lr=1e-3)
    assert "Fira" in one_line_error(lambda: register_comm_hook(model, "projected", optimizer=fira))
    apollo = ProjectedAdamW([{"params": [model[0].weight], "projection": "random", "rank": 2}], lr=1e-3)
    assert "APOLLO" in one_line_error(lambda: register_comm_hook(model, "projected", optimizer=apollo))
    assert "needs the optimizer" in one_line_error(lambda: register_comm_hook(model, "projected"))


def test_projected_on_one_process_counts_nothing():
    model = mlp()
    galore = ProjectedAdamW([{"params": [model[0].weight], "projection": "svd", "rank": 2}], lr=1e-3)
    stats = register_comm_hook(model, "projected", optimizer=galore)
    assert isinstance(stats, CommStats) and stats.record() == {"comm_bytes": 0, "comm_bytes_total": 0}


@pytest.mark.parametrize("option, value, words", [
    ("projection", "svd", "--comm projected"),
    ("density", 0.5, "sparse momentum"),
    ("spike_threshold", 5000.0, "SPAM"),
    ("adaptive_clip", True, "Stable-SPAM"),
    ("norm_scaling", True, "Stable-SPAM"),
    ("state_bits", 8, "fp32"),
    ("state_dtype", torch.bfloat16, "fp32"),
    ("reset_interval", 3, "never end"),
])
def test_onebit_refuses_what_it_cannot_serve(option, value, words):
    params = mlp().parameters()
    message = one_line_error(lambda: OneBitAdam(params, lr=1e-3, freeze_step=3, **{option: value}))
    assert words in message


def test_onebit_hook_needs_onebit_adam_and_kinds_are_checked():
    model = mlp()
    adamw = ProjectedAdamW(model.parameters(), lr=1e-3)
    assert "OneBitAdam" in one_line_error(lambda: register_comm_hook(model, "onebit", optimizer=adamw))
    assert "expected one of" in one_line_error(lambda: register_comm_hook(model, "int8"))
    assert "freeze_step" in one_line_error(lambda: OneBitAdam(model.parameters(), lr=1e-3, freeze_step=0))
    typo = [{"params": model.parameters(), "frezee_step": 3}]
    assert "unknown option 'frezee_step'" in one_line_error(lambda: OneBitAdam(typo, lr=1e-3, freeze_step=3))
    assert "PowerSGD options" in one_line_error(lambda: register_comm_hook(model, "bf16", matrix_approximation_rank=2))


# ---------------------------------------------------------------------- what --comm onebit serves


@pytest.mark.parametrize("method, why", [("galore", "which projection change"), ("lowrank_sparse", "density"),
                                         ("stable_spam", "which adaptive_clip, norm_scaling change"),
                                         ("full_rank", "this method uses adamw")])
def test_onebit_refuses_methods_it_cannot_serve(method, why):
    from lowrank.distributed.strategy import check_comm
    from lowrank.errors import UsageError
    from lowrank.methods import load_method

    with pytest.raises(UsageError, match=f"cannot serve method {method}: .*{why}.*; pick low_rank, ") as error:
        check_comm("onebit", "ddp", load_method(method))
    assert "stable_spam" not in str(error.value).split("pick")[1] and "full_rank" not in str(error.value).split("pick")[1]
    check_comm("onebit", "ddp", load_method("low_rank_restarts"))  # plain Adam on factors: served
