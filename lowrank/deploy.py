"""A trained model as it is deployed: plain ``transformers`` modules with the same function.

Training may leave three things that a plain model does not have: fake-quantized layers
(:mod:`lowrank.quant.fake`; removed: the full-precision weights are what was trained),
``LowRankLinear`` layers (merged to ``nn.Linear`` holding ``W0 + s·BA + S``) and OSP's
single-scale norms and embedding projections (folded into ordinary RMSNorm weights and the
embedding / head matrices, :func:`lowrank.osp.fold`). ``lowrank export`` and ``lowrank quant-eval``
both start from :func:`plain_model`.
"""

from __future__ import annotations

import copy

from torch import nn

from .osp import fold, is_osp
from .wrap import is_wrapped, merge_to_dense

__all__ = ["plain_model"]


def plain_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` itself when it is plain already; otherwise a copy (or, with ``inplace``, the
    model itself) with fake quantization removed, merged to dense and OSP folded."""
    # Imported here, not at the top: lowrank.quant's package imports quant.evaluate, which imports
    # this module; a top-level import made ``from lowrank.deploy import plain_model`` a cycle.
    from .quant.fake import is_fake_quantized, remove_fake_quant

    if not (is_fake_quantized(model) or is_wrapped(model) or is_osp(model)):
        return model
    plain = model if inplace else copy.deepcopy(model)
    if is_fake_quantized(plain):
        remove_fake_quant(plain)
    if is_wrapped(plain):
        plain = merge_to_dense(plain, inplace=True)
    if is_osp(plain):
        plain = fold(plain)
    return plain
