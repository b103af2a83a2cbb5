"""lowrank.data: corpora, split rules, tokenizer training and caching, packing, the resumable
DDP-sharded loaders (packed and streamed) and the one-line errors."""

import gzip
import hashlib
import io
import json
import math
import random
import sys
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets.distributed import split_dataset_by_node

from lowrank import data as D
from lowrank.data import build as data_build
from lowrank.data import builtin as data_builtin
from lowrank.data import tokenizer as data_tokenizer
from lowrank.data import (
    EOT,
    Packer,
    StreamingTrainLoader,
    TrainLoader,
    build_data,
    builtin_documents,
    encode_documents,
    load_tokenizer,
    pack,
    read_documents,
    spread_chunk_indices,
)
from lowrank.errors import UsageError

WORDS = (
    "the of and to in is that for it as with was on be by this are from or an at which def class return "
    "import module function value list dict string error file data token model layer rank café naïve 日本 "
    "x = 1 ( ) [ ] : , . -> None True self args kwargs"
).split()


def make_documents(n, seed=0):
    """Synthetic documents: no blank lines inside, some single line breaks, some unicode."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 3))]
        docs.append(f"doc {i}: " + "\n".join(lines))
    return docs


DOCS = make_documents(400)


def in_valid(key):
    """The documented rule, written out independently: sha1 of the text (or builtin module path) % 20 == 0."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % 20 == 0


def roundtrip(state):
    """What a checkpoint does to a loader state."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE trained once for the tests that do not test training itself."""
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    D.train_bpe_tokenizer(DOCS, vocab_size=400).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


# ------------------------------------------------------------------ packing and the packed loader


def unique_tokens(num_chunks, seq_len):
    """Every token distinct, so 'each token once' is checkable exactly; a partial last chunk."""
    return np.arange(num_chunks * seq_len + seq_len - 1, dtype=np.int32)


def epoch_batches(loader):
    return [next(loader) for _ in range(loader.batches_per_epoch)]


def test_packed_loader_yields_each_token_once_per_epoch():
    seq_len, batch = 8, 3
    loader = TrainLoader(unique_tokens(12, seq_len), seq_len=seq_len, batch_size=batch, seed=1)
    assert (loader.batches_per_epoch, loader.tokens_per_epoch) == (4, 4 * 3 * 8)
    for epoch in range(2):
        assert loader.epoch == epoch
        batches = epoch_batches(loader)
        assert all(b.dtype == torch.long and b.shape == (batch, seq_len) for b in batches)
        seen = torch.cat(batches).flatten().tolist()
        assert sorted(seen) == list(range(12 * seq_len))  # each token exactly once; the partial tail never
        # chunks are contiguous slices of the packed stream
        assert all((row.diff() == 1).all() and row[0] % seq_len == 0 for b in batches for row in b)
    assert loader.epoch == 2


def test_packed_loader_ranks_are_disjoint_and_cover_every_full_batch():
    seq_len, batch, world = 4, 3, 2
    tokens = unique_tokens(13, seq_len)  # 13 chunks: 2 steps x 3 x 2 ranks = 12 used, 1 dropped
    kwargs = dict(seq_len=seq_len, batch_size=batch, seed=7, world_size=world)
    loaders = [TrainLoader(tokens, rank=r, **kwargs) for r in range(world)]
    assert [ld.batches_per_epoch for ld in loaders] == [2, 2]
    for _epoch in range(3):
        per_rank = [set(torch.cat(epoch_batches(ld)).flatten().tolist()) for ld in loaders]
        assert not per_rank[0] & per_rank[1]
        assert len(per_rank[0]) == len(per_rank[1]) == 2 * batch * seq_len
        # together: exactly the chunks of the first 12 positions of this epoch's global order
        union = per_rank[0] | per_rank[1]
        assert len(union) == 12 * seq_len and union <= set(range(13 * seq_len))
    # the same global order as one rank with the whole batch
    single = TrainLoader(tokens, seq_len=seq_len, batch_size=batch * world, seed=7)
    ranks = [TrainLoader(tokens, rank=r, **kwargs) for r in range(world)]
    for _ in range(4):
        assert set(next(single).flatten().tolist()) == set(torch.cat([next(ld) for ld in ranks]).flatten().tolist())


def test_packed_order_is_deterministic_seeded_and_reshuffled_per_epoch():
    tokens = unique_tokens(40, 4)

    def first_epochs(seed, epochs=2):
        loader = TrainLoader(tokens, seq_len=4, batch_size=2, seed=seed)
        return [torch.stack(epoch_batches(loader)) for _ in range(epochs)]

    a, b, c = first_epochs(0), first_epochs(0), first_epochs(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # reshuffled
    assert torch.equal(a[0].flatten().sort().values, a[1].flatten().sort().values)  # same tokens


@pytest.mark.parametrize("steps", [3, 9, 10, 13, 25])  # 10 batches per epoch: mid, last, boundary, later epochs
def test_packed_resume_gives_the_same_batches(steps):
    tokens = unique_tokens(41, 4)
    kwargs = dict(seq_len=4, batch_size=2, seed=3, rank=1, world_size=2)
    loader = TrainLoader(tokens, **kwargs)
    assert loader.batches_per_epoch == 10
    for _ in range(steps):
        next(loader)
    state = roundtrip(loader.state_dict())
    assert all(isinstance(v, (int, str)) for v in state.values())
    expected = [next(loader) for _ in range(15)]
    resumed = TrainLoader(tokens, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.epoch == steps // 10
    assert all(torch.equal(x, y) for x, y in zip(expected, [next(resumed) for _ in range(15)]))


def test_packed_resume_with_another_world_size_keeps_the_global_position():
    tokens = unique_tokens(40, 4)
    ranks = [TrainLoader(tokens, seq_len=4, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for ld in ranks:
            next(ld)
    single = TrainLoader(tokens, seq_len=4, batch_size=4, seed=5)
    single.load_state_dict(roundtrip(ranks[0].state_dict()))
    after_two_ranks = set(torch.cat([next(ld) for ld in ranks]).flatten().tolist())
    assert set(next(single).flatten().tolist()) == after_two_ranks


def test_packed_resume_rejects_another_corpus():
    state = TrainLoader(unique_tokens(40, 4), seq_len=4, batch_size=2).state_dict()
    other = TrainLoader(unique_tokens(30, 4), seq_len=4, batch_size=2)
    with pytest.raises(UsageError) as excinfo:
        other.load_state_dict(state)
    assert "--seq-len" in one_line_error(excinfo)


def test_packer_matches_flat_packing_and_eos_follows_every_document(tok):
    flat = encode_documents(tok, DOCS[:50])
    assert flat.dtype == np.uint16
    eos = tok.eos_token_id
    assert tok.eos_token == EOT and (flat == eos).sum() == 50 and flat[-1] == eos
    pieces = [tok.backend_tokenizer.encode(d, add_special_tokens=False).ids + [eos] for d in DOCS[:50]]
    assert flat.tolist() == [t for piece in pieces for t in piece]
    packer, chunks = Packer(seq_len=16), []
    for piece in pieces:
        packer.add(np.array(piece))
        while (c := packer.take(1)) is not None:
            chunks.append(c)
    assert torch.equal(torch.from_numpy(np.concatenate(chunks)), pack(flat, 16))
    assert packer.leftover() == flat[len(chunks) * 16 :].tolist()


# ------------------------------------------------------------------ the streamed path (hub), on local data


def stream(docs, shards=4):
    return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(num_shards=shards)


def test_streaming_loader_packs_like_the_finite_path_and_splits_ranks(tok):
    docs = DOCS[:120]
    one = StreamingTrainLoader(stream(docs), tok, seq_len=16, batch_size=2, docs_per_read=7)
    expected = pack(encode_documents(tok, docs), 16)
    got = torch.cat([next(one) for _ in range(len(expected) // 2)])
    assert torch.equal(got, expected[: len(got)])
    # two ranks: disjoint documents that together are all of them, each packed in its own order
    seen = []
    for rank in range(2):
        loader = StreamingTrainLoader(stream(docs), tok, seq_len=16, batch_size=2, rank=rank, world_size=2)
        rank_docs = [row["text"] for row in split_dataset_by_node(stream(docs), rank=rank, world_size=2)]
        expected = pack(encode_documents(tok, rank_docs), 16)
        got = torch.cat([next(loader) for _ in range(len(expected) // 2)])
        assert torch.equal(got, expected[: len(got)])
        seen.append(set(rank_docs))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(docs)


@pytest.mark.parametrize("steps", [1, 5, 12])  # mid-stream, and after the first epoch rolled over
def test_streaming_resume_gives_the_same_batches(tok, steps):
    docs = DOCS[:60]
    kwargs = dict(seq_len=16, batch_size=2, rank=1, world_size=2, docs_per_read=5)
    loader = StreamingTrainLoader(stream(docs), tok, **kwargs)
    for _ in range(steps):
        next(loader)
    state = roundtrip(loader.state_dict())
    expected = [next(loader) for _ in range(20)]
    assert loader.epoch >= 1  # the stream ended and rolled over
    resumed = StreamingTrainLoader(stream(docs), tok, **kwargs)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, [next(resumed) for _ in range(20)]))


def test_build_data_streams_a_dataset_object(tokenizer_dir, tok):
    docs = DOCS
    bundle = build_data(
        datasets.IterableDatasetDict({"train": stream(docs)}), seq_len=16, batch_size=2, tokenizer=tokenizer_dir
    )
    valid_docs = [d for d in docs if in_valid(d)]
    train_docs = [d for d in docs if not in_valid(d)]
    assert 0 < len(valid_docs) < len(docs) // 10
    assert torch.equal(bundle.valid, pack(encode_documents(tok, valid_docs), 16))
    expected = pack(encode_documents(tok, train_docs), 16)
    got = torch.cat([next(bundle.train) for _ in range(len(expected) // 2)])
    assert torch.equal(got, expected[: len(got)])
    # a validation split is used as is
    split = datasets.IterableDatasetDict({"train": stream(docs[:300]), "validation": stream(docs[300:], 1)})
    bundle = build_data(split, seq_len=16, batch_size=2, tokenizer=tokenizer_dir, max_valid_tokens=160)
    assert torch.equal(bundle.valid, pack(encode_documents(tok, docs[300:]), 16)[:10])


# ------------------------------------------------------------------ builtin corpus


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("builtin-run")
    before = set(sys.modules)
    documents = builtin_documents(folder)
    return folder, documents, before


def test_builtin_corpus_is_deterministic_large_and_imports_nothing(builtin_cache):
    folder, documents, before = builtin_cache
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    harvested = {data_builtin._module_name(rel) for rel, _ in documents}
    assert not {m for m in harvested if m in sys.modules and m not in before}
    assert len(documents) > 300 and sum(len(d) for _, d in documents) > 1_000_000
    paths = [rel for rel, _ in documents]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert not any("/test/" in f"/{p}" or "/tests/" in f"/{p}" or p.startswith("idlelib") for p in paths)
    json_doc = dict(documents)["json/__init__.py"]
    assert json_doc.startswith("Module json\n\n") and "def json.dumps(obj, *, skipkeys=False" in json_doc
    # a fresh harvest (of every 10th module, to keep the test fast) gives the same documents
    files = data_builtin.builtin_files(data_builtin.stdlib_root())
    assert [rel for rel in files if rel in dict(documents)] == paths
    assert data_builtin._harvest(data_builtin.stdlib_root(), files[::10]) == [pair for pair in documents if pair[0] in files[::10]]
    assert list(folder.glob("data/builtin-*.json"))


def test_builtin_build_splits_by_module_path(builtin_cache, monkeypatch):
    folder, documents, _ = builtin_cache
    monkeypatch.setattr(data_builtin, "_harvest", None)  # the harvest is cached under cache_dir
    monkeypatch.setattr(data_tokenizer, "BPE_SAMPLE_CHARS", 200_000)  # a deterministic sample keeps the test fast
    bundle = build_data("builtin", seq_len=64, batch_size=4, vocab_size=300, cache_dir=folder)
    desc = bundle.description
    valid = [d for rel, d in documents if in_valid(rel)]
    assert desc["valid_documents"] == len(valid) > 5
    assert desc["train_documents"] == len(documents) - len(valid)
    assert desc["vocab_size"] == len(bundle.tokenizer) == 300
    expected = pack(encode_documents(bundle.tokenizer, valid), 64)
    assert torch.equal(bundle.valid, expected[: 1_000_000 // 64])
    # disjoint: no validation chunk occurs in the training stream
    train = torch.from_numpy(np.asarray(bundle.train.tokens, dtype=np.int64))
    train_chunks = {tuple(r) for r in train[: len(train) // 64 * 64].view(-1, 64).tolist()}
    assert not train_chunks & {tuple(r) for r in bundle.valid.tolist()}


# ------------------------------------------------------------------ local files


def write_txt(path, docs, compress=False):
    # documents separated by one or more blank lines, some whitespace-only
    separators = ["\n\n", "\n\n\n", "\n  \n"]
    text = "".join(d + separators[i % 3] for i, d in enumerate(docs))
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")


def write_parquet(path, docs, field="text"):
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path)


WRITERS = {
    "a.txt": write_txt,
    "a.txt.gz": lambda p, d: write_txt(p, d, compress=True),
    "a.jsonl": write_jsonl,
    "a.parquet": write_parquet,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_local_file_documents_and_hash_split(tmp_path, tokenizer_dir, tok, name):
    path = tmp_path / name
    WRITERS[name](path, DOCS)
    assert list(read_documents(path)) == DOCS  # blank lines split .txt; rows are documents
    bundles = [
        build_data(str(path), seq_len=16, batch_size=2, tokenizer=tokenizer_dir, seed=seed, rank=rank, world_size=2)
        for seed, rank in [(0, 0), (1, 1)]
    ]
    valid_docs = [d for d in DOCS if in_valid(d)]
    train_docs = [d for d in DOCS if not in_valid(d)]
    desc = bundles[0].description
    assert (desc["train_documents"], desc["valid_documents"]) == (len(train_docs), len(valid_docs))
    assert torch.equal(bundles[0].valid, pack(encode_documents(tok, valid_docs), 16))
    assert torch.equal(bundles[0].valid, bundles[1].valid)  # fixed: any seed, any rank
    assert np.array_equal(bundles[0].train.tokens, encode_documents(tok, train_docs))


def test_jsonl_rows_keep_blank_lines_and_text_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, ["first\n\nstill first", "second"], field="content")
    assert list(read_documents(path, text_field="content")) == ["first\n\nstill first", "second"]
    with pytest.raises(UsageError) as excinfo:
        list(read_documents(path))
    assert "--text-field" in one_line_error(excinfo) and "content" in str(excinfo.value)
    write_parquet(tmp_path / "rows.parquet", ["a"], field="content")
    with pytest.raises(UsageError) as excinfo:
        list(read_documents(tmp_path / "rows.parquet"))
    assert "--text-field" in one_line_error(excinfo)


def test_split_folder_uses_named_files(tmp_path, tokenizer_dir, tok):
    folder = tmp_path / "corpus"
    (folder / "train").mkdir(parents=True)
    write_txt(folder / "train" / "part-0.txt", DOCS[:150])
    write_jsonl(folder / "train" / "part-1.jsonl", DOCS[150:300])
    write_txt(folder / "validation.txt.gz", DOCS[300:], compress=True)
    write_txt(folder / "notes.txt", ["ignored document"])
    bundle = build_data(folder, seq_len=16, batch_size=2, tokenizer=tokenizer_dir, max_valid_tokens=320)
    desc = bundle.description
    assert (desc["train_documents"], desc["valid_documents"], desc["ignored_files"]) == (300, 100, 1)
    assert np.array_equal(bundle.train.tokens, encode_documents(tok, DOCS[:300]))
    everything = pack(encode_documents(tok, DOCS[300:]), 16)
    assert torch.equal(bundle.valid, everything[torch.from_numpy(spread_chunk_indices(len(everything), 20))])


def test_spread_chunk_indices_one_per_stratum():
    for total, count in [(10, 10), (10, 3), (1790, 512), (1001, 7), (5, 9)]:
        indices = spread_chunk_indices(total, count)
        kept = min(total, count)
        assert len(indices) == kept and len(set(indices.tolist())) == kept
        assert np.all(np.diff(indices) > 0) and 0 <= indices[0] and indices[-1] < total
        # exactly one index in each stratum [floor(i·T/n), floor((i+1)·T/n))
        edges = [(i * total) // kept for i in range(kept + 1)]
        strata = [next(i for i in range(kept) if edges[i] <= j < edges[i + 1]) for j in indices.tolist()]
        assert strata == list(range(kept))
    assert np.array_equal(spread_chunk_indices(1790, 512), spread_chunk_indices(1790, 512))  # fixed draw
    assert not np.array_equal(spread_chunk_indices(1790, 512), spread_chunk_indices(1790, 512, seed=1))


def test_validation_spans_the_whole_split_not_its_first_document(tmp_path, tokenizer_dir, tok):
    """A validation split whose first file is one long page: a prefix would evaluate on that page
    alone; the spread selection draws from every part of the split, in proportion to its length."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_txt(folder / "train.txt", DOCS[:300])
    long_page = " ".join(["the module layer rank"] * 400)
    write_txt(folder / "valid.txt", [long_page] + DOCS[300:])
    bundle = build_data(folder, seq_len=16, batch_size=2, tokenizer=tokenizer_dir, max_valid_tokens=16 * 24)
    everything = pack(encode_documents(tok, [long_page] + DOCS[300:]), 16)
    page_chunks = len(encode_documents(tok, [long_page])) // 16
    assert len(everything) > 2 * page_chunks > 24  # the page is a minority of the split ...
    page = {tuple(r) for r in everything[:page_chunks].tolist()}
    from_page = sum(tuple(r) in page for r in bundle.valid.tolist())
    assert from_page <= math.ceil(24 * page_chunks / len(everything)) + 1  # in proportion, not 24 of 24
    last = bundle.description["valid_selection"]["last_chunk"]
    assert last >= len(everything) - math.ceil(len(everything) / 24)  # the end of the split is represented
    selection = bundle.description["valid_selection"]
    assert (selection["chunks"], selection["of_chunks"], selection["tokens"]) == (24, len(everything), 24 * 16)
    assert selection["sha1"] == hashlib.sha1(bundle.valid.numpy().tobytes()).hexdigest()
    assert "strata" in selection["rule"]


# ------------------------------------------------------------------ tokenizer


def test_trained_tokenizer_is_cached_reloaded_and_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    write_txt(path, DOCS)
    run = tmp_path / "run"
    first = build_data(str(path), seq_len=16, batch_size=2, vocab_size=350, cache_dir=run)
    tok = first.tokenizer
    assert first.description["tokenizer_trained"] and len(tok) == 350
    assert tok.eos_token == tok.pad_token == EOT
    saved = run / "tokenizer" / "tokenizer.json"
    mtime = saved.stat().st_mtime_ns
    for text in ["def f(x):\n    return x  # café 日本\n\n\ttab", "  leading spaces", DOCS[3]]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    eos_count = int((np.asarray(first.train.tokens) == tok.eos_token_id).sum())
    assert eos_count == first.description["train_documents"]  # eos after every document

    def no_retraining(*args, **kwargs):
        raise AssertionError("retrained the tokenizer")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized the corpus")

    monkeypatch.setattr(data_tokenizer, "train_bpe_tokenizer", no_retraining)
    monkeypatch.setattr(data_build, "encode_documents", no_tokenizing)
    second = build_data(str(path), seq_len=16, batch_size=2, vocab_size=350, cache_dir=run)
    assert saved.stat().st_mtime_ns == mtime and not second.description["tokenizer_trained"]
    assert second.description["cache"].startswith("hit")
    assert second.tokenizer.get_vocab() == tok.get_vocab()
    assert torch.equal(second.valid, first.valid)
    assert [torch.equal(next(first.train), next(second.train)) for _ in range(5)] == [True] * 5


def test_tokenizer_without_eos_gets_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eos_token == EOT and tok.eos_token_id == 3 and len(tok) == 4
    assert encode_documents(tok, ["a b", "b"]).tolist() == [0, 1, 3, 1, 3]


# ------------------------------------------------------------------ errors


def folder_without_text(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "table.csv").write_text("a,b\n")
    return tmp_path / "d"


def empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    return tmp_path / "empty.txt"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p / "missing", ["no such file or folder", "missing"]),
        (folder_without_text, ["holds no", ".txt"]),
        (empty_file, ["holds no text", "empty.txt"]),
        (lambda p: "allenai/c4:en", ["--data allenai/c4:en", "offline", "local"]),
    ],
    ids=["missing", "no-text-files", "empty-file", "hub-offline"],
)
def test_bad_data_is_a_one_line_usage_error(tmp_path, tokenizer_dir, monkeypatch, make, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as excinfo:
        build_data(str(make(tmp_path)), seq_len=8, batch_size=2, tokenizer=tokenizer_dir)
    message = one_line_error(excinfo)
    assert all(part in message for part in expected), message


def test_bad_tokenizer_is_a_one_line_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    for name, expected in [
        (str(tmp_path / "nope"), "no such file or folder"),
        (str(tmp_path / "empty"), "cannot load a tokenizer"),
        ("someone/not-a-cached-tokenizer", "offline"),
    ]:
        with pytest.raises(UsageError) as excinfo:
            build_data("builtin", seq_len=8, batch_size=2, tokenizer=name)
        message = one_line_error(excinfo)
        assert f"--tokenizer {name}" in message and expected in message and "omit --tokenizer" in message


def test_too_little_data_is_a_usage_error(tmp_path, tokenizer_dir):
    path = tmp_path / "small.txt"
    write_txt(path, DOCS[:40])
    with pytest.raises(UsageError) as excinfo:
        build_data(str(path), seq_len=512, batch_size=8, tokenizer=tokenizer_dir)
    assert "--seq-len" in one_line_error(excinfo)
    with pytest.raises(UsageError) as excinfo:
        build_data(str(path), seq_len=0, batch_size=8)
    assert "--seq-len" in one_line_error(excinfo)


def test_empty_training_data_leaves_no_tokenizer_behind(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(UsageError) as excinfo:
        build_data(str(empty), seq_len=8, batch_size=2, vocab_size=300, cache_dir=tmp_path / "run")
    assert "holds no text" in one_line_error(excinfo)
    assert not (tmp_path / "run" / "tokenizer").exists()
