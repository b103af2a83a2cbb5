"""Activation checkpointing of every decoder layer (``--activation-checkpointing``).

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv 1604.06174): keep only
each layer's input in forward and recompute the layer's activations when backward reaches it. A
model of ``L`` layers then holds ``L`` layer inputs plus one layer's activations instead of ``L``
layers' activations (:mod:`lowrank.memory.activations` states the bytes), for one extra forward
of every layer per step.

We use what transformers already keeps for every Hugging Face causal LM: its decoder layers are
``GradientCheckpointingLayer`` modules, and ``activation_checkpointing_enable`` (the new name of
``gradient_checkpointing_enable``) makes each one run its ``forward`` through
``torch.utils.checkpoint``, **non-reentrant** (``use_reentrant=False``: autograd's saved-tensor
hooks, so parameters need no grad-requiring input, DDP's hooks see ordinary gradients, and the
recomputation stops as soon as the tensors backward needs exist again). It wraps ``forward``,
not ``__call__``, so FSDP2's per-layer all-gather hooks stay outside the checkpoint. The flags
live on the decoder layers themselves, which no other transform replaces (the low-rank wrap and
fake quantization change the linears inside them, OSP the norms), so checkpointing survives a
phase change, DDP, FSDP2 and ``torch.compile`` wrapping.

The one thing a recomputation must reproduce that autograd does not know about is our own
randomness: fake quantization's stochastic-rounding draws. :func:`lowrank.quant.fake.checkpoint_context_fn`
replays them (the checkpoint's ``context_fn``), so the recomputed forward is the forward first run.
"""

from __future__ import annotations

from torch import nn

from .errors import UsageError
from .quant.fake import checkpoint_context_fn, has_stochastic_activations
from .wrap import unwrap_model

__all__ = ["check_activation_checkpointing", "enable_activation_checkpointing", "is_activation_checkpointing"]


def _layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers checkpoints: its ``GradientCheckpointingLayer`` blocks."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.53: the flag on the blocks, as before the base class existed
        return [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and m is not model]
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def check_activation_checkpointing(model: nn.Module) -> None:
    """Refuse, with one line, a model whose decoder layers cannot be checkpointed."""
    root = unwrap_model(model)
    if not getattr(root, "supports_gradient_checkpointing", False) or not _layers(root):
        raise UsageError(f"--activation-checkpointing: {type(root).__name__} has no decoder layers transformers can "
                         "checkpoint (supports_gradient_checkpointing is not set); drop the flag for this model")


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether every decoder layer of ``model`` recomputes its activations in backward."""
    layers = _layers(unwrap_model(model))
    return bool(layers) and all(getattr(m, "gradient_checkpointing", False) for m in layers)


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every decoder layer of ``model`` (non-reentrant; see the module docstring) and
    return ``model``. Looks through DDP / ``torch.compile`` wrappers; calling it again is a no-op.

    Apply it to the bare model, before DDP or FSDP2 wraps it (the layers keep the setting through
    later wrapping), and after fake quantization: the stochastic-rounding replay is set up only
    for a model that draws noise, since ``torch.compile`` refuses a ``context_fn`` that is not a
    pair of dispatch modes. In training, the layers run without a KV cache (transformers turns
    ``use_cache`` off under checkpointing; pass ``use_cache=False`` to avoid its one-time warning).
    """
    root = unwrap_model(model)
    check_activation_checkpointing(root)
    if is_activation_checkpointing(root):
        return model
    options = {"use_reentrant": False}
    if has_stochastic_activations(root):
        options["context_fn"] = checkpoint_context_fn(root)
    if hasattr(root, "activation_checkpointing_enable"):
        root.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:  # transformers before the rename
        root.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    return model
