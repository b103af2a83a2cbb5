"""The tokenizer: loaded from a local folder, a ``tokenizer.json`` or the hub, or trained.

``tokenizer`` names a local folder / ``tokenizer.json`` or a hub model (:func:`load_tokenizer`;
one without an eos token gets one). Without one, a byte-level BPE (``tokenizers``,
:func:`train_bpe_tokenizer`) is trained on the training split (all of it, or a deterministic sample
of about :data:`BPE_SAMPLE_CHARS` characters) and saved with ``save_pretrained`` into
``cache_dir/tokenizer``; a later run with the same ``cache_dir`` reloads it instead of retraining
(:func:`get_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError, first_line
from .common import hub_offline

EOT = "<|endoftext|>"
"""The special token of a trained tokenizer: end of document, and also bos, pad and unk."""

BPE_SAMPLE_CHARS = 100_000_000
"""A trained BPE sees about this many characters of the training split at most."""


def _wrap_tokenizer(backend) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        clean_up_tokenization_spaces=False,
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE (``tokenizers``) on ``texts``; ``<|endoftext|>`` is the only special
    token (eos, bos, pad and unk). Returns a ``PreTrainedTokenizerFast``. The vocabulary may come out
    smaller than ``vocab_size`` on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap_tokenizer(backend)


def _ensure_special_tokens(tok) -> Any:
    """A tokenizer without an eos token gets one: an existing ``<|endoftext|>``, ``</s>``, ``<eos>``
    or ``[SEP]`` from its vocabulary, else a new ``<|endoftext|>`` special token (one more id).
    A missing pad token becomes the eos token."""
    if tok.eos_token is None:
        vocab = tok.get_vocab()
        existing = next((t for t in (EOT, "</s>", "<eos>", "[SEP]") if t in vocab), None)
        if existing is not None:
            tok.eos_token = existing
        else:
            tok.add_special_tokens({"eos_token": EOT})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name_or_path: str) -> Any:
    """Load ``--tokenizer``: a local folder (``save_pretrained`` / ``tokenizer.json`` inside), a
    ``tokenizer.json`` file, or a hub model name. Raises :class:`UsageError` on failure."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(name_or_path).expanduser()
    option = f"--tokenizer {name_or_path}"
    hint = "pass a folder saved with save_pretrained or a tokenizer.json file, or omit --tokenizer to train a BPE"
    if path.exists():
        try:
            if path.is_file():
                if path.suffix != ".json":
                    raise UsageError(f"{option}: a tokenizer file must be a tokenizer.json; {hint}")
                tok = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False)
            else:
                tok = AutoTokenizer.from_pretrained(str(path))
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"{option}: cannot load a tokenizer from it ({first_line(error)}); {hint}") from None
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".json") or name_or_path.count("/") > 1:
        raise UsageError(f"{option}: no such file or folder; {hint}")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as error:
            if hub_offline():
                raise UsageError(
                    f"{option}: not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE); "
                    "pass a local tokenizer folder or tokenizer.json, or omit --tokenizer to train a BPE on the data"
                ) from None
            raise UsageError(
                f"{option}: cannot load it from the Hugging Face hub ({first_line(error)}); "
                "check the name and network, pass a local tokenizer folder, or omit --tokenizer"
            ) from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise UsageError(f"{option}: not a fast tokenizer (no tokenizer.json); {hint}")
    return _ensure_special_tokens(tok)


def tokenizer_fingerprint(tok) -> str:
    """Cache key of a tokenizer: its serialized backend, eos id and length."""
    key = tok.backend_tokenizer.to_str() + f"\neos={tok.eos_token_id}\nlen={len(tok)}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _sample_for_bpe(texts: Iterable[str], estimated_chars: int | None) -> Iterator[str]:
    """All texts if the corpus is small, else a deterministic hash sample of about
    :data:`BPE_SAMPLE_CHARS` characters (capped there in any case)."""
    rate = 1.0 if not estimated_chars else min(1.0, BPE_SAMPLE_CHARS / estimated_chars)
    threshold = int(rate * 2**64)
    total = 0
    for text in texts:
        if rate < 1.0 and int.from_bytes(hashlib.sha1(b"bpe" + text.encode()).digest()[:8], "big") >= threshold:
            continue
        yield text
        total += len(text)
        if total >= BPE_SAMPLE_CHARS:
            return


def get_tokenizer(
    tokenizer: str | None,
    vocab_size: int,
    cache_dir: Path | None,
    train_texts: Callable[[], Iterable[str]],
    source_name: str,
    estimated_chars: int | None,
) -> tuple[Any, dict]:
    """The tokenizer named by ``tokenizer``, else the one cached in ``cache_dir/tokenizer``, else a
    BPE trained on a sample of ``train_texts()`` (and cached there); plus a description for logging."""
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        return tok, {"tokenizer": tokenizer, "tokenizer_trained": False}
    saved = cache_dir / "tokenizer" if cache_dir is not None else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = _ensure_special_tokens(PreTrainedTokenizerFast.from_pretrained(str(saved)))
        meta_file = saved / "lowrank_data.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if meta and (meta.get("data") != source_name or meta.get("vocab_size") != vocab_size):
            warnings.warn(
                f"reusing the tokenizer cached in {saved} (trained on {meta.get('data')} with vocab_size "
                f"{meta.get('vocab_size')}); delete that folder to train a new one",
                stacklevel=3,
            )
        return tok, {"tokenizer": str(saved), "tokenizer_trained": False}
    seen = {"documents": 0, "chars": 0}

    def counted(texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            seen["documents"] += 1
            seen["chars"] += len(text)
            yield text

    start = time.perf_counter()
    tok = train_bpe_tokenizer(counted(_sample_for_bpe(train_texts(), estimated_chars)), vocab_size)
    seconds = time.perf_counter() - start
    if seen["documents"] == 0:
        raise UsageError(
            f"--data {source_name}: the training split holds no text to train a tokenizer on; "
            "point --data at text data"
        )
    if saved is not None:
        tmp = saved.with_name(f"tokenizer.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        meta = {"data": source_name, "vocab_size": vocab_size, "trained_vocab": len(tok)}
        meta.update(seen, seconds=round(seconds, 2))
        (tmp / "lowrank_data.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, saved)
        except OSError:  # another process saved it first: keep theirs (training is deterministic)
            shutil.rmtree(tmp, ignore_errors=True)
        from transformers import PreTrainedTokenizerFast

        # What a resumed run will load, so that both runs see the very same tokenizer object.
        tok = _ensure_special_tokens(PreTrainedTokenizerFast.from_pretrained(str(saved)))
    description = {"tokenizer": f"trained byte-level BPE ({str(saved) if saved else 'not saved'})"}
    description.update(
        tokenizer_trained=True,
        tokenizer_train_seconds=round(seconds, 2),
        tokenizer_train_documents=seen["documents"],
        tokenizer_train_chars=seen["chars"],
    )
    return tok, description
