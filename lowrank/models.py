"""Model configurations: the LLaMA shapes of the GaLore / SLTrain / benchmark papers, any
Hugging Face config JSON, or a hub name."""

from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .errors import UsageError

__all__ = ["available_models", "load_model_config", "build_model", "config_dir"]


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
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UsageError(f"--model {model}: not valid JSON ({error}); pass a Hugging Face config.json") from None
        if "model_type" not in data:
            raise UsageError(f"--model {model}: the JSON has no 'model_type', so it is not a Hugging Face model config")
        model_type = data.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **data)
        except ValueError as error:
            raise UsageError(f"--model {model}: {error}") from None
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
    return config


def _require_causal_lm(config: PretrainedConfig, name: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(
            f"--model {name}: model_type {config.model_type!r} is not a causal language model; "
            "use a decoder config such as llama, qwen2 or gpt2"
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
