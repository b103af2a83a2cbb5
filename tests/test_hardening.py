"""Hardening: every bad value is refused where it enters (one line, exit 2, nothing written), a
diverged step never becomes `latest`, skipped and dead steps are handled as documented, corrupt
checkpoints are detected by their checksums, resumes tell the truth, and a stalled rank ends the
others with a message naming it."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank import LowRankConfig, RestartController, cli, wrap
from lowrank.methods import load_method
from lowrank.optim import ProjectedAdamW
from lowrank.run import loop
from lowrank.run.health import StepHealth, StopTraining, first_nonfinite
from tiny_models import build

ROOT = Path(__file__).resolve().parent.parent


def base_args(corpus, out, *extra):
    return ["pretrain", "--model", "tiny", "--method", "low_rank", "--data", corpus["data"], "--tokenizer", corpus["tokenizer"],
            "--rank", "8", "--batch-size", "2", "--seq-len", "32", "--max-steps", "4", "--eval-every", "0",
            "--eval-tokens", "1024", "--out", str(out), "--no-progress", "--no-plot", *extra]


def run_cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr().err.strip()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


# ---------------------------------------------------------------- every value checked where it enters


def write_model(tmp_path, **changes):
    config = json.loads((ROOT / "configs" / "models" / "tiny.json").read_text())
    config.update(changes)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config))
    return str(path)


BAD = [
    (["--set", "optimizer.lr=abc"], r"optimizer\.lr must be a finite number"),
    (["--set", "optimizer.lr=null"], r"optimizer\.lr must be a finite number"),
    (["--set", "optimizer.lr=.inf"], r"optimizer\.lr must be a finite number"),
    (["--set", "optimizer.eps=.inf"], r"optimizer\.eps must be a finite number"),
    (["--set", "optimizer.eps=inf"], r"optimizer\.eps must be a finite number"),
    (["--set", "optimizer.weight_decay=-1"], r"optimizer\.weight_decay must be a finite number in \[0"),
    (["--set", "optimizer.betas=0.9"], r"optimizer\.betas must be two numbers in \[0, 1\)"),
    (["--set", "optimizer.matrix=5"], r"optimizer\.matrix must be a mapping"),
    (["--set", "optimizer.matrix.desnity=0.5"], r"unknown key 'desnity'; did you mean 'density'\?"),
    (["--set", "optimizer.matrix.density=2"], r"density must be in \(0, 1\]"),
    (["--set", "lowrank=5"], r"section 'lowrank' must be a mapping"),
    (["--set", "lowrank.keep_base=maybe"], r"lowrank\.keep_base must be true or false"),
    (["--set", "lowrank.keep_base='no'"], r"lowrank\.keep_base must be true or false"),
    (["--set", "lowrank.alpha=.nan"], r"lowrank\.alpha must be a finite number"),
    (["--set", "lowrank.rank=32"], r"--rank 8 and --set lowrank\.rank=32 disagree"),
    (["--set", "schedule.warmup=abc"], r"schedule\.warmup must be a finite number"),
    (["--set", "schedule.warmup=2.5"], r"schedule\.warmup must be a fraction of the run"),
    (["--set", "schedule.warmup=10"], r"schedule\.warmup is 10 steps but the run has only 4"),
    (["--set", "training.grad_clip=-1"], r"training\.grad_clip must be a finite number in \[0"),
    (["--set", "training.nonfinite_grads=ignore"], r"training\.nonfinite_grads must be one of skip, stop"),
    (["--method", "low_rank_restarts", "--set", "restarts.cycle_length=abc"], r"restarts\.cycle_length must be an integer"),
    (["--method", "low_rank_restarts", "--set", "restarts.cycle_length=2.5"], r"restarts\.cycle_length must be an integer"),
    (["--method", "low_rank_restarts", "--cycle-length", "5", "--set", "restarts.rewarmup_steps=5"],
     r"rewarmup_steps \(5\) must be shorter than restarts\.cycle_length \(5\)"),
    (["--set", "optimizer.lr"], r"--set optimizer\.lr: expected KEY=VALUE"),
    (["--set", "optimizer..lr=1"], r"expected a dotted key"),
    (["--method", "galore", "--rank", "9999"], r"rank 9999 is larger than"),
    (["--vocab-size", "0"], r"--vocab-size must be a positive whole number"),
    (["--max-steps", "1.5"], r"argument --max-steps: invalid int value"),
    (["--max-steps", "0"], r"--max-steps must be a positive whole number"),
    (["--seed", str(2**64)], r"--seed must be a whole number in \[0, 2\*\*63\)"),
    (["--seed", "-1"], r"--seed must be a whole number"),
    (["--eval-every", "-1"], r"--eval-every must be a whole number >= 0"),
    (["--dist-timeout", "0"], r"--dist-timeout must be a positive number"),
    (["--comm", "onebit", "--method", "galore"], r"this method's optimizer is not plain Adam \(it sets projection\); pick "),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_exit_2_and_write_nothing(extra, message, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(base_args(corpus, out, *extra), capsys)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert __import__("re").search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    "model, message",
    [
        (dict(hidden_size=-1), r"hidden_size must be a positive integer, got -1"),
        (dict(hidden_size="abc"), r"hidden_size"),
        (dict(num_attention_heads=3), r"num_attention_heads \(3\) must divide hidden_size \(64\)"),
        (dict(num_key_value_heads=3), r"num_key_value_heads \(3\) must divide num_attention_heads"),
        (dict(model_type="bert"), r"model_type 'bert' is an encoder .*set \"is_decoder\": true"),
    ],
)
def test_bad_model_configs_are_one_line(model, message, corpus, tmp_path, capsys):
    path = write_model(tmp_path, **model)
    code, err = run_cli(base_args(corpus, tmp_path / "run", "--model", path), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert __import__("re").search(message, err), err


def test_binary_files_as_model_or_method_are_one_line(corpus, tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    for flag, message in (("--model", "not a JSON text file"), ("--method", "not a YAML text file")):
        code, err = run_cli(base_args(corpus, tmp_path / "run", flag, str(junk)), capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_output_paths_are_checked_before_any_work(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "build_data", lambda *a, **k: pytest.fail("data work before the path checks"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    cases = [
        (["--out", str(a_file)], "is a file, not a folder"),
        (["--cache-dir", str(a_file)], "is a file, not a folder"),
        (["--json-out", str(tmp_path)], "is a folder; give a file name"),
        (["--out", str(a_file / "run")], "cannot create or write there"),
        # /proc refuses new entries, also to root (whom the permission bits let write anywhere)
        (["--out", "/proc/lowrank-run"], "cannot create or write there"),
        (["--json-out", "/proc/lowrank/summary.json"], "cannot create or write there"),
    ]
    for extra, message in cases:
        args = base_args(corpus, tmp_path / "run", *extra)
        code, err = run_cli(args, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert a_file.read_text() == "keep me"


def test_api_arguments_name_the_problem():
    with pytest.raises(TypeError, match=r"wrap\(model, config\) needs a torch.nn.Module as model, got NoneType"):
        wrap(None, LowRankConfig(rank=4))
    model = wrap(build("llama"), LowRankConfig(rank=4))
    optimizer = ProjectedAdamW(model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match=r"RestartController\(model=...\) needs a torch.nn.Module, got str"):
        RestartController("m", optimizer, total_steps=10)
    with pytest.raises(TypeError, match=r"cycle_length=...\) must be a whole number of steps, got 2.5"):
        RestartController(model, optimizer, total_steps=10, cycle_length=2.5)
    controller = RestartController(model, optimizer, total_steps=10)
    with pytest.raises(ValueError, match=r"RestartController.load_state_dict: expected \{'num_steps'"):
        controller.load_state_dict({"steps": 3})
    with pytest.raises(ValueError, match=r"load_state_dict: expected an optimizer.state_dict\(\)"):
        optimizer.load_state_dict({"state": {}})
    other = ProjectedAdamW(wrap(build("llama"), LowRankConfig(rank=2)).parameters(), lr=1e-3)
    ids = torch.randint(0, 100, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    with pytest.raises(ValueError, match=r"exp_avg has shape \(4, .*\) in the state dict but \(2, .*\) here"):
        other.load_state_dict(optimizer.state_dict())
    with pytest.raises(ValueError, match="keep_base must be True or False"):
        LowRankConfig(rank=4, keep_base="no")
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        LowRankConfig(rank=4, alpha=float("nan"))


# ---------------------------------------------------------------- divergence never becomes latest


def grad_norm_from(step, value, monkeypatch):
    """Make every training step from ``step`` on see a gradient norm of ``value`` (0: a dead run, NaN: a diverged one)."""
    real, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def patched(params, max_norm):
        calls["n"] += 1
        norm = real(params, max_norm)
        return torch.tensor(value) if calls["n"] >= step else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", patched)


def latest_of(out):
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None


def test_a_diverging_run_keeps_latest_finite_and_names_the_last_good_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    # non-finite from step 6 on: step 6's gradient comes from the state after step 5, so step_4
    # is the last good checkpoint; nothing is written while steps are being skipped
    grad_norm_from(6, float("nan"), monkeypatch)
    out = tmp_path / "run"
    code, err = run_cli(base_args(corpus, out, "--max-steps", "30", "--save-every", "2"), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "training stopped and nothing of this state was saved" in err and "(step 15)" in err, err
    latest = latest_of(out)
    assert latest.name == "step_00000004" and f"the last good checkpoint is {latest}" in err, err
    weights = load_file(latest / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    state = torch.load(latest / "optimizer.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for s in state["state"].values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.parametrize("extra, fix", [
    (["--lr", "1e6"], f"--lr {load_method('low_rank').optimizer.lr:g}"),  # back to the preset's lr, not 1e6 / 2
    (["--set", "optimizer.eps=0"], "--set optimizer.eps=1e-08"),  # the eps, not the lr
])
def test_a_blow_up_suggests_what_would_fix_it(extra, fix, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(corpus, out, *extra, "--max-steps", "30", "--save-every", "1", "--set", "training.grad_clip=null")
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and fix in err and "500000" not in err, err
    # the state that went wrong (step 1's, which gave the first bad gradient) is no resume point
    assert latest_of(out) is None and not list((out / "checkpoints").glob("step_*")), err


def test_a_nonfinite_gradient_skips_the_step_and_the_run_goes_on(corpus, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def spike(params, max_norm):
        calls["n"] += 1
        norm = real(params, max_norm)
        return torch.tensor(float("nan")) if calls["n"] == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spike)
    before = {}

    def remember(self):
        if self.step == 2:
            before.update({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return original(self)

    original = loop.Trainer._train_step
    monkeypatch.setattr(loop.Trainer, "_train_step", remember)
    cfg = loop.TrainConfig(method="low_rank", model="tiny", data=corpus["data"], tokenizer=corpus["tokenizer"], rank=8,
                           batch_size=2, seq_len=32, max_steps=5, eval_every=0, eval_tokens=1024, out=str(tmp_path / "run"),
                           progress=False, plot=False)
    trainer = loop.Trainer(cfg)
    step_three = {}
    original_step = trainer.optimizer.step

    def watch():
        if trainer.step == 2:
            step_three["stepped"] = True
        return original_step()

    trainer.optimizer.step = watch
    summary = trainer.train()
    assert summary["steps"] == 5 and summary["skipped_steps"] == 1 and "stepped" not in step_three
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]


def test_health_policies():
    health = StepHealth("skip", max_skipped_steps=2, dead_steps=3)
    assert health.should_skip(float("nan")) and not health.should_skip(1.0) and health.should_skip(float("inf"))
    with pytest.raises(StopTraining, match="non-finite for 2 steps in a row"):
        health.should_skip(float("nan"))
    with pytest.raises(StopTraining, match=r"became nan \(training.nonfinite_grads=stop\)"):
        StepHealth("stop", 10, 0).should_skip(float("nan"))
    dead = StepHealth("skip", 10, 3)
    assert not dead.should_skip(0.0) and not dead.should_skip(0.0)
    with pytest.raises(StopTraining, match="exactly zero for 3 steps in a row: the run is dead"):
        dead.should_skip(0.0)
    assert first_nonfinite([("a", torch.ones(3)), ("b", torch.tensor([1.0, float("inf")]))]) == "b"
    assert first_nonfinite([("a", torch.ones(3, dtype=torch.bfloat16)), ("n", torch.tensor(3))]) is None


def test_the_finite_check_holds_one_fp32_copy_at_a_time():
    """The check before every checkpoint runs over all weights and state: fp32 copies of all bf16
    weights at once would double their memory at that moment (a 7B run: +10 GiB). Its
    allocations stay within one tensor's fp32 copy (torch's fp32-accumulating norm casts one
    tensor at a time)."""
    from lowrank.accounting import profiled_allocation_rises

    weights = [(name, torch.randn(1024, 2048).to(torch.bfloat16)) for name in "abc"]
    found, rises = profiled_allocation_rises(lambda: first_nonfinite(weights))
    assert found is None and max(rises) <= 1024 * 2048 * 4 + 4096
    weights[1][1][5, 7] = float("nan")
    assert first_nonfinite(weights) == "b"


def test_a_dead_run_is_reported_not_a_success(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(0.0))
    code, err = run_cli(base_args(corpus, tmp_path / "run", "--max-steps", "12", "--set", "training.dead_steps=5"), capsys)
    assert code == 2 and "the run is dead" in err and len(err.splitlines()) == 1, err


def test_a_dead_run_names_a_checkpoint_from_before_it_died(corpus, tmp_path, capsys, monkeypatch):
    # zero from step 4 on (dead_steps 20 by default): the state after step 3 is the dead one
    grad_norm_from(4, 0.0, monkeypatch)
    out = tmp_path / "run"
    code, err = run_cli(base_args(corpus, out, "--max-steps", "30", "--save-every", "1"), capsys)
    assert code == 2 and "the run is dead" in err and "(step 23)" in err, err
    assert latest_of(out).name == "step_00000002" and f"the last good checkpoint is {latest_of(out)}" in err, err
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000002"]


def test_a_run_that_ends_dead_is_not_a_success(corpus, tmp_path, capsys, monkeypatch):
    grad_norm_from(3, 0.0, monkeypatch)  # 18 zero steps of 20: fewer than dead_steps, still dead
    out = tmp_path / "run"
    code, err = run_cli(base_args(corpus, out, "--max-steps", "20", "--save-every", "1"), capsys)
    assert code == 2 and "exactly zero for the last 18 steps of the run" in err and len(err.splitlines()) == 1, err
    assert latest_of(out).name == "step_00000001" and not (out / "summary.json").exists()


# ---------------------------------------------------------------- resume and checkpoints tell the truth


def test_a_changed_byte_in_a_checkpoint_is_detected(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(base_args(corpus, out, "--save-every", "2"), capsys)[0] == 0
    for name in ("model.safetensors", "optimizer.pt"):
        checkpoint = out / "checkpoints" / "step_00000004"
        target = checkpoint / name
        original = target.read_bytes()
        damaged = bytearray(original)
        for i in range(len(damaged) // 2, len(damaged) // 2 + 64):
            damaged[i] ^= 0xFF
        target.write_bytes(bytes(damaged))
        code, err = run_cli(base_args(corpus, out, "--resume", "latest", "--max-steps", "6"), capsys)
        assert code == 2 and f"{name} does not match the checksum" in err and len(err.splitlines()) == 1, err
        target.write_bytes(original)


def test_resume_after_a_partial_metrics_line_overrides_applied_and_truthful_summary(corpus, tmp_path, capsys):
    full = tmp_path / "full"
    assert run_cli(base_args(corpus, full, "--max-steps", "8"), capsys)[0] == 0
    out = tmp_path / "run"
    assert run_cli(base_args(corpus, out, "--max-steps", "8", "--save-every", "4"), capsys)[0] == 0
    # pretend the run was killed at step 6, in the middle of writing a metrics line
    records = (out / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in records if json.loads(line)["step"] <= 6]
    (out / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 7, "tok')
    (out / "checkpoints" / "latest").write_text("step_00000004\n")
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_00000008")
    assert run_cli(base_args(corpus, out, "--max-steps", "8", "--resume", "latest"), capsys)[0] == 0
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (out, full))
    assert summary["final_train_loss"] == pytest.approx(reference["final_train_loss"], abs=0, rel=1e-12)
    assert summary["parameter_hashes"] == reference["parameter_hashes"]
    # a finished run has nothing to resume: said, and summary.json is left as it was
    before = (out / "summary.json").read_bytes()
    code, err = run_cli(base_args(corpus, out, "--max-steps", "8", "--resume", "latest"), capsys)
    assert code == 2 and "the end of this run (8 steps): nothing to resume" in err
    assert (out / "summary.json").read_bytes() == before
    json.loads(before)  # strict JSON
    # overrides given on resume apply from there on, and are what the run records
    assert run_cli(base_args(corpus, out, "--max-steps", "12", "--resume", "latest", "--lr", "3e-4"), capsys)[0] == 0
    lrs = {json.loads(line)["step"]: json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line}
    original = {json.loads(line)["step"]: json.loads(line)["lr"] for line in (full / "metrics.jsonl").read_text().splitlines()
                if '"lr"' in line}
    assert lrs[8] == original[8] and lrs[12] < 3e-4 and lrs[10] / 3e-4 == pytest.approx(lrs[10] / 3e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["method"]["optimizer"]["lr"] == 3e-4


def test_resume_with_other_shapes_says_what_differs(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(base_args(corpus, out, "--save-every", "2"), capsys)[0] == 0
    for extra, message in ((["--rank", "4"], "lowrank.rank: 8 → 4"), (["--model", "llama_9m"], "model.hidden_size: 64 → 128")):
        args = base_args(corpus, out, "--resume", "latest", "--max-steps", "6", *extra)
        if "--rank" in extra:
            args.remove("--rank"), args.remove("8")
        code, err = run_cli(args, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err and "corrupt" not in err, err


def test_export_of_a_damaged_meta_is_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(base_args(corpus, out, "--save-every", "4"), capsys)[0] == 0
    meta_path = out / "checkpoints" / "step_00000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for damage, message in (
        (lambda m: m["model_config"].update(model_type="nonesuch"), "is not a transformers config"),
        (lambda m: m["method"]["lowrank"].update(ranks=3), "unknown key 'ranks'"),
        (lambda m: m["method"]["lowrank"].update(rank=2), "lowrank.rank"),
    ):
        changed = json.loads(json.dumps(meta))
        damage(changed)
        meta_path.write_text(json.dumps(changed))
        code, err = run_cli(["export", str(out), "--out", str(tmp_path / "hf"), "--overwrite"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert message in err or "does not fit this model" in err, err
    for text, message in ((json.dumps({**meta, "model_config": {**meta["model_config"], "hidden_size": "abc"}}),
                           "hidden_size must be a positive integer, got 'abc'"),
                          ("[1, 2]", "meta.json is not a lowrank checkpoint's")):
        meta_path.write_text(text)
        code, err = run_cli(["export", str(out), "--out", str(tmp_path / "hf"), "--overwrite"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_output_paths_of_export_and_quantization_are_checked_first(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(base_args(corpus, out), capsys)[0] == 0
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    quant = ["--data", corpus["data"], "--eval-tokens", "512", "--batch-size", "2"]
    cases = [
        (["export", str(out), "--out", "/proc/lowrank/hf"], "cannot create or write there"),
        (["export", str(out), "--out", str(a_file / "hf")], f"--out's folder {a_file} is a file, not a folder"),
        (["quantize", str(out), "--bits", "4", "--out", "/proc/lowrank/q", *quant], "cannot create or write there"),
        (["quant-eval", str(out), "--json", "/proc/lowrank/r.json", *quant], "cannot create or write there"),
        (["quant-eval", str(out), "--json", str(tmp_path), *quant], "is a folder; give a file name"),
        (["quant-eval", str(a_file), *quant], f"{a_file}: a file, not a folder"),
        (["quant-eval", str(out), "--group-size", "100", *quant],
         r"--group-size 100 does not divide the 64 input channels of model.layers.0.self_attn.q_proj; use a divisor of "),
        (["quant-eval", str(out), "--group-size", "100", "--flat-groups", *quant], "does not divide the 4096 entries"),
    ]
    if not torch.cuda.is_available():
        cases.append((["memory", "--model", "tiny", "--method", "low_rank", "--rank", "8", "--device", "cuda", "--measure", "1"],
                      "--device cuda: no CUDA device is available"))
    for args, message in cases:
        code, err = run_cli(args, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (args, err)
    assert a_file.read_text() == "keep me"


def test_a_stale_temporary_file_of_a_killed_write_is_cleaned_on_the_next_start(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(base_args(corpus, out, "--save-every", "2"), capsys)[0] == 0
    # killed inside atomic_write_bytes (the pointer swap) and inside a checkpoint write
    (out / "checkpoints" / "latest.tmp4242").write_text("step_00000002\n")
    (out / "checkpoints" / ".tmp-step_00000006-4242").mkdir()
    assert run_cli(base_args(corpus, out, "--resume", "latest", "--max-steps", "6"), capsys)[0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000006"]


def test_scientific_notation_is_a_number_everywhere(tmp_path):
    import yaml

    from lowrank.cli.pretrain import parse_set
    from lowrank.methods import available_methods, load_method, preset_path
    from lowrank.methods.presets import read_yaml

    assert parse_set(["optimizer.lr=5e-3", "optimizer.eps=1E-8", "schedule.warmup=1e1", "training.grad_clip=+2e0"]) == {
        "optimizer.lr": 0.005, "optimizer.eps": 1e-8, "schedule.warmup": 10.0, "training.grad_clip": 2.0}
    assert parse_set(["optimizer.lr=1e-3x"]) == {"optimizer.lr": "1e-3x"}  # not a number: refused by the key's check
    assert load_method("low_rank").with_overrides(parse_set(["optimizer.lr=5e-3"])).optimizer.lr == 0.005
    preset = tmp_path / "mine.yaml"
    preset.write_text(re.sub(r"\n  lr: \S+\n", "\n  lr: 5e-3\n", preset_path("low_rank").read_text()).replace("1.0e-8", "1e-8"))
    method = load_method(str(preset))
    assert method.optimizer.lr == 0.005 and method.optimizer.eps == 1e-8
    # the bundled presets read the same with either rule: none relies on YAML 1.1 reading a number as a string
    for name in available_methods():
        text = preset_path(name).read_text()
        assert read_yaml(text) == yaml.safe_load(text), name


def test_api_arguments_name_the_problem_second_pass():
    from lowrank.integrations.trainer import create_optimizer_and_scheduler
    from lowrank.layers import LowRankLinear
    from lowrank.methods import load_method

    for bad, message in ((dict(target_modules=123), "target_modules must be a module name pattern"),
                         (dict(exclude_modules=[1]), "exclude_modules must be a module name pattern"),
                         (dict(seed="x"), r"seed must be a whole number in \[0, 2\*\*63\), got 'x'"),
                         (dict(seed=-1), r"seed must be a whole number in \[0, 2\*\*63\), got -1")):
        with pytest.raises(ValueError, match=message):
            LowRankConfig(rank=4, **bad)
    model = wrap(build("llama"), LowRankConfig(rank=4))
    optimizer = ProjectedAdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"warmup_steps \(20\) is longer than the run \(total_steps=10\)"):
        RestartController(model, optimizer, total_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match=r"RestartController\(total_steps=...\) must be the run's length.*got None"):
        RestartController(model, optimizer, total_steps=None)
    with pytest.raises(ValueError, match=r"a method is a preset name .* or a YAML path, got None"):
        load_method(None)
    with pytest.raises(ValueError, match=r"LowRankLinear\(in_features=...\) must be a positive whole number, got 0"):
        LowRankLinear(in_features=0, out_features=8, rank=2)
    with pytest.raises(ValueError, match=r"create_optimizer_and_scheduler\(total_steps=...\) must be the Trainer's max_steps"):
        create_optimizer_and_scheduler(model, "low_rank", overrides={"lowrank.rank": 4}, total_steps=0)


# ---------------------------------------------------------------- distributed runs fail fast


def torchrun(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def lowrank_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("lowrank pretrain")]


def no_traceback_of_ours(stderr):
    """torchrun itself raises ChildFailedError (its own traceback) when a rank exits non-zero;
    no frame of a traceback may come from lowrank or the test script. (Matched by their full
    paths: in a clone named lowrank, torchrun's own frames, in its .venv, contain "/lowrank/".)"""
    ours = tuple(f'File "{ROOT / folder}{os.sep}' for folder in ("lowrank", "tests"))
    frames = [line.strip() for line in stderr.splitlines() if line.strip().startswith("File ")]
    return not any(frame.startswith(ours) for frame in frames)


def test_a_stalled_rank_ends_the_others_with_its_name(corpus, tmp_path):
    # --dist-timeout 20: long enough that a busy machine's slow start of one rank is not a stall
    # (the stalled rank sleeps for minutes: torchrun ends it once rank 0 exits)
    result = torchrun(str(ROOT / "tests" / "dist" / "stall.py"), "1", "3", "--",
                      *base_args(corpus, tmp_path / "run", "--max-steps", "6", "--dist-timeout", "20"), timeout=240)
    assert result.returncode != 0
    lines = lowrank_lines(result.stderr)
    assert len(lines) == 1 and "rank 1 (at step 2) stopped answering" in lines[0] and "--dist-timeout 20 s" in lines[0], result.stderr[-3000:]
    assert no_traceback_of_ours(result.stderr), result.stderr[-3000:]


def test_a_stall_inside_a_step_names_the_other_rank():
    from types import SimpleNamespace

    from lowrank.distributed.setup import stalled_message

    for positions, who in (({0: 3, 1: 3}, "rank 1 (at step 3) stopped"), ({0: 3, 1: 3, 2: 3}, "one of ranks 1, 2 (at step 3)"),
                           ({0: 3, 1: 2, 2: 3}, "rank 1 (at step 2) stopped")):
        heartbeat = SimpleNamespace(info=SimpleNamespace(rank=0), positions=lambda positions=positions: positions)
        message = stalled_message(heartbeat, 5.0, RuntimeError("Timed out waiting 5000ms"))
        assert who in message and "another rank" not in message, message


def test_the_process_group_ends_after_what_holds_it(tmp_path, monkeypatch):
    """end_process_group frees a DDP wrapper left in a reference cycle before it destroys the group
    (freed after, its reducer would take gloo's destructor down with it), and barriers only after a
    completed run."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch import nn

    from lowrank.distributed import end_process_group

    calls, destroy, barrier = [], dist.destroy_process_group, dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), barrier(*a, **k))[1])
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: (calls.append(("destroy", wrapper() is None)), destroy(*a, **k))[1])
    for completed in (True, False):
        calls.clear()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg-{completed}", rank=0, world_size=1)
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
        ddp.cycle = ddp  # collectable only by the garbage collector
        wrapper = weakref.ref(ddp)
        gc.disable()  # so that only end_process_group can collect it
        try:
            del ddp
            end_process_group(completed=completed)
        finally:
            gc.enable()
        assert calls == (["barrier"] if completed else []) + [("destroy", True)] and not dist.is_initialized()
    end_process_group(completed=True)  # no group: nothing to do
    assert calls[-1] == ("destroy", True)


def test_a_user_error_under_torchrun_is_one_line_from_rank_0(corpus, tmp_path):
    result = torchrun("-m", "lowrank", *base_args(corpus, tmp_path / "run", "--set", "optimizer.lr=abc"))
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    assert len(lowrank_lines(result.stderr)) == 1 and no_traceback_of_ours(result.stderr), result.stderr[-3000:]


def test_ranks_started_without_torchrun_get_one_message(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    result = subprocess.run([sys.executable, "-m", "lowrank", *base_args(corpus, tmp_path / "run")], capture_output=True,
                            text=True, timeout=60, env=env, cwd=ROOT)
    assert result.returncode == 2 and len(lowrank_lines(result.stderr)) == 1 and "start the ranks with torchrun" in result.stderr
    assert "Traceback" not in result.stderr
# ---------------------------------------------------------------- the public API imports in any order

# Runs in a fresh interpreter: it imports all of lowrank once, for the third-party modules that
# pulls in, forgets lowrank's own modules (lowrank registers nothing in torch or transformers),
# and imports every module of lowrank first in a forked child that starts without any of them.
# An import cycle that only bites when a given module comes first shows up, at a fraction of a
# second per module instead of an interpreter start-up and a transformers import each.
_IMPORT_EACH_FIRST = """
import importlib, os, sys, traceback

def import_first(name):
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    return pid

for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException:  # the order that fails is reported below, from a clean start
        pass
for name in [n for n in sys.modules if n.split(".")[0] == "lowrank"]:
    del sys.modules[name]
running, failures = {}, []
for name in sys.argv[1:] + [None] * os.cpu_count():
    if len(running) >= os.cpu_count() or name is None and running:
        pid, status = os.wait()
        failures += [running.pop(pid)] if status else []
    if name is not None:
        running[import_first(name)] = name
print("failed:", " ".join(failures))
sys.exit(1 if failures else 0)
"""


def public_modules() -> list[str]:
    """Every module of the package that is not private (no part of its name starts with "_")."""
    names = []
    for path in sorted((ROOT / "lowrank").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return names


def test_every_public_module_imports_first_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, *public_modules()], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-500:] + result.stderr[-3000:]
