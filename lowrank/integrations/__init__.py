"""Bridges to the Hugging Face ecosystem: add ``lowrank`` to an existing training script, and take
a trained model anywhere without it.

* :mod:`.trainer` — :class:`LowRankCallback` runs the restart controller inside
  ``transformers.Trainer``; :func:`optimizer_cls_and_kwargs` and
  :func:`create_optimizer_and_scheduler` give the Trainer a method preset's optimizer (and its
  jagged-cosine schedule).
* :mod:`.peft` — save the factors of a ReLoRA-style model as a PEFT LoRA adapter and load one back.
* :mod:`.export` — ``lowrank export``: a run folder → a plain dense Hugging Face model folder.

Names are imported lazily: ``lowrank export`` should not pay for importing the ``Trainer``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LowRankCallback": "trainer",
    "LowRankOptimizerFactory": "trainer",
    "optimizer_cls_and_kwargs": "trainer",
    "create_optimizer_and_scheduler": "trainer",
    "save_peft_adapter": "peft",
    "load_peft_adapter": "peft",
    "dense_base_model": "peft",
    "export_model": "export",
    "load_run_model": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowrank.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
