"""The LLaMA-60M model used by the optimizer benchmarks."""

from __future__ import annotations

import torch

from lowrank.models import build_model, load_model_config

# The 60M LLaMA of the GaLore/Fira/APOLLO papers: the bundled configs/models/llama_60m.json.
_CONFIG = load_model_config("llama_60m")
# The shape, as recorded in the result files.
LLAMA_60M = {key: getattr(_CONFIG, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                                    "vocab_size", "max_position_embeddings", "tie_word_embeddings")}


def llama_60m(seed: int = 0) -> torch.nn.Module:
    return build_model(_CONFIG, seed=seed)


def fill_grads(model: torch.nn.Module, seed: int = 1) -> None:
    """Random gradients: the benchmarks measure memory and time, not training."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3
