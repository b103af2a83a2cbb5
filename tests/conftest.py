import os

# Tests never touch the network: models are built from configs, data is local or generated.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402

# torchao (a test-only reference) logs a warning per CUDA kernel library it cannot load on a CPU
# machine whenever transformers imports it; the one-line-error tests read stderr.
for _name in ("torchao", "bitsandbytes"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import torch  # noqa: E402

# Test models are tiny: one thread is fastest, and it keeps two test processes (DDP) or a busy
# machine from oversubscribing the cores, which slows OpenMP-threaded kernels by orders of magnitude.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small deterministic text corpus (Python docstrings) and a BPE tokenizer trained on it."""
    import builtins
    import collections
    import functools
    import itertools
    import json
    import re
    import string
    import textwrap

    from lowrank.data import build_data

    folder = tmp_path_factory.mktemp("corpus")
    docs = []
    for module in (builtins, collections, functools, itertools, json, re, string, textwrap):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                docs.append(doc.strip().replace("\n\n", "\n"))
    (folder / "train.txt").write_text("\n\n".join(docs * 2) + "\n")
    (folder / "valid.txt").write_text("\n\n".join(docs[::7]) + "\n")
    bundle = build_data(str(folder), seq_len=32, batch_size=2, vocab_size=512, cache_dir=folder / "cache")
    return {"data": str(folder), "tokenizer": str(folder / "cache" / "tokenizer"), "vocab": len(bundle.tokenizer)}
