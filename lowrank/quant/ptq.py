"""Ultra-low-bit post-training quantization with low-rank partial retraining (DESIGN 2.13).

:func:`quantize` turns every targeted ``nn.Linear`` of a causal LM (default PEFT's
``"all-linear"``: every linear layer but the output head) into a
:class:`~lowrank.quant.apiq.QuantizedLowRankLinear`, ``y = Q(W) x + s·B(A x) + b``, with the
quantized weight ``Q(W)`` stored as integer codes and the factors chosen and trained as the method
says, under a named recipe of settings (:mod:`lowrank.quant.recipes`: ``"ours"``, or ``"apiq"``,
ApiQ's released script):

* ``"rtn"``: round-to-nearest ``Q(W)``, ``B = 0`` (the plain baseline; no calibration data used).
* ``"apiq"``: ApiQ (Liao et al. 2024, arXiv 2402.05147), decoder block by decoder block:

  1. *base*: ``Q(W)`` with ApiQ's learnable per-group clipping (:mod:`lowrank.quant.clipping`,
     ``clipping="learned"``, both recipes) or frozen round-to-nearest codes (``"frozen"``);
  2. *initialisation* of the factors: the closed form of :mod:`lowrank.quant.apiq` (``"ours"``),
     minimising ``‖X Wᵀ − X_q (Q + s·BA)ᵀ‖`` on the calibration tokens, ``X`` the full-precision
     model's input to the layer and ``X_q`` the partly quantized model's own (layers that share
     an input, q/k/v and gate/up, in one stage; then o, then down); or PEFT's ``B = 0``
     (``"apiq"``, as released);
  3. *partial retraining* (ApiQ-bw's block-wise objective, :mod:`lowrank.quant.retrain`): AdamW
     on the block's factors and clipping logits, one calibration batch per step in turn, so that
     the quantized block ``f_q`` on the quantized model's stream ``h_q`` reproduces the
     full-precision block ``f`` on the full-precision stream ``h`` (``"ours"``: relative error
     ``‖f_q(h_q) − f(h)‖² / ‖f(h)‖²``; ``"apiq"``: MSE plus ApiQ's ``aug_loss``);
  4. the learned clipping's codes are stored (:meth:`QuantizedLowRankLinear.freeze_base`);

  then both streams move on to the next block. Memory stays that of one block's activations on
  the calibration set; nothing is back-propagated through the whole model.
* ``"apiq+saliency"``: the same with the saliency-aware regularizer of Cao & Aref 2025
  (arXiv 2504.13932; :mod:`lowrank.quant.saliency`): by default the published form — ``λ Σ g²
  (Q(W) − W)²`` with precomputed squared gradients on the learned-clipping ``Q(W)`` before the
  LoRA term, trained alone in the first weight-preservation steps (``saliency="fisher"``);
  ours as named alternatives (``"activation"``: ``|W|·‖X_j‖``, ``"gradient"``: ``|W·∂L/∂W|``,
  on ``Q + s·BA``, relative, added at every step).

The three methods use the same format, rank, calibration batches and (for the two ApiQ methods)
the same recipe, so their reports compare. Quantization format: integer,
``bits`` in 2/3/4/8, groups of ``group_size`` consecutive input channels, asymmetric min–max with
a zero point by default (``symmetric=False``: 4 levels at 2 bits, as ApiQ, GPTQ and OmniQuant
quantize weights; the symmetric grid is ternary at 2 bits).

Memory: the full-precision model is kept while quantizing (it provides ``X`` and the block
targets, and ``W`` for the regularizer), plus the two hidden-state streams on the calibration set
(three with ``aug_loss``), three ``n × n`` float64 statistics of the layers being initialised, a
full-precision copy of the current block's weights while its clipping is learned, and one score
per weight of every target for the ``fisher`` / ``gradient`` saliencies.

Export (:func:`export_quantized`): the quantized model becomes a plain dense Hugging Face model
(``Q(W) + s·BA`` in every linear, :func:`dequantized_model`; ``from_pretrained`` without
``lowrank``, the same logits) and, optionally, a PEFT LoRA adapter (``lora_A = A``, ``lora_B = B``,
``lora_alpha / r = s``) over the dequantized base model ``Q(W)`` (:func:`peft_model`, written
with :func:`lowrank.integrations.peft.dense_base_model` and ``save_peft_adapter``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..layers import check_rank
from ..seeding import derive_seed
from ..wrap import describe_linears, lowrank_layers, match_target_modules, merge_to_dense, replace_layers
from .apiq import LayerStatistics, QuantizedLowRankLinear, apiq_factors, output_error
from .clipping import CLIPPINGS
from .evaluate import as_batches, decoder_layers, plain_model, validation_loss
from .formats import INT_BITS, QuantFormat, bits_per_weight, fake_quantize
from .recipes import INITS, LOSSES, RECIPES, SCHEDULES, Recipe
from .retrain import relative_error, run_block, train_block
from .saliency import PUBLISHED, SALIENCY, FisherRegularizer, RelativeRegularizer, fisher_scores, taylor_scores

__all__ = [
    "METHODS",
    "SALIENCY",
    "RECIPES",
    "quantize",
    "quantized_layers",
    "dequantized_model",
    "peft_model",
    "export_quantized",
]

METHODS = ("apiq+saliency", "apiq", "rtn")
"""The methods of :func:`quantize` (module docstring), the default first."""


# ---------------------------------------------------------------------- checks


def _number(name: str, value, *, zero_allowed: bool, at_most_one: bool = False) -> None:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or value < 0 or (value == 0 and not zero_allowed) or (at_most_one and value > 1):
        bound = "in [0, 1]" if at_most_one else (">= 0" if zero_allowed else "> 0")
        raise UsageError(f"{name} must be a finite number {bound}, got {value!r}")


def _count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be a whole number >= 0, got {value!r}")


def _check_options(bits, method, rank, recipe: Recipe, damp) -> None:
    if isinstance(bits, bool) or bits not in INT_BITS:
        raise UsageError(f"--bits must be one of {', '.join(map(str, INT_BITS))}, got {bits!r}")
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {rank!r}")
    if recipe.steps is not None:
        _count("--steps", recipe.steps)
    else:
        _count("--epochs", recipe.epochs)
    for name, value, zero_allowed in (("--lr", recipe.lr, False), ("--saliency-lambda", recipe.saliency_lambda, True),
                                      ("damp", damp, False), ("weight_decay", recipe.weight_decay, True),
                                      ("clip_lr", recipe.clip_lr, False), ("clip_weight_decay", recipe.clip_weight_decay, True),
                                      ("scale", recipe.scale, False)):
        _number(name, value, zero_allowed=zero_allowed)
    _number("weight_preservation", recipe.weight_preservation, zero_allowed=True, at_most_one=True)
    if recipe.grad_clip is not None:
        _number("grad_clip", recipe.grad_clip, zero_allowed=False)
    if isinstance(recipe.batch_size, bool) or not isinstance(recipe.batch_size, int) or recipe.batch_size < 1:
        raise UsageError(f"--calib-batch-size must be a positive integer, got {recipe.batch_size!r}")
    for name, value, choices in (("--saliency", recipe.saliency, SALIENCY), ("--clipping", recipe.clipping, CLIPPINGS),
                                 ("schedule", recipe.schedule, SCHEDULES), ("loss", recipe.loss, LOSSES),
                                 ("init", recipe.init, INITS)):
        if value not in choices:
            raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if method == "apiq+saliency" and recipe.saliency == PUBLISHED and recipe.clipping != "learned":
        raise UsageError("--saliency fisher (the published form) regularizes the learned clipping; "
                         "use --clipping learned, or --saliency activation / gradient with frozen codes")


def _targets(model: nn.Module, target_modules, exclude_modules, fmt: QuantFormat, rank: int) -> list[str]:
    """The names of the linear layers to quantize, each checked (type, group size, rank, inside a decoder block)."""
    layers_name, _ = decoder_layers(model)
    names = match_target_modules(model, target_modules, exclude_modules)
    if not names:
        raise UsageError(f"target_modules={target_modules!r} matches no module; " + describe_linears(model))
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise UsageError(
                f"{name!r} is a {type(module).__name__}: quantize needs plain nn.Linear layers "
                "(merge a wrapped model with lowrank.merge_to_dense first; GPT-2's Conv1D is not supported)"
            )
        if not name.startswith(f"{layers_name}."):
            raise UsageError(f"{name!r} is outside the decoder blocks ({layers_name}); exclude it (exclude_modules)")
        try:
            fmt.group_entries(tuple(module.weight.shape))
        except ValueError as error:
            raise UsageError(f"--group-size: layer {name!r}: {error}") from None
        try:
            check_rank(rank, module.out_features, module.in_features, where=f"layer {name!r}: ")
        except ValueError as error:
            raise UsageError(f"--rank: {error}") from None
    return names


# ---------------------------------------------------------------------- block by block


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def _record_layer_calls(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> tuple[list, list]:
    """One full-precision forward per batch, recording the first block's hidden-state input and
    the other arguments every block is called with (masks, rotary embeddings; they may differ per
    block, e.g. Qwen2's sliding-window layers)."""
    inputs, calls = [], [[] for _ in layers]

    def hook(index: int):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[index].append((tuple(args[1:]), rest))
            if index == 0:
                inputs.append(hidden)
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, calls


def _capture_inputs(block: nn.Module, names: list[str], hidden: torch.Tensor, call: tuple) -> dict[str, torch.Tensor]:
    """Run ``block`` once; the input of each named submodule (its first call), in call order."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, args):
            seen.setdefault(name, args[0])
        return record

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        run_block(block, hidden, call)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def _stage_statistics(fp_block, q_block, pending, h_fp, h_q, calls) -> tuple[list[str], dict[str, LayerStatistics]]:
    """The next stage of a block: the pending layers that receive the very same input tensor as
    the first pending layer called (q/k/v, gate/up), so quantizing one cannot change another's
    input; and their statistics over all calibration batches."""
    stage, stats = None, {}
    for hidden_fp, hidden_q, call in zip(h_fp, h_q, calls):
        q_inputs = _capture_inputs(q_block, stage or pending, hidden_q, call)
        if stage is None:
            if not q_inputs:
                raise UsageError(f"layers {pending} are never called in a forward pass; exclude them (exclude_modules)")
            leader = next(iter(q_inputs.values()))
            stage = [name for name in pending if q_inputs.get(name) is leader]
            stats = {name: LayerStatistics(leader.shape[-1], leader.device) for name in stage}
        fp_inputs = _capture_inputs(fp_block, stage, hidden_fp, call)
        for name in stage:
            stats[name].add(q_inputs[name], fp_inputs[name])
    return stage, stats


@torch.no_grad()
def _block_error(q_block, h_q, targets, calls) -> float:
    """Mean over batches of ``‖block_q(h_q) − block_fp(h_fp)‖² / ‖block_fp(h_fp)‖²`` (whatever the training loss)."""
    errors = [relative_error(run_block(q_block, h, call), target) for h, target, call in zip(h_q, targets, calls)]
    return float(sum(errors) / len(errors))


def _new_layer(linear: nn.Linear, stats: LayerStatistics, fmt: QuantFormat, recipe: Recipe, options: dict,
               seed: int) -> tuple[QuantizedLowRankLinear, dict]:
    """The quantized layer of ``linear`` with the recipe's base and factor initialisation, and its
    layer output errors (RTN, and the initialised layer's)."""
    layer = QuantizedLowRankLinear.from_linear(linear, options["rank"], fmt, alpha=options["alpha"], seed=seed,
                                               clipping=recipe.clipping)
    with torch.no_grad():
        if recipe.init == "closed_form":
            base = layer.quantized_base.weight(torch.float64)
            B, A = apiq_factors(linear.weight, base, stats, rank=layer.rank, scale=layer.scale, damp=options["damp"])
            layer.B.copy_(B)
            layer.A.copy_(A)
        rtn = fake_quantize(linear.weight.detach(), fmt)
        errors = {"rtn_error": output_error(linear.weight, rtn, stats),
                  "apiq_error": output_error(linear.weight, layer.dense_weight(), stats)}
    return layer, errors


def _regularizer(layers: dict, fp_block: nn.Module, scores: dict, saliency: str):
    if saliency == PUBLISHED:
        return FisherRegularizer(layers, scores)
    return RelativeRegularizer(layers, {rel: fp_block.get_submodule(rel).weight for rel in layers}, scores)


def _quantize_blocks(fp, q, targets, batches, fmt, recipe: Recipe, options: dict, model_scores) -> dict:
    """ApiQ, decoder block by decoder block (module docstring): initialise each target on the
    statistics of its stage, then retrain the block (:func:`lowrank.quant.retrain.train_block`)
    and store its codes; feed the next block the full-precision and the quantized block's outputs."""
    layers_name, fp_blocks = decoder_layers(fp)
    _, q_blocks = decoder_layers(q)
    index = {name: i for i, name in enumerate(targets)}
    by_block: dict[int, list[str]] = {}
    for name in targets:
        block, _, rel = name[len(layers_name) + 1:].partition(".")
        by_block.setdefault(int(block), []).append(rel)
    h_fp, calls = _record_layer_calls(fp, fp_blocks, batches)
    h_q = list(h_fp)
    errors, blocks = {}, []
    steps, saliency = options["steps"], options["saliency"]
    for b, (fp_block, q_block) in enumerate(zip(fp_blocks, q_blocks)):
        pending, layers, scores = by_block.get(b, []), {}, {}
        while pending:
            stage, stats = _stage_statistics(fp_block, q_block, pending, h_fp, h_q, calls[b])
            for rel in stage:
                name = f"{layers_name}.{b}.{rel}"
                linear = fp_block.get_submodule(rel)
                layer, errors[name] = _new_layer(linear, stats[rel], fmt, recipe, options, derive_seed(options["seed"], index[name]))
                if saliency == "activation":
                    scores[rel] = linear.weight.detach().abs() * stats[rel].input_norms().to(linear.weight)[None, :]
                elif saliency is not None:
                    scores[rel] = model_scores[name]
                _set_module(q_block, rel, layer)
                layers[rel] = layer
            pending = [rel for rel in pending if rel not in stage]
        with torch.no_grad():
            targets_out = [run_block(fp_block, h, call) for h, call in zip(h_fp, calls[b])]
            aug = [run_block(fp_block, h, call) for h, call in zip(h_q, calls[b])] if recipe.aug_loss and layers and steps else None
        if layers and steps:
            regularizer = _regularizer(layers, fp_block, scores, saliency) if saliency is not None else None
            weight_steps = round(recipe.weight_preservation * steps) if saliency == PUBLISHED else 0
            initial = _block_error(q_block, h_q, targets_out, calls[b])
            history = train_block(q_block, layers, h_q, targets_out, aug, calls[b], recipe=recipe, steps=steps,
                                  reg_lambda=recipe.saliency_lambda, regularizer=regularizer, weight_steps=weight_steps)
        for layer in layers.values():
            layer.freeze_base()
        if layers and steps:
            blocks.append({"block": b, "initial": initial, "final": _block_error(q_block, h_q, targets_out, calls[b]),
                           "history": history})
        if b + 1 < len(fp_blocks):
            with torch.no_grad():
                h_q = [run_block(q_block, h, call) for h, call in zip(h_q, calls[b])]
            h_fp = targets_out
    return {"layers": errors, "blocks": blocks}


# ---------------------------------------------------------------------- entry point


def quantize(
    model: nn.Module,
    calibration_batches: torch.Tensor | list[torch.Tensor],
    *,
    bits: int,
    recipe: str = next(iter(RECIPES)),
    method: str = METHODS[0],
    group_size: int | None = None,
    flat: bool = False,
    rank: int = 64,
    steps: int | None = None,
    lr: float | None = None,
    reg_lambda: float | None = None,
    saliency: str | None = None,
    clipping: str | None = None,
    batch_size: int | None = None,
    alpha: float | None = None,
    symmetric: bool = False,
    damp: float = 0.01,
    target_modules: list[str] | str = "all-linear",
    exclude_modules: list[str] | str | None = None,
    seed: int = 0,
    **settings: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``model``'s linear layers to ``bits`` with low-rank factors (module docstring).

    Every retraining option left ``None`` takes the value of ``recipe``
    (:data:`lowrank.quant.recipes.RECIPES`: ``"ours"`` or ``"apiq"``, ApiQ's released settings).

    Args:
        model: a causal LM; left untouched (a wrapped or OSP model is first made plain:
            :func:`lowrank.quant.evaluate.plain_model`).
        calibration_batches: token ids, an ``(N, T)`` LongTensor (split into ``batch_size`` rows)
            or a list of ``(B, T)`` batches.
        bits: 2, 3, 4 or 8.
        recipe: the named settings the other options default to.
        method: ``"apiq+saliency"``, ``"apiq"`` or ``"rtn"``.
        group_size: input channels per quantization group; must divide every target's input
            dimension (default: the recipe's for ``bits``).
        flat: groups of ``group_size`` consecutive entries of the flattened weight instead (they
            may span rows; the group size must divide each weight's number of entries).
        rank: rank of the factors (ApiQ uses 64 on 7B models).
        steps: retraining steps per block (default: the recipe's; ``"apiq"`` counts 20 epochs
            over the calibration batches); ``0`` keeps the initialisation.
        lr: the factors' AdamW learning rate.
        reg_lambda: ``λ`` of the saliency regularizer (``"apiq+saliency"`` only).
        saliency: ``"fisher"`` (published), ``"activation"`` or ``"gradient"`` (ours):
            :mod:`lowrank.quant.saliency`.
        clipping: ``"learned"`` (ApiQ's) or ``"frozen"`` round-to-nearest codes.
        batch_size: calibration sequences per retraining step when the batches are one tensor.
        alpha: scale numerator, ``s = alpha / rank`` (default: the recipe's ``scale · rank``).
        symmetric: absmax grid instead of min–max with a zero point.
        damp: the ridge ``δ`` of the closed-form initialisation, relative to the mean input energy.
        settings: any other :class:`~lowrank.quant.recipes.Recipe` field (``epochs``,
            ``weight_decay``, ``schedule``, ``grad_clip``, ``loss``, ``aug_loss``, ``init``,
            ``clip_lr``, ``clip_weight_decay``, ``weight_preservation``).

    Returns:
        The quantized model (a copy; eval mode; ``A``/``B`` trainable, all else frozen) and a report:
        ``{"method", "recipe", "bits", "format", "group_size", "rank", "bits_per_weight", "layers":
        {name: {"rtn_error", "apiq_error"}}, "blocks": [{"block", "initial", "final", "history"}],
        "calibration_loss", "retraining", ...}``.

    Raises:
        UsageError: bits outside {2, 3, 4, 8}, an unknown method, recipe or option value, a group
            size or rank that does not fit a layer, a target that is not an ``nn.Linear`` inside a
            decoder block.
    """
    if recipe not in RECIPES:
        raise UsageError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(Recipe)} | ({"name", "group_size"} & set(settings)))
    if unknown:
        raise UsageError(f"quantize: unknown option(s) {', '.join(unknown)}")
    chosen = RECIPES[recipe].replace(steps=steps, lr=lr, saliency_lambda=reg_lambda, saliency=saliency,
                                     clipping=clipping, batch_size=batch_size, **settings)
    _check_options(bits, method, rank, chosen, damp)
    group_size = chosen.group_size[bits] if group_size is None else group_size
    alpha = chosen.scale * rank if alpha is None else alpha
    try:
        fmt = QuantFormat("int", bits, group_size, symmetric=symmetric, flat=flat)
    except ValueError as error:
        raise UsageError(f"--group-size: {error}") from None
    start = time.perf_counter()
    fp = plain_model(model)
    was_training = fp.training
    fp.eval()
    try:
        batches = as_batches(calibration_batches, chosen.batch_size, next(fp.parameters()).device)
        steps = chosen.steps_per_block(len(batches)) if method != "rtn" else 0
        regularized = method == "apiq+saliency" and chosen.saliency_lambda > 0 and steps > 0
        saliency = chosen.saliency if regularized else None
        targets = _targets(fp, target_modules, exclude_modules, fmt, rank)
        q = copy.deepcopy(fp).requires_grad_(False)
        if method == "rtn":
            for i, name in enumerate(targets):
                layer = QuantizedLowRankLinear.from_linear(fp.get_submodule(name), rank, fmt, alpha=alpha, seed=derive_seed(seed, i))
                _set_module(q, name, layer)
            result = {"layers": {}, "blocks": []}
        else:
            scores = {"fisher": fisher_scores, "gradient": taylor_scores}.get(saliency)
            options = {"rank": rank, "alpha": alpha, "damp": damp, "seed": seed, "steps": steps, "saliency": saliency}
            result = _quantize_blocks(fp, q, targets, batches, fmt, chosen, options,
                                      scores(fp, targets, batches) if scores else None)
        loss = validation_loss(q, batches)
        fp_loss = validation_loss(fp, batches)
    finally:
        fp.train(was_training)
    q.eval()
    layers = quantized_layers(q)
    dense = sum(layer.in_features * layer.out_features for layer in layers.values())
    factors = sum((layer.in_features + layer.out_features) * layer.rank for layer in layers.values())
    base_bits = bits_per_weight(fmt)
    report = {
        "method": method,
        "recipe": recipe,
        "bits": bits,
        "format": fmt.label,
        "group_size": group_size,
        "symmetric": symmetric,
        "rank": rank,
        "alpha": alpha,
        "layers_quantized": len(layers),
        "bits_per_weight": {"base": base_bits, "with_factors_bf16": base_bits + 16 * factors / dense},
        "calibration": {"batches": len(batches), "tokens": sum(b.numel() for b in batches)},
        "retraining": {
            "steps_per_block": steps,
            "lr": chosen.lr if steps else None,
            "lambda": chosen.saliency_lambda if regularized else None,
            "saliency": saliency,
            "settings": {k: v for k, v in dataclasses.asdict(chosen).items() if k != "group_size"} if method != "rtn" else None,
        },
        "calibration_loss": {"full_precision": fp_loss, "quantized": loss},
        **result,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return q, report


# ---------------------------------------------------------------------- export


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLowRankLinear]:
    """The :class:`QuantizedLowRankLinear` layers of ``model`` by name, in module order."""
    return {name: layer for name, layer in lowrank_layers(model).items() if isinstance(layer, QuantizedLowRankLinear)}


def _require_quantized(model: nn.Module, action: str) -> None:
    if not quantized_layers(model):
        raise ValueError(f"{action}: the model has no QuantizedLowRankLinear layers; run lowrank.quant.quantize first")


def dequantized_model(model: nn.Module) -> nn.Module:
    """A plain dense copy: every quantized layer an ``nn.Linear`` holding ``Q(W) + s·BA`` (and its
    bias), so ``save_pretrained`` / ``from_pretrained`` need nothing of ``lowrank``."""
    _require_quantized(model, "dequantized_model")
    return merge_to_dense(model)


def peft_model(model: nn.Module) -> nn.Module:
    """A copy in which every quantized layer is a ``LowRankLinear(keep_base=True)`` over the
    dequantized ``Q(W)`` with the same factors: the form :func:`lowrank.integrations.peft.dense_base_model`
    and ``save_peft_adapter`` turn into a base model and a LoRA adapter."""
    _require_quantized(model, "peft_model")
    return replace_layers(copy.deepcopy(model), lambda layer: layer.to_lowrank_linear())


def export_quantized(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    report: dict | None = None,
    peft: bool = False,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the quantized ``model``: ``out/`` the dense model (:func:`dequantized_model`) with the
    tokenizer and ``quantize.json`` (the report); with ``peft``, also ``out/peft/base`` (the
    dequantized base) and ``out/peft/adapter`` (the LoRA adapter). Written into a temporary folder,
    then renamed into place. Returns the paths written."""
    from ..integrations.peft import dense_base_model, save_peft_adapter

    _require_quantized(model, "export_quantized")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not empty; pick a new folder, or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dequantized_model(model).save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if report is not None:
        (tmp / "quantize.json").write_text(json.dumps(report, indent=1) + "\n")
    if peft:
        adapter_model = peft_model(model)
        dense_base_model(adapter_model).save_pretrained(tmp / "peft" / "base", safe_serialization=True)
        save_peft_adapter(adapter_model, tmp / "peft" / "adapter", base_model_name_or_path=str(out / "peft" / "base"))
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.rename(tmp, out)
    paths = {"model": str(out)}
    if peft:
        paths.update(base=str(out / "peft" / "base"), adapter=str(out / "peft" / "adapter"))
    return paths
