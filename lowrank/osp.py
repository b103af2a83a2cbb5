"""Outlier-Safe Pre-Training's architecture (Park et al. 2025, arXiv 2506.19697) for LLaMA-family
Hugging Face models, as a model transform, and its fold back into a plain model for export.

OSP combines three things: the Muon optimizer (DESIGN 2.9; not here), and two architecture
changes that :func:`apply` makes to a ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM`` (:data:`SUPPORTED_ARCHITECTURES`) in place:

* **Single-Scale RMSNorm** (``single_scale_norm``): every decoder norm (``input_layernorm``,
  ``post_attention_layernorm``) and the final norm compute::

      y = g · x / sqrt(mean(x²) + eps)        g: one learnable scalar per norm

  instead of a per-channel gain vector ``γ ⊙ x / rms(x)``: a per-channel gain lets a few
  channels grow into outliers, one scalar cannot. :class:`SingleScaleRMSNorm`
  holds ``weight`` of shape ``(1,)`` and keeps ``eps``; it computes exactly as transformers'
  ``LlamaRMSNorm`` (fp32 statistics, the gain applied in the input dtype), so folding is exact.
  ``g`` starts at the mean of the replaced gain vector (1 for a freshly initialised model: the
  transform is meant for pretraining from scratch; on a trained model it changes the function).

* **Embedding projection** (``embedding_projection``): learnable ``d × d`` matrices after the
  token embedding and after the final norm, before the head::

      h₀ = P_in · E[id]          logits = W_head · (P_out · norm(h_L))

  both orthogonally initialised (``torch.nn.init.orthogonal_``, drawn on the CPU from
  :func:`lowrank.seeding.cpu_generator` ``(seed, STREAM_OSP_PROJECTION, 0 | 1)``), so at
  initialisation they rotate activations without changing their norms. They redistribute the
  per-channel magnitudes that an embedding matrix would otherwise put straight into the residual
  stream. They live in the embedding and head modules themselves
  (:class:`ProjectedEmbedding`, an ``nn.Embedding`` with a ``projection`` parameter;
  :class:`ProjectedHead`, an ``nn.Linear`` with one), so ``get_input_embeddings()``,
  ``get_output_embeddings()``, ``num_embeddings``, weight tying and PEFT's "all-linear" rule
  (which leaves out the output head) behave as before, and the state-dict keys of the model are
  unchanged plus ``…embed_tokens.projection`` and ``lm_head.projection``.

:func:`fold` turns an OSP model back into the plain architecture, in place, with the same logits
(up to float rounding of the two matrix products)::

    E      ← E · P_inᵀ        (row i of E is the embedding of token i: P_in E[i] = (E P_inᵀ)[i])
    W_head ← W_head · P_out   (W_head (P_out x) = (W_head P_out) x)
    γ      ← g · 1            (an ordinary RMSNorm holding the gain g in every channel)

so ``save_pretrained`` writes a model that ``AutoModelForCausalLM.from_pretrained`` loads
without ``lowrank``.

**Tied embeddings** (``tie_word_embeddings=True``, one matrix ``E`` shared by input and head):
OSP trains with the tie (``h₀ = P_in E[id]``, ``logits = E P_out h``), but the two projections
cannot both be folded into one shared matrix (``E P_inᵀ ≠ E P_out`` in general). :func:`fold`
therefore **unties**: the embedding becomes ``E P_inᵀ``, the head a new parameter ``E P_out``,
and ``config.tie_word_embeddings`` is set to ``False`` so the saved model keeps both (one more
``V × d`` matrix on disk). With only the norms transformed, a tie is kept as it is.

**Export**: ``lowrank export`` (:mod:`lowrank.integrations.export`) should, after
``merge_to_dense``, call ``if is_osp(model): fold(model)`` before ``save_pretrained``; and a run
trained with OSP must be rebuilt with :func:`apply` (same options) before its
``model.safetensors`` is loaded, since the checkpoint holds the OSP parameters.

Any other architecture (GPT-2, ...) raises a one-line :class:`~lowrank.errors.UsageError` naming
the supported ones.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .precision import embedding, linear
from .seeding import cpu_generator

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "STREAM_OSP_PROJECTION",
    "SingleScaleRMSNorm",
    "ProjectedEmbedding",
    "ProjectedHead",
    "apply",
    "fold",
    "is_osp",
    "projections",
    "check_architecture",
]

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
"""``config.model_type`` values :func:`apply` knows: decoder blocks with ``input_layernorm`` and
``post_attention_layernorm`` RMSNorms, a final ``model.norm``, ``nn.Embedding`` input and
``nn.Linear`` head."""

STREAM_OSP_PROJECTION = 0x05B
"""Seed stream of the orthogonal initialisation of the embedding projections (distinct from the
streams of :mod:`lowrank.seeding`)."""


class SingleScaleRMSNorm(nn.Module):
    """``y = g · x / sqrt(mean(x²) + eps)``: RMSNorm with one learnable scalar gain ``g``.

    ``weight`` has shape ``(1,)``; the arithmetic is that of transformers' ``LlamaRMSNorm``
    (statistics in fp32, the gain applied in the input dtype). ``norm_class`` is the per-channel
    RMSNorm class it replaced, which :meth:`to_norm` rebuilds.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, norm_class: type[nn.Module] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.hidden_size = hidden_size
        self.norm_class = norm_class

    @classmethod
    def from_norm(cls, norm: nn.Module) -> "SingleScaleRMSNorm":
        """Replace a per-channel RMSNorm (``weight`` of shape ``(d,)``, ``variance_epsilon`` or
        ``eps``): same ``eps``, ``g`` = the mean of its gains."""
        gains = norm.weight.detach()
        layer = cls(gains.numel(), _norm_eps(norm), norm_class=type(norm), device=gains.device, dtype=gains.dtype)
        if gains.device.type != "meta":  # on meta (the memory estimator) there are no values to copy
            with torch.no_grad():
                layer.weight.fill_(float(gains.float().mean()))
        return layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    @torch.no_grad()
    def to_norm(self) -> nn.Module:
        """The per-channel RMSNorm with gain ``g`` in every channel (the same function)."""
        if self.norm_class is None:
            raise ValueError("SingleScaleRMSNorm.to_norm: the norm class it replaced is unknown (built directly?)")
        norm = self.norm_class(self.hidden_size, eps=self.variance_epsilon)
        norm.weight = nn.Parameter(self.weight.detach().expand(self.hidden_size).clone())
        return norm

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, eps={self.variance_epsilon}, single_scale=True"


class ProjectedEmbedding(nn.Embedding):
    """``nn.Embedding`` followed by a learnable ``d × d`` projection: ``h = P_in · E[id]``.

    Made from an ``nn.Embedding`` by :func:`apply` (its class changes in place and it gains the
    parameter ``projection``); :func:`fold` folds ``P_in`` into the table and changes it back."""

    projection: nn.Parameter

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # precision.embedding / linear: the rows and the projection in the compute dtype under bf16 storage
        return linear(embedding(self, input_ids), self.projection)


class ProjectedHead(nn.Linear):
    """The output head after a learnable ``d × d`` projection: ``logits = W_head · (P_out · x) + b``.

    Made from an ``nn.Linear`` by :func:`apply`; :func:`fold` folds ``P_out`` into ``W_head``."""

    projection: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.projection), self.weight, self.bias)


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ValueError(f"{type(norm).__name__} has no eps (variance_epsilon) attribute")


def check_architecture(model: nn.Module, action: str = "OSP") -> None:
    """Raise a one-line :class:`UsageError` unless ``model`` is one of :data:`SUPPORTED_ARCHITECTURES`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES or not hasattr(model, "get_input_embeddings"):
        raise UsageError(
            f"{action} supports LLaMA-family Hugging Face models (model_type {', '.join(SUPPORTED_ARCHITECTURES)}); "
            f"got {type(model).__name__} (model_type {model_type!r})"
        )


def _rms_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder and final norms: every module whose class name ends with ``RMSNorm``."""
    return [(name, module) for name, module in model.named_modules()
            if type(module).__name__.endswith("RMSNorm") and not isinstance(module, SingleScaleRMSNorm)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _orthogonal(d: int, seed: int, which: int, like: torch.Tensor) -> nn.Parameter:
    if like.device.type == "meta":
        return nn.Parameter(torch.empty(d, d, device="meta", dtype=like.dtype))
    matrix = torch.empty(d, d, dtype=torch.float32)
    nn.init.orthogonal_(matrix, generator=cpu_generator(seed, STREAM_OSP_PROJECTION, which))
    return nn.Parameter(matrix.to(device=like.device, dtype=like.dtype))


def _embedding_and_head(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embed) not in (nn.Embedding, ProjectedEmbedding) or head is None or type(head) not in (nn.Linear, ProjectedHead):
        raise UsageError(
            f"OSP's embedding projection needs an nn.Embedding input and an nn.Linear head; this model has "
            f"{type(embed).__name__} and {type(head).__name__} (wrapped or already changed? apply OSP before wrap)"
        )
    return embed, head


def apply(model: nn.Module, *, single_scale_norm: bool = True, embedding_projection: bool = True, seed: int = 0) -> nn.Module:
    """Make ``model`` an OSP model in place (see the module docstring) and return it.

    Args:
        single_scale_norm: replace every RMSNorm by a :class:`SingleScaleRMSNorm`.
        embedding_projection: add the orthogonally initialised input and output projections.
        seed: seeds the two orthogonal draws (``(seed, STREAM_OSP_PROJECTION, 0)`` for ``P_in``,
            ``(..., 1)`` for ``P_out``).

    Raises:
        UsageError: an architecture not in :data:`SUPPORTED_ARCHITECTURES`, a model already OSP,
            or nothing asked for.
    """
    check_architecture(model)
    if not (single_scale_norm or embedding_projection):
        raise UsageError("OSP: nothing to do; enable single_scale_norm, embedding_projection or both")
    if is_osp(model):
        raise UsageError("OSP: the model is an OSP model already; fold(model) first to start again")
    if embedding_projection:
        embed, head = _embedding_and_head(model)
    if single_scale_norm:
        norms = _rms_norms(model)
        if not norms:
            raise UsageError(f"OSP: {type(model).__name__} has no RMSNorm modules to make single-scale")
        for name, norm in norms:
            _set_module(model, name, SingleScaleRMSNorm.from_norm(norm))
    if embedding_projection:
        d = embed.embedding_dim
        embed.__class__ = ProjectedEmbedding
        embed.projection = _orthogonal(d, seed, 0, embed.weight)
        head.__class__ = ProjectedHead
        head.projection = _orthogonal(d, seed, 1, head.weight)
    return model


def is_osp(model: nn.Module) -> bool:
    """Whether ``model`` holds any OSP module (single-scale norm or embedding projection)."""
    return any(isinstance(m, (SingleScaleRMSNorm, ProjectedEmbedding, ProjectedHead)) for m in model.modules())


def projections(model: nn.Module) -> list[nn.Parameter]:
    """The embedding projections ``P_in``, ``P_out`` of an OSP model (empty for any other model).

    They are hidden ``d × d`` matrices that OSP trains with **Muon**, while the embedding and
    head tables stay with AdamW (the OSP repository's README, "EmbProj": "These layers should be
    optimized using the Muon optimizer rather than AdamW, which is applied to the embedding
    matrices"). They live inside the embedding and head modules, so a grouping by module
    ("all-linear", or "every parameter of the embedding modules is AdamW's") misses them: the
    optimizer groups ask for them here (:func:`lowrank.methods.build.param_groups`)."""
    return [module.projection for module in (model.get_input_embeddings(), model.get_output_embeddings())
            if isinstance(module, (ProjectedEmbedding, ProjectedHead))] if hasattr(model, "get_input_embeddings") else []


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Fold the OSP parts of ``model`` into the plain architecture, in place, and return it:
    ``E ← E P_inᵀ``, ``W_head ← W_head P_out``, every single-scale norm ← an RMSNorm with ``g·1``
    (products in float64, stored in the weights' dtype). Tied embeddings are untied (see the
    module docstring). The logits are unchanged up to rounding; the result holds no ``lowrank``
    class, so ``save_pretrained`` / ``from_pretrained`` need nothing of ``lowrank``.

    Raises:
        ValueError: the model has no OSP parts.
    """
    if not is_osp(model):
        raise ValueError("fold: the model has no OSP parts (SingleScaleRMSNorm, ProjectedEmbedding, ProjectedHead)")
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, SingleScaleRMSNorm)]:
        _set_module(model, name, module.to_norm())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    table = embed.weight.detach()
    if isinstance(embed, ProjectedEmbedding):
        new_table = (table.double() @ embed.projection.double().T).to(table.dtype)
        del embed.projection
        embed.__class__ = nn.Embedding
    else:
        new_table = table
    if isinstance(head, ProjectedHead):
        new_head = (head.weight.detach().double() @ head.projection.double()).to(head.weight.dtype)
        del head.projection
        head.__class__ = nn.Linear
    else:
        new_head = head.weight.detach() if head is not None else None
    if tied and new_table is not table:
        # Two projections, one shared matrix: untie (the module docstring says why).
        embed.weight = nn.Parameter(new_table, requires_grad=embed.weight.requires_grad)
        head.weight = nn.Parameter(new_head.clone(), requires_grad=head.weight.requires_grad)
        _untie_config(model)
    else:
        embed.weight.copy_(new_table)
        if head is not None:
            head.weight.copy_(new_head)
    return model


def _untie_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    config.tie_word_embeddings = False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text_config is not None and text_config is not config:
        text_config.tie_word_embeddings = False
