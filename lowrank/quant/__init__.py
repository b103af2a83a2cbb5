"""Quantization for lowrank: formats as pure functions (:mod:`lowrank.quant.formats`) and
straight-through fake quantization of linear and low-rank layers (:mod:`lowrank.quant.fake`).

Formats: INT8/4/3/2, symmetric (absmax) or asymmetric (min–max with a zero point), per group /
per row (per token) / per tensor, round-to-nearest or seeded stochastic rounding, top-k outliers
kept in full precision; FP4 E2M1 (OCP MX) and E1M2. The formulas and their sources are in
:mod:`lowrank.quant.formats`; the gradient rule and the seeding of rounding noise in
:mod:`lowrank.quant.fake`.
"""

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
    "Outliers",
    "QuantFormat",
    "Quantized",
    "apply_fake_quant",
    "bits_per_weight",
    "dequantize",
    "fake_quant_layers",
    "fake_quant_state_dict",
    "fake_quantize",
    "is_fake_quantized",
    "load_fake_quant_state_dict",
    "quantize",
    "remove_fake_quant",
    "straight_through",
    "uniform_noise",
]
