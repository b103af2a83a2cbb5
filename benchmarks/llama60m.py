"""The LLaMA-60M model used by the optimizer benchmarks."""

from __future__ import annotations

import torch

# The 60M LLaMA of the GaLore/Fira/APOLLO papers (configs/llama_60m.json in their repositories).
LLAMA_60M = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    vocab_size=32000,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)

def llama_60m(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_60M))


def fill_grads(model: torch.nn.Module, seed: int = 1) -> None:
    """Random gradients: the benchmarks measure memory and time, not training."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3
