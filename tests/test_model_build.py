"""build_method_model: exactly the model ``build_model`` + ``apply_method`` + the storage cast give
(names, dtypes, values bit for bit, requires_grad, buffers, the global RNG after), built module by
module without ever holding the dense fp32 model."""

import weakref

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

from lowrank.methods import apply_method, available_methods, build_method_model, load_method
from lowrank.models import NotReproducible, build_model, load_model_config, materialize_model
from lowrank.osp import is_osp
from lowrank.precision import store_parameters
from lowrank.quant import is_fake_quantized
from lowrank.wrap import is_wrapped

SEED = 7
RANK = 16  # the presets' rank (128) is wider than the tiny model
DTYPES = [torch.float32, torch.bfloat16]
# A fallback to the dense-first build would pass the equality tests for the wrong reason.
no_fallback = pytest.mark.filterwarnings("error:building the dense")


def dense_first(config, method, dtype, *, lowrank=True):
    """Today's path: the dense fp32 model, the method applied, the parameters cast."""
    model = build_model(config, seed=SEED)
    apply_method(model, method, seed=SEED, lowrank=lowrank)
    return store_parameters(model, dtype)


def bits(tensor):
    return tensor.detach().contiguous().view(-1).view(torch.uint8)


def assert_same_model(expected, actual):
    assert [(n, type(m)) for n, m in expected.named_modules()] == [(n, type(m)) for n, m in actual.named_modules()]
    want, got = expected.state_dict(), actual.state_dict()
    assert list(want) == list(got)
    for name in want:
        assert want[name].dtype == got[name].dtype, name
        assert want[name].shape == got[name].shape, name
        assert torch.equal(bits(want[name]), bits(got[name])), name
    assert [(n, p.requires_grad) for n, p in expected.named_parameters()] == \
           [(n, p.requires_grad) for n, p in actual.named_parameters()]
    want_buffers, got_buffers = dict(expected.named_buffers()), dict(actual.named_buffers())  # with rotary inv_freq
    assert list(want_buffers) == list(got_buffers)
    for name in want_buffers:
        assert want_buffers[name].dtype == got_buffers[name].dtype, name
        assert torch.equal(bits(want_buffers[name]), bits(got_buffers[name])), name
    assert getattr(expected, "lowrank_config", None) == getattr(actual, "lowrank_config", None)
    tied = lambda model: model.get_output_embeddings().weight is model.get_input_embeddings().weight  # noqa: E731
    assert tied(expected) == tied(actual)


def check_build(config, method, dtype, *, lowrank=True):
    expected = dense_first(config, method, dtype, lowrank=lowrank)
    rng = torch.get_rng_state()
    actual = build_method_model(config, method, seed=SEED, dtype=dtype, lowrank=lowrank)
    assert torch.equal(torch.get_rng_state(), rng), "the global generator ends elsewhere"
    assert_same_model(expected, actual)
    return actual


@pytest.fixture(scope="module")
def tiny():
    return load_model_config("tiny")


@no_fallback
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", available_methods())
def test_every_preset_is_built_as_dense_first(tiny, name, dtype):
    check_build(tiny, load_method(name).with_overrides(rank=RANK), dtype)


@no_fallback
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, overrides", [
    ("low_rank", {"lowrank.init": "spectral"}),  # factors from the SVD of the dense draw
    ("relora", {"lowrank.init": "spectral"}),  # W0 keeps the remainder
    ("sltrain", {"lowrank.sparse_init": "zeros", "lowrank.rank_ratio": 0.25, "lowrank.rank": None}),
    ("low_rank", {"lowrank.target_modules": ["q_proj", "down_proj"], "lowrank.seed": 11}),
    ("low_rank", {"quant.weights": "int4"}),  # fake quantization on the factors
])
def test_variants_that_read_the_dense_weight(tiny, name, overrides, dtype):
    check_build(tiny, load_method(name).with_overrides(overrides, rank=None if "lowrank.rank" in overrides else RANK), dtype)


@no_fallback
def test_a_warm_start_builds_the_dense_model_and_wraps_later_as_before(tiny):
    """``lowrank=False`` (ReLoRA's dense warm start): the dense bf16 model; the trainer's later
    apply_method wraps it exactly as it wraps the dense-first model."""
    method = load_method("relora").with_overrides({"lowrank.warm_start_steps": 5}, rank=RANK)
    expected = dense_first(tiny, method, torch.bfloat16, lowrank=False)
    actual = check_build(tiny, method, torch.bfloat16, lowrank=False)
    for model in (expected, actual):
        apply_method(model, method, seed=SEED, lowrank=True)
    assert_same_model(expected, actual)


@no_fallback
@pytest.mark.parametrize("arch, options", [
    ("qwen2", {"tie_word_embeddings": True}),
    ("gpt2", {}),  # Conv1D layers, tied head, c_proj drawn twice (by the layer, then by its block)
    ("llama", {"pad_token_id": 3, "tie_word_embeddings": False}),  # a zeroed padding row
])
def test_other_architectures(arch, options):
    sizes = ({"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}
             if arch == "gpt2" else
             {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64})
    config = AutoConfig.for_model(arch, vocab_size=96, **sizes, **options)
    for name in ("low_rank", "sltrain", "full_rank"):
        check_build(config, load_method(name).with_overrides(rank=8), torch.bfloat16)


@no_fallback
def test_apply_method_again_changes_nothing(tiny):
    """The trainer's ``_enter`` calls apply_method on the built model: every part (OSP, the wrap,
    fake quantization) is there already."""
    method = load_method("osp").with_overrides({"lowrank.rank": RANK, "lowrank.target_modules": "all-linear",
                                                "quant.weights": "int4"})
    model = build_method_model(tiny, method, seed=SEED, dtype=torch.bfloat16)
    assert is_osp(model) and is_wrapped(model) and is_fake_quantized(model)
    before = {name: (param, bits(param).clone()) for name, param in model.named_parameters()}
    modules = [(name, type(module)) for name, module in model.named_modules()]
    apply_method(model, method, seed=SEED, lowrank=True)
    after = dict(model.named_parameters())
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert list(after) == list(before)
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(bits(param), value), name


def test_a_value_the_initialisation_does_not_set_falls_back_to_dense_first(tiny, monkeypatch):
    """A model whose ``_init_weights`` leaves the norms to their constructor (ones): the per-module
    build cannot tell their values, says so, leaves the RNG as it was, and the result is built
    dense-first — the same model."""
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    init = LlamaPreTrainedModel._init_weights
    monkeypatch.setattr(LlamaPreTrainedModel, "_init_weights",
                        lambda self, module: None if "RMSNorm" in type(module).__name__ else init(self, module))
    rng = torch.get_rng_state()
    with pytest.raises(NotReproducible, match="layernorm.weight is not .*set"):
        materialize_model(tiny, seed=None, finish=lambda name, module: module)
    assert torch.equal(torch.get_rng_state(), rng)
    method = load_method("low_rank").with_overrides(rank=RANK)
    with pytest.warns(UserWarning, match="building the dense llama model first"):
        check_build(tiny, method, torch.bfloat16)


def test_on_meta_nothing_is_allocated(tiny):
    method = load_method("sltrain").with_overrides(rank=RANK)
    model = build_method_model(tiny, method, seed=SEED, dtype=torch.bfloat16, device="meta")
    expected = dense_first(tiny, method, torch.bfloat16)
    assert all(t.is_meta for t in model.state_dict().values())
    assert [(n, t.dtype, t.shape) for n, t in model.state_dict().items()] == \
           [(n, t.dtype, t.shape) for n, t in expected.state_dict().items()]


# ---------------------------------------------------------------------------------- memory


class PeakBytes(TorchDispatchMode):
    """The most bytes of CPU tensor storage alive at once among the storages created while active:
    each op's outputs are seen as they are made, a storage counts until it is freed (torch keeps
    one Python object per storage, so a weakref finalizer fires exactly then)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                storage = tensor.untyped_storage()
                if storage not in self.seen:
                    self.seen.add(storage)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, storage.nbytes())
        return out

    def _free(self, nbytes):
        self.live -= nbytes


@no_fallback
@pytest.mark.parametrize("name", ["lowrank_sparse", "relora", "full_rank"])
def test_start_up_holds_at_most_one_decoder_layer_in_fp32(name):
    """The per-module build's peak: the bf16 result, plus at most one decoder layer's dense fp32
    weights and the fp32 embedding (held until the model's own init ran); the dense-first build
    holds the whole fp32 model."""
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                                  num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    method = load_method(name).with_overrides(rank=RANK)
    skeleton = build_model(config, device="meta")
    dense = 4 * sum(p.numel() for p in skeleton.parameters())
    layer = 4 * sum(p.numel() for p in skeleton.model.layers[0].parameters())
    embedding = 4 * skeleton.model.embed_tokens.weight.numel()

    with PeakBytes() as old:
        dense_first(config, method, torch.bfloat16)
    with PeakBytes() as new:
        model = build_method_model(config, method, seed=SEED, dtype=torch.bfloat16)
    final = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
    assert old.peak > dense  # the tracker sees the dense model
    assert new.peak < final + layer + embedding, (new.peak, final, layer, embedding)
