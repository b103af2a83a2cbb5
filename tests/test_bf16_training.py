"""`lowrank pretrain --param-dtype bf16` on the tiny model: every optimizer mode trains with bf16
parameters and gradients, resumes bit-identically (the rounding draws are seeded from the step),
stochastic rounding keeps the updates that round-to-nearest loses, and the run exports bf16
safetensors that plain transformers loads."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank.errors import UsageError
from lowrank.methods import load_method
from lowrank.train import pretrain
from test_train import config as train_config
from test_train import losses

# One preset per optimizer mode: plain AdamW (torch's, run as ProjectedAdamW), low-rank factors,
# sparse momentum, GaLore projection, the Fira residual, APOLLO, SPAM's spike clipping, Stable-SPAM,
# 8-bit moments, ReLoRA (frozen bf16 base + merges), SLTrain (sparse values), Muon, OSP, INT4.
MODES = ["full_rank", "low_rank_restarts", "lowrank_sparse", "galore", "fira", "apollo", "spam", "stable_spam",
         "lowrank_sparse_8bit", "relora", "sltrain", "muon", "osp"]
SHORT_CYCLES = {"restarts.cycle_length": 4, "restarts.rewarmup_steps": 1}


def config(corpus, tmp_path, **kwargs):
    """test_train's tiny run with bf16 storage."""
    return train_config(corpus, tmp_path, **{"param_dtype": "bf16", **kwargs})


def final_weights(summary):
    checkpoints = Path(summary["run_dir"]) / "checkpoints"
    return load_file(checkpoints / (checkpoints / "latest").read_text().strip() / "model.safetensors")


@pytest.mark.parametrize("method", MODES)
def test_every_optimizer_mode_trains_in_bf16(method, corpus, tmp_path):
    preset = load_method(method)
    overrides = dict(SHORT_CYCLES) if preset.restarts else {}
    if method == "relora":
        overrides["lowrank.warm_start_steps"] = 2
    if preset.optimizer.name == "muon":
        overrides["optimizer.lr"] = 2 * preset.optimizer.lr  # as in test_every_preset_learns
    if method == "spam":
        overrides.update({"optimizer.matrix.reset_warmup": 2, "optimizer.other.reset_warmup": 2})
    summary = pretrain(config(corpus, tmp_path, method=method, overrides=overrides, max_steps=16))
    assert summary["param_dtype"] == "bfloat16" and summary["precision"] == "fp32"  # fp32 compute on a CPU
    curve = losses(summary["run_dir"])
    assert all(map(torch.isfinite, torch.tensor(curve)))
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    weights = final_weights(summary)
    # Every floating tensor is stored in bf16: trainable, frozen (ReLoRA's base) and SLTrain's values.
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}, method
    state = torch.load(Path(summary["run_dir"]) / "checkpoints" / "step_00000016" / "optimizer.pt", weights_only=True)
    moments = [v for s in state["state"].values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq", "momentum_buffer")]
    # The optimizer's arithmetic and its (full-precision) moments are fp32, not bf16.
    assert moments and all(m.dtype in (torch.float32, torch.uint8, torch.int8) for m in moments), method


def test_bf16_resume_is_bit_identical(corpus, tmp_path):
    options = dict(method="lowrank_sparse", overrides=dict(SHORT_CYCLES), save_every=5, max_steps=10)
    full = pretrain(config(corpus, tmp_path / "full", **options))
    # Resume the step-5 checkpoint in a fresh folder: the rounding noise of steps 6-10 must repeat.
    step5 = Path(full["run_dir"]) / "checkpoints" / "step_00000005"
    resumed = pretrain(config(corpus, tmp_path / "resumed", resume=str(step5), **options))
    assert resumed["parameter_hashes"] == full["parameter_hashes"]
    assert losses(resumed["run_dir"])[-5:] == losses(full["run_dir"])[-5:]


def test_stochastic_rounding_keeps_updates_that_nearest_rounding_loses(corpus, tmp_path):
    # An lr so small that each AdamW step (±lr per entry) is far below half a bf16 ulp of most weights.
    lr = 2e-6
    options = dict(method="full_rank", rank=None, max_steps=6, lr=lr)
    start = pretrain(config(corpus, tmp_path / "start", **{**options, "max_steps": 1, "lr": 1e-12}))
    nearest = pretrain(config(corpus, tmp_path / "nearest", overrides={"training.bf16_rounding": "nearest"}, **options))
    stochastic = pretrain(config(corpus, tmp_path / "stochastic", **options))
    before, after_nearest, after_stochastic = (final_weights(s) for s in (start, nearest, stochastic))
    name = next(k for k in before if k.endswith("mlp.up_proj.weight"))
    w0 = before[name].float()
    big = w0.abs() > 2 * 2**8 * lr * 6  # entries whose half-ulp exceeds the whole run's movement
    assert big.sum() > 100
    moved_nearest = (after_nearest[name].float() != w0)[big].float().mean()
    moved_stochastic = (after_stochastic[name].float() != w0)[big].float().mean()
    assert moved_nearest == 0.0
    assert moved_stochastic > 0.005  # ≈ 6·lr / ulp of the entries: a few percent move by one ulp


def test_bf16_run_exports_bf16_safetensors_that_transformers_loads(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowrank.integrations import export_model

    summary = pretrain(config(corpus, tmp_path, method="relora", max_steps=6,
                              overrides={**SHORT_CYCLES, "lowrank.warm_start_steps": 2}))
    result = export_model(summary["run_dir"], tmp_path / "exported")
    assert result["dtype"] == "bfloat16"
    tensors = load_file(next((tmp_path / "exported").glob("*.safetensors")))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", torch_dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.isfinite(model(ids).logits.float()).all()


def test_bf16_with_an_optimizer_factory_is_refused(corpus, tmp_path):
    with pytest.raises(UsageError, match="per-parameter step"):
        pretrain(config(corpus, tmp_path, optimizer_factory=lambda model, method: torch.optim.SGD(model.parameters(), lr=0.1)))


def test_unknown_param_dtype_is_one_line(corpus, tmp_path):
    with pytest.raises(UsageError, match="--param-dtype must be one of fp32, bf16"):
        pretrain(config(corpus, tmp_path, param_dtype="fp16"))
