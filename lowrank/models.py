"""Model configurations: the LLaMA shapes of the GaLore / SLTrain / benchmark papers, any
Hugging Face config JSON, or a hub name."""

from __future__ import annotations

import builtins
import difflib
import json
from collections.abc import Callable
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

from .errors import UsageError

__all__ = ["available_models", "load_model_config", "build_model", "config_dir", "check_model_shape",
           "materialize_model", "NotReproducible"]


def config_dir(kind: str) -> Path:
    """The folder of bundled presets: ``kind`` is ``"models"`` or ``"methods"``."""
    return Path(str(resources.files("lowrank.configs") / kind))


def available_models() -> list[str]:
    return sorted(path.stem for path in config_dir("models").glob("*.json"))


def load_model_config(model: str, **overrides) -> PretrainedConfig:
    """A ``transformers`` config from a bundled name (``llama_60m``), a config JSON path or a
    folder holding ``config.json``, or a hub name (needs the network)."""
    bundled = config_dir("models") / f"{model}.json"
    path = Path(model)
    if bundled.is_file():
        path = bundled
    elif path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UsageError(f"--model {model}: the folder has no config.json; pass a config JSON file or a bundled name ({', '.join(available_models())})")
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"--model {model}: not a JSON text file ({reason}); pass a Hugging Face config.json") from None
        if not isinstance(data, dict):
            raise UsageError(f"--model {model}: the JSON is a {type(data).__name__}, not a mapping of config keys")
        if "model_type" not in data:
            raise UsageError(f"--model {model}: the JSON has no 'model_type', so it is not a Hugging Face model config")
        check_model_shape(data, f"--model {model}")
        model_type = data.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **data)
        except Exception as error:  # noqa: BLE001 - transformers validates with several error types
            raise UsageError(f"--model {model}: {str(error).strip().splitlines()[-1].strip()}") from None
    else:
        looks_like_hub = model.count("/") == 1 and not model.startswith((".", "/", "~"))
        if not looks_like_hub:
            close = difflib.get_close_matches(model, available_models(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(
                f"--model {model}: no such bundled model or file.{hint} Bundled: {', '.join(available_models())}; "
                "or pass a config JSON path or a hub name like 'meta-llama/Llama-3.2-1B'"
            )
        try:
            config = AutoConfig.from_pretrained(model)
        except OSError as error:
            raise UsageError(
                f"--model {model}: could not load the hub config ({str(error).splitlines()[0]}); "
                "offline (HF_HUB_OFFLINE=1) or a typo? Pass a local config JSON instead"
            ) from None
    for key, value in overrides.items():
        setattr(config, key, value)
    _require_causal_lm(config, model)
    check_model_shape(config, f"--model {model}")
    return config


_POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions", "n_inner")


def check_model_shape(config: PretrainedConfig | dict, where: str) -> None:
    """Sizes are positive integers and the attention heads divide the width, so a bad config
    (a ``PretrainedConfig`` or its JSON dict) fails here in one line instead of deep inside
    ``from_config``."""

    def getattr(obj, key, default=None):  # noqa: A001 - the config or its dict alike
        return obj.get(key, default) if isinstance(obj, dict) else builtins.getattr(obj, key, default)

    for key in _POSITIVE_SIZES:
        value = getattr(config, key, None)
        if value is None and key in ("num_key_value_heads", "n_inner"):
            continue  # optional: defaults to the number of heads / 4 × width
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UsageError(f"{where}: {key} must be a positive integer, got {value!r}")
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise UsageError(f"{where}: num_attention_heads ({heads}) must divide hidden_size ({hidden})")
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise UsageError(f"{where}: num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})")


def _require_causal_lm(config: PretrainedConfig, name: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(
            f"--model {name}: model_type {config.model_type!r} is not a causal language model; "
            "use a decoder config such as llama, qwen2 or gpt2"
        )
    # Encoders (BERT, RoBERTa, ...: the masked-LM families) have a causal-LM head too, but unless
    # their config says is_decoder: true that model attends in both directions: it sees the token
    # it is asked to predict and learns nothing. (GPT-NeoX also says is_decoder: false, and is causal.)
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)
    if encoder and not getattr(config, "is_decoder", False):
        raise UsageError(
            f"--model {name}: model_type {config.model_type!r} is an encoder (is_decoder is false): its attention sees the "
            'tokens it predicts; set "is_decoder": true in the config, or use a decoder config such as llama, qwen2 or gpt2'
        )


def build_model(config: PretrainedConfig, *, device: torch.device | str | None = None, seed: int | None = None) -> torch.nn.Module:
    """A randomly initialised causal LM for ``config`` (``device="meta"`` allocates nothing)."""
    if seed is not None:
        torch.manual_seed(seed)
    if str(device) == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------------------------- module by module


class NotReproducible(RuntimeError):
    """:func:`materialize_model` cannot promise :func:`build_model`'s values for this model; the
    message says why. The global RNG is left as it was found, so the caller can build it whole."""


def materialize_model(config: PretrainedConfig, *, seed: int | None,
                      finish: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """The model ``build_model(config, seed=seed)`` returns — the same modules, the same parameter
    and buffer values bit for bit, the global RNG left in the same state — built module by module,
    so the whole model never exists in fp32 at once.

    ``finish(name, module)`` is called once per module (``""`` for the root, last): its own
    parameters and buffers then hold their final fp32 values on the CPU and its submodules have
    been finished. It returns the module to keep in that place: moved, cast, or replaced (a
    factorized layer), so that at most a few modules' fp32 values are alive at any time.

    How ``build_model`` draws: each module's constructor draws torch's default init from the global
    CPU generator (``nn.Linear``'s Kaiming-uniform, ``nn.Embedding``'s normal); each
    ``PreTrainedModel``'s ``post_init`` then runs ``initialize_weights`` over its modules
    (post-order, ``_init_weights``: normal(0, initializer_range) for linears and embeddings, ones
    for norms, the rotary ``inv_freq``), inner models during the outer one's construction. Final
    values come from the last draw into each tensor, but every draw moves the generator.

    So, in three passes interleaved:

    1. **Log.** Build on ``meta`` with ``initialize_weights`` run anyway (transformers skips it on
       meta) and tying off, logging every seeded draw: on meta a draw costs nothing and moves no
       generator.
    2. **Replay** the log in order on the CPU's global generator, each draw into a tensor of the
       same shape, stride and dtype: the last draw of each parameter into a tensor that is kept
       until its module takes it, every other draw into scratch memory that is dropped at once.
       Replay is lazy (it runs as far as the next module needs), so few kept draws wait at a time.
    3. **Initialise** module by module in ``initialize_weights``' order, each module's tensors
       allocated just before its ``_init_weights`` runs, with every draw inside replaced by the
       tensor's logged last draw (no generator moves; a draw writes its tensor whole, so only the
       last one's values can survive, and the last takes the kept tensor's storage, no copy) and
       every other write (ones, zeros, a padding row, ``inv_freq``) done for real. A module is
       finished once its parent's ``_init_weights`` ran too (GPT-2 re-draws ``c_proj`` from its
       attention block).

    Then the rest of the log is replayed (the generator ends where ``build_model`` leaves it) and
    the weights are tied as ``post_init`` ties them.

    Raises:
        NotReproducible: the model is not a ``PreTrainedModel`` with transformers' own
            ``init_weights`` / ``initialize_weights``; a draw writes part of a tensor, reads a
            tensor, uses its own generator or creates a tensor; a tensor is shared or not floating
            point; or a value is not set by the initialisation (a tensor no draw writes starts as
            NaN to tell).

    Not thread-safe: pass 1 patches ``PreTrainedModel.init_weights`` while it builds on meta.
    """
    state = torch.get_rng_state()
    try:
        model, draws = _log_draws(config, seed)
        model = _Initializer(draws, finish).run(model)
        draws.replay_rest()
    except NotReproducible:
        torch.set_rng_state(state)
        raise
    model.tie_weights(recompute_mapping=False)
    return model


class _Draw:
    """One logged draw: the aten op, its arguments (meta tensors kept, so no storage is reused
    while the log lives) and the tensor it wrote; ``in_init``: made by ``initialize_weights``."""

    __slots__ = ("func", "args", "kwargs", "out", "in_init")

    def __init__(self, func, args, kwargs, out, in_init: bool) -> None:
        self.func, self.args, self.kwargs, self.out, self.in_init = func, args, kwargs, out, in_init


class _DrawLog(TorchDispatchMode):
    """Logs every aten op tagged ``nondeterministic_seeded`` (the ops that draw from a generator)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[_Draw] = []
        self.init_depth = 0  # > 0 inside initialize_weights

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.draws.append(_Draw(func, args, kwargs, out, self.init_depth > 0))
        return out

    @contextmanager
    def initializing(self):
        self.init_depth += 1
        try:
            yield
        finally:
            self.init_depth -= 1


def _log_draws(config: PretrainedConfig, seed: int | None) -> tuple[PreTrainedModel, "_Draws"]:
    """Pass 1: the meta model, untied, and its draws (see :func:`materialize_model`)."""
    log = _DrawLog()

    def init_weights(self):  # PreTrainedModel.init_weights without its "not on meta" test, nor tying
        with log.initializing():
            self.initialize_weights()

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = init_weights
    try:
        with hf_init.no_tie_weights(), log:
            model = build_model(config, device="meta", seed=seed)
    finally:
        PreTrainedModel.init_weights = original
    _check_initializable(model)
    return model, _Draws(log.draws, model)


def _check_initializable(model: nn.Module) -> None:
    """What pass 3 assumes of the model: transformers' own initialisation and unshared,
    floating-point tensors (NaN tells which were never set)."""
    if not isinstance(model, PreTrainedModel):
        raise NotReproducible(f"{type(model).__name__} is not a transformers PreTrainedModel")
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for method in ("init_weights", "initialize_weights"):
                if getattr(type(module), method) is not getattr(PreTrainedModel, method):
                    raise NotReproducible(f"{type(module).__name__} overrides {method}")
    if len(list(model.named_modules(remove_duplicate=False))) != len(list(model.named_modules())):
        raise NotReproducible("a module appears twice in the model")
    for name, tensor in _named_tensors(model, remove_duplicate=False):
        if not tensor.is_floating_point():
            raise NotReproducible(f"{name} is a {tensor.dtype} tensor (its initialisation cannot be checked)")
    if len(list(_named_tensors(model, remove_duplicate=False))) != len(list(_named_tensors(model))):
        raise NotReproducible("a parameter or buffer is shared by two modules")


def _named_tensors(module: nn.Module, *, remove_duplicate: bool = True, recurse: bool = True):
    yield from module.named_parameters(recurse=recurse, remove_duplicate=remove_duplicate)
    yield from module.named_buffers(recurse=recurse, remove_duplicate=remove_duplicate)


class _Draws:
    """Pass 2: the logged draws replayed in order on the global CPU generator, each parameter's
    last draw kept (:meth:`value`) and every other draw made into scratch memory."""

    def __init__(self, log: list[_Draw], model: nn.Module) -> None:
        names = {tensor.untyped_storage()._cdata: (name, tensor) for name, tensor in _named_tensors(model)}
        self._log, self._next, self._kept = log, 0, {}
        self._last: dict[str, int] = {}
        self.init_draws: dict[str, int] = {}  # how many draws initialize_weights makes into each tensor
        for index, draw in enumerate(log):
            name = _draw_target(draw, names)
            if name is not None:
                self._last[name] = index
                self.init_draws[name] = self.init_draws.get(name, 0) + draw.in_init
        self._final = {index: name for name, index in self._last.items()}

    def value(self, name: str) -> torch.Tensor | None:
        """The value ``name``'s last draw gave (replaying the log up to it), once; ``None`` if no
        draw writes ``name``."""
        if name not in self._last:
            return None
        if self._last[name] < self._next and name not in self._kept:
            raise NotReproducible(f"{name} is drawn into more often than when the model is built whole")
        while name not in self._kept:
            self._replay_next()
        return self._kept.pop(name)

    def replay_rest(self) -> None:
        while self._next < len(self._log):
            self._replay_next()
        if self._kept:
            raise NotReproducible(f"{', '.join(sorted(self._kept))}: drawn but never taken by the initialisation")

    def _replay_next(self) -> None:
        index, draw = self._next, self._log[self._next]
        self._next += 1
        result = draw.func(*tree_map(_on_cpu, draw.args), **tree_map(_on_cpu, draw.kwargs))
        if index in self._final:
            self._kept[self._final[index]] = result


def _on_cpu(value):
    """A logged argument for the replay: a meta tensor becomes an uninitialised CPU tensor of the
    same geometry (a draw's consumption of the generator depends on its size, layout and dtype)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
    if isinstance(value, torch.device):
        return torch.device("cpu")
    return value


def _draw_target(draw: _Draw, names: dict) -> str | None:
    """The name of the tensor a draw writes whole; ``None`` for a temporary (only the generator's
    position matters then)."""
    leaves, _ = tree_flatten((draw.args, draw.kwargs))
    if any(isinstance(leaf, torch.Generator) for leaf in leaves):
        raise NotReproducible(f"{draw.func} draws from a generator of its own")
    out = draw.out
    if not isinstance(out, torch.Tensor) or any(isinstance(leaf, torch.Tensor) and leaf is not out for leaf in leaves):
        raise NotReproducible(f"{draw.func} reads a tensor or returns something else than the tensor it draws into")
    name, tensor = names.get(out.untyped_storage()._cdata, (None, None))
    if name is None:
        if not leaves or leaves[0] is not out:
            raise NotReproducible(f"{draw.func} creates a tensor (its values could reach a parameter)")
        return None
    if (out.shape, out.stride(), out.storage_offset()) != (tensor.shape, tensor.stride(), tensor.storage_offset()):
        raise NotReproducible(f"{draw.func} draws into part of {name}")
    return name


class _Initializer(TorchDispatchMode):
    """Pass 3: ``initialize_weights``' walk, one module's tensors allocated at a time; while an
    ``_init_weights`` runs, this mode turns every draw into the logged value."""

    def __init__(self, draws: _Draws, finish: Callable[[str, nn.Module], nn.Module]) -> None:
        super().__init__()
        self.draws, self.finish = draws, finish
        self.live: dict[int, str] = {}  # data_ptr -> name of the tensors that draws may write
        self.pending: dict[str, torch.Tensor] = {}  # logged values still to be written
        self.left: dict[str, int] = {}  # draws initialize_weights still has to make into each tensor
        self.unset: set[str] = set()  # tensors no draw sets, NaN until _init_weights writes them

    def run(self, model: PreTrainedModel) -> nn.Module:
        for module in model.modules():  # pass 1 ran initialize_weights, which marks each module done
            module.__dict__.pop("_is_hf_initialized", None)
        self._visit(model, model._initialize_weights, "", model.is_custom_code())
        return self._finish("", model)

    def _visit(self, module: nn.Module, init_fn, prefix: str, custom: bool) -> None:
        # transformers' smart_apply: children first, each sub-model with its own _initialize_weights
        for name, child in module.named_children():
            child_fn = child._initialize_weights if isinstance(child, PreTrainedModel) else init_fn
            self._visit(child, child_fn, f"{prefix}{name}.", custom)
        self._allocate(module, prefix)
        with torch.no_grad(), hf_init.guard_torch_init_functions(), self:
            init_fn(module, custom)
        for name, child in list(module.named_children()):
            module._modules[name] = self._finish(prefix + name, child)

    def _allocate(self, module: nn.Module, prefix: str) -> None:
        """The module's own tensors on the CPU: one that ``_init_weights`` draws into is left
        uninitialised (its draw writes it whole); one drawn only in its constructor gets that
        draw's value; any other starts as NaN, for ``_init_weights`` to set."""
        for store in (module._parameters, module._buffers):
            for key, meta in store.items():
                if meta is None:
                    continue
                name = prefix + key
                value, draws = self.draws.value(name), self.draws.init_draws.get(name, 0)
                if draws:
                    tensor = torch.empty(meta.shape, dtype=meta.dtype)
                    self.pending[name], self.left[name] = value, draws
                    self.live[tensor.data_ptr()] = name
                elif value is not None:
                    tensor = value
                else:
                    tensor = torch.full(meta.shape, float("nan"), dtype=meta.dtype)
                    self.unset.add(name)
                store[key] = nn.Parameter(tensor, requires_grad=meta.requires_grad) if isinstance(meta, nn.Parameter) else tensor

    def _finish(self, name: str, module: nn.Module) -> nn.Module:
        prefix = f"{name}." if name else ""
        for key, tensor in _named_tensors(module, recurse=False):
            full = prefix + key
            if full in self.left:
                raise NotReproducible(f"{full} is drawn into less often than when the model is built whole")
            if full in self.unset:
                if torch.isnan(tensor).any():
                    raise NotReproducible(f"{full} is not (entirely) set by transformers' initialisation")
                self.unset.discard(full)
        return self.finish(name, module)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """A draw into a whole tensor that has a logged value writes that value instead (the
        last one takes its storage, no copy); any other draw cannot be reproduced."""
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        target = args[0] if args and isinstance(args[0], torch.Tensor) and func._schema.name.endswith("_") else None
        name = self.live.get(target.data_ptr()) if target is not None else None
        if name is None or target.storage_offset() or target.numel() != self.pending[name].numel():
            raise NotReproducible(f"_init_weights makes a draw ({func}) that the logged build did not make whole")
        self.left[name] -= 1
        if self.left[name]:
            return target.copy_(self.pending[name])
        del self.live[target.data_ptr()], self.left[name]
        return target.set_(self.pending.pop(name))
