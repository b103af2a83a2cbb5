"""lowrank.quant.apiq / lowrank.quant.ptq: the quantized low-rank layer, ApiQ's closed-form
initialisation, retraining with the saliency-aware regularizer, export (dense and PEFT), the
`quantize` command-line function and its one-line errors."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import build, logits, tokens
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowrank.cli.quant import add_quant_eval_arguments, add_quantize_arguments, run_quant_eval, run_quantize
from lowrank.data import build_data
from lowrank.errors import UsageError
from lowrank.integrations.peft import dense_base_model, save_peft_adapter
from lowrank.quant import QuantFormat, fake_quantize, quantize as quantize_tensor
from lowrank.quant.apiq import LayerStatistics, QuantizedBase, QuantizedLowRankLinear, apiq_factors, output_error
from lowrank.quant.clipping import CLIP_INIT, LearnedClipBase, clipped_quantize
from lowrank.quant.ptq import dequantized_model, peft_model, quantize, quantized_layers
from lowrank.quant.recipes import RECIPES
from lowrank.quant.saliency import FisherRegularizer, fisher_scores
from lowrank.train import TrainConfig, pretrain

GROUP, RANK = 16, 4


def sample(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- formats and the quantized layer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_formats_round_trip_within_half_a_step(bits, symmetric):
    fmt = QuantFormat("int", bits, GROUP, symmetric=symmetric)
    weight = sample(24, 64) * 0.05
    q = quantize_tensor(weight, fmt)
    codes = q.codes.long()
    assert q.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert fmt.qmin <= codes.min() and codes.max() <= fmt.qmax
    if bits == 2:
        assert (fmt.qmin, fmt.qmax) == ((-1, 1) if symmetric else (0, 3))
    base = QuantizedBase.from_weight(weight, fmt)
    assert torch.equal(base.weight(), fake_quantize(weight, fmt))
    step = base.scale.repeat_interleave(GROUP, dim=1)
    assert ((base.weight() - weight).abs() <= step / 2 + 1e-7).all()


def test_quantized_layer_computes_q_plus_factors_and_its_state_dict_round_trips(tmp_path):
    linear = nn.Linear(32, 24)
    fmt = QuantFormat("int", 3, GROUP, symmetric=False)
    layer = QuantizedLowRankLinear.from_linear(linear, RANK, fmt, alpha=8.0)
    with torch.no_grad():
        layer.B.copy_(sample(24, RANK, seed=1) * 0.1)
    x = sample(5, 32, seed=2)
    q_weight = fake_quantize(linear.weight.detach(), fmt)
    expected = x @ (q_weight + 2.0 * layer.B @ layer.A).T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.dense_weight(), q_weight + 2.0 * (layer.B @ layer.A).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.to_dense()(x), expected, rtol=1e-5, atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["A", "B"]
    state = layer.state_dict()
    assert {"quantized_base.codes", "quantized_base.scale", "quantized_base.zero"} <= set(state)
    assert state["quantized_base.codes"].dtype == torch.uint8 and "base_weight" not in state
    torch.save(state, tmp_path / "layer.pt")
    other = QuantizedLowRankLinear.from_linear(nn.Linear(32, 24), RANK, fmt, alpha=8.0)
    other.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
    torch.testing.assert_close(other(x), layer(x))
    torch.testing.assert_close(layer.to_lowrank_linear()(x), layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot merge"):
        layer.merge()


# ---------------------------------------------------------------------- learned clipping


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("flat", [True, False])
def test_clipping_at_full_range_is_rtn_and_the_frozen_codes_are_the_learned_values(symmetric, flat):
    weight = sample(12, 32, seed=3)
    fmt = QuantFormat("int", 2, GROUP, symmetric=symmetric, flat=flat)
    rtn = quantize_tensor(weight, fmt)
    full = torch.full(rtn.scale.shape, 40.0)  # σ(40) = 1 in float32: no clipping
    values, codes = clipped_quantize(weight, fmt, full, full)
    assert torch.equal(codes.codes, rtn.codes) and torch.allclose(codes.scale, rtn.scale)
    assert (codes.zero is None) == symmetric and (symmetric or torch.equal(codes.zero, rtn.zero))
    torch.testing.assert_close(values, fake_quantize(weight, fmt))
    base = LearnedClipBase(weight, fmt)
    assert base.up.shape == rtn.scale.shape and float(base.up.detach().flatten()[0]) == CLIP_INIT
    (base.weight() - weight).square().sum().backward()  # the gradient reaches the bound factors (through s)
    assert base.up.grad.abs().sum() > 0 and base.low.grad.abs().sum() > (0 if not symmetric else -1)
    frozen = base.freeze()
    assert isinstance(frozen, QuantizedBase) and torch.equal(frozen.weight(), base.weight().detach())


# ---------------------------------------------------------------------- ApiQ's closed form


def statistics(x_q, x):
    stats = LayerStatistics(x.shape[1])
    stats.add(x_q, x)
    return stats


def test_apiq_closed_form_is_the_h_weighted_best_rank_r_correction():
    """With X_q = X and no damping: L = U_r Σ_r V_rᵀ H^-½ from the SVD of (W − Q) H^½, whose error
    is the discarded singular values' energy; no perturbation of the factors does better."""
    W, X = sample(12, 16, seed=0), sample(300, 16, seed=1) * torch.linspace(0.2, 3, 16)
    Q = fake_quantize(W, QuantFormat("int", 2, 8, symmetric=False))
    stats = statistics(X, X)
    B, A = apiq_factors(W, Q, stats, rank=3, damp=1e-12)
    H = X.double().T @ X.double()
    eigenvalues, vectors = torch.linalg.eigh(H)
    root = (vectors * eigenvalues.sqrt()) @ vectors.T
    u, sigma, v_t = torch.linalg.svd((W - Q).double() @ root)
    expected = u[:, :3] @ torch.diag(sigma[:3]) @ v_t[:3] @ torch.linalg.inv(root)
    torch.testing.assert_close(B @ A, expected, rtol=1e-6, atol=1e-8)
    reference = ((X @ W.T).double() ** 2).sum()
    assert output_error(W, Q + B @ A, stats) == pytest.approx(float((sigma[3:] ** 2).sum() / reference), rel=1e-6)
    direct = ((X.double() @ (W - Q - B @ A).T) ** 2).sum() / reference
    assert output_error(W, Q + B @ A, stats) == pytest.approx(float(direct), rel=1e-6)
    best = output_error(W, Q + B @ A, stats)
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        B2 = B + 1e-3 * torch.randn(B.shape, generator=generator, dtype=B.dtype)
        A2 = A + 1e-3 * torch.randn(A.shape, generator=generator, dtype=A.dtype)
        assert output_error(W, Q + B2 @ A2, stats) >= best


def test_apiq_matches_the_full_precision_output_on_the_quantized_input():
    """X_q ≠ X: at full rank the factors solve the ridge regression of X Wᵀ on X_q exactly (the
    gradient of ‖X Wᵀ − X_q Mᵀ‖² + δ‖L‖² vanishes); the error beats RTN's and (W − Q)'s fit."""
    W, X = sample(10, 16, seed=4), sample(400, 16, seed=5)
    X_q = X + 0.1 * sample(400, 16, seed=6)
    Q = fake_quantize(W, QuantFormat("int", 3, 8, symmetric=False))
    stats = statistics(X_q, X)
    damp = 0.01
    B, A = apiq_factors(W, Q, stats, rank=10, damp=damp)
    L, M = B @ A, Q.double() + B @ A
    delta = damp * stats.gram_q.diagonal().mean()
    gradient = -2 * (X.double() @ W.double().T - X_q.double() @ M.T).T @ X_q.double() + 2 * delta * L
    assert gradient.abs().max() < 1e-8 * (X.double() @ W.double().T).abs().max() * len(X)
    error = output_error(W, M, stats)
    assert error < output_error(W, Q, stats) / 2
    naive = output_error(W, W, stats)  # what reproducing W exactly would leave: the input error alone
    assert error < naive


# ---------------------------------------------------------------------- quantize on a trained tiny model


@pytest.fixture(scope="module")
def trained(corpus):
    """A tiny LLaMA trained for a while on the corpus, and calibration / held-out batches."""
    data = build_data(corpus["data"], seq_len=32, batch_size=8, tokenizer=corpus["tokenizer"],
                      cache_dir=Path(corpus["data"]) / "cache", max_valid_tokens=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=corpus["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        ids = next(data.train)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    calibration = torch.cat([next(data.train) for _ in range(2)])
    return model.eval(), calibration, data.valid


def options(**overrides):
    return {"bits": 2, "group_size": GROUP, "rank": RANK, "batch_size": 8, "steps": 0, **overrides}


def test_apiq_init_beats_rtn_layer_by_layer_and_on_the_calibration_loss(trained):
    model, calibration, _ = trained
    before = logits(model, calibration[:2])
    rtn, rtn_report = quantize(model, calibration, method="rtn", **options())
    apiq, report = quantize(model, calibration, method="apiq", **options())
    torch.testing.assert_close(logits(model, calibration[:2]), before)  # the input model is left alone
    assert len(quantized_layers(apiq)) == len(report["layers"]) == 14 and rtn_report["layers"] == {}
    for name, row in report["layers"].items():
        assert row["apiq_error"] < row["rtn_error"], name
    assert report["blocks"] == [] and report["retraining"]["lr"] is None
    assert report["calibration_loss"]["quantized"] < rtn_report["calibration_loss"]["quantized"]
    # The first layer's error, recomputed from its inputs (there X_q = X: nothing before it is quantized).
    captured = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(calibration)
    handle.remove()
    X = torch.cat(captured).reshape(-1, 64).double()
    W = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    M = apiq.model.layers[0].self_attn.q_proj.dense_weight().double()
    direct = ((X @ (W - M).T) ** 2).sum() / ((X @ W.T) ** 2).sum()
    assert report["layers"]["model.layers.0.self_attn.q_proj"]["apiq_error"] == pytest.approx(float(direct), rel=1e-3)


@pytest.mark.parametrize("method, saliency", [("apiq", "activation"), ("apiq+saliency", "activation"), ("apiq+saliency", "gradient")])
def test_retraining_lowers_every_block_loss(trained, method, saliency):
    model, calibration, _ = trained
    init_only, init_report = quantize(model, calibration, method=method, **options(bits=3))
    _, report = quantize(model, calibration, method=method, saliency=saliency, **options(bits=3, steps=12, lr=3e-3))
    first = [name for name in init_report["layers"] if name.startswith("model.layers.0.")]
    assert first and all(report["layers"][n] == init_report["layers"][n] for n in first)  # the same closed-form start
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    for block in report["blocks"]:
        losses = [row["loss"] for row in block["history"]]
        assert len(losses) == 12 and block["final"] < block["initial"]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
        penalties = [row["regularizer"] for row in block["history"]]
        assert (penalties == [None] * 12) if method == "apiq" else all(p > 0 for p in penalties)
    assert report["retraining"]["saliency"] == (None if method == "apiq" else saliency)


def test_learned_clipping_lowers_the_2bit_block_error_vs_frozen_rtn_codes(trained, capsys):
    """ApiQ's learned clipping, trained with the factors, against frozen round-to-nearest codes:
    the same init, steps and batches; every block's output error ends lower (2 bits, groups of 16)."""
    model, calibration, _ = trained
    common = options(steps=40, lr=3e-3)
    _, frozen = quantize(model, calibration, method="apiq", clipping="frozen", **common)
    learned_model, learned = quantize(model, calibration, method="apiq", clipping="learned", **common)
    assert learned["retraining"]["settings"]["clipping"] == "learned" and frozen["retraining"]["settings"]["clipping"] == "frozen"
    finals = [(f["final"], l["final"]) for f, l in zip(frozen["blocks"], learned["blocks"])]
    with capsys.disabled():
        print("\n2-bit block output error, frozen RTN codes vs learned clipping: "
              + ", ".join(f"block {i}: {f:.4f} vs {l:.4f}" for i, (f, l) in enumerate(finals)))
    assert all(l < f for f, l in finals)
    assert learned["calibration_loss"]["quantized"] < frozen["calibration_loss"]["quantized"]
    # The learned clipping is stored as integer codes: no full-precision weight or logits remain.
    state = learned_model.state_dict()
    assert not [k for k in state if k.endswith((".full", ".up", ".low"))] and any(k.endswith("codes") for k in state)
    layer = learned_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.quantized_base, QuantizedBase)
    assert not torch.equal(layer.quantized_base.weight(), fake_quantize(model.model.layers[0].self_attn.q_proj.weight.detach(),
                                                                        layer.quantized_base.fmt))


def test_published_saliency_is_the_default_fisher_weight_preservation(trained):
    """The published regularizer: λ Σ g²·(Q(W) − W)² on the learned-clipping Q(W) before LoRA,
    trained alone in the first 75% of the steps (the factors do not move there), then the output
    loss alone; g² the per-sequence squared gradients."""
    model, calibration, _ = trained
    steps = 8
    quantized, report = quantize(model, calibration, **options(steps=steps, lr=3e-3))
    assert report["method"] == "apiq+saliency" and report["retraining"]["saliency"] == "fisher"
    assert report["retraining"]["settings"]["weight_preservation"] == 0.75
    for block in report["blocks"]:
        phases = [row["phase"] for row in block["history"]]
        assert phases == ["weight"] * 6 + ["output"] * 2
        assert all(row["loss"] is None and row["regularizer"] > 0 for row in block["history"][:6])
        assert all(row["loss"] > 0 and row["regularizer"] is None for row in block["history"][6:])
        weights = [row["regularizer"] for row in block["history"][:6]]
        assert weights[-1] < weights[0]  # weight preservation lowers Σ g²(Q − W)²
    # g²: the sum over calibration sequences of each sequence's squared gradient.
    name = "model.layers.1.mlp.down_proj"
    fisher = fisher_scores(model, [name], [calibration[:3]])[name]
    weight = model.get_submodule(name).weight
    expected = torch.zeros_like(weight)
    for row in calibration[:3]:
        grad, = torch.autograd.grad(model(input_ids=row[None], labels=row[None]).loss, weight)
        expected += grad.square()
    torch.testing.assert_close(fisher, expected, rtol=1e-4, atol=1e-12)
    # R itself, on a learned-clipping layer: Σ F (Q(W) − W)², independent of the factors.
    layer = QuantizedLowRankLinear.from_linear(model.get_submodule(name), RANK, QuantFormat("int", 2, GROUP, symmetric=False),
                                               clipping="learned")
    with torch.no_grad():
        layer.B.normal_()
    penalty = FisherRegularizer({"down": layer}, {"down": fisher})()
    q_weight = clipped_quantize(weight.detach(), layer.quantized_base.fmt, layer.quantized_base.up, layer.quantized_base.low)[0]
    torch.testing.assert_close(penalty, (fisher * (q_weight - weight.detach()).square()).sum())
    penalty.backward()
    assert layer.B.grad is None and layer.quantized_base.up.grad.abs().sum() > 0
    with pytest.raises(UsageError, match="learned clipping"):
        quantize(model, calibration, **options(steps=2, clipping="frozen"))


def test_our_saliency_form_stays_a_named_alternative(trained):
    model, calibration, _ = trained
    _, report = quantize(model, calibration, saliency="activation", **options(steps=4, clipping="frozen"))
    assert report["retraining"]["saliency"] == "activation"
    for block in report["blocks"]:  # added to the output loss at every step
        assert all(row["phase"] == "output" and row["loss"] > 0 and row["regularizer"] > 0 for row in block["history"])


def test_recipe_apiq_is_the_released_configuration(trained):
    model, calibration, _ = trained
    apiq = RECIPES["apiq"]
    assert (apiq.epochs, apiq.lr, apiq.weight_decay, apiq.scale, apiq.loss, apiq.group_size[2]) == (20, 5e-4, 0.1, 0.25, "mse", 64)
    assert (apiq.calib_tokens, apiq.batch_size, apiq.clip_lr, apiq.clip_weight_decay) == (128 * 2048, 1, 5e-3, 0.1)
    assert (apiq.schedule, apiq.grad_clip, apiq.init, apiq.aug_loss, apiq.clipping) == ("constant", None, "lora", True, "learned")
    ours = RECIPES["ours"]
    assert (ours.steps, ours.lr, ours.scale, ours.loss, ours.group_size[2], ours.init) == (200, 1e-3, 1.0, "relative", 128, "closed_form")
    # 2 epochs over the 16 calibration sequences, one per step: 32 steps per block; group 64 at 2 bits.
    _, report = quantize(model, calibration[:16], bits=2, rank=RANK, recipe="apiq", method="apiq", epochs=2)
    assert report["recipe"] == "apiq" and report["group_size"] == 64 and report["format"] == "int2-g64-asym"
    assert report["calibration"]["batches"] == 16 and report["retraining"]["steps_per_block"] == 32
    assert report["alpha"] == RANK * 0.25 and report["retraining"]["lr"] == 5e-4
    init = [row for name, row in report["layers"].items()]
    assert all(row["apiq_error"] == pytest.approx(row["rtn_error"], rel=0.5) for row in init)  # B = 0: the base alone
    for block in report["blocks"]:
        assert len(block["history"]) == 32 and block["final"] < block["initial"]
    with pytest.raises(UsageError, match="--recipe"):
        quantize(model, calibration, bits=2, recipe="omniquant")
    with pytest.raises(UsageError, match="unknown option"):
        quantize(model, calibration, bits=2, epoch=3)


def test_export_is_a_plain_dense_model_and_a_peft_adapter_with_the_same_logits(trained, tmp_path):
    model, calibration, _ = trained
    quantized, _ = quantize(model, calibration, method="apiq+saliency", **options(bits=3, steps=2))
    ids = calibration[:2]
    expected = logits(quantized, ids)
    dequantized_model(quantized).save_pretrained(tmp_path / "dense")
    keys = load_file(tmp_path / "dense" / "model.safetensors")
    assert not [k for k in keys if k.endswith((".A", ".B", "codes", "scale", "zero", "base_weight"))]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(logits(dense, ids), expected, rtol=1e-4, atol=1e-5)
    adapter = peft_model(quantized)
    dense_base_model(adapter).save_pretrained(tmp_path / "base")
    save_peft_adapter(adapter, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-4, atol=1e-5)


def test_bad_input_is_one_line(trained):
    model, calibration, _ = trained

    def error(**kwargs):
        with pytest.raises(UsageError) as caught:
            quantize(model, calibration[:2], **{**options(), **kwargs})
        assert len(str(caught.value).splitlines()) == 1, caught.value
        return str(caught.value)

    assert "--bits must be one of 2, 3, 4, 8" in error(bits=5)
    assert "--bits" in error(bits=1)
    assert "does not divide" in error(group_size=24)
    assert "--method" in error(method="gptq")
    assert "rank" in error(rank=65)
    with pytest.raises(UsageError, match="nn.Linear"):
        quantize(build("gpt2"), tokens(2, 8), **options())


# ---------------------------------------------------------------------- the command line


def cli(add, run, *argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    """A two-step `lowrank pretrain` run of a wrapped (low-rank) tiny LLaMA."""
    out = tmp_path_factory.mktemp("quant-runs") / "low_rank"
    pretrain(TrainConfig(method="low_rank", model="tiny", data=corpus["data"], tokenizer=corpus["tokenizer"], rank=8,
                         batch_size=2, seq_len=32, max_steps=2, eval_every=0, eval_tokens=256, progress=False, plot=False,
                         out=str(out)))
    return out


def test_quantize_and_quant_eval_cli_on_a_run_folder(run_dir, corpus, tmp_path, capsys):
    out = tmp_path / "quantized"
    report = cli(add_quantize_arguments, run_quantize, run_dir, "--bits", 3, "--data", corpus["data"], "--out", out,
                 "--rank", RANK, "--group-size", GROUP, "--calib-tokens", 256, "--steps", 3, "--batch-size", 4,
                 "--eval-tokens", 256, "--peft", "--device", "cpu", "--json", tmp_path / "report.json")
    printed = capsys.readouterr().out
    assert "int3-g16-asym" in printed and "validation ppl" in printed
    assert report["model"]["source"] == "run" and report["layers_quantized"] == 14
    saved = json.loads((out / "quantize.json").read_text())
    assert saved["method"] == "apiq+saliency" and json.loads((tmp_path / "report.json").read_text())["export"]
    dense = AutoModelForCausalLM.from_pretrained(out).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "peft" / "base"), out / "peft" / "adapter").eval()
    ids = torch.randint(0, corpus["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(peft, ids), logits(dense, ids), rtol=1e-4, atol=1e-5)
    assert (out / "tokenizer.json").is_file()
    # quant-eval reads the run folder (wrapped: merged to dense) and the quantized export alike.
    for source in (run_dir, out):
        result = cli(add_quant_eval_arguments, run_quant_eval, source, "--data", corpus["data"], "--eval-tokens", 128,
                     "--seq-len", 32, "--group-size", GROUP, "--device", "cpu")
        assert result["schemes"]["fp"]["ppl"] > 1
    with pytest.raises(UsageError, match="exists and is not empty"):
        cli(add_quantize_arguments, run_quantize, run_dir, "--bits", 3, "--data", corpus["data"], "--out", out)


def test_quantize_cli_errors_are_one_line(run_dir, corpus, tmp_path):
    def error(*argv):
        with pytest.raises(UsageError) as caught:
            cli(add_quantize_arguments, run_quantize, *argv)
        assert len(str(caught.value).splitlines()) == 1, caught.value
        return str(caught.value)

    (tmp_path / "empty").mkdir()
    common = ("--data", corpus["data"], "--out", tmp_path / "x", "--device", "cpu")
    assert "holds no checkpoint" in error(tmp_path / "empty", "--bits", 3, *common)
    assert "--bits must be one of" in error(run_dir, "--bits", 6, *common)
    assert "does not divide" in error(run_dir, "--bits", 3, "--group-size", 48, "--calib-tokens", 64, "--seq-len", 32, *common)
    assert not (tmp_path / "x").exists()
