"""lowrank.memory: the meta-device estimate equals what real training steps hold, follows the
DESIGN 2.8 formulas as the rank changes, and the command line gives stable JSON and one-line errors."""

import json
import resource
import sys
import time

import pytest
import torch
from torch import nn

from lowrank.cli import main
from lowrank.memory import estimate, llama_activation_bytes, measure, measure_method
from lowrank.memory.build import available, build, parse_dtype, resolve
from lowrank.methods import load_method, method_overrides
from lowrank.models import load_model_config

TINY = load_model_config("tiny")  # h 64, f 176, 4 heads, 2 layers, vocab 4096
SMALL = dict(batch_size=2, seq_len=32)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _methods():
    for name in available():
        marks = [pytest.mark.skipif(not _has_bitsandbytes(), reason="needs bitsandbytes")] if name == "adamw8bit" else []
        yield pytest.param(name, marks=marks, id=name)


def _target_shapes(config):
    """(m, n) of every attention/MLP linear of a LLaMA config: what "all-linear" targets."""
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)] * config.num_hidden_layers


# ------------------------------------------------------------------ estimate == measurement


@pytest.mark.parametrize("method", list(_methods()))
@pytest.mark.parametrize("dtypes", [("float32", None), ("bfloat16", "float32")], ids=["fp32", "bf16-fp32state"])
def test_estimate_equals_measured_bytes(method, dtypes):
    weight_dtype, state_dtype = dtypes
    options = dict(rank=8, weight_dtype=weight_dtype, state_dtype=state_dtype, **SMALL)
    # bf16 storage computes in fp32 on a CPU (lowrank.precision): fp32 activations
    estimated = estimate("tiny", method, compute_dtype="float32", **options)
    measured = measure_method("tiny", method, steps=2, **options)
    # Exact layouts: to the byte (sparse-momentum subsets are exactly round(d·numel) here too).
    assert estimated.parameters == measured.parameters
    assert estimated.weights == measured.weights
    assert estimated.gradients == measured.gradients
    assert estimated.optimizer_state == measured.optimizer_state
    assert estimated.optimizer_extra == measured.optimizer_extra
    # Activations are a formula, not a count; on CPU it matches the saved tensors closely.
    assert measured.activations == pytest.approx(estimated.activation_detail["saved"], rel=0.02)
    assert measured.peak is not None and measured.peak >= measured.model_state
    # How close the estimated total comes to the measured peak is a benchmark
    # (benchmarks/bench_memory_estimate.py), not a test: the CPU profiler's peak varies from run
    # to run in one process.


def test_estimate_follows_a_gpt2_config_json(tmp_path):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 96}))
    for method in ("full_rank", "low_rank", "galore"):
        options = dict(rank=4, batch_size=2, seq_len=16)
        estimated, measured = estimate(str(path), method, **options), measure_method(str(path), method, steps=1, **options)
        assert (estimated.weights, estimated.gradients, estimated.optimizer_state) == (
            measured.weights, measured.gradients, measured.optimizer_state)


def test_full_rank_adamw_fp32_is_16_bytes_per_parameter():
    for model in ("tiny", "llama_7b"):
        e = estimate(model, "full_rank", weight_dtype="float32", **SMALL)
        assert e.optimizer == "torch.optim.AdamW"
        params = e.weight_detail["trainable"] + e.weight_detail["frozen"]
        assert params + e.gradients + e.optimizer_detail["moments"] == 16 * e.parameters
        # torch keeps one 0-dim fp32 ``step`` per parameter tensor on top of the 16 bytes.
        tensors = 2 + 9 * TINY.num_hidden_layers + 1 if model == "tiny" else None
        if tensors is not None:
            assert e.optimizer_detail["scalars"] == 4 * tensors
    measured = measure_method("tiny", "full_rank", steps=1, weight_dtype="float32", **SMALL)
    tensors = 2 + 9 * TINY.num_hidden_layers + 1
    params = measured.weights - 2 * 8 * 4  # rotary inv_freq and original_inv_freq buffers (head_dim/2 fp32 each)
    assert params + measured.gradients + measured.optimizer_state - 4 * tensors == 16 * measured.parameters


# ------------------------------------------------------------------ DESIGN 2.8 scaling


@pytest.mark.parametrize("r1,r2", [(16, 8), (32, 4)])
def test_state_scales_with_rank_as_design_2_8(r1, r2):
    shapes = _target_shapes(TINY)
    sum_mn = sum(m + n for m, n in shapes)
    fp32 = dict(weight_dtype="float32", state_dtype="float32", **SMALL)

    def diff(method, attribute):
        return getattr(estimate("tiny", method, rank=r1, **fp32), attribute) - getattr(estimate("tiny", method, rank=r2, **fp32), attribute)

    dr = r1 - r2
    # low-rank: weights and grads (m+n)r, optimizer 2(m+n)r.
    assert diff("low_rank", "weights") == 4 * sum_mn * dr
    assert diff("low_rank", "gradients") == 4 * sum_mn * dr
    assert diff("low_rank", "optimizer_state") == 2 * 4 * sum_mn * dr
    # ReLoRA: the same factors on top of a frozen dense base mn.
    assert diff("relora", "optimizer_state") == 2 * 4 * sum_mn * dr
    relora, low_rank = estimate("tiny", "relora", rank=r1, **fp32), estimate("tiny", "low_rank", rank=r1, **fp32)
    assert relora.weights - low_rank.weights == 4 * sum(m * n for m, n in shapes)
    assert relora.gradients == low_rank.gradients
    # Sparse momentum d = 0.25: 2d(m+n)r, up to rounding of each subset.
    assert diff("lowrank_sparse", "optimizer_state") == pytest.approx(2 * 0.25 * 4 * sum_mn * dr, rel=0.02)
    # GaLore: mn weights and grads whatever the rank; state min(m,n)·r (projector) + 2·max(m,n)·r.
    assert diff("galore", "weights") == 0 and diff("galore", "gradients") == 0
    assert diff("galore", "optimizer_state") == 4 * sum(min(m, n) + 2 * max(m, n) for m, n in shapes) * dr
    # Full-rank AdamW ignores the rank.
    assert diff("full_rank", "optimizer_state") == 0


def test_activations_follow_the_formula_and_checkpointing():
    b, t, e, layers = SMALL["batch_size"], SMALL["seq_len"], 4, TINY.num_hidden_layers
    dense = estimate("tiny", "full_rank", weight_dtype="float32", **SMALL)
    factors = estimate("tiny", "low_rank", rank=8, weight_dtype="float32", **SMALL)
    # Each of the 7 factorized linears of a layer keeps its r-dim intermediate.
    assert factors.activations - dense.activations == layers * b * t * e * 7 * 8
    checkpointed = estimate("tiny", "full_rank", weight_dtype="float32", checkpointing=True, **SMALL)
    per_layer = dense.activation_detail["per_layer"]
    assert checkpointed.activation_detail["layers"] == layers * b * t * TINY.hidden_size * e + per_layer
    assert checkpointed.activations < dense.activations
    # The pure function: linear in the batch, logits b·T·V in the weight dtype.
    one = llama_activation_bytes(batch_size=1, seq_len=64, hidden_size=64, intermediate_size=176, num_layers=2,
                                 num_heads=4, num_kv_heads=4, vocab_size=4096, dtype_bytes=2)
    two = llama_activation_bytes(batch_size=2, seq_len=64, hidden_size=64, intermediate_size=176, num_layers=2,
                                 num_heads=4, num_kv_heads=4, vocab_size=4096, dtype_bytes=2)
    assert two.layers == 2 * one.layers and one.logits == 64 * 4096 * 2


def test_llama_7b_all_methods_on_meta_quickly():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    results = [estimate("llama_7b", m, rank=1024, weight_dtype="bfloat16", state_dtype="float32") for m in available()]
    elapsed = time.perf_counter() - start
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * (1 if sys.platform == "darwin" else 1024)
    assert rise < 2**30, f"the estimate allocated {rise / 2**30:.1f} GiB"
    assert elapsed < 30, f"{elapsed:.1f} s"  # ~2-3 s on 2 cores; generous for a loaded CI machine
    full = next(r for r in results if r.method == "full_rank")
    assert full.parameters == 6_738_415_616
    assert full.optimizer_detail["moments"] == 8 * full.parameters  # two fp32 moments


# ------------------------------------------------------------------ the optimizer step inside backward (--layerwise-step)


def _largest_gradient(method, weight_dtype, world_size=1):
    """The largest trainable parameter's gradient bytes (rank 0's shard: torch.chunk rows), from the
    model the method builds, on the meta device."""
    dtype = parse_dtype(weight_dtype, "weight_dtype")
    model, _ = build(TINY, resolve(method, rank=8, weight_dtype=dtype), weight_dtype=dtype)
    return max(-(-p.shape[0] // world_size) * p[0].numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["low_rank", "full_rank"])
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_layerwise_estimate_counts_the_largest_gradient(method, weight_dtype):
    options = dict(rank=8, weight_dtype=weight_dtype, **SMALL)
    whole, layerwise = estimate("tiny", method, **options), estimate("tiny", method, layerwise=True, **options)
    assert not whole.layerwise and layerwise.layerwise
    assert layerwise.gradients == _largest_gradient(method, weight_dtype) < whole.gradients
    assert any("largest trainable parameter's gradient" in note and "gradient accumulation > 1 or under DDP" in note
               for note in layerwise.notes)
    # the trainer's optimizer: full_rank's AdamW runs as ProjectedAdamW (it needs step_param)
    assert layerwise.optimizer == "lowrank.optim.ProjectedAdamW"
    sharded = estimate("tiny", method, layerwise=True, world_size=2, **options)
    assert sharded.gradients == _largest_gradient(method, weight_dtype, world_size=2) < layerwise.gradients


def test_layerwise_does_not_apply_to_a_peer():
    e = estimate("tiny", "adamw8bit", layerwise=True, **SMALL)
    assert not e.layerwise and e.gradients == estimate("tiny", "adamw8bit", **SMALL).gradients
    assert any("--layerwise-step does not apply" in note for note in e.notes)


@pytest.mark.parametrize("method", ["full_rank", "low_rank", "galore"])
@pytest.mark.parametrize("dtypes", [("float32", None), ("bfloat16", "float32")], ids=["fp32", "bf16-fp32state"])
def test_layerwise_measured_bytes_equal_the_estimate(method, dtypes):
    weight_dtype, state_dtype = dtypes
    options = dict(rank=8, weight_dtype=weight_dtype, state_dtype=state_dtype, layerwise=True, **SMALL)
    estimated = estimate("tiny", method, compute_dtype="float32", **options)
    measured = measure_method("tiny", method, steps=2, **options)
    assert measured.labels["layerwise"]
    # the most .grad bytes alive at once during the step: one parameter's, the largest
    assert measured.gradients == estimated.gradients == _largest_gradient(method, weight_dtype)
    assert (measured.weights, measured.optimizer_state, measured.optimizer_extra) == (
        estimated.weights, estimated.optimizer_state, estimated.optimizer_extra)
    # the updates run inside backward, annotated as optimizer steps: the profiler's split sees them
    assert measured.peak_optimizer_step is not None and measured.peak_optimizer_step >= measured.model_state


@pytest.mark.parametrize("method", ["low_rank", "galore"])
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_layerwise_peak_is_lower_by_the_freed_gradients(method, weight_dtype):
    # 1 × 4 tokens: activations are small, so the peak is where the model state is (in the optimizer's
    # updates). Both paths update with ProjectedAdamW (full_rank would compare torch's AdamW, whose
    # batched step has temporaries of its own, with ProjectedAdamW's per-parameter one).
    options = dict(rank=8, weight_dtype=weight_dtype, state_dtype="float32", batch_size=1, seq_len=4)
    ordinary = measure_method("tiny", method, steps=2, **options)
    layerwise = measure_method("tiny", method, steps=2, layerwise=True, **options)
    freed = ordinary.gradients - layerwise.gradients  # every gradient but the largest
    # the CPU profiler's peak, now deterministic (measure frees the previous step's gradients before
    # profiling), is compared within 1 % of it: what differs is the per-parameter update's temporaries
    assert ordinary.peak - layerwise.peak == pytest.approx(freed, abs=0.01 * ordinary.peak)


def test_measured_peak_counts_the_gradients_once():
    # The previous step's gradients are freed before the profiled step: the profiler does not report
    # the free of a tensor allocated before it started, so they stayed in the baseline next to this
    # step's. fp32, 1 × 4 tokens: the peak is the model state and the update's small temporaries.
    measured = measure_method("tiny", "low_rank", steps=2, rank=8, weight_dtype="float32", batch_size=1, seq_len=4)
    assert measured.model_state < measured.peak < measured.model_state + measured.gradients


# ------------------------------------------------------------------ measure() on any model


def test_measure_counts_a_plain_module():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 16)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    result = measure(model, optimizer, step, 3)
    n = sum(p.numel() for p in model.parameters())
    assert result.parameters == n and result.weights == 4 * n and result.gradients == 4 * n
    assert result.optimizer_state == 8 * n + 4 * 4  # two moments + a 0-dim step per tensor
    assert result.activations > 0 and result.peak >= result.model_state


def test_method_overrides_sets_every_rank_the_preset_has():
    assert method_overrides("low_rank", rank=16) == {"lowrank.rank": 16, "lowrank.rank_ratio": None}
    assert method_overrides("galore", rank=16) == {"optimizer.matrix.rank": 16}
    assert method_overrides("spam", rank=16) == {}
    assert load_method("fira", method_overrides("fira", rank=16)).optimizer["matrix"]["rank"] == 16


# ------------------------------------------------------------------ command line


def _run(capsys, *argv):
    code = main(["memory", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_is_valid_and_stable(capsys, tmp_path):
    argv = ["--model", "tiny", "--method", "full_rank,low_rank,galore,lowrank_sparse", "--rank", "8",
            "--batch-size", "2", "--seq-len", "32", "--json"]
    code, first, _ = _run(capsys, *argv)
    assert code == 0
    _, second, _ = _run(capsys, *argv)
    assert first == second
    data = json.loads(first)
    assert list(data) == ["schema", "units", "model", "settings", "baseline", "estimates"]
    assert data["settings"] == {"rank": 8, "weight_dtype": "float32", "state_dtype": "float32", "batch_size": 2,
                                "seq_len": 32, "checkpointing": False, "layerwise": False}
    assert [e["method"] for e in data["estimates"]] == ["full_rank", "low_rank", "galore", "lowrank_sparse"]
    for entry in data["estimates"]:
        held = entry["weights"] + entry["optimizer_state"] + entry["optimizer_extra"]
        assert entry["model_state"] == held + entry["gradients"]
        head_gradient = max(0, entry["first_gradient"] - entry["activation_detail"]["log_softmax"])
        assert entry["total"] == held + max(entry["activations"] + head_gradient, entry["gradients"] + entry["step_working_set"])
        assert entry["rank"] == (None if entry["method"] == "full_rank" else 8)
    assert data["estimates"][0]["ratio_to_full_rank"] == 1.0
    # --json PATH keeps the table on stdout and writes the same document; --plot writes a PNG.
    code, table, _ = _run(capsys, *argv[:-1], "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png"))
    assert code == 0 and "vs full-rank" in table and "lowrank_sparse" in table
    assert json.loads((tmp_path / "m.json").read_text()) == data
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_layerwise_step(capsys):
    argv = ["--model", "tiny", "--method", "full_rank,low_rank", "--rank", "8", "--batch-size", "2", "--seq-len", "32"]
    code, out, _ = _run(capsys, *argv, "--layerwise-step", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["settings"]["layerwise"] is True
    for entry in data["estimates"]:
        assert entry["layerwise"] is True and entry["gradients"] == _largest_gradient(entry["method"], "float32")
    code, table, _ = _run(capsys, *argv, "--layerwise-step")
    assert code == 0 and "layerwise step on" in table and "largest trainable parameter's gradient" in table
    _, table, _ = _run(capsys, *argv)
    assert "layerwise step off" in table


def test_cli_measure_prints_side_by_side(capsys):
    code, out, _ = _run(capsys, "--model", "tiny", "--method", "low_rank", "--rank", "8", "--batch-size", "1",
                        "--seq-len", "16", "--measure", "1", "--device", "cpu")
    assert code == 0
    assert "Estimate vs 1 measured step(s) on cpu" in out
    assert "optimizer state" in out and "+0.00%" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny", "--method", "galor"], "unknown method 'galor'. Did you mean 'galore'?"),
        (["--model", "tiny", "--method", "low_rank"], "rank must be an integer in [1, min(m, n)] = [1, 64]"),
        (["--model", "tiny", "--method", "galore", "--rank", "100"], "rank 100 is larger than"),
        (["--model", "tiny", "--method", "low_rank", "--rank", "-4"], "--rank must be positive"),
        (["--model", "tiny", "--batch-size", "-1"], "--batch-size must be positive"),
        (["--model", "tiny", "--seq-len", "0"], "--seq-len must be positive"),
        (["--model", "no_such_model"], "no such bundled model"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("lowrank memory: error: ") and message in err
    assert err.count("\n") == 1, err


def test_cli_rejects_a_config_that_is_not_a_causal_lm(capsys, tmp_path):
    path = tmp_path / "vit.json"  # (BERT would pass: transformers maps it to BertLMHeadModel)
    path.write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}))
    code, _, err = _run(capsys, "--model", str(path))
    assert code == 2 and "not a causal language model" in err and err.count("\n") == 1


@pytest.mark.parametrize("layerwise", [False, True])
def test_pretrain_reports_the_allocator_peak_that_measure_reports(tmp_path, layerwise):
    """``lowrank pretrain``'s summary (and its second step's metrics record) carry the allocator's
    peak over one step — on a CPU, live bytes before the step plus the profiler's largest rise —
    the number ``lowrank memory --measure`` gives for the same step. The trainer's step holds in
    addition only its batch of token ids (2 × 32 int64) and its loss accumulator."""
    from lowrank.train import TrainConfig, pretrain

    summary = pretrain(TrainConfig(method="low_rank", model="tiny", data="builtin", rank=8, batch_size=2, seq_len=32,
                                   max_steps=3, eval_every=0, eval_tokens=512, out=str(tmp_path / "run"), progress=False,
                                   plot=False, layerwise_step=layerwise))
    measured = measure_method("tiny", "low_rank", steps=2, device="cpu", rank=8, batch_size=2, seq_len=32, layerwise=layerwise)
    assert 0 <= summary["allocator_peak_bytes"] - measured.peak <= 2 * 32 * 8 + 1024
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["allocator_peak_bytes"] for r in records if "allocator_peak_bytes" in r] == [summary["allocator_peak_bytes"]]


def test_pretrain_and_memory_take_the_same_memory_options():
    """What sets memory is one definition (lowrank.cli.memory_options): the same flags, choices and
    help in both commands, only the defaults differ; and a value is read the same way in both."""
    from lowrank.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    shared = ("--rank", "--param-dtype", "--batch-size", "--seq-len", "--activation-checkpointing", "--layerwise-step")

    def options(command):
        actions = {flag: action for action in commands[command]._actions for flag in action.option_strings}
        # the help up to its default, which each command states for itself
        return {flag: (actions[flag].dest, actions[flag].type, actions[flag].metavar, actions[flag].help.split(" (default")[0])
                for flag in shared if flag != "--seq-len"} | {"--seq-len": actions["--seq-len"].dest}

    assert options("pretrain") == options("memory")
    for command in ("pretrain", "memory"):
        args = commands[command].parse_args(["--param-dtype", "bfloat16", "--model", "tiny"])
        assert args.param_dtype == "bf16"
    with pytest.raises(SystemExit):
        commands["memory"].parse_args(["--model", "tiny", "--param-dtype", "float16"])  # the trainer stores fp32 or bf16
