"""Activation memory of a LLaMA-style decoder in training: a stated formula, not a measurement.

What autograd keeps between forward and backward for one ``LlamaDecoderLayer`` of Hugging Face
``transformers`` with SDPA attention (flash / memory-efficient kernel: the ``T × T`` score matrix
is never stored), read off the code op by op. Notation: ``N = b·T`` tokens, hidden ``h``,
MLP width ``f``, ``a`` query heads and ``g`` key/value heads of width ``d = h/a`` (``k = g·d``),
``e`` bytes per activation element (the weight dtype: 2 for bf16, 4 for fp32 training), ``R`` the
sum of the ranks of the layer's low-rank linears (0 for a dense layer)::

    RMSNorm (x2)     fp32 copy of the input 4h, rsqrt 4, normalised input e·h     2·(4h + 4 + e·h)
    norm outputs     inputs of q/k/v and of gate/up (each shared by its linears)  2·e·h
    SDPA             q and k after RoPE, v, output: e·(2h + 2k); fp32 logsumexp 4a
                     (the output, laid out b×T×a×d by the kernel, is also o_proj's input)
    SwiGLU MLP       gate out (SiLU input), SiLU out, up out, their product       4·e·f
    low-rank         each LowRankLinear's scaled r-dim intermediate s·Ax          e·R

    per layer  A = N·(8h + 8 + 6·e·h + 2·e·k + 4·e·f + e·R + 4a)

RoPE's products save only ``cos``/``sin`` (shared by all layers), residual adds save nothing, a
ReLoRA base (frozen) and SLTrain's sparse part save only the layer input, which the other linears
of the layer already hold. Outside the layers: the embedding's token ids (8N), ``cos``/``sin``
(``2·e·T·d``, computed once and broadcast over the batch), the final norm and ``lm_head`` input
(``4h + 4 + 2·e·h`` per token), the log-softmax of the fp32 upcast logits that Hugging Face's
loss keeps for backward (``4·N·V``), the shifted labels (8N), the loss's 0-dim fp32 target count
(4 bytes); the logits the model returns (``e·N·V``), alive until the step ends; and one
transient, counted because it sets the peak when ``V ≫ h``: the gradient of the fp32 logits at
the start of backward (``4·N·V``, plus ``e·N·V`` for its cast to the weight dtype when ``e < 4``).
With activation checkpointing each layer keeps only its input (``e·N·h``) and one layer's
activations exist again while it is recomputed in backward: ``L·e·N·h + A`` instead of ``L·A``;
the first recomputation comes after the loss's backward has freed the logits' gradient, so the
two count as the larger of them.

This is an estimate of what is *saved* plus that logits gradient, not of the peak: other
transients come on top (the fp32 logits copy ``4·N·V`` during the loss when ``e < 4``, the dense
``m × n`` temporary of SLTrain's sparse product, kernels' workspaces, allocator rounding). Grouped
query attention is counted with ``enable_gqa`` (no attention mask); when ``transformers`` repeats
the key/value heads instead, k and v cost ``e·h`` each. For other architectures (GPT-2, ...) the
same formula is applied to their config's sizes and is only indicative.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ActivationBytes", "llama_activation_bytes"]


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes of activations (see the module docstring for the formula).

    ``per_layer`` is one decoder layer's saved tensors; ``layers`` all layers as kept (with
    checkpointing: the layer inputs plus one recomputed layer); ``head`` what lies outside the
    layers and is saved (ids, RoPE tables, final norm, fp32 log-softmax, labels);
    ``logits`` the returned logits; ``loss_backward`` the logits' gradient at the start of
    backward; ``total = layers + head + logits + loss_backward``, except with ``checkpointing``:
    the recomputed layer exists only once the loss's backward is done with its transient, so
    ``total = layers − per_layer + head + logits + max(loss_backward, per_layer)``.
    """

    per_layer: int
    layers: int
    head: int
    logits: int
    loss_backward: int
    checkpointing: bool = False
    log_softmax: int = 0  # the part of ``head`` that the loss's backward frees first (4·N·V)

    @property
    def total(self) -> int:
        if self.checkpointing:
            return self.layers - self.per_layer + self.head + self.logits + max(self.loss_backward, self.per_layer)
        return self.layers + self.head + self.logits + self.loss_backward

    @property
    def saved(self) -> int:
        """What autograd holds for backward (without the returned logits and their gradient)."""
        return self.layers + self.head

    def to_dict(self) -> dict:
        return {**asdict(self), "saved": self.saved, "total": self.total}


def llama_activation_bytes(
    *,
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    dtype_bytes: int,
    rank_sum_per_layer: int = 0,
    checkpointing: bool = False,
) -> ActivationBytes:
    """Activation bytes of a LLaMA decoder for one micro-batch (formula in the module docstring).

    Args:
        rank_sum_per_layer: ``R``, the sum of ``r`` over one layer's low-rank linears (7 r for
            LLaMA with every projection factorized); 0 for dense and projected-gradient methods.
        checkpointing: activation (gradient) checkpointing of every decoder layer.
    """
    for name, value in (
        ("batch_size", batch_size), ("seq_len", seq_len), ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size), ("num_layers", num_layers), ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads), ("vocab_size", vocab_size), ("dtype_bytes", dtype_bytes),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if rank_sum_per_layer < 0:
        raise ValueError(f"rank_sum_per_layer must be >= 0, got {rank_sum_per_layer}")
    n, e, h, f = batch_size * seq_len, dtype_bytes, hidden_size, intermediate_size
    head_dim = h // num_heads
    kv = num_kv_heads * head_dim
    per_token = 8 * h + 8 + 6 * e * h + 4 * num_heads + 2 * e * kv + 4 * e * f + e * rank_sum_per_layer
    per_layer = n * per_token
    layers = num_layers * e * n * h + per_layer if checkpointing else num_layers * per_layer
    head = n * (8 + 4 * h + 4 + 2 * e * h + 4 * vocab_size + 8) + 2 * e * seq_len * head_dim + 4
    loss_backward = n * vocab_size * (4 + (e if e < 4 else 0))
    return ActivationBytes(per_layer=per_layer, layers=layers, head=head, logits=e * n * vocab_size, loss_backward=loss_backward,
                           checkpointing=checkpointing, log_softmax=4 * n * vocab_size)
