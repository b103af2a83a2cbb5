"""Quantization for lowrank: formats as pure functions (:mod:`lowrank.quant.formats`),
straight-through fake quantization of linear and low-rank layers (:mod:`lowrank.quant.fake`),
quantization evaluation of a trained model (:mod:`lowrank.quant.evaluate`: hidden-state kurtosis,
perplexity under weight-only and W/A quantization), and ultra-low-bit post-training quantization
with low-rank partial retraining (:mod:`lowrank.quant.ptq`: ApiQ and its saliency-aware
extension; the quantized layer and closed-form initialisation in :mod:`lowrank.quant.apiq`,
learned clipping in :mod:`lowrank.quant.clipping`, the block retraining in
:mod:`lowrank.quant.retrain`, the regularizer forms in :mod:`lowrank.quant.saliency`, the named
settings in :mod:`lowrank.quant.recipes`).

Formats: INT8/4/3/2, symmetric (absmax) or asymmetric (min–max with a zero point), per group /
per row (per token) / per tensor, round-to-nearest or seeded stochastic rounding, top-k outliers
kept in full precision; FP4 E2M1 (OCP MX) and E1M2. The formulas and their sources are in
:mod:`lowrank.quant.formats`; the gradient rule and the seeding of rounding noise in
:mod:`lowrank.quant.fake`.
"""

from .apiq import LayerStatistics, QuantizedBase, QuantizedLowRankLinear, apiq_factors, output_error
from .evaluate import default_schemes, evaluate_quantization, excess_kurtosis, hidden_state_statistics, validation_loss
from .fake import (
    STABLE_SPAM_TARGETS,
    FakeQuantConfig,
    FakeQuantLinear,
    FakeQuantLowRankLinear,
    apply_fake_quant,
    fake_quant_layers,
    fake_quant_state_dict,
    is_fake_quantized,
    load_fake_quant_state_dict,
    remove_fake_quant,
    straight_through,
)
from .formats import (
    E1M2_GRID,
    E2M1_GRID,
    STABLE_SPAM_FP4,
    STABLE_SPAM_INT4_ACTIVATIONS,
    STABLE_SPAM_INT4_WEIGHTS,
    Outliers,
    Quantized,
    QuantFormat,
    bits_per_weight,
    dequantize,
    fake_quantize,
    quantize,
    uniform_noise,
)
from .ptq import dequantized_model, export_quantized, peft_model, quantized_layers
from .ptq import quantize as quantize_model

__all__ = [
    "E1M2_GRID",
    "E2M1_GRID",
    "STABLE_SPAM_FP4",
    "STABLE_SPAM_INT4_ACTIVATIONS",
    "STABLE_SPAM_INT4_WEIGHTS",
    "STABLE_SPAM_TARGETS",
    "FakeQuantConfig",
    "FakeQuantLinear",
    "FakeQuantLowRankLinear",
    "LayerStatistics",
    "Outliers",
    "QuantFormat",
    "Quantized",
    "QuantizedBase",
    "QuantizedLowRankLinear",
    "apiq_factors",
    "apply_fake_quant",
    "bits_per_weight",
    "default_schemes",
    "dequantize",
    "dequantized_model",
    "evaluate_quantization",
    "excess_kurtosis",
    "export_quantized",
    "fake_quant_layers",
    "fake_quant_state_dict",
    "fake_quantize",
    "hidden_state_statistics",
    "is_fake_quantized",
    "load_fake_quant_state_dict",
    "output_error",
    "peft_model",
    "quantize",
    "quantize_model",
    "quantized_layers",
    "remove_fake_quant",
    "straight_through",
    "uniform_noise",
    "validation_loss",
]
