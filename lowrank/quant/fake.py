"""Straight-through fake quantization of linear layers (quantization-aware training).

:func:`apply_fake_quant` makes the targeted ``nn.Linear`` and :class:`~lowrank.layers.LowRankLinear`
layers compute with quantized weights and activations while their parameters stay in full
precision and keep receiving gradients:

* ``nn.Linear``: ``y = Q_w(W) Q_a(x) + b``.
* ``LowRankLinear`` (``y = W0 x + s·B(A x) + S x + b``)::

      x̂ = Q_a(x)     h = Q_a(s · Q_w(A) x̂)     y = Q_w(B) h + Q_w(W0) x̂ + S x + b

  The factors ``A``, ``B`` and the frozen base ``W0`` (when there is one) are quantized as
  weights (groups along their last dimension: ``n`` for ``A`` and ``W0``, ``r`` for ``B``); the
  input activation and the rank-r intermediate ``s·A x̂`` (the input of ``B``) are quantized as
  activations. The sparse part ``S`` of SLTrain stays in full precision, values and input alike
  (a separate sparse kernel, as outlier paths are in mixed-precision schemes). The bias is never
  quantized.

Gradient rule (:func:`straight_through`): the forward returns ``fake_quantize(x)``; the backward
passes the incoming gradient unchanged, ``∂x̂/∂x = 1``. The clipped straight-through estimator
(zero gradient where ``round(x/s) + z`` falls outside ``[qmin, qmax]``, as torchao's
``_fake_quantize_affine_cachemask`` computes) reduces to this identity here, because every scale
is taken from the group's own absmax (or min and max): no entry of a group lies outside its
grid's range, so the mask would be all ones and storing it would cost a byte per entry for
nothing. Scales and zero points are constants to autograd, as in Stable-SPAM's
``qweight.detach() + w − w.detach()``. The same identity holds for the FP4 grids and for
outliers (kept exactly).

Stochastic rounding of activations draws its uniforms from a generator seeded with
``derive_seed(config.seed, STREAM_FAKE_QUANT, layer index, draw count)``: layer ``i`` is the
``i``-th targeted layer in module order, and the draw count counts that layer's draws (one per
forward for ``nn.Linear``, two for ``LowRankLinear``: input, then intermediate). On the CPU it is
:func:`lowrank.seeding.cpu_generator`; on CUDA (or any other device) a generator of that device
seeded with the same integer, since filling a large tensor from a CPU generator and copying it
over is slow. CUDA and CPU generators give different streams for the same seed, so a CUDA run's
rounding noise is not a CPU run's (each is a pure function of the integers on its device type).
The draw runs outside ``torch.compile`` graphs (``torch.compiler.disable``; one graph break per
draw), the quantization itself inside them. Draw counts are not in the ``state_dict`` (which
keeps the model's own keys); :func:`fake_quant_state_dict` and :func:`load_fake_quant_state_dict`
carry them across a resume. Activation checkpointing (:mod:`lowrank.checkpointing`) runs a
layer's forward a second time in backward; :func:`checkpoint_context_fn` sets the draw counts
back to where they stood when the layer first ran, for the recomputation only, so it draws the
same noise (the recomputed forward is the forward first run) and the counts go on as without
checkpointing.

Wrapping changes the class of each targeted module in place (``nn.Linear`` → :class:`FakeQuantLinear`,
``LowRankLinear`` → :class:`FakeQuantLowRankLinear`, subclasses that add no parameters or
buffers): parameters, ``state_dict`` keys, ``isinstance`` checks and the ``LowRankLinear`` events
(``merge``, ``refactorize``) stay as they were, and :func:`remove_fake_quant` sets the class back.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import LowRankLinear, SparseLinearFunction
from ..precision import linear
from ..seeding import STREAM_FAKE_QUANT, device_generator
from ..wrap import describe_linears, match_target_modules, unwrap_model
from .formats import QuantFormat, fake_quantize, uniform_noise

__all__ = [
    "STABLE_SPAM_TARGETS",
    "FakeQuantConfig",
    "FakeQuantLinear",
    "FakeQuantLowRankLinear",
    "straight_through",
    "apply_fake_quant",
    "remove_fake_quant",
    "fake_quant_layers",
    "is_fake_quantized",
    "fake_quant_state_dict",
    "load_fake_quant_state_dict",
    "checkpoint_context_fn",
    "has_stochastic_activations",
]

STABLE_SPAM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections Stable-SPAM's 4-bit scripts quantize (every linear of a LLaMA block)."""

_CONFIG_ATTRIBUTE = "fake_quant_config"


@dataclass(frozen=True)
class FakeQuantConfig:
    """What :func:`apply_fake_quant` quantizes and how.

    Attributes:
        weights: format of the weights (``W``; ``A``, ``B``, ``W0`` of a ``LowRankLinear``), or
            ``None`` to keep them in full precision.
        activations: format of each targeted layer's input (and a ``LowRankLinear``'s rank-r
            intermediate), or ``None``.
        target_modules: PEFT's rules (as in :class:`lowrank.LowRankConfig`); the default is
            :data:`STABLE_SPAM_TARGETS`.
        exclude_modules: PEFT's rules.
        seed: seeds the stochastic rounding of activations.
    """

    weights: QuantFormat | None = None
    activations: QuantFormat | None = None
    target_modules: list[str] | str = field(default_factory=lambda: list(STABLE_SPAM_TARGETS))
    exclude_modules: list[str] | str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weights", "activations"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantFormat):
                raise TypeError(f"FakeQuantConfig.{name} must be a lowrank.quant.QuantFormat or None, got {type(value).__name__}")
        if self.weights is None and self.activations is None:
            raise ValueError("FakeQuantConfig quantizes nothing: give weights=, activations= or both")
        if self.weights is not None and self.weights.stochastic:
            raise ValueError(
                "stochastic rounding of weights is not supported (a weight's noise would need its own seed stream); "
                "use a round-to-nearest weight format"
            )
        if not self.target_modules:
            raise ValueError('target_modules is empty: name modules (e.g. ["q_proj", "v_proj"]) or use "all-linear"')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")


@dataclass
class _LayerQuant:
    """Per-layer state: the formats, the layer's seed keys and how many draws it has made."""

    weights: QuantFormat | None
    activations: QuantFormat | None
    seed: int
    index: int
    draws: int = 0


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, noise):
        return fake_quantize(x, fmt, noise=noise)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def straight_through(x: torch.Tensor, fmt: QuantFormat | None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quantize(x, fmt)`` forward, the identity backward (see the module docstring);
    ``fmt=None`` returns ``x``. ``noise``: ``U[0, 1)`` draws of ``x``'s shape for a stochastic format."""
    if fmt is None:
        return x
    return _StraightThrough.apply(x, fmt, noise)


@torch.compiler.disable
def _draw_noise(state: _LayerQuant, like: torch.Tensor) -> torch.Tensor:
    keys = (state.seed, STREAM_FAKE_QUANT, state.index, state.draws)
    state.draws += 1
    return uniform_noise(like.shape, device_generator(like.device, *keys), like.device)


def _activation(state: _LayerQuant, x: torch.Tensor) -> torch.Tensor:
    fmt = state.activations
    if fmt is None:
        return x
    return straight_through(x, fmt, _draw_noise(state, x) if fmt.stochastic else None)


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` computing ``Q_w(W) Q_a(x) + b`` with straight-through gradients.

    Made by :func:`apply_fake_quant` (which sets ``fake_quant``); holds exactly the parameters of
    the ``nn.Linear`` it was.
    """

    fake_quant: _LayerQuant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.fake_quant
        return linear(_activation(state, x), straight_through(self.weight, state.weights), self.bias)


class FakeQuantLowRankLinear(LowRankLinear):
    """A :class:`LowRankLinear` computing ``Q_w(B) Q_a(s·Q_w(A) x̂) + Q_w(W0) x̂ + S x + b`` with
    ``x̂ = Q_a(x)`` (the sparse part ``S`` and the bias in full precision).

    Made by :func:`apply_fake_quant`; ``merge``, ``refactorize`` and the dense views work as on
    the ``LowRankLinear`` it was (they act on the full-precision parameters).
    """

    fake_quant: _LayerQuant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.fake_quant
        inputs = _activation(state, x)
        hidden = _activation(state, linear(inputs, straight_through(self.A, state.weights)) * self.scale)
        out = linear(hidden, straight_through(self.B, state.weights))
        if self.base_weight is not None:
            out = out + linear(inputs, straight_through(self.base_weight, state.weights))
        if self.sparse_values is not None:
            out = out + SparseLinearFunction.apply(x, self.sparse_values, self.sparse_indices, self.out_features, self.in_features)
        return out if self.bias is None else out + self.bias


_FAKE_CLASS = {nn.Linear: FakeQuantLinear, LowRankLinear: FakeQuantLowRankLinear}
_ORIGINAL_CLASS = {fake: original for original, fake in _FAKE_CLASS.items()}


def _check_shapes(name: str, module: nn.Module, config: FakeQuantConfig) -> None:
    """Every tensor the layer quantizes must split into the formats' groups; say which one does not."""
    if isinstance(module, LowRankLinear):
        weights = {"A": module.A, "B": module.B, "W0": module.base_weight}
        activations = {"input": module.in_features, "intermediate (rank)": module.rank}
    else:
        weights = {"weight": module.weight}
        activations = {"input": module.in_features}
    checks = []
    if config.weights is not None:
        checks += [(label, config.weights, tuple(w.shape)) for label, w in weights.items() if w is not None]
    if config.activations is not None and not config.activations.flat:
        # Flat activation groups span tokens: whether they divide depends on the batch, checked at
        # the forward pass.
        checks += [(label, config.activations, (1, width)) for label, width in activations.items()]
    for label, fmt, shape in checks:
        try:
            fmt.group_entries(shape)
        except ValueError as error:
            raise ValueError(f"layer {name!r}, {label} ({fmt.label}): {error}") from None


def apply_fake_quant(model: nn.Module, config: FakeQuantConfig) -> nn.Module:
    """Fake-quantize the targeted layers of ``model`` in place (see the module docstring) and
    return ``model``.

    Targets are matched with PEFT's rules (:func:`lowrank.wrap.match_target_modules`); each must
    be an ``nn.Linear`` or a ``LowRankLinear`` (wrap first, then fake-quantize). A DDP or
    ``torch.compile`` wrapper is looked through. The model trains as before (gradients reach
    every parameter through the straight-through estimator) and compiles with ``torch.compile``.

    Raises:
        ValueError: nothing matches (the message lists the linear modules), a match is of another
            type or already fake-quantized, or a group size does not divide one of a layer's
            quantized dimensions (the message names the layer and the tensor).
    """
    if not isinstance(config, FakeQuantConfig):
        raise TypeError(f"apply_fake_quant(model, config) needs a FakeQuantConfig, got {type(config).__name__}")
    root = unwrap_model(model)
    names = match_target_modules(root, config.target_modules, config.exclude_modules)
    if not names:
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no module; "
            + describe_linears(root)
        )
    plan = []
    for name in names:
        module = root.get_submodule(name)
        if type(module) in _ORIGINAL_CLASS:
            raise ValueError(f"module {name!r} is fake-quantized already; call remove_fake_quant(model) first")
        if type(module) not in _FAKE_CLASS:
            raise ValueError(
                f"target_modules matches {name!r}, a {type(module).__name__}: only nn.Linear and LowRankLinear can be "
                "fake-quantized; narrow target_modules or add it to exclude_modules"
            )
        _check_shapes(name, module, config)
        plan.append(module)
    for index, module in enumerate(plan):
        module.fake_quant = _LayerQuant(config.weights, config.activations, config.seed, index)
        module.__class__ = _FAKE_CLASS[type(module)]
    setattr(root, _CONFIG_ATTRIBUTE, config)
    return model


def fake_quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The fake-quantized layers of ``model`` by module name, in module order."""
    root = unwrap_model(model)
    return {name: module for name, module in root.named_modules() if type(module) in _ORIGINAL_CLASS}


def is_fake_quantized(model: nn.Module) -> bool:
    return bool(fake_quant_layers(model))


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fake_quant` in place: every layer is again the ``nn.Linear`` /
    ``LowRankLinear`` it was (the same objects and parameters), so the logits are exactly the
    original ones. Returns ``model``."""
    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("remove_fake_quant: the model has no fake-quantized layers")
    for module in layers.values():
        module.__class__ = _ORIGINAL_CLASS[type(module)]
        del module.fake_quant
    root = unwrap_model(model)
    if hasattr(root, _CONFIG_ATTRIBUTE):
        delattr(root, _CONFIG_ATTRIBUTE)
    return model


def fake_quant_state_dict(model: nn.Module) -> dict[str, int]:
    """``{layer name: draw count}``: what a checkpoint needs so a resumed run draws the same noise."""
    return {name: module.fake_quant.draws for name, module in fake_quant_layers(model).items()}


def load_fake_quant_state_dict(model: nn.Module, state: dict[str, int]) -> None:
    """Restore the draw counts saved by :func:`fake_quant_state_dict` (the layer names must agree)."""
    layers = fake_quant_layers(model)
    if set(state) != set(layers):
        missing, unexpected = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
        raise ValueError(f"fake-quant state does not fit this model: missing {missing}, unexpected {unexpected}")
    for name, draws in state.items():
        layers[name].fake_quant.draws = int(draws)


def checkpoint_context_fn(model: nn.Module) -> Callable[[], tuple[contextlib.AbstractContextManager,
                                                                 contextlib.AbstractContextManager]]:
    """A ``torch.utils.checkpoint`` ``context_fn`` (non-reentrant) that makes a recomputed forward
    draw the same stochastic-rounding noise as the forward it repeats.

    ``torch.utils.checkpoint`` calls it once per checkpointed call, in forward: it notes every
    stochastic layer's draw count then, and returns (nothing to do in forward, a context for the
    recomputation) — the recomputation runs with the counts set back to the noted ones, and the
    counts are restored afterwards, so later draws are those of a run without checkpointing (the
    way ``preserve_rng_state`` treats the global generator). The layers are looked up at each call
    (fake quantization may be applied or re-applied after checkpointing is enabled, e.g. when a
    dense warm start is factorized); ``model`` is held weakly.
    """
    reference = weakref.ref(unwrap_model(model))

    def context_fn():
        root = reference()
        states = [] if root is None else _stochastic_states(root)
        if not states:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return contextlib.nullcontext(), _replay_draws(states, [state.draws for state in states])

    return context_fn


def _stochastic_states(model: nn.Module) -> list[_LayerQuant]:
    return [m.fake_quant for m in fake_quant_layers(model).values()
            if m.fake_quant.activations is not None and m.fake_quant.activations.stochastic]


def has_stochastic_activations(model: nn.Module) -> bool:
    """Whether a forward of ``model`` draws stochastic-rounding noise (what a recomputation must replay)."""
    return bool(_stochastic_states(unwrap_model(model)))


@contextlib.contextmanager
def _replay_draws(states: list[_LayerQuant], counts: list[int]):
    now = [state.draws for state in states]
    for state, count in zip(states, counts):
        state.draws = count
    try:
        yield
    finally:
        for state, count in zip(states, now):
            state.draws = count
