"""Named settings of :func:`lowrank.quant.ptq.quantize`: ours and ApiQ's released ones, in one place.

Every default of ``quantize`` / ``lowrank quantize --recipe NAME`` comes from a :class:`Recipe`;
an option given explicitly overrides the recipe's value (:meth:`Recipe.replace`).

* ``"ours"`` (default): the closed-form ApiQ initialisation of the factors (:mod:`lowrank.quant.apiq`),
  then 200 AdamW steps per block at lr 1e-3 (cosine with 10 % warm-up, gradients clipped at 1,
  no weight decay) on the block's *relative* output error, LoRA scale ``s = 1``, groups of 128,
  65,536 calibration tokens in batches of 4 sequences, and ApiQ's learned clipping (lr 5e-3,
  weight decay 0.1) trained with the factors.
* ``"apiq"``: ApiQ's released 2-bit script (BaohaoLiao/ApiQ ``scripts/quantize.sh`` and the
  ``apiq/main.py`` defaults it relies on): 128 calibration samples of 2,048 tokens (262,144
  tokens), one sample per step, 20 epochs (2,560 steps per block), AdamW at a constant lr 5e-4 /
  weight decay 0.1 for the LoRA factors and 5e-3 / 0.1 for the clipping, no gradient clipping,
  **MSE** loss plus the ``--aug_loss`` term (the same MSE against the full-precision block fed the
  quantized stream), LoRA ``r = 64, lora_alpha = 16`` (``s = 16/64 = 0.25``) with PEFT's
  initialisation (``A`` Kaiming, ``B = 0``), groups of 64 at 2 bits. The group size at 3 and 4
  bits (128) is OmniQuant's / ApiQ's paper setting, not in the script. The script also passes
  ``--symmetric``, whose grid in their code is an absmax scale with a fixed zero point
  ``2^(b−1) − 1`` (4 levels at 2 bits); both recipes use the asymmetric min–max grid of
  DESIGN 2.13 (``--symmetric`` gives our zero-free symmetric grid instead).

Saliency-aware regularizer (``method="apiq+saliency"``), the same in both recipes: λ = 0.1 and
the first 75 % of the steps as weight-preservation steps, from ULB-SAPR's README example
("Saliency-Aware Weight Preservation": ``--lambda_reg 0.1 --reg_method before_lora
--weighted_reg --wpt_epochs 15 --opt_epochs 5``); see :mod:`lowrank.quant.saliency`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Recipe", "RECIPES", "SCHEDULES", "LOSSES", "INITS"]

SCHEDULES = ("cosine", "constant")
"""Learning-rate schedules of the retraining: cosine with 10 % linear warm-up, or constant."""
LOSSES = ("relative", "mse")
"""Block losses: ``‖f_q − f‖² / ‖f‖²`` or the mean squared error (ApiQ's ``nn.MSELoss``)."""
INITS = ("closed_form", "lora")
"""Factor initialisations: ApiQ's objective solved in closed form, or PEFT's (``A`` Kaiming, ``B = 0``)."""


@dataclass(frozen=True)
class Recipe:
    """One configuration of the block-wise retraining (module docstring).

    ``steps`` fixes the steps per block; ``epochs`` (when ``steps`` is ``None``) gives
    ``epochs × calibration batches`` steps, a pass over the calibration set per epoch.
    ``scale`` is the LoRA scale ``s = alpha / rank``. ``group_size`` maps bits to the group size.
    """

    name: str
    steps: int | None
    epochs: int | None
    lr: float
    weight_decay: float
    schedule: str
    grad_clip: float | None
    loss: str
    aug_loss: bool
    scale: float
    init: str
    clipping: str
    clip_lr: float
    clip_weight_decay: float
    group_size: dict[int, int]
    calib_tokens: int
    batch_size: int
    saliency: str
    saliency_lambda: float
    weight_preservation: float

    def steps_per_block(self, batches: int) -> int:
        """Retraining steps per block for ``batches`` calibration batches."""
        return self.steps if self.steps is not None else self.epochs * batches

    def replace(self, **overrides) -> "Recipe":
        """A copy with the options that are not ``None`` replaced; ``epochs`` given without
        ``steps`` counts the steps by epochs (``steps`` given wins)."""
        given = {key: value for key, value in overrides.items() if value is not None}
        if "epochs" in given and "steps" not in given:
            given["steps"] = None
        return dataclasses.replace(self, **given)


_SALIENCY = {"saliency": "fisher", "saliency_lambda": 0.1, "weight_preservation": 0.75}

RECIPES: dict[str, Recipe] = {
    "ours": Recipe(name="ours", steps=200, epochs=None, lr=1e-3, weight_decay=0.0, schedule="cosine", grad_clip=1.0,
                   loss="relative", aug_loss=False, scale=1.0, init="closed_form", clipping="learned", clip_lr=5e-3,
                   clip_weight_decay=0.1, group_size={2: 128, 3: 128, 4: 128, 8: 128}, calib_tokens=65_536,
                   batch_size=4, **_SALIENCY),
    "apiq": Recipe(name="apiq", steps=None, epochs=20, lr=5e-4, weight_decay=0.1, schedule="constant", grad_clip=None,
                   loss="mse", aug_loss=True, scale=0.25, init="lora", clipping="learned", clip_lr=5e-3,
                   clip_weight_decay=0.1, group_size={2: 64, 3: 128, 4: 128, 8: 128}, calib_tokens=262_144,
                   batch_size=1, **_SALIENCY),
}
"""The named recipes, the default first."""
