"""``lowrank pretrain --strategy ddp|fsdp2 --comm ...`` end to end, with real processes.

Two gloo ranks (``torchrun --nproc_per_node 2``) against one process on the same global batch
(``--batch-size`` twice the per-rank batch): the tiny model on the ``corpus`` fixture, 7 steps.
All the two-rank command lines run in ONE torchrun start-up (``tests/dist/cli_runs.py``: each
entry is ``lowrank.cli.main(argv)``, the function ``python -m lowrank`` exits with, and joins and
leaves its own process group); the one-process runs run in this process while the ranks work.

What is checked:

* FSDP2 on 2 ranks = one process, for ``full_rank``, ``low_rank_restarts``, ``galore``, ``fira``,
  ``lowrank_sparse`` and ``relora``, with restarts every 3 steps and GaLore / Fira projector
  refreshes every 3 steps (so refactorizations, sparse-subset redraws, merges and refreshes all
  happen inside the run): the per-step losses of ``metrics.jsonl`` and the final weights agree
  within ``ATOL`` (weights: see ``assert_weights_agree``). The weights are compared after ``lowrank export`` (dense ``W0 + s·BA``): a
  refactorization takes an SVD, whose singular vectors are defined up to sign, so the raw factors
  of two runs that differ by float rounding may be ``(u, v)`` in one and ``(−u, −v)`` in the
  other; the product (the layer's function, and its logits) does not depend on that sign.
* DCP: a 2-rank FSDP2 run stopped at step 4 (``--max-steps 4``) and resumed with
  ``--max-steps 7`` reproduces the uninterrupted 7-step run bit for bit (losses and parameter
  hashes); resumed on one process with twice the batch it agrees within ``ATOL``. (The LR is flat
  after a 2-step warm-up in these runs, so the 4-step run has the 7-step run's schedule; a
  restart due at the last step of a run does not fire, so the stop is off the cycle.)
* ``--comm projected`` with GaLore = plain DDP (both without clipping) within ``ATOL``, and its ``comm_bytes`` per step
  are the formula computed here from the model: each projected matrix ``4·r·max(m, n)`` bytes
  between refreshes and ``4·m·n`` on refresh steps (plus rank 0's broadcast of the refreshed matrix,
  its basis and moments), every other parameter ``4·numel``.
* ``--comm powersgd`` (low_rank, ``--freeze-step 3``): fp32 for 3 steps, then compressed.
* ``--comm onebit`` (low_rank, ``--freeze-step 3``): steps 1–3 send every gradient in fp32, later
  steps send 1-bit momenta: ``N'/8 + 4w`` bytes per parameter (``lowrank.distributed.onebit``'s
  wire format, ``N' = padded_numel(N, w)``), about 1/32 of fp32; the loss falls; a run stopped
  at step 5 and resumed reproduces the uninterrupted one bit for bit (including ``comm_bytes_total``).
* bad input: one line on stderr from rank 0, exit code 2, on every rank.

Tolerance: ``ATOL`` as in tests/test_fsdp.py (the ranks sum gradients, and FSDP2 shards the
projections, in another order than one process: ~1e-7 relative per step, amplified a little by
Adam over 7 steps); the largest differences seen are printed in the assertion messages. After a
momentum reset the losses are compared within what a reset can do to rounding-level gradient
entries (``assert_losses_agree``), not within ``ATOL``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank import cli

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "dist" / "cli_runs.py"

ATOL = 2e-5
OUTLIERS = 0.01  # the fraction of weight entries allowed past ATOL (see assert_weights_agree)
STEPS = 7
CYCLE = 3  # restarts at steps 3 and 6
GAP = 3  # GaLore / Fira refresh their projector at steps 1, 4, 7
STOP = 4  # the DCP run is stopped here and resumed
PER_RANK_BATCH = 2
RANK = 8

# A flat LR after a 2-step warm-up: a run stopped with --max-steps N has the same schedule as the longer run.
FLAT = ["--set", "schedule.warmup=2", "--set", "schedule.min_lr_ratio=1.0"]
RESTARTS = ["--set", f"restarts.cycle_length={CYCLE}", "--set", "restarts.rewarmup_steps=1"]
METHODS = {
    "full_rank": ["--method", "full_rank"],
    "low_rank_restarts": ["--method", "low_rank_restarts", "--rank", str(RANK), *RESTARTS, *FLAT,
                          "--save-every", str(STOP), "--keep-checkpoints", "3"],
    "galore": ["--method", "galore", "--rank", str(RANK), "--set", f"optimizer.matrix.update_proj_gap={GAP}"],
    "fira": ["--method", "fira", "--rank", str(RANK), "--set", f"optimizer.matrix.update_proj_gap={GAP}"],
    "lowrank_sparse": ["--method", "lowrank_sparse", "--rank", str(RANK), *RESTARTS],
    "relora": ["--method", "relora", "--rank", str(RANK), *RESTARTS],
}
# Moments carried through each refactorization (reset m, rotate v) under DDP, against one process.
ROTATE = ["--method", "low_rank_restarts", "--rank", str(RANK), *RESTARTS, *FLAT, "--set", "restarts.reset_moments=first",
          "--set", "restarts.rotate_moments=true"]
EVENTS = {"low_rank_restarts": "refactorize", "lowrank_sparse": "refactorize", "relora": "merge"}

ONEBIT_STEPS, ONEBIT_STOP, FREEZE = 10, 5, 3
ONEBIT = ["--method", "low_rank", "--rank", str(RANK), "--comm", "onebit", "--freeze-step", str(FREEZE), *FLAT]
# No clipping: with --comm projected a global-norm clip sees the norm of the projected gradients
# (lowrank.distributed.comm), so with clipping on the two runs rightly differ.
GALORE_DDP = ["--method", "galore", "--rank", str(RANK), "--set", f"optimizer.matrix.update_proj_gap={GAP}",
              "--set", "training.grad_clip=0"]

# Sparse part + refactorizations under FSDP2, GaLore under DDP: each against its run without checkpointing.
CHECKPOINTING = "--activation-checkpointing"
CHECKPOINTED = {"fsdp2_lowrank_sparse": [*METHODS["lowrank_sparse"], "--strategy", "fsdp2"], "ddp_galore": GALORE_DDP}

# The optimizer step inside backward, each against the same run stepping after backward (no
# clipping: the layerwise clip uses the previous step's norm, tests/test_layerwise.py): FSDP2 with
# refactorizations and accumulation (the step runs on the shards after the reduce-scatter), FSDP2
# GaLore (projector refreshes are collectives inside the hooks), DDP GaLore (after each bucket's
# all-reduce; the reference is ddp_galore).
LAYERWISE = "--layerwise-step"
LAYERWISE_RUNS = {
    "fsdp2_restarts_accum": ["--method", "low_rank_restarts", "--rank", str(RANK), *RESTARTS, *FLAT, "--grad-accum", "2",
                             "--set", "training.grad_clip=0", "--strategy", "fsdp2"],
    "fsdp2_galore": [*GALORE_DDP, "--strategy", "fsdp2"],
    # bf16 storage: the step never changes a parameter's dtype, so DDP's gradient hooks stay (ranks identical)
    "ddp_bf16_sparse": ["--method", "lowrank_sparse", "--rank", str(RANK), *RESTARTS, "--param-dtype", "bf16",
                        "--set", "training.grad_clip=0"],
    "fsdp2_bf16": ["--method", "low_rank", "--rank", str(RANK), "--param-dtype", "bf16", "--set", "training.grad_clip=0",
                   "--strategy", "fsdp2"],
    # the step after a --comm hook of PyTorch's (bf16-compressed all-reduce), wrapped
    "ddp_comm_bf16": ["--method", "low_rank", "--rank", str(RANK), "--comm", "bf16", "--set", "training.grad_clip=0"],
}


def pretrain_args(corpus, out, cache, *extra, batch=PER_RANK_BATCH, steps=STEPS):
    return ["pretrain", "--model", "tiny", "--data", corpus["data"], "--tokenizer", corpus["tokenizer"],
            "--batch-size", str(batch), "--seq-len", "32", "--max-steps", str(steps), "--eval-every", "0",
            "--eval-tokens", "1024", "--out", str(out), "--cache-dir", str(cache), "--dist-timeout", "120",
            "--no-progress", "--no-plot", *extra]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in records(run_dir) if "loss" in r]


def step_records(run_dir) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def max_abs(a, b) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def assert_losses_agree(two, one, reset_at: int | None) -> None:
    """The per-step losses of two runs whose sums differ only in order agree within ``ATOL`` until
    the first update after a momentum reset (``reset_at``: the step whose end resets), and within
    what that reset can do from then on.

    A reset zeroes Adam's moments, so the next update of each entry is ``lr·m̂/√v̂ = lr·g/|g|``: a
    full ``±lr`` whatever the gradient's size. Where an entry's gradient is at rounding level the
    two runs may disagree on its sign, and the entry then moves ``+lr`` in one and ``−lr`` in the
    other; Adam keeps such entries apart by at most ``2·lr`` per step (``|m̂/√v̂| ≤ 1`` after a
    reset). So at step ``t`` their weights differ by at most ``D_t = Σ 2·lr_s`` over the updates
    ``s`` from the first after the reset to ``t − 1`` (step ``t``'s loss is computed before its own
    update), and to first order the loss by ``Σ_flipped |∂L/∂w_i|·D_t ≤ ‖g_t‖·D_t``: the flipped
    entries are those whose gradient was at rounding level, so together they carry at most the
    whole gradient's norm (``grad_norm``, logged per step). A fixed 2e-5 cannot hold across BLAS
    paths (4.3e-5 seen after the reset on another CPU); a missing or misplaced reset, which moves
    every entry, exceeds this."""
    r2, r1 = step_records(two), step_records(one)
    assert [r["step"] for r in r2] == [r["step"] for r in r1] == list(range(1, STEPS + 1))
    first_moved = STEPS + 1 if reset_at is None else reset_at + 2  # the first loss to see a post-reset update
    apart = 0.0
    for a, b in zip(r2, r1):
        step, difference = a["step"], abs(a["loss"] - b["loss"])
        if step < first_moved:
            assert difference <= ATOL, f"step {step}: loss difference {difference:.2e} > {ATOL:g} before the reset acts"
            continue
        apart += 2 * max(r["lr"] for r in r1 if r["step"] == step - 1)
        bound = ATOL + max(a["grad_norm"], b["grad_norm"]) * apart
        assert difference <= bound, f"step {step}: loss difference {difference:.2e} > {bound:.2e} after the reset"


RELATIVE_AFTER_RESET = 1e-2  # per-tensor ‖a − b‖_F / ‖b‖_F once a reset has acted (see assert_weights_agree)


def assert_weights_agree(a: dict, b: dict, run_dir, reset: bool = False) -> None:
    """Two runs' exported weights agree: all but ``OUTLIERS`` of the entries within ``ATOL``, and
    none by more than two Adam steps (``2·lr``, the run's largest lr).

    Why a few entries may differ by up to ``lr``: right after a momentum reset Adam moves an entry
    by about ``±lr`` whatever its gradient's size, so an entry whose gradient is at rounding level
    can step in opposite directions in two runs; and a refactorization takes the SVD of ``BA``,
    whose singular vectors for near-equal singular values are defined only up to a rotation that
    Adam (not rotation-invariant) then updates differently. Seen: 130 of 166,208 entries in
    ``low_rank_restarts`` (layer 1's MLP), up to 4.6e-4 at lr 1.5e-3. A sharding, gather or
    reduction bug moves most entries, by far more.
    """
    assert a.keys() == b.keys()
    if reset:
        # Once a reset has acted, the entries flipped by it keep moving apart for every step after it
        # (assert_losses_agree), and a refactorization then rotates them into other entries of the
        # product: how many and how far depends on the BLAS path (130 entries up to 4.6e-4 on an AMD
        # EPYC, 8,510 up to 4.4e-3 on an Intel Xeon). They stay a minority of small moves: per tensor
        # the relative Frobenius difference was at most 1.6e-3, where a sharding, gather or reduction
        # bug moves most entries by their own size (a relative difference of order 1).
        for key in a:
            relative = float((a[key].double() - b[key].double()).norm() / b[key].double().norm().clamp_min(1e-30))
            assert relative <= RELATIVE_AFTER_RESET, f"{key}: relative difference {relative:.2e} > {RELATIVE_AFTER_RESET:g}"
        return
    lr = max(r["lr"] for r in step_records(run_dir))
    total = outliers = 0
    worst = 0.0
    for key in a:
        difference = (a[key].double() - b[key].double()).abs()
        total += difference.numel()
        outliers += int((difference > ATOL).sum())
        worst = max(worst, float(difference.max()))
    assert outliers <= OUTLIERS * total and worst <= 2 * lr, (
        f"{outliers} of {total} entries differ by more than {ATOL:g}; the largest by {worst:.2e} (2·lr = {2 * lr:.2e})")


def dense_weights(checkpoint_or_run, scratch: Path) -> dict[str, torch.Tensor]:
    """The run's model as ``lowrank export`` writes it (dense ``W0 + s·BA + S``)."""
    target = scratch / f"export-{abs(hash(str(checkpoint_or_run)))}"
    code = cli.main(["export", str(checkpoint_or_run), "--out", str(target), "--overwrite"])
    assert code == 0, f"lowrank export {checkpoint_or_run} failed"
    return load_file(target / "model.safetensors")


def one_line_error(record: dict, message: str) -> None:
    """Exit code 2 and exactly one line on stderr (``lowrank pretrain: error: ...``)."""
    lines = record["stderr"].strip().splitlines()
    assert record["rc"] == 2 and len(lines) == 1 and lines[0].startswith("lowrank pretrain: error:"), record
    assert "Traceback" not in record["stderr"] and message in lines[0], lines


# ---------------------------------------------------------------------- the runs, once for the file


class Runs:
    def __init__(self, corpus, base: Path) -> None:
        self.corpus, self.base = corpus, base
        self.cache_one, self.cache_two = base / "cache-one", base / "cache-two"
        self.timings: dict[str, float] = {}

    def two(self, name: str) -> Path:
        return self.base / "two" / name

    def one(self, name: str) -> Path:
        return self.base / "one" / name

    def args_two(self, name, *extra, **kwargs):
        return pretrain_args(self.corpus, self.two(name), self.cache_two, *extra, **kwargs)

    def args_one(self, name, *extra, **kwargs):
        return pretrain_args(self.corpus, self.one(name), self.cache_one, *extra, batch=2 * PER_RANK_BATCH, **kwargs)

    def plan(self) -> list[dict]:
        """Every two-rank command line, in order (later entries resume earlier ones' checkpoints)."""
        plan = [
            # bad input under torchrun (checked before any work; nothing is written)
            {"name": "err_onebit_galore", "argv": self.args_two("err_onebit_galore", *GALORE_DDP, "--comm", "onebit")},
            {"name": "err_projected_low_rank",
             "argv": self.args_two("err_projected_low_rank", "--method", "low_rank", "--rank", str(RANK), "--comm", "projected")},
        ]
        plan += [{"name": f"fsdp2_{m}", "argv": self.args_two(f"fsdp2_{m}", *extra, "--strategy", "fsdp2")}
                 for m, extra in METHODS.items()]
        dcp = [*METHODS["low_rank_restarts"], "--strategy", "fsdp2"]
        plan += [
            {"name": "dcp_stop", "argv": self.args_two("dcp_stop", *dcp, steps=STOP)},
            {"name": "dcp_resume", "argv": self.args_two("dcp_stop", *dcp, "--resume", "latest")},
            {"name": "ddp_galore", "argv": self.args_two("ddp_galore", *GALORE_DDP)},
            {"name": "ddp_rotate", "argv": self.args_two("ddp_rotate", *ROTATE)},
            {"name": "err_fsdp2_rotate", "argv": self.args_two("err_fsdp2_rotate", *ROTATE, "--strategy", "fsdp2")},
            {"name": "ddp_galore_projected", "argv": self.args_two("ddp_galore_projected", *GALORE_DDP, "--comm", "projected")},
            # a DDP checkpoint (one full state dict) resumed with --strategy fsdp2
            {"name": "err_fsdp2_from_ddp",
             "argv": self.args_two("err_fsdp2_from_ddp", *GALORE_DDP, "--strategy", "fsdp2", "--resume",
                                   str(self.two("ddp_galore")), steps=STEPS + 3)},
            {"name": "ddp_powersgd", "argv": self.args_two("ddp_powersgd", "--method", "low_rank", "--rank", str(RANK), "--comm",
                                                           "powersgd", "--freeze-step", str(FREEZE))},
            {"name": "onebit", "argv": self.args_two("onebit", *ONEBIT, "--save-every", str(ONEBIT_STOP), steps=ONEBIT_STEPS)},
            {"name": "onebit_stop", "argv": self.args_two("onebit_stop", *ONEBIT, steps=ONEBIT_STOP)},
            {"name": "onebit_resume", "argv": self.args_two("onebit_stop", *ONEBIT, "--resume", "latest", steps=ONEBIT_STEPS)},
        ]
        # the runs above again, every decoder layer recomputed in backward (test_activation_checkpointing_*)
        plan += [{"name": f"{name}_checkpointed", "argv": self.args_two(f"{name}_checkpointed", *extra, CHECKPOINTING)}
                 for name, extra in CHECKPOINTED.items()]
        for name, extra in LAYERWISE_RUNS.items():
            plan += [{"name": f"ordinary_{name}", "argv": self.args_two(f"ordinary_{name}", *extra)},
                     {"name": f"layerwise_{name}", "argv": self.args_two(f"layerwise_{name}", *extra, LAYERWISE)}]
        restarts = [*LAYERWISE_RUNS["fsdp2_restarts_accum"], LAYERWISE]
        plan += [
            {"name": "layerwise_ddp_galore", "argv": self.args_two("layerwise_ddp_galore", *GALORE_DDP, LAYERWISE)},
            {"name": "layerwise_stop", "argv": self.args_two("layerwise_stop", *restarts, steps=STOP)},
            {"name": "layerwise_resume", "argv": self.args_two("layerwise_stop", *restarts, "--resume", "latest")},
        ]
        return plan

    def record(self, name: str, rank: int = 0) -> dict:
        return json.loads((self.base / "records" / f"{name}.rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    started = time.perf_counter()
    base = tmp_path_factory.mktemp("distributed_cli")
    state = Runs(corpus, base)
    plan = state.plan()
    (base / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(base / "ranks.log", "w")  # a file, not a pipe: nobody reads a pipe while this process trains
    ranks = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
         str(base / "plan.json"), str(base / "records")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base,
    )
    try:
        # The one-process references, meanwhile, here.
        for method, extra in METHODS.items():
            t = time.perf_counter()
            assert cli.main(state.args_one(method, *extra)) == 0, method
            state.timings[f"one_{method}"] = time.perf_counter() - t
        t = time.perf_counter()
        assert cli.main(state.args_one("rotate", *ROTATE)) == 0
        state.timings["one_rotate"] = time.perf_counter() - t
        t = time.perf_counter()
        state.plain_fsdp2 = subprocess.run(
            [sys.executable, "-m", "lowrank", *state.args_one("err_plain_fsdp2", "--method", "low_rank", "--rank", str(RANK),
                                                            "--strategy", "fsdp2")],
            capture_output=True, text=True, timeout=120, env={k: v for k, v in env.items() if k not in ("RANK", "MASTER_ADDR")},
            cwd=base)
        state.timings["plain_fsdp2"] = time.perf_counter() - t
        ranks.wait(timeout=900)
    except BaseException:
        ranks.kill()
        raise
    finally:
        log.close()
    assert ranks.returncode == 0, (base / "ranks.log").read_text()[-6000:]
    for entry in plan:
        state.timings[entry["name"]] = state.record(entry["name"])["seconds"]
    # 2 ranks → 1 process with twice the batch, from the stopped run's DCP checkpoint
    t = time.perf_counter()
    checkpoint = state.two("dcp_stop") / "checkpoints" / f"step_{STOP:08d}"
    assert cli.main(state.args_one("dcp_resume_one", *METHODS["low_rank_restarts"], "--resume", str(checkpoint))) == 0
    state.timings["one_dcp_resume"] = time.perf_counter() - t
    state.timings["total"] = time.perf_counter() - started
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in state.timings.items()}))
    return state


# ---------------------------------------------------------------------- FSDP2 = one process


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_matches_one_process(runs, method, tmp_path):
    two, one = runs.two(f"fsdp2_{method}"), runs.one(method)
    assert runs.record(f"fsdp2_{method}")["rc"] == 0 and runs.record(f"fsdp2_{method}", 1)["rc"] == 0
    s2, s1 = summary(two), summary(one)
    assert s2["strategy"] == "fsdp2" and s2["world_size"] == 2 and s1["world_size"] == 1
    assert s2["tokens"] == s1["tokens"] == STEPS * 2 * PER_RANK_BATCH * 32
    assert len(s2["parameter_hashes"]) == 2 and len(set(s2["parameter_hashes"])) == 1  # the gathered model, on both ranks
    assert_losses_agree(two, one, reset_at=CYCLE if method in EVENTS else None)
    # the weights after `lowrank export` (dense products: free of the SVD sign, see the module docstring)
    assert_weights_agree(dense_weights(two, tmp_path), dense_weights(one, tmp_path), one, reset=method in EVENTS)
    events2 = [(r["step"], r["event"], r["layers"]) for r in records(two) if "event" in r]
    events1 = [(r["step"], r["event"], r["layers"]) for r in records(one) if "event" in r]
    if method in EVENTS:  # tiny: 2 decoder layers × 7 linear layers, every one refactorized / merged
        assert events2 == events1 == [(CYCLE, EVENTS[method], 14), (2 * CYCLE, EVENTS[method], 14)], events2
    else:
        assert events2 == events1 == []
    assert (two / "checkpoints" / "latest").is_file()
    assert (two / "checkpoints" / f"step_{STEPS:08d}" / "dcp" / ".metadata").is_file()  # a DCP checkpoint


# ---------------------------------------------------------------------- DCP resume


def test_dcp_resume_on_two_ranks_is_bit_identical(runs):
    full, stopped = runs.two("fsdp2_low_rank_restarts"), runs.two("dcp_stop")
    assert runs.record("dcp_stop")["rc"] == 0 and runs.record("dcp_resume")["rc"] == 0
    assert losses(stopped) == losses(full)  # exact: steps 1-4 of the stopped run, then 5-7 resumed
    assert [r["step"] for r in step_records(stopped)] == list(range(1, STEPS + 1))
    assert summary(stopped)["parameter_hashes"] == summary(full)["parameter_hashes"]
    assert [r["step"] for r in records(stopped) if "event" in r] == [CYCLE, 2 * CYCLE]
    # the checkpoint the stopped run ended with is the uninterrupted run's step-4 checkpoint
    from lowrank.distributed.dcp import dcp_to_state_dict

    a = dcp_to_state_dict(stopped / "checkpoints" / f"step_{STOP:08d}")
    b = dcp_to_state_dict(full / "checkpoints" / f"step_{STOP:08d}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dcp_resume_on_one_process_with_twice_the_batch(runs, tmp_path):
    full, resumed = runs.two("fsdp2_low_rank_restarts"), runs.one("dcp_resume_one")
    s = summary(resumed)
    assert s["world_size"] == 1 and s["steps"] == STEPS and s["tokens"] == summary(full)["tokens"]
    after = [r for r in step_records(full) if r["step"] > STOP]
    mine = step_records(resumed)
    assert [r["step"] for r in mine] == [r["step"] for r in after] == list(range(STOP + 1, STEPS + 1))
    assert [r["loss"] for r in mine] == pytest.approx([r["loss"] for r in after], abs=ATOL)
    assert [r["step"] for r in records(resumed) if "event" in r] == [2 * CYCLE]
    assert_weights_agree(dense_weights(resumed, tmp_path), dense_weights(full, tmp_path), full)


# ---------------------------------------------------------------------- --comm projected


def galore_shapes(corpus) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """The tiny model as the runs build it: GaLore's projected matrices (name → shape) and every
    other trainable parameter (name → numel)."""
    from lowrank.methods import apply_method, load_method, param_groups
    from lowrank.models import build_model, load_model_config

    config = load_model_config("tiny")
    config.vocab_size = corpus["vocab"]
    model = build_model(config, device="meta")
    method = load_method("galore").with_overrides({"optimizer.matrix.update_proj_gap": GAP}, rank=RANK)
    apply_method(model, method, seed=0, lowrank=True)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = {}
    for group in param_groups(model, method):
        if group.get("projection") == "svd":
            projected.update({names[id(p)]: tuple(p.shape) for p in group["params"] if p.dim() == 2 and RANK < min(p.shape)})
    others = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in projected}
    return projected, others


def test_comm_projected_equals_plain_ddp_and_sends_the_formula(runs, corpus, tmp_path):
    plain, projected = runs.two("ddp_galore"), runs.two("ddp_galore_projected")
    assert runs.record("ddp_galore")["rc"] == 0 and runs.record("ddp_galore_projected")["rc"] == 0
    lp, lq = losses(plain), losses(projected)
    assert lq == pytest.approx(lp, abs=ATOL), f"max loss difference {max_abs(lq, lp):.2e}"
    assert_weights_agree(dense_weights(projected, tmp_path), dense_weights(plain, tmp_path), plain)
    assert len(set(summary(projected)["parameter_hashes"])) == 1

    matrices, others = galore_shapes(corpus)
    assert len(matrices) == 14  # q k v o gate up down × 2 layers; embeddings, norms and head in full
    between = sum(4 * RANK * max(m, n) for m, n in matrices.values()) + 4 * sum(others.values())
    refresh = sum(4 * m * n for m, n in matrices.values()) + 4 * sum(others.values())
    # after a refresh rank 0's matrices, bases P (min(m, n) × r) and moments (2 × r × max(m, n)) are broadcast
    basis = sum(4 * (m * n + min(m, n) * RANK + 2 * RANK * max(m, n)) for m, n in matrices.values())
    refreshes = {1 + k * GAP for k in range(STEPS) if 1 + k * GAP <= STEPS}  # {1, 4, 7}
    expected = [refresh + basis if step in refreshes else between for step in range(1, STEPS + 1)]
    logged = step_records(projected)
    assert [r["comm_bytes"] for r in logged] == expected
    assert [r["comm_bytes_total"] for r in logged] == [sum(expected[: i + 1]) for i in range(STEPS)]
    assert summary(projected)["comm_bytes_total"] == sum(expected)
    assert between < refresh / 2  # projected steps send well under half


def test_ddp_rotated_moments_match_one_process(runs, tmp_path):
    """restarts.rotate_moments under DDP: every rank maps its moments with rank 0's maps (broadcast
    with the factors), so the ranks stay identical and the run is one process's, within what the
    first-moment reset at step 3 allows (assert_losses_agree)."""
    two, one = runs.two("ddp_rotate"), runs.one("rotate")
    assert runs.record("ddp_rotate")["rc"] == 0 and runs.record("ddp_rotate", 1)["rc"] == 0
    for run in (two, one):  # both refactorizations (steps 3, 6) carried every factor's v: 2 per layer, 14 layers
        events = [r for r in records(run) if "event" in r]
        assert [(r["step"], r["rotated_params"]) for r in events] == [(3, 28), (6, 28)], events
    assert_losses_agree(two, one, reset_at=CYCLE)
    assert len(set(summary(two)["parameter_hashes"])) == 1
    assert_weights_agree(dense_weights(two, tmp_path), dense_weights(one, tmp_path), one, reset=True)


# ---------------------------------------------------------------------- --comm powersgd


def test_comm_powersgd_compresses_after_the_freeze_step(runs, corpus):
    """PyTorch's PowerSGD hook, started at ``--freeze-step``: full fp32 gradients before, less after."""
    from lowrank.methods import apply_method, load_method
    from lowrank.models import build_model, load_model_config

    run = runs.two("ddp_powersgd")
    assert runs.record("ddp_powersgd")["rc"] == 0, runs.record("ddp_powersgd")["stderr"][-3000:]
    config = load_model_config("tiny")
    config.vocab_size = corpus["vocab"]
    model = build_model(config, device="meta")
    apply_method(model, load_method("low_rank").with_overrides({}, rank=RANK), seed=0, lowrank=True)
    fp32 = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    sent = [r["comm_bytes"] for r in step_records(run)]
    assert sent[:FREEZE] == [fp32] * FREEZE
    assert len(set(sent[FREEZE:])) == 1 and sent[FREEZE] < fp32 / 2, sent
    assert len(set(summary(run)["parameter_hashes"])) == 1
    assert all(math.isfinite(x) for x in losses(run))


# ---------------------------------------------------------------------- --comm onebit


def test_comm_onebit_bytes_loss_and_exact_resume(runs, corpus):
    from lowrank.distributed.onebit import padded_numel
    from lowrank.methods import apply_method, load_method
    from lowrank.models import build_model, load_model_config

    full, stopped = runs.two("onebit"), runs.two("onebit_stop")
    for name in ("onebit", "onebit_stop", "onebit_resume"):
        assert runs.record(name)["rc"] == 0, runs.record(name)["stderr"][-3000:]
    config = load_model_config("tiny")
    config.vocab_size = corpus["vocab"]
    model = build_model(config, device="meta")
    apply_method(model, load_method("low_rank").with_overrides({}, rank=RANK), seed=0, lowrank=True)
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    w = 2
    fp32 = 4 * sum(numels)
    compressed = sum(padded_numel(n, w) // 8 + 4 * w for n in numels)  # signs + one fp32 scale per chunk
    expected = [fp32 if step <= FREEZE else compressed for step in range(1, ONEBIT_STEPS + 1)]
    logged = step_records(full)
    assert [r["comm_bytes"] for r in logged] == expected
    assert fp32 / 32 < compressed < fp32 / 30  # 1/32 of fp32, plus the scales and padding (2.6 % on tiny)
    curve = [r["loss"] for r in logged]
    assert all(math.isfinite(x) for x in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.05, curve
    # stopped at step 5 (after the freeze: the error buffers exist) and resumed: bit-identical
    assert losses(stopped) == curve
    assert [r["comm_bytes"] for r in step_records(stopped)] == expected
    assert summary(stopped)["parameter_hashes"] == summary(full)["parameter_hashes"]
    assert len(set(summary(full)["parameter_hashes"])) == 1
    assert [r["comm_bytes_total"] for r in step_records(stopped)] == [r["comm_bytes_total"] for r in logged]


# ---------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_activation_checkpointing_keeps_the_run(runs, name):
    """The same ranks, the same kernels in the same order, the layers recomputed in backward:
    bit-identical losses and weights (tests/test_checkpointing.py says why), under FSDP2 (the
    per-layer all-gather hooks stay outside the checkpoint) and DDP."""
    plain, recomputed = runs.two(name), runs.two(f"{name}_checkpointed")
    assert runs.record(f"{name}_checkpointed")["rc"] == 0 and runs.record(f"{name}_checkpointed", 1)["rc"] == 0
    assert summary(recomputed)["activation_checkpointing"] and not summary(plain)["activation_checkpointing"]
    assert losses(recomputed) == losses(plain)
    assert summary(recomputed)["parameter_hashes"] == summary(plain)["parameter_hashes"]
    warnings = [line for line in runs.record(f"{name}_checkpointed")["stderr"].splitlines() if "warn" in line.lower()]
    assert not warnings, warnings  # nothing printed per step (nor once)


# ---------------------------------------------------------------------- the optimizer step inside backward


@pytest.mark.parametrize("name", [*LAYERWISE_RUNS, "ddp_galore"])
def test_layerwise_step_on_two_ranks_is_the_ordinary_step(runs, name):
    """Bit for bit: the same reduced gradients, the same per-parameter update (FSDP2: on the
    local shards after the reduce-scatter; DDP: after each bucket's all-reduce), ranks identical."""
    reference = runs.two(name if name == "ddp_galore" else f"ordinary_{name}")
    layerwise = runs.two(f"layerwise_{name}")
    for rank in (0, 1):
        assert runs.record(f"layerwise_{name}", rank)["rc"] == 0, runs.record(f"layerwise_{name}", rank)["stderr"][-3000:]
    assert summary(layerwise)["layerwise_step"] and not summary(reference)["layerwise_step"]
    assert len(set(summary(reference)["parameter_hashes"])) == 1  # the ordinary run's ranks agree too
    assert losses(layerwise) == losses(reference)
    hashes = summary(layerwise)["parameter_hashes"]
    assert len(set(hashes)) == 1 and hashes == summary(reference)["parameter_hashes"]


def test_layerwise_step_resumes_bit_identically_under_fsdp2(runs):
    full, stopped = runs.two("layerwise_fsdp2_restarts_accum"), runs.two("layerwise_stop")
    assert runs.record("layerwise_stop")["rc"] == 0 and runs.record("layerwise_resume")["rc"] == 0
    assert losses(stopped) == losses(full)
    assert summary(stopped)["parameter_hashes"] == summary(full)["parameter_hashes"]


# ---------------------------------------------------------------------- bad input


def test_bad_distributed_input_is_one_line_from_rank_0_with_exit_2(runs):
    cases = {
        "err_onebit_galore": "--comm onebit cannot serve method galore",
        "err_projected_low_rank": "--comm projected sends GaLore-style projected gradients",
        "err_fsdp2_from_ddp": "was written without --strategy fsdp2",
        "err_fsdp2_rotate": "sets restarts.rotate_moments, which --strategy fsdp2 cannot serve",
    }
    for name, message in cases.items():
        one_line_error(runs.record(name, 0), message)
        other = runs.record(name, 1)
        assert other["rc"] == 2 and "error" not in other["stderr"], other  # rank 1 exits 2 and says nothing
    for name in ("err_onebit_galore", "err_projected_low_rank", "err_fsdp2_from_ddp", "err_fsdp2_rotate"):
        assert not runs.two(name).exists()  # refused before anything was written
    plain = runs.plain_fsdp2  # --strategy fsdp2 in a plain process (no torchrun)
    one_line_error({"rc": plain.returncode, "stderr": plain.stderr}, "--strategy fsdp2 shards the model over the ranks")
    assert "torchrun --nproc_per_node" in plain.stderr and not runs.one("err_plain_fsdp2").exists()
