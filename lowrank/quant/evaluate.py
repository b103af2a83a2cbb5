"""Quantization evaluation of a trained causal LM: how outlier-prone its hidden states are, and how
much validation perplexity it loses under simulated weight-only and weight–activation quantization.

**Hidden-state statistics**, by one of two protocols (:data:`KURTOSIS_PROTOCOLS`,
``--kurtosis-protocol``):

* ``"ours"`` (default): forward hooks on the output of every decoder layer, on the validation
  sequences with their full context; the embedding output is not counted.
* ``"osp"``: OSP's reference protocol (their ``evaluate_kurtosis.py``): each validation token fed
  as its own length-1 sequence, averaged over all of transformers' ``hidden_states`` — the
  embedding output, the outputs of layers 1…L−1 and the last layer's output after the final
  norm. Use it to compare with the paper's numbers; the two differ (a token alone sees no
  context, and the embedding and final-normed states count).

The statistics:

* excess kurtosis as Outlier-Safe Pre-Training measures it (Park et al. 2025, arXiv 2506.19697;
  DESIGN 2.10). For the hidden state ``x ∈ R^d`` of one token at one layer::

      κ(x) = max(0, mean_j(x_j⁴) / std(x)⁴ − 3),    std(x)² = Σ_j (x_j − x̄)² / (d − 1)

  i.e. the fourth moment is *not* centred while the standard deviation is (and unbiased), and
  each token's value is clamped at 0 — their conventions, kept so that the numbers compare with
  the paper's (Adam 1.4B: 1818.56, OSP: 0.04). The reported ``kurtosis`` is the mean of ``κ`` over
  all tokens of all validation sequences, per state (layer), then over states (every state sees
  the same tokens, so this is also the mean over all (state, token) pairs). For a zero-mean Gaussian it is
  ≈ 0 (the clamp adds a small positive bias, about ``0.4·sqrt(24/d)``), for a Laplace ≈ 3. A token
  whose hidden state is constant (``std = 0``: e.g. a padding-index embedding row, all zero, at
  position 0 stays zero through every LLaMA block) has no kurtosis (``0/0``); it is left out of
  the mean and counted in ``skipped_tokens``.
* ``max_abs``: the largest ``|x_j|`` over every state, token and channel.

**Perplexity** ``exp(mean next-token cross-entropy)`` over the validation tokens, in full
precision and under each scheme of :func:`default_schemes`, simulated with
:func:`lowrank.quant.apply_fake_quant` (round-to-nearest; :func:`lowrank.quant.fake_quantize`
formats) on **every linear layer but the output head** (PEFT's ``"all-linear"`` rule: the head and
the embeddings stay in full precision, as is usual in weight-quantization papers; the head is
the layer most sensitive to quantization and often kept at 8+ bits in deployment):

* ``w4``, ``w3``, ``w2``: weight-only INT4 / INT3 / INT2, symmetric absmax per group of
  ``group_size`` (128) consecutive input channels (INT2 symmetric is ternary, ``{−1, 0, 1}·s``;
  see :mod:`lowrank.quant.formats`).
* ``w4a4``, ``w8a8``: the same weights (INT4 / INT8, per group) and each linear layer's input
  quantized symmetric per token (one absmax scale per token row, ``group_size=-1``).

A model wrapped in ``LowRankLinear`` layers is evaluated as its dense merge
(:func:`lowrank.merge_to_dense`), and an OSP model after :func:`lowrank.osp.fold`, since that is
what would be deployed (:func:`plain_model`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..deploy import plain_model
from ..errors import UsageError
from .fake import FakeQuantConfig, apply_fake_quant, remove_fake_quant
from .formats import QuantFormat, bits_per_weight

__all__ = [
    "default_schemes",
    "excess_kurtosis",
    "hidden_state_statistics",
    "KURTOSIS_PROTOCOLS",
    "validation_loss",
    "evaluate_quantization",
    "format_quant_eval",
    "decoder_layers",
    "plain_model",
    "as_batches",
]


def default_schemes(group_size: int = 128, *, flat: bool = False) -> dict[str, FakeQuantConfig | None]:
    """``{"fp": None, "w4", "w3", "w2", "w4a4", "w8a8"}`` as in the module docstring. ``flat``:
    weight groups of ``group_size`` consecutive entries of the flattened matrix (they may span
    rows), for layers whose input width the group size does not divide (GaLore's LLaMA shapes:
    an MLP of 688, 1376 or 5461)."""

    def weights(bits: int) -> QuantFormat:
        return QuantFormat("int", bits, group_size, symmetric=True, flat=flat)

    def per_token(bits: int) -> QuantFormat:
        return QuantFormat("int", bits, -1, symmetric=True)

    schemes: dict[str, FakeQuantConfig | None] = {"fp": None}
    for bits in (4, 3, 2):
        schemes[f"w{bits}"] = FakeQuantConfig(weights=weights(bits), target_modules="all-linear")
    for bits in (4, 8):
        schemes[f"w{bits}a{bits}"] = FakeQuantConfig(weights=weights(bits), activations=per_token(bits), target_modules="all-linear")
    return schemes


def excess_kurtosis(x: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """OSP's per-token excess kurtosis over the last dimension (see the module docstring):
    ``mean(x⁴) / std(x)⁴ − 3`` with the unbiased std, clamped at 0 unless ``clamp=False``.
    Returns ``x.shape[:-1]`` float32 values; NaN where ``std(x) = 0``."""
    x = x.float()
    kurtosis = x.pow(4).mean(-1) / x.std(-1).pow(4) - 3.0
    return kurtosis.clamp_min(0.0) if clamp else kurtosis


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ``ModuleList`` of the decoder blocks: the first ``ModuleList`` holding
    ``config.num_hidden_layers`` modules (``model.layers`` for LLaMA/Qwen2, ``transformer.h`` for GPT-2)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return name, module
    raise UsageError(f"{type(model).__name__}: cannot find its decoder layers (a ModuleList of num_hidden_layers={count} blocks)")


def as_batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int, device: torch.device | None = None) -> list[torch.Tensor]:
    """Token batches from an ``(N, T)`` LongTensor (split into ``batch_size`` rows) or an iterable
    of ``(B, T)`` LongTensors, moved to ``device``."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 2:
            raise UsageError(f"token batches must be an (N, seq_len) tensor, got shape {tuple(data.shape)}")
        data = data.split(batch_size)
    batches = [batch.to(device) if device is not None else batch for batch in data]
    if not batches or any(b.ndim != 2 or b.shape[1] < 2 for b in batches):
        raise UsageError("need at least one (batch, seq_len >= 2) batch of token ids")
    return batches


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over all predicted tokens of ``batches`` (nats)."""
    total, count = 0.0, 0
    for ids in batches:
        predicted = ids.shape[0] * (ids.shape[1] - 1)
        total += float(model(input_ids=ids, labels=ids).loss.double()) * predicted
        count += predicted
    return total / count


KURTOSIS_PROTOCOLS = ("ours", "osp")
"""How :func:`hidden_state_statistics` feeds the model and which states it averages (module
docstring): ``"ours"`` (the default, what the README tables report unless they say otherwise)
or ``"osp"`` (the OSP repository's ``evaluate_kurtosis.py``)."""


class _StateStatistics:
    """Running kurtosis sums, token counts, skipped tokens and peak ``|x|`` of a list of states."""

    def __init__(self, count: int) -> None:
        self.sums, self.counts, self.skipped, self.peaks = [0.0] * count, [0] * count, [0] * count, [0.0] * count

    def add(self, index: int, hidden: torch.Tensor) -> None:
        kurtosis = excess_kurtosis(hidden)
        defined = kurtosis.isfinite()
        self.sums[index] += float(kurtosis[defined].double().sum())
        self.counts[index] += int(defined.sum())
        self.skipped[index] += kurtosis.numel() - int(defined.sum())
        self.peaks[index] = max(self.peaks[index], float(hidden.detach().abs().max()))

    def result(self, protocol: str) -> dict:
        per_layer = [{"layer": i, "kurtosis": total / max(count, 1), "max_abs": peak}
                     for i, (total, count, peak) in enumerate(zip(self.sums, self.counts, self.peaks))]
        return {
            "kurtosis": sum(row["kurtosis"] for row in per_layer) / len(per_layer),
            "max_abs": max(self.peaks),
            "skipped_tokens": sum(self.skipped),
            "kurtosis_protocol": protocol,
            "layers": per_layer,
        }


@torch.no_grad()
def hidden_state_statistics(model: nn.Module, batches: list[torch.Tensor], *, protocol: str = KURTOSIS_PROTOCOLS[0]) -> dict:
    """Excess kurtosis and largest magnitude of the hidden states (see the module docstring).

    ``protocol="ours"``: the outputs of the ``L`` decoder layers, each sequence with its full
    context; ``layers[i]`` is block ``i``.
    ``protocol="osp"``: the OSP repository's ``evaluate_kurtosis.py`` (commit 504a6a2): every
    token fed as its own length-1 sequence (``model(seq.unsqueeze(1), output_hidden_states=True)``)
    and the ``L + 1`` states of transformers' ``hidden_states`` averaged: the embedding output,
    the outputs of layers 1…L−1, and the last layer's output after the final norm; ``layers[i]``
    is ``hidden_states[i]``. (Their script averages per sequence and state, then over all; with
    sequences of one length that is this mean. A token with ``std = 0`` is skipped and counted, as
    in ours; theirs would turn the whole mean into NaN.)

    Returns ``{"kurtosis", "max_abs", "skipped_tokens", "kurtosis_protocol", "layers": [{"layer",
    "kurtosis", "max_abs"}, ...]}``.
    """
    if protocol not in KURTOSIS_PROTOCOLS:
        raise UsageError(f"--kurtosis-protocol must be one of {', '.join(KURTOSIS_PROTOCOLS)}, got {protocol!r}")
    _, layers = decoder_layers(model)
    if protocol == "osp":
        stats = _StateStatistics(len(layers) + 1)
        for ids in batches:
            states = model(input_ids=ids.reshape(-1, 1), output_hidden_states=True, use_cache=False).hidden_states
            for index, hidden in enumerate(states):
                stats.add(index, hidden)
        return stats.result(protocol)
    stats = _StateStatistics(len(layers))

    def hook(index: int):
        def record(module, inputs, output):
            stats.add(index, output[0] if isinstance(output, (tuple, list)) else output)
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return stats.result(protocol)


def _scheme_row(config: FakeQuantConfig | None, loss: float) -> dict:
    weights = config.weights if config is not None else None
    activations = config.activations if config is not None else None
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "weights": weights.label if weights else None,
        "activations": activations.label if activations else None,
        "bits_per_weight": bits_per_weight(weights) if weights and weights.group_size not in (None, -1) else None,
    }


def evaluate_quantization(
    model: nn.Module,
    valid: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int = 8,
    group_size: int = 128,
    flat: bool = False,
    schemes: dict[str, FakeQuantConfig | None] | None = None,
    kurtosis_protocol: str = KURTOSIS_PROTOCOLS[0],
) -> dict:
    """Hidden-state statistics and perplexity under each quantization scheme (module docstring).

    Args:
        model: a causal LM (``model(input_ids=..., labels=...)``); a wrapped or OSP model is
            evaluated as :func:`plain_model` makes it. It is left as it was.
        valid: validation token ids, an ``(N, T)`` LongTensor (e.g. ``build_data(...).valid``) or
            an iterable of ``(B, T)`` batches.
        batch_size: rows per forward when ``valid`` is one tensor.
        group_size: weight group size of the default schemes (must divide every quantized
            layer's input dimension).
        schemes: ``{label: FakeQuantConfig or None (full precision)}``; default :func:`default_schemes`.
        kurtosis_protocol: ``"ours"`` or ``"osp"`` (:func:`hidden_state_statistics`).

    Returns:
        ``{"tokens", "sequences", "seq_len", "kurtosis", "max_abs", "layers", "schemes": {label:
        {"loss", "ppl", "weights", "activations", "bits_per_weight"}}}``.

    Raises:
        UsageError: the group size does not divide a layer's dimension (the message names it).
    """
    model = plain_model(model)
    was_training = model.training
    model.eval()
    batches = as_batches(valid, batch_size, _device(model))
    schemes = default_schemes(group_size, flat=flat) if schemes is None else schemes
    try:
        stats = hidden_state_statistics(model, batches, protocol=kurtosis_protocol)
        rows = {}
        for label, config in schemes.items():
            if config is None:
                rows[label] = _scheme_row(None, validation_loss(model, batches))
                continue
            try:
                apply_fake_quant(model, config)
            except ValueError as error:
                raise UsageError(f"quantization scheme {label}: {error}") from None
            try:
                rows[label] = _scheme_row(config, validation_loss(model, batches))
            finally:
                remove_fake_quant(model)
    finally:
        model.train(was_training)
    return {
        "tokens": sum(b.numel() for b in batches),
        "sequences": sum(b.shape[0] for b in batches),
        "seq_len": batches[0].shape[1],
        **stats,
        "schemes": rows,
    }


def format_quant_eval(result: dict) -> str:
    """A plain-text table of :func:`evaluate_quantization`'s result."""
    lines = [
        f"{result['tokens']:,} validation tokens ({result['sequences']} x {result['seq_len']}); "
        f"hidden states: excess kurtosis {result['kurtosis']:.3f} ({result.get('kurtosis_protocol', 'ours')} protocol), "
        f"max |x| {result['max_abs']:.2f}",
        f"{'scheme':<8} {'weights':<14} {'activations':<14} {'bits/w':>7} {'loss':>8} {'ppl':>10} {'Δppl':>9}",
    ]
    base = result["schemes"].get("fp", {}).get("ppl")
    for label, row in result["schemes"].items():
        bits = f"{row['bits_per_weight']:.3f}" if row["bits_per_weight"] else "-"
        delta = f"{row['ppl'] - base:+.2f}" if base is not None and label != "fp" else ""
        lines.append(
            f"{label:<8} {row['weights'] or 'full':<14} {row['activations'] or 'full':<14} {bits:>7} "
            f"{row['loss']:>8.4f} {row['ppl']:>10.2f} {delta:>9}"
        )
    return "\n".join(lines)
