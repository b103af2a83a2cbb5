"""PEFT interoperability: a low-rank model's factors as a PEFT LoRA adapter, and back.

A layer wrapped with a frozen base (``LowRankConfig(keep_base=True)``, ReLoRA) computes
``W0 x + s·B(A x) + b``, which is exactly a PEFT LoRA layer over a base ``nn.Linear`` holding
``W0`` and ``b``, with ``lora_A = A``, ``lora_B = B`` and ``scaling = lora_alpha / r = s``. So:

* :func:`dense_base_model` — the base model: a copy with every wrapped layer replaced by a plain
  layer holding ``W0`` (and its bias); everything else as trained.
* :func:`save_peft_adapter` — ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's
  format (``base_model.model.<module>.lora_A.weight``, ``r``, ``lora_alpha``, exact module names in
  ``target_modules``; per-layer ranks and scales in ``rank_pattern`` / ``alpha_pattern``).
  ``PeftModel.from_pretrained(dense_base, dir)`` gives the wrapped model's logits.
* :func:`load_peft_adapter` — a PEFT LoRA adapter into the factors of a wrapped model.

A layer without a base (plain low-rank training: ``W = s·BA`` alone) or with SLTrain's sparse part
is not a LoRA adapter over any base model we could name; those raise a ``ValueError`` saying so.

Design decision: ReLoRA is built on our ``LowRankLinear(keep_base=True)`` and its ``merge()``, not
on PEFT's ``LoraLayer``. We evaluated the PEFT route and kept ours because:

1. *Merge semantics.* ``LoraLayer.merge()`` is an inference device: it adds ``s·BA`` into
   ``base_layer.weight`` and marks the adapter merged, after which forward skips the LoRA path
   until ``unmerge()``. ReLoRA needs "merge, then train fresh factors": with PEFT that means
   clearing ``merged_adapters`` behind its back, then re-initialising ``lora_A`` and zeroing
   ``lora_B`` by hand. ``merge_and_unload()`` instead swaps the modules out, so the factors would be
   new ``Parameter`` objects and the optimizer would have to be rebuilt every cycle.
2. *Re-initialisation and DDP.* ``reset_lora_parameters`` draws ``lora_A`` from the global torch
   RNG (``kaiming_uniform_(a=√5)``): ranks draw different factors, and a resumed run draws
   differently from an uninterrupted one, unless every caller juggles RNG state. Ours draws from
   ``(layer seed, merge count)``; the count is in the state dict, so every rank agrees without
   communication and resumption is bit-identical.
3. *What else the layer does.* Balanced refactorization, the sparse part, spectral init and
   base-free low-rank training do not exist in PEFT's LoRA; a subclass would re-implement most of
   the layer while inheriting PEFT's state-dict layout (``…q_proj.base_layer.weight``,
   ``…lora_A.default.weight``), which renames every wrapped key, so checkpoints, the meta-device
   memory estimator and ``lowrank export`` would have to handle two layouts. PEFT's forward also
   adds a dropout module and dtype casts per adapter to every step.

What is shared instead is what matters for interoperability: target-module selection calls
PEFT's own matcher (:func:`lowrank.wrap.match_target_modules`), so a pattern selects the same
modules here as in a LoRA adapter, and the adapter format, tested against
``PeftModel.from_pretrained``. PEFT's per-module rank/alpha lookup (``get_pattern_key``) is reused
when reading an adapter.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..layers import LowRankLinear
from ..wrap import unwrap_model, lowrank_layers, replace_layers

__all__ = ["dense_base_model", "save_peft_adapter", "load_peft_adapter"]

_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the HF model)


def _adapter_layers(model: nn.Module, action: str) -> dict[str, LowRankLinear]:
    """The wrapped layers, checked to be expressible as LoRA layers over a base model."""
    layers = lowrank_layers(model)
    if not layers:
        raise ValueError(f"{action}: the model has no LowRankLinear layers; call lowrank.wrap(model, LowRankConfig(keep_base=True, ...)) first")
    for name, layer in layers.items():
        if layer.base_weight is None:
            raise ValueError(
                f"{action}: layer {name!r} has no frozen base: it computes s·BA alone, while a LoRA adapter adds s·BA to a "
                "base model's weight. Only layers wrapped with keep_base=True (ReLoRA) form an adapter; export the whole "
                "model instead (lowrank.merge_to_dense or `lowrank export`)"
            )
        if layer.sparse_values is not None:
            raise ValueError(
                f"{action}: layer {name!r} has a sparse part S (SLTrain, sparse_density > 0), which a LoRA adapter cannot "
                "hold; export the whole model instead (lowrank.merge_to_dense or `lowrank export`)"
            )
    if len({layer.source_type for layer in layers.values()}) > 1:
        raise ValueError(f"{action}: the model mixes nn.Linear and Conv1D layers; PEFT's fan_in_fan_out is one setting per adapter")
    return layers


def dense_base_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each wrapped layer replaced by a plain ``nn.Linear`` (or
    ``Conv1D``) holding its frozen base ``W0`` and bias: the base model that the adapter written by
    :func:`save_peft_adapter` goes on top of. ``model`` is left untouched."""
    _adapter_layers(model, "dense_base_model")
    return replace_layers(copy.deepcopy(unwrap_model(model)), lambda layer: layer.to_dense(weight=layer.base_weight))


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the factors of ``model`` as a PEFT LoRA adapter in ``directory``.

    Every wrapped layer needs a frozen base and no sparse part. ``base_model_name_or_path`` is
    recorded in ``adapter_config.json`` (where the base model lives, e.g. the folder you saved
    :func:`dense_base_model` to). Returns ``directory``.
    """
    from peft import LoraConfig
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    layers = _adapter_layers(model, "save_peft_adapter")
    # The most common rank and alpha are the defaults; the others go to PEFT's per-module
    # patterns, keyed by the escaped full module name (PEFT matches the keys as regexes).
    rank = Counter(layer.rank for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=_plain_number(alpha),
        target_modules=sorted(layers),
        rank_pattern={re.escape(n): layer.rank for n, layer in layers.items() if layer.rank != rank},
        alpha_pattern={re.escape(n): _plain_number(layer.alpha) for n, layer in layers.items() if layer.alpha != alpha},
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=next(iter(layers.values())).source_type == "conv1d",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.A.detach().contiguous().clone()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.B.detach().contiguous().clone()
    save_file(tensors, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into the
    factors of the wrapped ``model``, in place; returns ``model``.

    The adapter must cover exactly the wrapped layers, with their ranks. A different scale
    (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) is folded into ``B`` so that ``s·BA`` equals
    the adapter's update. DoRA, LoRA biases and ``modules_to_save`` have no counterpart here and
    are refused.
    """
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    directory = Path(directory)
    layers = _adapter_layers(model, "load_peft_adapter")
    config_file, weights_file = directory / CONFIG_NAME, directory / SAFETENSORS_WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"load_peft_adapter: {directory} has no {CONFIG_NAME}; pass a folder written by save_pretrained of a PEFT model")
    if not weights_file.is_file():
        raise ValueError(f"load_peft_adapter: {directory} has no {SAFETENSORS_WEIGHTS_NAME} (only safetensors adapters are read)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_peft_adapter: {directory} is a {config.get('peft_type')} adapter; only LoRA adapters map onto B A")
    for key, fine in (("use_dora", False), ("lora_bias", False), ("bias", "none"), ("modules_to_save", None)):
        if config.get(key, fine) not in (fine, [], {}):
            raise ValueError(f"load_peft_adapter: the adapter sets {key}={config[key]!r}, which has no counterpart in LowRankLinear")

    weights = load_file(str(weights_file))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise ValueError(f"load_peft_adapter: the adapter holds {key!r}, which is not a lora_A/lora_B weight")
        factors.setdefault(match.group(1), {})[match.group(2)] = tensor
    missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
    if missing or extra:
        raise ValueError(
            f"load_peft_adapter: the adapter's modules differ from the wrapped layers (not in the adapter: {missing[:3]}, "
            f"not wrapped: {extra[:3]}); wrap with the adapter's target_modules"
        )
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    with torch.no_grad():
        for name, layer in layers.items():
            A, B = factors[name].get("A"), factors[name].get("B")
            if A is None or B is None:
                raise ValueError(f"load_peft_adapter: module {name!r} lacks lora_A or lora_B in the adapter")
            if tuple(A.shape) != tuple(layer.A.shape) or tuple(B.shape) != tuple(layer.B.shape):
                raise ValueError(
                    f"load_peft_adapter: module {name!r}: adapter factors {tuple(B.shape)} @ {tuple(A.shape)} do not fit the "
                    f"layer's {tuple(layer.B.shape)} @ {tuple(layer.A.shape)}; wrap with the adapter's rank"
                )
            r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
            lora_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
            scaling = lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            layer.A.copy_(A)
            layer.B.copy_(B.to(torch.float32) * (scaling / layer.scale))
    return model
