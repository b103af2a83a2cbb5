"""Muon for the hidden matrices and ProjectedAdamW for everything else, in one optimizer.

The math is two pure functions, :func:`newton_schulz` (orthogonalisation) and
:func:`muon_update` (one Muon step of one matrix), plus :func:`adjusted_lr`; :class:`Muon` is the
thin optimizer around them (``step()`` and the per-parameter ``step_param()`` both call
:func:`muon_update`); :func:`muon_param_groups` builds the usual split of a model.

Sources: Keller Jordan et al., "Muon: an optimizer for hidden layers in neural networks" (2024,
https://kellerjordan.github.io/posts/muon/), and Liu et al., "Muon is scalable for LLM
training" (Moonlight, arXiv 2502.16982) for the update scale that lets Muon share AdamW's
learning rate and weight decay. ``torch.optim.Muon`` (torch >= 2.9) implements the same update;
its helpers (``torch.optim._muon._zeropower_via_newtonschulz``, ``_adjust_lr``) are private and
not stable (``_zeropower_via_newtonschulz`` has gained a ``use_addmm`` argument on pytorch's main
branch that 2.13 lacks; neither exists before 2.9, and this package supports torch >= 2.4), so the
formulas are restated here as small pure functions.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import UsageError
from .adamw import ProjectedAdamW
from .layout import StateBytes, muon_state_layout
from .reset import DEFAULT_RESET_MOMENTS
from .options import ADAM_DEFAULTS, OPTION_DEFAULTS, check_step_hyperparameters, validate_group

__all__ = ["ADJUST_LR", "NS_COEFFICIENTS", "Muon", "adjusted_lr", "muon_param_groups", "muon_update", "newton_schulz"]

# Keller Jordan's quintic coefficients (a, b, c), chosen to maximise the slope at zero.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("match_rms_adamw", "original", None)

# The Muon groups' defaults (``lr`` is required).
MUON_DEFAULTS: dict[str, Any] = {
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "ns_coefficients": NS_COEFFICIENTS,
    "weight_decay": 0.0,
    "adjust_lr": "match_rms_adamw",
    "eps": 1e-7,
    "state_dtype": None,
}

# Options only a Muon group has.
MUON_ONLY = frozenset({"momentum", "nesterov", "ns_steps", "ns_coefficients", "adjust_lr"})

# Keywords an AdamW group (``use_muon=False``) may set: ProjectedAdamW's.
ADAMW_OPTIONS = frozenset({"lr", *ADAM_DEFAULTS, *OPTION_DEFAULTS})

_PROJECTION = (
    "Muon orthogonalises the whole momentum matrix; "
    "gradient projection (GaLore/APOLLO) belongs in a use_muon=False group"
)
_STABLE_SPAM = "Stable-SPAM rescales what enters Adam's moments; Newton-Schulz normalises the update's scale anyway"
# ProjectedAdamW options a Muon group refuses (when set to anything but their inert default), and why.
REFUSED: dict[str, str] = {
    **dict.fromkeys(
        ("projection", "rank", "update_proj_gap", "scale", "scale_type", "oversample", "power_iters"), _PROJECTION
    ),
    "residual": "Fira's residual is scaled by Adam's per-channel update norms, which Muon does not compute",
    "density": "sparse momentum would leave most of the matrix out, and Newton-Schulz orthogonalises the whole matrix",
    **dict.fromkeys(
        ("spike_threshold", "spike_skip_steps"),
        "SPAM's clip compares g^2 with Adam's second moment, which Muon does not keep (its update has a fixed RMS)",
    ),
    **dict.fromkeys(("adaptive_clip", "norm_scaling", "gammas"), _STABLE_SPAM),
    "reset_interval": "periodic resets are RestartController(reset='all')'s job, on one clock for both halves",
    "reset_warmup": "the warm-up offsets Adam's near-zero moments after a reset; Muon's update has full RMS at once",
    "betas": "Muon has one momentum coefficient: set momentum",
    "foreach": "Muon orthogonalises each matrix on its own; there is no multi-tensor path",
    "seed": "Muon draws no random numbers",
    "state_bits": "Muon's momentum buffer is not quantized (it is kept in state_dtype)",
}
# Every ProjectedAdamW option but the shared ones is refused, also one added later.
_NOT_MUON = "it is a ProjectedAdamW option that Muon does not implement"
_INERT = {name: value for name, value in {**ADAM_DEFAULTS, **OPTION_DEFAULTS}.items() if name not in MUON_DEFAULTS}


# ---------------------------------------------------------------------- pure functions


def newton_schulz(
    matrix: torch.Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7
) -> torch.Tensor:
    """Approximate orthogonalisation ``U Vᵀ`` of ``matrix = U Σ Vᵀ`` by the quintic Newton–Schulz
    iteration (Keller Jordan 2024), in bfloat16 as his code and ``torch.optim.Muon`` run it.

    ``X = M / max(‖M‖_F, eps)``, transposed so that rows <= columns; then ``steps`` times
    ``A = X Xᵀ;  X ← aX + (bA + cA²) X`` with ``(a, b, c) = coefficients``. Jordan's coefficients
    maximise the slope ``a`` at zero rather than converge: after 5 steps singular values above
    about ``‖M‖_F/300`` end in roughly ``[0.7, 1.2]`` (measured; the post says ~U(0.5, 1.5)), not at
    1, which does not hurt training; smaller ones are multiplied by about ``a⁵ ≈ 485``. The result
    is bfloat16, of ``matrix``'s shape; ``matrix`` is not modified. The iteration is invariant to
    a positive scale of ``matrix`` (up to the rounding of the bfloat16 cast and ``eps``).
    """
    a, b, c = coefficients
    x = matrix.bfloat16()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if transposed else x


def adjusted_lr(lr: float, shape: tuple[int, ...], rule: str | None) -> float:
    """The learning rate of Muon's orthogonalised update of an ``m × n`` matrix.

    * ``"match_rms_adamw"`` (Moonlight): ``lr · 0.2·sqrt(max(m, n))``: the update's RMS becomes
      ~0.2, AdamW's typical RMS, so one lr and weight decay serve Muon and AdamW;
    * ``"original"`` (Keller Jordan): ``lr · sqrt(max(1, m/n))``;
    * ``None``: ``lr``.

    (``torch.optim.Muon``'s ``adjust_lr_fn=None`` means ``"original"``; here ``None`` is no
    adjustment.)
    """
    m, n = shape[0], shape[1]
    if rule == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(m, n)))
    if rule == "original":
        return lr * math.sqrt(max(1.0, m / n))
    return lr


def muon_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    adjust_lr: str | None = "match_rms_adamw",
) -> None:
    """One Muon step of the matrix ``param`` (``m × n``), in place (``param`` and ``momentum_buffer``):

    ``M ← μM + G``;  ``U = G + μM`` (Nesterov) or ``M``;  ``O = newton_schulz(U)``;
    ``W ← W(1 − lr·wd) − adjusted_lr(lr, (m, n), adjust_lr) · O``.

    ``grad`` must have ``momentum_buffer``'s dtype. This is the momentum of Jordan's original code
    and of Moonlight; ``torch.optim.Muon`` keeps the EMA ``B ← μB + (1−μ)G`` (and
    ``(1−μ)G + μB``) instead, which is ``(1−μ)`` times the same matrix: the orthogonalisation
    removes that scale, so the two agree to bfloat16 rounding, while their buffers differ by the
    factor ``1/(1−μ)``.
    """
    momentum_buffer.mul_(momentum).add_(grad)
    direction = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    ortho = newton_schulz(direction, ns_coefficients, ns_steps, eps)
    param.mul_(1.0 - lr * weight_decay)
    param.add_(ortho.to(param.dtype), alpha=-adjusted_lr(lr, param.shape, adjust_lr))


# ---------------------------------------------------------------------- the optimizer


class Muon(Optimizer):
    r"""Muon on the hidden matrices and ProjectedAdamW on every other parameter, in one optimizer.

    Each parameter group carries ``use_muon``. A group without it is a Muon group when all its
    parameters are 2-D, an AdamW group when none is, and is split in two (2-D first) otherwise;
    callers normally build the split themselves, e.g. with :func:`muon_param_groups` (embeddings
    and the head are 2-D but belong to AdamW).

    **Muon groups** (``use_muon=True``, 2-D parameters only) run :func:`muon_update` on every
    matrix with a gradient: ``M ← μM + G``, Nesterov ``G + μM``, ``ns_steps`` quintic
    Newton–Schulz steps (:func:`newton_schulz`), then ``W ← W(1 − lr·wd) − lr·adj·O`` with
    ``adj = 0.2·sqrt(max(m, n))`` (``adjust_lr="match_rms_adamw"``, Moonlight, arXiv 2502.16982),
    so one ``lr`` serves both halves. A low-rank layer's factors ``A`` (``r × n``) and ``B``
    (``m × r``) are two such matrices, each orthogonalised on its own. Options: ``lr``,
    ``momentum`` (0.95), ``nesterov`` (True), ``ns_steps`` (5), ``ns_coefficients``
    (:data:`NS_COEFFICIENTS`), ``weight_decay``, ``adjust_lr`` (``"match_rms_adamw"``,
    ``"original"`` = ``sqrt(max(1, m/n))``, or ``None``), ``eps`` (1e-7, the norm floor of the
    Newton–Schulz normalisation) and ``state_dtype`` (dtype of the momentum buffer; ``None``: the
    parameter's). ``torch.optim.Muon`` computes the same update; see :func:`muon_update` for the
    one difference (its momentum buffer is ``(1−μ)`` times ours).

    **AdamW groups** (``use_muon=False``) are stepped by an inner :class:`ProjectedAdamW` that
    shares this optimizer's ``state`` and the very group dicts in ``param_groups``, so they take
    every ProjectedAdamW option (projection, sparse momentum, spike clipping, resets, ...) and
    setting ``group["lr"]`` (LR schedulers, :class:`lowrank.restarts.RestartController`) reaches
    both halves. Their defaults are ProjectedAdamW's, with ``lr``, ``weight_decay`` and
    ``state_dtype`` taken from this constructor unless ``adamw`` overrides them. Note that ``eps``
    means Newton–Schulz's norm floor in a Muon group and Adam's ``eps`` (1e-8) in an AdamW group.

    Taken from ProjectedAdamW: :meth:`reset_momentum` (for ``RestartController``'s
    refactorize/merge resets), :meth:`state_bytes` (the same :class:`StateBytes`), a state layout
    (:func:`lowrank.optim.layout.muon_state_layout`) that the optimizer allocates from and the
    memory estimator sums, tensor-and-int-only state (``torch.load(weights_only=True)`` reads
    ``state_dict()``), ``load_state_dict`` that keeps saved dtypes, ``state_dtype``, and up-front
    validation. Refused in Muon groups with a one-line ``ValueError`` (the reasons are in
    :data:`REFUSED`): gradient projection and its options, Fira's residual, sparse momentum,
    SPAM spike clipping and Stable-SPAM (they act on Adam's moments, which Muon does not keep,
    and Newton–Schulz fixes the update's scale anyway), the scheduled ``reset_interval`` (use
    ``RestartController(reset="all")``) and ``reset_warmup``, ``betas``, ``foreach``, ``seed``,
    ``state_bits`` (a quantized buffer is not implemented) and any ProjectedAdamW option added
    later. An option set to ProjectedAdamW's inert default is accepted. Muon-only options in an
    AdamW group are refused too.

    State per Muon parameter: ``momentum_buffer`` (see the layout) and the int ``step`` (Muon steps
    since the last reset). Sparse gradients are not supported.

    **Per parameter**: :meth:`step_param` updates one parameter from its gradient, exactly as
    :meth:`step` does (which runs the same update for every parameter), so an optimizer step
    inside backward can call it from a post-accumulate-grad hook. Hyper-parameters changed after
    construction to a NaN, infinite or negative value are refused at the step (a ``UsageError``).

    Args:
        params: parameters or parameter-group dicts (see ``use_muon`` above).
        lr: learning rate of both halves, read from the group every step.
        weight_decay: decoupled weight decay of both halves (0 as ProjectedAdamW; torch.optim.Muon's
            default is 0.1).
        momentum, nesterov, ns_steps, ns_coefficients, adjust_lr, eps: the Muon groups' defaults.
        state_dtype: the dtype of every state tensor's default (``None``: the parameter's).
        adamw: defaults of the AdamW groups: any :class:`ProjectedAdamW` keyword (``betas``,
            ``eps``, ``projection``, ...).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        weight_decay: float = MUON_DEFAULTS["weight_decay"],
        momentum: float = MUON_DEFAULTS["momentum"],
        nesterov: bool = MUON_DEFAULTS["nesterov"],
        ns_steps: int = MUON_DEFAULTS["ns_steps"],
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        adjust_lr: str | None = MUON_DEFAULTS["adjust_lr"],
        eps: float = MUON_DEFAULTS["eps"],
        state_dtype: torch.dtype | None = None,
        adamw: Mapping[str, Any] | None = None,
    ) -> None:
        adamw = dict(adamw or {})
        unknown = sorted(set(adamw) - ADAMW_OPTIONS)
        if unknown:
            raise TypeError(f"Muon got unexpected AdamW option(s) {unknown}; known: {sorted(ADAMW_OPTIONS)}")
        self._adamw_defaults = {
            "lr": lr,
            **ADAM_DEFAULTS,
            **OPTION_DEFAULTS,
            "weight_decay": weight_decay,
            "state_dtype": state_dtype,
            **adamw,
        }
        validate_group(self._adamw_defaults, "adamw")
        self._adamw: ProjectedAdamW | None = None
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_coefficients": ns_coefficients,
            "weight_decay": weight_decay,
            "adjust_lr": adjust_lr,
            "eps": eps,
            "state_dtype": state_dtype,
        }
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._group_index: dict[int, int] | None = None  # step_param's lookup, rebuilt on demand
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters must be an ordered collection (a list), not a set")
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if "use_muon" not in group:
            tensors = [_tensor(p) for p in group["params"]]
            if any(t.dim() == 2 for t in tensors) and any(t.dim() != 2 for t in tensors):
                for use_muon in (True, False):
                    part = [p for p, t in zip(group["params"], tensors) if (t.dim() == 2) == use_muon]
                    self.add_param_group({**group, "params": part, "use_muon": use_muon})
                return
            group["use_muon"] = all(t.dim() == 2 for t in tensors)
        where = f"param_groups[{len(self.param_groups)}]"
        if not isinstance(group["use_muon"], bool):
            raise ValueError(f"{where}: use_muon must be True or False, got {group['use_muon']!r}")
        if group["use_muon"]:
            validate_muon_group({**self.defaults, **group}, where)
            super().add_param_group(group)
            return
        validate_group({**self._adamw_defaults, **group}, where)
        for name in sorted(MUON_ONLY & set(group)):
            raise ValueError(f"{where}: {name} is a Muon option and this is an AdamW group (use_muon=False)")
        taken = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(_tensor(p)) in taken for p in group["params"]):
            raise ValueError(f"{where}: some parameters appear in more than one parameter group")
        adamw = self._adamw_half()
        adamw.add_param_group(group)  # torch's checks and ProjectedAdamW's defaults, on the shared dict
        self.param_groups.append(adamw.param_groups[-1])

    def _adamw_half(self) -> ProjectedAdamW:
        if self._adamw is None:
            self._adamw = self._adamw_view([g for g in self.param_groups if not g["use_muon"]], self.state)
        return self._adamw

    def _adamw_view(self, groups: list[dict[str, Any]], state: dict) -> ProjectedAdamW:
        """A ProjectedAdamW over ``groups`` and ``state`` (the dicts themselves, not copies), built
        the way unpickling builds an optimizer (``__new__`` + ``__setstate__``), which needs no
        parameter list."""
        view = ProjectedAdamW.__new__(ProjectedAdamW)
        view.__setstate__({"defaults": dict(self._adamw_defaults), "state": state, "param_groups": groups})
        return view

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_adamw_defaults": self._adamw_defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # New group dicts or a new state (unpickling, load_state_dict): rebuild the AdamW half on them.
        self._adamw = None
        self._group_index = None
        self._adamw_half()

    # ------------------------------------------------------------------ public helpers

    @torch.no_grad()
    def reset_momentum(self, params: Iterable[torch.Tensor] | None = None, moments: str = DEFAULT_RESET_MOMENTS) -> None:
        """Zero the momentum of ``params`` (default: all) and restart their step counts.

        Muon parameters: ``momentum_buffer`` is zeroed and ``step`` set to 0. AdamW parameters:
        :meth:`ProjectedAdamW.reset_momentum` (moments, bias correction, warm-up ramp, sparse
        subsets). Parameters that have not stepped yet have nothing to reset. ``moments``: as
        ProjectedAdamW's (Muon has one moment: ``first`` zeroes it and keeps the step count).
        """
        use_muon = {id(p): group["use_muon"] for group in self.param_groups for p in group["params"]}
        targets = [p for group in self.param_groups for p in group["params"]] if params is None else list(params)
        for p in targets:
            if id(p) not in use_muon:
                raise ValueError(f"reset_momentum: a parameter of shape {tuple(p.shape)} is not in this optimizer")
        for p in targets:
            state = self.state.get(p)
            if use_muon[id(p)] and state and "momentum_buffer" in state:
                state["momentum_buffer"].zero_()
                if moments == "both":
                    state["step"] = 0
        adamw = [p for p in targets if not use_muon[id(p)]]
        if adamw:
            self._adamw_half().reset_momentum(adamw, moments)

    def state_bytes(self) -> StateBytes:
        """Exact tensor bytes in ``self.state``, in total and per parameter group (the AdamW
        groups' numbers and the sparse-momentum cache come from ProjectedAdamW's own count)."""
        adamw = self._adamw_half().state_bytes()
        adamw_groups = iter(adamw.per_group)
        per_group = [
            sum(
                value.numel() * value.element_size()
                for p in group["params"]
                for value in self.state.get(p, {}).values()
                if isinstance(value, torch.Tensor)
            )
            if group["use_muon"]
            else next(adamw_groups)
            for group in self.param_groups
        ]
        return StateBytes(total=sum(per_group), per_group=per_group, subset_cache=adamw.subset_cache)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``Optimizer.load_state_dict`` but keeps each tensor's saved dtype.

        The loading is ProjectedAdamW's own (torch's checks, then its restoration of saved
        dtypes), run by a view over copies of this optimizer's groups; its result becomes this
        optimizer's state and groups. (Load-state-dict hooks registered on this optimizer are not
        run.)
        """
        loader = self._adamw_view([dict(g) for g in self.param_groups], defaultdict(dict))
        loader.load_state_dict(state_dict)
        self.__setstate__({"state": loader.state, "param_groups": loader.param_groups})

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of every parameter with a gradient: the AdamW groups through
        :meth:`ProjectedAdamW.step`, then :meth:`step_param`'s Muon update of each Muon matrix."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # its backward fills every gradient
        for index, group in enumerate(self.param_groups):
            if any(p.grad is not None for p in group["params"]):
                self._check_step(index, group)
        self._adamw_half().step()
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.grad is not None:
                        self._muon_step(p, group, p.grad)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, grad: torch.Tensor | None = None, *, value: torch.Tensor | None = None) -> None:
        """Update the one parameter ``p`` from ``grad`` (default ``p.grad``): what :meth:`step`
        does for ``p``, bit for bit (:meth:`ProjectedAdamW.step_param` for an AdamW parameter,
        :func:`muon_update` for a Muon matrix). The entry point of an optimizer step inside
        backward; Newton–Schulz needs the whole matrix, so under FSDP2 that is a Muon group's
        limit (its matrices are not sharded here). ``value``: as :meth:`ProjectedAdamW.step_param`'s
        (the tensor updated in place of ``p``, in its dtype)."""
        if self._group_index is None:
            self._group_index = {id(q): i for i, g in enumerate(self.param_groups) for q in g["params"]}
        index = self._group_index.get(id(p))
        if index is None:
            raise ValueError(f"step_param: a parameter of shape {tuple(p.shape)} is not in this optimizer")
        group = self.param_groups[index]
        grad = p.grad if grad is None else grad
        if grad is None:
            raise ValueError(f"step_param: a parameter of shape {tuple(p.shape)} has no gradient")
        self._check_step(index, group)
        if group["use_muon"]:
            self._muon_step(p, group, grad, p if value is None else value)
        else:
            self._adamw_half().step_param(p, grad, value=value)

    @staticmethod
    def _check_step(index: int, group: dict[str, Any]) -> None:
        """Hyper-parameters reassigned since construction (an LR schedule): a one-line UsageError."""
        where = f"param_groups[{index}]"
        check_step_hyperparameters(group, where)
        momentum = group.get("momentum", 0.0) if group["use_muon"] else 0.0
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise UsageError(f"{where}: momentum must be in [0, 1) at the step, got {momentum!r} "
                             "(set after the optimizer was built)")

    def _muon_step(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Muon's update of ``target`` (default ``p``), with ``p``'s state."""
        target = p if target is None else target
        if grad.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        state = self.state[p]
        buffer = state.get("momentum_buffer")
        if buffer is None:
            spec = muon_state_layout(tuple(p.shape), target.dtype, group).tensors()["momentum_buffer"]
            buffer = state["momentum_buffer"] = torch.zeros(spec.shape, dtype=spec.dtype, device=p.device)
            state["step"] = 0
        muon_update(
            target,
            grad.to(buffer.dtype),
            buffer,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_steps=group["ns_steps"],
            ns_coefficients=group["ns_coefficients"],
            eps=group["eps"],
            adjust_lr=group["adjust_lr"],
        )
        state["step"] += 1


def _tensor(p: Any) -> torch.Tensor:
    """The tensor of a ``params`` entry (torch also accepts ``(name, tensor)`` pairs)."""
    return p[1] if isinstance(p, tuple) else p


def validate_muon_group(group: Mapping[str, Any], where: str) -> None:
    """Raise a one-line ``ValueError("param_groups[i]: ...")`` for the first invalid option or
    parameter of a Muon group (``group`` with every option present)."""

    def fail(message: str) -> None:
        raise ValueError(f"{where}: {message}")

    for name, inert in _INERT.items():
        if name in group and group[name] != inert:
            fail(f"{name}={group[name]!r} is not a Muon option: {REFUSED.get(name, _NOT_MUON)}")
    for name in ("lr", "weight_decay", "eps"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            fail(f"{name} must be a number >= 0, got {value!r}")
    momentum = group["momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        fail(f"momentum must be in [0, 1), got {momentum!r}")
    if not isinstance(group["nesterov"], bool):
        fail(f"nesterov must be True or False, got {group['nesterov']!r}")
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        fail(f"ns_steps must be an integer >= 1, got {steps!r}")
    coefficients = group["ns_coefficients"]
    if not (
        isinstance(coefficients, (tuple, list))
        and len(coefficients) == 3
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coefficients)
    ):
        fail(f"ns_coefficients must be a tuple of 3 finite numbers (a, b, c), got {coefficients!r}")
    if group["adjust_lr"] not in ADJUST_LR:
        fail(f"adjust_lr must be one of {ADJUST_LR}, got {group['adjust_lr']!r}")
    state_dtype = group["state_dtype"]
    if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        fail(f"state_dtype must be None or a floating torch.dtype, got {state_dtype!r}")
    for p in group["params"]:
        shape = tuple(_tensor(p).shape)
        if len(shape) != 2:
            fail(f"Muon orthogonalises matrices, got a parameter of shape {shape}: put it in a use_muon=False group")


# ---------------------------------------------------------------------- parameter split


def muon_param_groups(
    model: nn.Module,
    *,
    muon: Mapping[str, Any] | None = None,
    adamw: Mapping[str, Any] | None = None,
    adamw_names: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The usual Muon / AdamW split of ``model``'s trainable parameters, as parameter groups.

    Rule, for each parameter with ``requires_grad`` (frozen ones, e.g. ReLoRA's base, are left
    out), the first match wins:

    1. **AdamW**: the parameters of the input and output embedding modules
       (``model.get_input_embeddings()`` / ``get_output_embeddings()`` when the model has them:
       LLaMA's ``embed_tokens`` and ``lm_head``, GPT-2's ``wte``), of every other ``nn.Embedding``
       (GPT-2's ``wpe``), and those whose full name matches an ``fnmatch`` pattern of
       ``adamw_names``;
    2. **Muon**: every other 2-D parameter: the decoder's hidden matrices (attention q/k/v/o, MLP
       gate/up/down, GPT-2's ``Conv1D`` weights) and, in a model wrapped by :func:`lowrank.wrap`,
       each low-rank layer's factors ``A`` and ``B``;
    3. **AdamW**: the rest: norms, biases, SLTrain's sparse values (1-D), any non-2-D tensor.

    Returns ``[{"params": [...], "use_muon": True, **muon}, {"params": [...], "use_muon": False,
    **adamw}]`` in ``named_parameters`` order, without a group that would be empty.
    """
    excluded = {id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            excluded.update(id(p) for p in module.parameters())
    patterns = list(adamw_names)
    hidden: list[torch.Tensor] = []
    other: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_adamw = id(p) in excluded or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        (other if is_adamw or p.dim() != 2 else hidden).append(p)
    groups = [
        {**(muon or {}), "params": hidden, "use_muon": True},
        {**(adamw or {}), "params": other, "use_muon": False},
    ]
    return [group for group in groups if group["params"]]
