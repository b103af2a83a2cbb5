"""Model configurations: the LLaMA shapes of the GaLore / SLTrain / benchmark papers, any
Hugging Face config JSON, or a hub name."""

from __future__ import annotations

import builtins
import difflib
import json
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .errors import UsageError

__all__ = ["available_models", "load_model_config", "build_model", "config_dir", "check_model_shape"]


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
