"""lowrank.osp (Single-Scale RMSNorm, embedding projections, fold for export) and the
hidden-state statistics / quant-eval of lowrank.quant.evaluate."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from test_integrations import WITHOUT_LOWRANK
from tiny_models import build, logits, tokens
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lowrank import LowRankConfig, wrap
from lowrank import osp
from lowrank.cli.quant import add_quant_eval_arguments, run_quant_eval
from lowrank.data import load_tokenizer
from lowrank.errors import UsageError
from lowrank.quant.evaluate import evaluate_quantization, excess_kurtosis, hidden_state_statistics, plain_model


def tiny(arch, vocab=96, tie=False, seed=0):
    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()


def train_steps(model, steps=8, seed=0, lr=1e-2):
    """A few AdamW steps on random tokens; returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = tokens(4, 16, seed=seed)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


# ---------------------------------------------------------------------- the transform


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_apply_makes_single_scale_norms_and_orthogonal_seeded_projections(arch):
    model = osp.apply(build(arch), seed=5)
    norms = [m for m in model.modules() if isinstance(m, osp.SingleScaleRMSNorm)]
    assert len(norms) == 2 * 2 + 1  # input and post-attention norm per block, plus the final norm
    assert all(n.weight.shape == (1,) and n.variance_epsilon == model.config.rms_norm_eps for n in norms)
    assert not [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and not isinstance(m, osp.SingleScaleRMSNorm)]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, osp.ProjectedEmbedding) and isinstance(head, osp.ProjectedHead)
    for P in (embed.projection, head.projection):
        assert P.shape == (32, 32) and P.requires_grad
        torch.testing.assert_close(P.T @ P, torch.eye(32), atol=1e-5, rtol=0)
    assert not torch.allclose(embed.projection, head.projection)
    again = osp.apply(build(arch), seed=5)
    assert torch.equal(again.get_input_embeddings().projection, embed.projection)
    assert not torch.equal(osp.apply(build(arch), seed=6).get_input_embeddings().projection, embed.projection)
    keys = set(model.state_dict())
    assert {"model.embed_tokens.projection", "lm_head.projection", "model.norm.weight"} <= keys
    assert model(tokens()).logits.shape == (2, 12, 96) and osp.is_osp(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_osp_model_trains_and_fold_keeps_the_logits(arch):
    model = osp.apply(tiny(arch))
    model, losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.3
    gains = [m.weight.item() for m in model.modules() if isinstance(m, osp.SingleScaleRMSNorm)]
    assert any(abs(g - 1) > 1e-3 for g in gains)  # the scalar gains trained
    projection = model.get_input_embeddings().projection.detach()
    assert (projection.T @ projection - torch.eye(32)).abs().max() > 1e-3  # and the projections moved
    ids = tokens(3, 20, seed=4)
    before = logits(model, ids)
    folded = osp.fold(model)
    assert folded is model and not osp.is_osp(model)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding and type(model.get_output_embeddings()) is torch.nn.Linear
    assert all(m.weight.shape == (32,) for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-5)


def test_folded_model_loads_in_plain_transformers_without_lowrank(corpus, tmp_path):
    model, _ = train_steps(osp.apply(tiny("llama", vocab=corpus["vocab"]), seed=1), steps=3)
    ids = torch.randint(0, corpus["vocab"], (2, 24), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    osp.fold(model).save_pretrained(tmp_path / "folded")
    load_tokenizer(corpus["tokenizer"]).save_pretrained(tmp_path / "folded")
    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert config["model_type"] == "llama" and not [k for k in config if "osp" in k.lower() or "lowrank" in k.lower()]
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_LOWRANK, str(tmp_path / "folded"), str(tmp_path / "ids.pt"),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_train_tied_and_are_untied_on_fold(tmp_path):
    model = osp.apply(tiny("qwen2", tie=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # OSP trains with the tie
    model, _ = train_steps(model, steps=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokens(2, 16, seed=3)
    expected = logits(model, ids)
    osp.fold(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and model.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "untied")
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "untied").eval()
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-4, atol=1e-5)
    # Norms only: nothing forces an untie, so the tie is kept.
    norms_only = osp.fold(osp.apply(tiny("llama", tie=True), embedding_projection=False))
    assert norms_only.lm_head.weight is norms_only.model.embed_tokens.weight and norms_only.config.tie_word_embeddings


def test_unknown_architecture_and_misuse_are_one_line_errors():
    with pytest.raises(UsageError) as error:
        osp.apply(build("gpt2"))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "llama" in message and "qwen2" in message and "gpt2" in message
    model = osp.apply(build("llama"))
    with pytest.raises(UsageError, match="already"):
        osp.apply(model)
    with pytest.raises(UsageError, match="nothing to do"):
        osp.apply(build("llama"), single_scale_norm=False, embedding_projection=False)
    with pytest.raises(ValueError, match="no OSP parts"):
        osp.fold(build("llama"))


def test_plain_model_merges_a_wrapped_osp_model_and_folds_it():
    model = wrap(osp.apply(build("llama")), LowRankConfig(rank=4))
    ids = tokens()
    plain = plain_model(model)
    assert plain is not model and not osp.is_osp(plain) and osp.is_osp(model)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_osp_preset_trains_the_embedding_projections_with_muon():
    """OSP's README: the projections are optimized by Muon, the embedding tables by AdamW."""
    from lowrank.methods import apply_method, build_optimizer, load_method

    model = apply_method(tiny("llama"), load_method("osp"))
    optimizer = build_optimizer(model, load_method("osp"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.param_groups if not g["use_muon"] for p in g["params"]}
    assert {"model.embed_tokens.projection", "lm_head.projection"} <= muon
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= adamw and not muon & adamw
    assert len(muon | adamw) == len(list(model.parameters()))
    assert osp.projections(tiny("llama")) == [] and len(osp.projections(osp.apply(tiny("llama"), embedding_projection=True))) == 2


# ---------------------------------------------------------------------- kurtosis


def test_excess_kurtosis_is_osps_formula():
    x = torch.tensor([[1.0, 2.0, 3.0, 10.0], [1.0, -1.0, 1.0, -1.0]])
    fourth = x.pow(4).mean(-1)  # not centred
    std = torch.tensor([x[0].std().item(), x[1].std().item()])  # unbiased, d - 1
    torch.testing.assert_close(excess_kurtosis(x, clamp=False), fourth / std**4 - 3)
    assert excess_kurtosis(x, clamp=False)[1] < 0 and excess_kurtosis(x)[1] == 0  # clamped per token


def test_kurtosis_of_known_distributions():
    """4096 channels, 2048 tokens: Gaussian ≈ 0 (the clamp adds ~0.4·sqrt(24/d) ≈ 0.03; tolerance
    0.08), Laplace ≈ 3 (per-token sd ≈ 0.8, so the mean over 2048 tokens is within ~0.05; tolerance 0.15)."""
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(2048, 4096, generator=generator)
    assert 0 <= excess_kurtosis(gaussian).mean().item() < 0.08
    assert abs(excess_kurtosis(gaussian, clamp=False).mean().item()) < 0.03
    uniform = torch.rand(2048, 4096, generator=generator) - 0.5
    laplace = -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())
    assert abs(excess_kurtosis(laplace).mean().item() - 3.0) < 0.15


def test_hidden_state_statistics_hook_every_decoder_layer_output():
    model, ids = build("llama"), tokens(2, 12)
    stats = hidden_state_statistics(model, [ids])
    first_layer = model(ids, output_hidden_states=True).hidden_states[1].detach()  # embeddings, layer 0, final norm
    assert len(stats["layers"]) == 2
    assert stats["layers"][0]["kurtosis"] == pytest.approx(excess_kurtosis(first_layer).mean().item(), rel=1e-5)
    assert stats["layers"][0]["max_abs"] == pytest.approx(first_layer.abs().max().item(), rel=1e-6)
    assert stats["kurtosis"] == pytest.approx(sum(r["kurtosis"] for r in stats["layers"]) / 2)
    assert stats["max_abs"] == max(r["max_abs"] for r in stats["layers"])


def outlier_model():
    """A tiny LLaMA whose residual stream carries outlier channels: channel 3 of the embedding
    table and of every block's MLP output scaled up."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] *= 30
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[3] *= 40
            layer.self_attn.o_proj.weight[7] *= 25
    return model


def reference_osp_kurtosis(model, ids):
    """OSP's evaluate_kurtosis.py, written out: each sequence's tokens as a batch of length-1
    sequences, every hidden state's mean clamped kurtosis, averaged over (sequence, state)."""
    values = []
    with torch.no_grad():
        for seq in ids:
            for hidden in model(seq.unsqueeze(1), output_hidden_states=True).hidden_states:
                x = hidden.float()
                values.append(((x**4).mean(-1) / x.std(-1) ** 4 - 3).relu().mean().item())
    return sum(values) / len(values)


def test_kurtosis_protocol_osp_is_the_reference_procedure_and_differs_from_ours(capsys):
    model, ids = outlier_model(), tokens(3, 16, seed=4)
    ours = hidden_state_statistics(model, [ids[:2], ids[2:]])
    theirs = hidden_state_statistics(model, [ids[:2], ids[2:]], protocol="osp")
    assert ours["kurtosis_protocol"] == "ours" and theirs["kurtosis_protocol"] == "osp"
    assert len(ours["layers"]) == 2 and len(theirs["layers"]) == 3  # embedding, layer 1, final-normed last state
    assert theirs["kurtosis"] == pytest.approx(reference_osp_kurtosis(model, ids), rel=1e-5)
    assert ours["kurtosis"] > 3 and abs(ours["kurtosis"] - theirs["kurtosis"]) > 0.05 * ours["kurtosis"]
    print(f"toy model with outlier channels: kurtosis ours {ours['kurtosis']:.2f}, osp protocol {theirs['kurtosis']:.2f}")
    with pytest.raises(UsageError, match="kurtosis-protocol"):
        hidden_state_statistics(model, [ids], protocol="paper")


def test_evaluate_quantization_schemes_and_group_size_error():
    model, _ = train_steps(tiny("llama"), steps=20)
    result = evaluate_quantization(model, tokens(4, 16, seed=0), batch_size=2, group_size=16)
    rows = result["schemes"]
    assert list(rows) == ["fp", "w4", "w3", "w2", "w4a4", "w8a8"] and result["tokens"] == 64
    assert rows["w4"]["weights"] == "int4-g16" and rows["w4a4"]["activations"] == "int4-row"
    assert rows["fp"]["ppl"] < rows["w4"]["ppl"] < rows["w2"]["ppl"] and rows["w8a8"]["ppl"] < rows["w4a4"]["ppl"]
    assert abs(rows["w8a8"]["loss"] - rows["fp"]["loss"]) < 0.05
    torch.testing.assert_close(logits(model, tokens()), logits(model, tokens()))  # fake quantization removed again
    assert not [m for m in model.modules() if "FakeQuant" in type(m).__name__]
    with pytest.raises(UsageError) as error:
        evaluate_quantization(model, tokens(2, 16), group_size=24)
    assert len(str(error.value).splitlines()) == 1 and "does not divide" in str(error.value)


# ---------------------------------------------------------------------- quant-eval from the command line


def quant_eval(*argv):
    parser = argparse.ArgumentParser()
    add_quant_eval_arguments(parser)
    return run_quant_eval(parser.parse_args([str(a) for a in argv]))


def test_quant_eval_cli_on_an_exported_osp_model(corpus, tmp_path, capsys):
    model = osp.fold(osp.apply(tiny("llama", vocab=corpus["vocab"])))
    model.save_pretrained(tmp_path / "model")
    load_tokenizer(corpus["tokenizer"]).save_pretrained(tmp_path / "model")
    result = quant_eval(tmp_path / "model", "--data", corpus["data"], "--json", tmp_path / "q.json", "--eval-tokens", 256,
                        "--seq-len", 32, "--batch-size", 4, "--group-size", 32, "--device", "cpu",
                        "--kurtosis-protocol", "osp")
    table = capsys.readouterr().out
    assert result["kurtosis_protocol"] == "osp" and len(result["layers"]) == 3 and "(osp protocol)" in table
    assert "excess kurtosis" in table and "w4a4" in table and "w2" in table
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["schemes"].keys() == result["schemes"].keys() and saved["tokens"] == 256 and saved["model"]["source"] == "hf"
    with pytest.raises(UsageError) as error:
        quant_eval(tmp_path / "empty-run", "--data", corpus["data"])
    assert "no such folder" in str(error.value)
    (tmp_path / "run").mkdir()
    with pytest.raises(UsageError) as error:
        quant_eval(tmp_path / "run", "--data", corpus["data"])
    assert "holds no checkpoint" in str(error.value) and len(str(error.value).splitlines()) == 1
