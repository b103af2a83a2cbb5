"""Pretraining data: corpora, tokenizer, packed sequences, a resumable and DDP-sharded loader.

:func:`build_data` is the one entry point. ``data`` is one of

* ``"builtin"``: an offline corpus present on every machine, harvested deterministically from the
  docstrings of the installed Python standard library (:mod:`.builtin`: one document per module,
  parsed with :mod:`ast`, nothing imported, nothing shipped, no network).
* a local ``.txt`` / ``.txt.gz`` / ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file or a folder of them
  (searched recursively, sorted). Text files split into documents at blank lines; JSON lines and
  Parquet rows are documents, read from the ``text_field`` column (:mod:`.sources`).
* a Hugging Face hub dataset ``owner/name`` or ``owner/name:config``, streamed and split across DDP
  ranks (or, from Python, a ``datasets.IterableDataset`` or ``IterableDatasetDict`` object;
  :mod:`.build`).

Validation split (fixed: the same on every rank and every run with the same inputs):

* builtin: the modules with ``sha1(relative path) % 20 == 0``;
* a folder whose files (or top-level subfolders) are named ``train*`` and ``valid*`` /
  ``validation*`` / ``val*`` / ``dev*`` (or, failing those, ``test*``): those files, other files
  are ignored;
* any other file or folder: the documents with ``sha1(text) % 20 == 0`` (duplicates land together);
* hub: the dataset's ``validation`` (or ``valid``) split if it has one, else the documents of the
  train stream with ``sha1(text) % 20 == 0``, which the train stream then filters out.

Packing (:mod:`.packing`): each document's tokens, then the EOS id, concatenated into one stream
and cut into ``seq_len`` chunks (the final partial chunk is dropped): no padding. Validation of a
finite corpus is ``max_valid_tokens // seq_len`` chunks spread evenly over the whole packed
validation split (:func:`spread_chunk_indices`, from the fixed seed :data:`VALID_SELECTION_SEED`);
a stream's validation is its first ``max_valid_tokens`` tokens. ``description["valid_selection"]``
says which tokens were used.

Tokenizer (:mod:`.tokenizer`): ``tokenizer`` names a local folder / ``tokenizer.json`` or a hub
model. Without one, a byte-level BPE is trained on the training split (at most about
:data:`BPE_SAMPLE_CHARS` characters of it) and saved into ``cache_dir/tokenizer``; a later run with
the same ``cache_dir`` reloads it instead of retraining.

Caches under ``cache_dir/data``: the harvested builtin corpus and, for finite corpora, the packed
token arrays keyed by the corpus files and the tokenizer, so a resumed or second run does not
re-tokenize. Under ``torch.distributed`` with a ``cache_dir``, rank 0 builds the caches first and
the other ranks then read them.

Loaders (:mod:`.loaders`): :class:`TrainLoader` over a packed corpus, :class:`StreamingTrainLoader`
over a stream; both resume from their ``state_dict`` (exactly, unless a stream has a shuffle
buffer).
"""

from .build import DataBundle, build_data
from .builtin import builtin_documents
from .common import VALID_MODULUS
from .loaders import StreamingTrainLoader, TrainLoader
from .packing import VALID_SELECTION_SEED, Packer, encode_documents, pack, spread_chunk_indices
from .sources import read_documents
from .tokenizer import BPE_SAMPLE_CHARS, EOT, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "BPE_SAMPLE_CHARS",
    "EOT",
    "VALID_MODULUS",
    "VALID_SELECTION_SEED",
    "DataBundle",
    "Packer",
    "StreamingTrainLoader",
    "TrainLoader",
    "build_data",
    "builtin_documents",
    "encode_documents",
    "load_tokenizer",
    "pack",
    "read_documents",
    "spread_chunk_indices",
    "train_bpe_tokenizer",
]
