"""wrap() on real Hugging Face architectures: events preserve logits, targets match PEFT's,
the model saves, loads, generates, compiles and exports to plain transformers."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lowrank
from lowrank import LowRankConfig, LowRankLinear
from lowrank.wrap import _dense_shape, match_target_modules
from tiny_models import ARCHS, build, logits, tokens


def perturb_factors(model, seed=0):
    """Random, unbalanced factors (B ≠ 0), so events have something to preserve."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lowrank.lowrank_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 0.2)
            layer.A.mul_(3.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_refactorize_preserves_logits(arch):
    model = lowrank.wrap(build(arch), LowRankConfig(rank=4))
    perturb_factors(model)
    ids = tokens()
    before = logits(model, ids)
    spectra = lowrank.refactorize(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert set(spectra) == set(lowrank.lowrank_layers(model))
    assert all(s.shape == (4,) and torch.all(s[:-1] >= s[1:]) for s in spectra.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_preserves_logits(arch):
    model = lowrank.wrap(build(arch), LowRankConfig(rank=4, alpha=8, keep_base=True))
    ids = tokens()
    dense = logits(build(arch), ids)
    # keep_base with the LoRA init starts exactly at the dense model.
    torch.testing.assert_close(logits(model, ids), dense)
    perturb_factors(model)
    before = logits(model, ids)
    norms = lowrank.merge(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert all(norm > 0 for norm in norms.values())
    assert all(torch.count_nonzero(layer.B) == 0 for layer in lowrank.lowrank_layers(model).values())


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_to_dense_round_trip_through_plain_transformers(arch, tmp_path):
    model = lowrank.wrap(build(arch), LowRankConfig(rank=4, keep_base=True, sparse_density=0.05))
    perturb_factors(model)
    ids = tokens()
    expected = logits(model, ids)
    dense = lowrank.merge_to_dense(model)
    assert not lowrank.is_wrapped(dense) and lowrank.is_wrapped(model)  # the original is untouched
    torch.testing.assert_close(logits(dense, ids), expected, rtol=1e-5, atol=1e-5)
    dense.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(dense)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip(arch, tmp_path):
    config = LowRankConfig(rank=4, keep_base=True, sparse_density=0.05, seed=1)
    model = lowrank.wrap(build(arch), config)
    perturb_factors(model)
    lowrank.merge(model)
    perturb_factors(model, seed=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or arch != "gpt2"}, tmp_path / "model.safetensors")
    # A fresh model with other random weights, wrapped the same way, then loaded.
    fresh = lowrank.wrap(build(arch, seed=7), config)
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = tokens()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids))
    # The merge counter travels too: the next merge re-initialises A identically.
    lowrank.merge(model), lowrank.merge(fresh)
    for (name, a), (_, b) in zip(lowrank.lowrank_layers(model).items(), lowrank.lowrank_layers(fresh).items()):
        assert torch.equal(a.A, b.A), name


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_of_wrapped_model(arch, tmp_path):
    model = lowrank.wrap(build(arch), LowRankConfig(rank=4))
    model.save_pretrained(tmp_path)
    fresh = lowrank.wrap(build(arch, seed=3), LowRankConfig(rank=4))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    torch.testing.assert_close(logits(fresh, tokens()), logits(model, tokens()))


PATTERNS = [
    "all-linear",
    ["q_proj", "v_proj"],
    ["self_attn.o_proj", "mlp.down_proj"],
    r".*\.layers\.1\..*_proj",
    r"model\.layers\.\d+\.mlp\.(gate|up)_proj",
    ["gate_proj", "up_proj", "down_proj", "q_proj"],
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("exclude", [None, ["q_proj"], r".*layers\.0\..*"], ids=str)
def test_target_matching_agrees_with_peft(pattern, exclude):
    base = build("llama")
    ours = lowrank.wrap(copy.deepcopy(base), LowRankConfig(rank=2, target_modules=copy.deepcopy(pattern), exclude_modules=exclude))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=copy.deepcopy(pattern), exclude_modules=exclude))
    theirs = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert set(lowrank.lowrank_layers(ours)) == theirs
    assert "lm_head" not in theirs


def test_gpt2_conv1d_all_linear_matches_peft():
    ours = lowrank.wrap(build("gpt2"), LowRankConfig(rank=2))
    theirs = get_peft_model(build("gpt2"), LoraConfig(r=2, target_modules="all-linear", fan_in_fan_out=True))
    names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, LoraLayer)}
    assert set(lowrank.lowrank_layers(ours)) == names
    assert {layer.source_type for layer in lowrank.lowrank_layers(ours).values()} == {"conv1d"}


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts(arch):
    model = build(arch)
    shapes = {name: _dense_shape(model.get_submodule(name)) for name in match_target_modules(model, "all-linear")}
    total_before = sum(p.numel() for p in model.parameters())
    replaced = sum(m * n for m, n in shapes.values())
    lowrank.wrap(model, LowRankConfig(rank=3))
    counts = lowrank.count_parameters(model)
    assert counts.frozen == 0
    assert counts.trainable == total_before - replaced + sum((m + n) * 3 for m, n in shapes.values())
    for name, layer in lowrank.lowrank_layers(model).items():
        assert layer.A.numel() + layer.B.numel() == (layer.out_features + layer.in_features) * 3
    relora = lowrank.count_parameters(lowrank.wrap(build(arch), LowRankConfig(rank=3, keep_base=True)))
    assert relora.frozen == replaced
    assert relora.total == total_before + sum((m + n) * 3 for m, n in shapes.values())


def test_rank_ratio_is_per_layer():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank_ratio=0.25))
    ranks = {name.rsplit(".", 1)[-1]: layer.rank for name, layer in lowrank.lowrank_layers(model).items()}
    # hidden 32, intermediate 64, 2 KV heads of 8: k_proj is 16×32 → min 16 → rank 4.
    assert ranks == {"q_proj": 8, "k_proj": 4, "v_proj": 4, "o_proj": 8, "gate_proj": 8, "up_proj": 8, "down_proj": 8}


def test_layers_get_distinct_seeds():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4))
    a_matrices = [layer.A for layer in lowrank.lowrank_layers(model).values() if layer.A.shape == (4, 32)]
    assert not torch.equal(a_matrices[0], a_matrices[1])
    again = lowrank.wrap(build("llama"), LowRankConfig(rank=4))
    for first, second in zip(lowrank.lowrank_layers(model).values(), lowrank.lowrank_layers(again).values()):
        assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)


def test_training_step_moves_only_trainable_parameters():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4, keep_base=True, init="kaiming")).train()
    base = {name: layer.base_weight.clone() for name, layer in lowrank.lowrank_layers(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(4, 16)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, layer in lowrank.lowrank_layers(model).items():
        assert torch.equal(layer.base_weight, base[name])


@pytest.mark.parametrize("arch", ARCHS)
def test_generate(arch):
    model = lowrank.wrap(build(arch), LowRankConfig(rank=4, sparse_density=0.02))
    ids = tokens(1, 5)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids)
    # Greedy decoding through the KV cache agrees with a full forward pass.
    assert torch.equal(logits(model, out[:, :-1])[0, -1].argmax(), out[0, -1])


def test_torch_compile_matches_eager():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=4, keep_base=True, sparse_density=0.05, init="kaiming")).train()
    perturb_factors(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = tokens()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled_loss = compiled(ids, labels=ids).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)
    # Events work through the compiled wrapper.
    assert set(lowrank.refactorize(compiled)) == set(lowrank.lowrank_layers(model))


def test_bf16_model_forward():
    model = lowrank.wrap(build("llama").to(torch.bfloat16), LowRankConfig(rank=4, sparse_density=0.02))
    out = logits(model, tokens())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    reference = lowrank.wrap(build("llama"), LowRankConfig(rank=4, sparse_density=0.02))
    with torch.no_grad():
        for (_, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
            b.copy_(a.float())
    torch.testing.assert_close(out.float(), logits(reference, tokens()), rtol=0.1, atol=0.1)


# ---------------------------------------------------------------- bad input


def test_pattern_matching_nothing_lists_existing_modules():
    with pytest.raises(ValueError, match=r"matches no module.*down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        lowrank.wrap(build("llama"), LowRankConfig(rank=2, target_modules=["query", "value"]))


def test_non_linear_target_is_rejected():
    with pytest.raises(ValueError, match="embed_tokens.*Embedding.*only nn.Linear and Conv1D"):
        lowrank.wrap(build("llama"), LowRankConfig(rank=2, target_modules=["embed_tokens", "q_proj"]))


def test_rank_larger_than_layer():
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.k_proj'.*\[1, 16\].*rank_ratio"):
        lowrank.wrap(build("llama"), LowRankConfig(rank=20))


def test_tied_head_is_rejected():
    with pytest.raises(ValueError, match="shares its weight.*tie_word_embeddings=False"):
        lowrank.wrap(build("gpt2"), LowRankConfig(rank=2, target_modules=["c_attn", "lm_head"]))


def test_double_wrap_is_rejected():
    model = lowrank.wrap(build("llama"), LowRankConfig(rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a LowRankLinear"):
        lowrank.wrap(model, LowRankConfig(rank=2, target_modules=["q_proj"]))


def test_events_on_unwrapped_model():
    with pytest.raises(ValueError, match="call lowrank.wrap"):
        lowrank.refactorize(build("llama"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of rank"),
        ({"rank": 4, "rank_ratio": 0.5}, "exactly one of rank"),
        ({"rank": 0}, "positive integer"),
        ({"rank_ratio": 1.5}, r"rank_ratio must be in \(0, 1\]"),
        ({"rank": 4, "sparse_density": 1.0}, r"sparse_density must be in \[0, 1\)"),
        ({"rank": 4, "init": "normal"}, "init must be one of"),
        ({"rank": 4, "target_modules": []}, "target_modules is empty"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankConfig(**kwargs)


def test_unsupported_layer_type():
    with pytest.raises(ValueError, match="only nn.Linear"):
        LowRankLinear.from_module(torch.nn.Conv2d(3, 3, 3), rank=2)
