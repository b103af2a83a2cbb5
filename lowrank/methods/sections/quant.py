"""The ``quant`` section: fake-quantized (e.g. 4-bit) training (absent: full precision)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError
from .base import SectionView, _Check

QUANT_FORMATS = ("int8", "int4", "fp4", "fp4_e1m2", "fp4_e2m1")
"""``fp4`` is ``fp4_e1m2``, the FP4 of Stable-SPAM's scripts; ``fp4_e2m1`` is the OCP MX FP4."""


@dataclass(frozen=True)
class QuantSection(SectionView):
    """Fake-quantized training (straight-through estimator; :mod:`lowrank.quant.fake`), as
    Stable-SPAM's 4-bit scripts simulate it. Defaults: INT4 weights, asymmetric min–max per group
    of 256; INT4 activations per group of 64 with stochastic rounding, the 2 largest-magnitude
    entries of each group kept in full precision; on q/k/v/o/gate/up/down.

    * ``weights`` / ``activations``: one of :data:`QUANT_FORMATS`, or ``null`` (full precision).
    * ``group_size``: weight group size; ``activation_group_size``: activation group size; groups
      are consecutive entries of the flattened tensor (Stable-SPAM's ``reshape(-1, g)``).
    * ``stochastic_rounding``: for activations (weights round to nearest).
    * ``keep_outliers``: full-precision entries per activation group.
    * ``target_modules``: PEFT's rules.
    """

    weights: str | None = "int4"
    activations: str | None = "int4"
    group_size: int = 256
    activation_group_size: int = 64
    stochastic_rounding: bool = True
    keep_outliers: int = 2
    target_modules: str | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    NAME = "quant"
    CHECKS = {
        "weights": _Check.optional(_Check.choice(QUANT_FORMATS)),
        "activations": _Check.optional(_Check.choice(QUANT_FORMATS)),
        "group_size": _Check.integer(1),
        "activation_group_size": _Check.integer(1),
        "stochastic_rounding": _Check.flag(),
        "keep_outliers": _Check.integer(0),
        "target_modules": _Check.patterns(),
    }

    def check(self, where: str) -> None:
        if self.weights is None and self.activations is None:
            raise UsageError(f"{where}: quant: weights and activations are both null; drop the section instead")
        try:
            self.config(0)
        except ValueError as error:
            raise UsageError(f"{where}: quant: {error}") from None

    def formats(self):
        """``(weight format, activation format)`` as :class:`lowrank.quant.QuantFormat` (or ``None``)."""
        from ...quant import QuantFormat

        def make(name, group, activation):
            if name is None:
                return None
            kind, bits = ("int", int(name[3:])) if name.startswith("int") else ("fp4_e2m1" if name == "fp4_e2m1" else "fp4_e1m2", 4)
            # Groups of the flattened tensor, as Stable-SPAM's scripts (x.reshape(-1, g)).
            return QuantFormat(kind=kind, bits=bits, group_size=group, symmetric=activation or kind != "int",
                               stochastic=activation and self.stochastic_rounding,
                               keep_outliers=self.keep_outliers if activation else 0, flat=True)

        return (make(self.weights, self.group_size, False), make(self.activations, self.activation_group_size, True))

    def config(self, seed: int):
        """The :class:`lowrank.quant.FakeQuantConfig` to apply (``seed``: the run's)."""
        from ...quant import FakeQuantConfig

        weights, activations = self.formats()
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return FakeQuantConfig(weights=weights, activations=activations, target_modules=targets, seed=seed)
