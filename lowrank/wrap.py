"""Turn the linear layers of any Hugging Face model into :class:`~lowrank.layers.LowRankLinear`.

Target selection is PEFT's own (``LoraConfig.target_modules`` / ``exclude_modules`` rules, the
``"all-linear"`` shorthand that leaves out the output head): we call PEFT's matcher rather than
re-implementing it, so a pattern selects the same modules here as in a LoRA adapter.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layers import LowRankLinear, check_init, check_rank, check_sparse_density, check_sparse_init, rank_from_ratio
from .seeding import derive_seed

__all__ = [
    "LowRankConfig",
    "ParameterCount",
    "wrap",
    "lowrank_layers",
    "is_wrapped",
    "refactorize",
    "merge",
    "merge_to_dense",
    "count_parameters",
    "match_target_modules",
    "unwrap_model",
    "factorize_layer",
    "mark_wrapped",
]

_LINEAR_TYPES = (nn.Linear, Conv1D)
_CONFIG_ATTRIBUTE = "lowrank_config"


@dataclass
class LowRankConfig:
    """How :func:`wrap` factorizes a model.

    Attributes:
        rank: rank ``r`` of every wrapped layer. Give exactly one of ``rank`` and ``rank_ratio``.
        rank_ratio: rank as a fraction of each layer's ``min(m, n)`` (rounded, at least 1).
        alpha: scale numerator, ``s = alpha / r``; ``None`` means ``s = 1``.
        target_modules: PEFT's rules: a list of module names or name suffixes, a regex string
            matched with ``re.fullmatch`` against the full module name, or ``"all-linear"``
            (every ``nn.Linear``/``Conv1D`` except the output head).
        exclude_modules: PEFT's rules, the same forms as ``target_modules``.
        keep_base: ReLoRA mode: keep the dense weight frozen as ``W0`` and train factors on top.
        sparse_density: SLTrain mode: add a trainable sparse part with this fraction of entries.
        init: one of ``"kaiming"``, ``"lora"``, ``"spectral"`` (see :data:`lowrank.layers.INITS`);
            ``None`` picks ``"lora"`` with ``keep_base`` and ``"kaiming"`` without.
        sparse_init: ``"uniform"`` (SLTrain's ``U(±1/√n)``) or ``"zeros"`` for the sparse part
            (see :data:`lowrank.layers.SPARSE_INITS`); ``None`` picks ``"zeros"`` with
            ``keep_base`` or ``init="spectral"`` and ``"uniform"`` otherwise.
        seed: base seed; layer ``i`` (in module order) draws from ``(seed, i)``.
    """

    rank: int | None = None
    rank_ratio: float | None = None
    alpha: float | None = None
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    keep_base: bool = False
    sparse_density: float = 0.0
    init: str | None = None
    sparse_init: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.rank_ratio is None):
            raise ValueError(
                "LowRankConfig needs exactly one of rank (an int, e.g. rank=128) and rank_ratio "
                f"(a fraction of min(m, n), e.g. rank_ratio=0.25); got rank={self.rank!r}, rank_ratio={self.rank_ratio!r}"
            )
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.rank_ratio is not None and (isinstance(self.rank_ratio, bool) or not isinstance(self.rank_ratio, (int, float))
                                            or not 0.0 < self.rank_ratio <= 1.0):
            raise ValueError(f"rank_ratio must be in (0, 1], got {self.rank_ratio!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"alpha must be a finite number > 0 (s = alpha / rank), got {self.alpha!r}")
        if not isinstance(self.keep_base, bool):
            raise ValueError(f"keep_base must be True or False, got {self.keep_base!r}")
        check_sparse_density(self.sparse_density)
        check_init(self.init)
        check_sparse_init(self.sparse_init)
        if not self.target_modules:
            raise ValueError('target_modules is empty: name modules (e.g. ["q_proj", "v_proj"]) or use "all-linear"')
        _check_patterns("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_patterns("exclude_modules", self.exclude_modules)
        # every layer's seed is derive_seed(seed, i): a 63-bit non-negative integer mixes exactly. (A
        # subclass whose default seed is None, the preset's lowrank section, fills it in later.)
        optional = self.seed is None and next(f.default for f in fields(self) if f.name == "seed") is None
        if not optional and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be a whole number in [0, 2**63), got {self.seed!r}")

    def rank_for(self, out_features: int, in_features: int) -> int:
        if self.rank is not None:
            return self.rank
        return rank_from_ratio(self.rank_ratio, out_features, in_features)

    def layer_options(self) -> dict:
        """The :class:`LowRankLinear` keyword arguments this config sets for every layer."""
        return {"alpha": self.alpha, "keep_base": self.keep_base, "sparse_density": self.sparse_density, "init": self.init,
                "sparse_init": self.sparse_init}

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(data[key], (set, tuple)):
                data[key] = sorted(data[key])
        return data


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def _check_patterns(name: str, value) -> None:
    """PEFT's forms (a name or regex string, or a collection of names), checked here: PEFT itself
    accepts anything and fails, or matches nothing, only when the model is wrapped."""
    if isinstance(value, str) or (isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value)):
        return
    raise ValueError(f'{name} must be a module name pattern (a string, e.g. "all-linear") or a list of module names '
                     f'(e.g. ["q_proj", "v_proj"]), got {value!r}')


def match_target_modules(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Names of the modules of ``model`` that PEFT's rules select (any module type), in module order."""
    # Imported here: PEFT pulls in half of the ecosystem and would add seconds to `import lowrank`.
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    # A LoraConfig only as a carrier for PEFT's matching rules; its rank is irrelevant here.
    peft_config = LoraConfig(target_modules=copy.deepcopy(target_modules), exclude_modules=copy.deepcopy(exclude_modules))
    peft_config = _maybe_include_all_linear_layers(peft_config, model)
    return [name for name, _ in model.named_modules() if name and check_target_module_exists(peft_config, name)]


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (*_LINEAR_TYPES, LowRankLinear))]


def describe_linears(model: nn.Module) -> str:
    names = _linear_names(model)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    example = names[0] if names else "<none>"
    return f"linear modules in this model end with: {', '.join(suffixes) or '<none>'} (full names look like {example!r})"


def wrap(model: nn.Module, config: LowRankConfig) -> nn.Module:
    """Replace the targeted ``nn.Linear`` / ``Conv1D`` layers of ``model`` with
    :class:`LowRankLinear`, in place, and return ``model``.

    Works for any ``transformers`` causal LM (LLaMA, Qwen2, GPT-2, ...) and plain ``nn.Module``
    trees. Layer ``i`` (in ``named_modules`` order) is seeded with
    :func:`lowrank.seeding.derive_seed` ``(config.seed, i)``. The model
    keeps working with ``generate``, its ``state_dict`` and ``torch.compile``.

    Raises:
        ValueError: a pattern matches no linear module (the message lists the ones that exist),
            matches a module that is not linear, matches a layer already wrapped or whose weight
            is tied to another module, or the rank does not fit a layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap(model, config) needs a torch.nn.Module as model, got {type(model).__name__}")
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"wrap(model, config) needs a lowrank.LowRankConfig, got {type(config).__name__}")
    names = match_target_modules(model, config.target_modules, config.exclude_modules)
    matched = [(name, model.get_submodule(name)) for name in names]
    if not matched:
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no module; "
            + describe_linears(model)
        )
    for name, module in matched:
        if isinstance(module, LowRankLinear):
            raise ValueError(f"module {name!r} is already a LowRankLinear: the model was wrapped before")
        if not isinstance(module, _LINEAR_TYPES):
            raise ValueError(
                f"target_modules matches {name!r}, a {type(module).__name__}: only nn.Linear and Conv1D can be "
                f"factorized; narrow target_modules or add it to exclude_modules. " + describe_linears(model)
            )

    shared = _tied_weights(model)
    plan = []
    for name, module in matched:
        out_features, in_features = _dense_shape(module)
        if id(module.weight) in shared:
            others = ", ".join(sorted(n for n in shared[id(module.weight)] if n != name))
            raise ValueError(
                f"{name!r} shares its weight with {others} (tied embeddings): factorizing it would untie them; "
                "add it to exclude_modules or build the model with tie_word_embeddings=False"
            )
        rank = config.rank_for(out_features, in_features)
        check_rank(rank, out_features, in_features, where=f"layer {name!r}: ")
        plan.append((name, module, rank))

    for index, (name, module, rank) in enumerate(plan):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, factorize_layer(module, rank, config, index))
    mark_wrapped(model, config)
    return model


def factorize_layer(module: nn.Module, rank: int, config: LowRankConfig, index: int) -> LowRankLinear:
    """The :class:`LowRankLinear` that :func:`wrap` puts in place of ``module``, the ``index``-th
    layer of its plan (in module order): seeded with ``derive_seed(config.seed, index)``, so a
    model built layer by layer (:func:`lowrank.methods.build_method_model`) gets the same values."""
    return LowRankLinear.from_module(module, rank, **config.layer_options(), seed=derive_seed(config.seed, index))


def mark_wrapped(model: nn.Module, config: LowRankConfig) -> None:
    """Record ``config`` on ``model``, as :func:`wrap` does, so that events, export and checkpoints
    know how it was built."""
    setattr(model, _CONFIG_ATTRIBUTE, config)


def _dense_shape(module: nn.Module) -> tuple[int, int]:
    """``(m, n)`` = (out, in) of an ``nn.Linear`` or ``Conv1D`` (whose weight is stored ``n × m``)."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{name}.{param_name}" if name else param_name)
    modules_by_param = {}
    for pid, names in owners.items():
        modules = {n.rpartition(".")[0] for n in names}
        if len(modules) > 1:
            modules_by_param[pid] = sorted(modules)
    return modules_by_param


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """The wrapped layers of ``model`` by module name, in module order; a DDP or ``torch.compile``
    wrapper is looked through, so the names are those of the model itself."""
    model = unwrap_model(model)
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(module, LowRankLinear) for module in model.modules())


def _require_layers(model: nn.Module, action: str) -> dict[str, LowRankLinear]:
    layers = lowrank_layers(model)
    if not layers:
        raise ValueError(f"{action}: the model has no LowRankLinear layers; call lowrank.wrap(model, config) first")
    return layers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (the model itself if none)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def refactorize(model: nn.Module) -> dict[str, torch.Tensor]:
    """Balanced refactorization of every wrapped layer (:meth:`LowRankLinear.refactorize`).

    Returns:
        ``{layer name: singular values of B A}``, useful to log the spectrum.
    """
    return {name: layer.refactorize() for name, layer in _require_layers(model, "refactorize").items()}


def merge(model: nn.Module) -> dict[str, float]:
    """ReLoRA merge of every wrapped layer (:meth:`LowRankLinear.merge`); needs ``keep_base``.

    Returns:
        ``{layer name: Frobenius norm of the merged update s·BA}``.
    """
    return {name: layer.merge() for name, layer in _require_layers(model, "merge").items()}


def merge_to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain model with ordinary ``nn.Linear`` (or ``Conv1D``) layers and the same logits.

    The result holds no ``lowrank`` classes, so ``transformers`` alone can ``save_pretrained``
    and ``from_pretrained`` it. By default the wrapped model is left untouched (a deep copy is
    converted); ``inplace=True`` converts ``model`` itself and saves the copy's memory.
    """
    model = unwrap_model(model)
    _require_layers(model, "merge_to_dense")
    if not inplace:
        model = copy.deepcopy(model)
    return replace_layers(model, lambda layer: layer.to_dense())


def replace_layers(model: nn.Module, convert: Callable[[LowRankLinear], nn.Module]) -> nn.Module:
    """Put ``convert(layer)`` in place of every wrapped layer of ``model`` (in place) and drop the
    wrap record, so the result no longer counts as wrapped."""
    for name, layer in list(lowrank_layers(model).items()):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, convert(layer))
    if hasattr(model, _CONFIG_ATTRIBUTE):
        delattr(model, _CONFIG_ATTRIBUTE)
    return model


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and frozen parameter counts (shared/tied parameters counted once)."""
    trainable = frozen = 0
    for param in unwrap_model(model).parameters():
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return ParameterCount(trainable=trainable, frozen=frozen)
