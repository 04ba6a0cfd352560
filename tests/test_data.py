"""Reading corpora, packing tokens into chunks, and deterministic resumable batches."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mlsae import data
from mlsae.data import (ChunkLoader, adds_bos, describe, iter_documents, iter_texts, load_chunks,
                        tokenize_chunks)
from mlsae.tiny import ARCHS, _train_tokenizer
from mlsae.utils import MLSAEError, cache_dir

SHARED_CACHE = cache_dir()  # the real cache (./cache), where `brown` is fetched once for all tests

WORDS = ["<eos>", "<bos>", "[UNK]"] + [chr(ord("a") + i) for i in range(26)]
ID = {w: i for i, w in enumerate(WORDS)}  # a..z are 3..28


def make_tokenizer(**special) -> PreTrainedTokenizerFast:
    """A real fast tokenizer with one id per letter-word, so expected ids are easy to write down."""
    backend = Tokenizer(models.WordLevel(dict(ID), unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=4, **special)


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer(eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


DOCS = [{"text": "a b c", "meta": {"i": 0}}, {"text": "d e", "meta": {"i": 1}}, {"text": "f g h i", "meta": {"i": 2}}]


def jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


def write(path: Path, docs: list[dict] = DOCS) -> Path:
    raw = jsonl(docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if path.name.endswith(".zst") else raw)
    return path


# ----------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.zst"])
def test_read_file(tmp_path, name):
    path = write(tmp_path / name)
    assert list(iter_documents(str(path))) == DOCS
    assert list(iter_texts(str(path), "test")) == ["a b c", "d e", "f g h i"]  # a file is its own split


def test_read_folder_of_splits(tmp_path):
    write(tmp_path / "train.jsonl.zst")
    write(tmp_path / "val.jsonl", DOCS[:1])
    assert len(list(iter_documents(str(tmp_path), "train"))) == 3
    assert list(iter_texts(str(tmp_path), "validation")) == ["a b c"]  # val and validation are one split
    with pytest.raises(MLSAEError, match=r"no split 'test' in .*available splits: \['train', 'val'\]"):
        list(iter_documents(str(tmp_path), "test"))


def test_multi_frame_zst(tmp_path):
    cctx = zstandard.ZstdCompressor()
    path = tmp_path / "two.jsonl.zst"
    path.write_bytes(cctx.compress(jsonl(DOCS[:2])) + cctx.compress(jsonl(DOCS[2:])))
    assert list(iter_documents(str(path))) == DOCS


def test_large_zst_streams_across_blocks(tmp_path):
    docs = [{"text": f"document {i} " + "x" * 3000, "meta": {}} for i in range(2000)]  # 6 MB, > 1 MiB blocks
    path = write(tmp_path / "big.jsonl.zst", docs)
    assert [d["text"] for d in iter_documents(str(path))] == [d["text"] for d in docs]


def test_missing_file(tmp_path):
    with pytest.raises(MLSAEError, match="no such file or folder: .*nope.jsonl.zst"):
        list(iter_documents(str(tmp_path / "nope.jsonl.zst")))
    with pytest.raises(MLSAEError, match="no such file"):
        list(iter_documents("./data/test.jsonl.zst"))


def test_corrupt_zst(tmp_path):
    docs = [{"text": " ".join(str(i * j % 997) for j in range(200))} for i in range(50)]
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(jsonl(docs)))
    blob[len(blob) // 2 : len(blob) // 2 + 8] = bytes(8)
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(bytes(blob))
    with pytest.raises(MLSAEError, match=f"{path} is corrupt"):
        list(iter_documents(str(path)))
    path.write_bytes(b"this is not zstd at all")
    with pytest.raises(MLSAEError, match="is corrupt"):
        list(iter_documents(str(path)))


def test_truncated_zst(tmp_path):
    blob = zstandard.ZstdCompressor().compress(jsonl([{"text": f"doc {i} " * 50} for i in range(500)]))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MLSAEError, match=f"{path} is truncated"):
        list(iter_documents(str(path)))


def test_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(DOCS[:2]) + b'{"text": "unterminated\n' + jsonl(DOCS[2:]))
    with pytest.raises(MLSAEError, match=f"{path}, line 3: invalid JSON"):
        list(iter_documents(str(path)))
    path.write_bytes(b'{"meta": {}}\n')
    with pytest.raises(MLSAEError, match="line 1: expected an object with a string field 'text'"):
        list(iter_documents(str(path)))


def test_empty_dataset(tmp_path):
    for path in (tmp_path / "empty.jsonl", tmp_path / "empty.jsonl.zst"):
        path.write_bytes(b"" if path.suffix == ".jsonl" else zstandard.ZstdCompressor().compress(b"\n"))
        with pytest.raises(MLSAEError, match="has no documents"):
            list(iter_documents(str(path)))


def test_hf_streaming_path(tmp_path, tok):
    folder = tmp_path / "dataset"
    folder.mkdir()
    write(folder / "train.jsonl", DOCS)
    write(folder / "val.jsonl", DOCS[:1])
    # hf: sends a local folder through datasets.load_dataset(..., streaming=True), as for a hub id
    assert list(iter_documents(f"hf:{folder}", "train")) == DOCS
    assert list(iter_texts(f"hf:{folder}", "val")) == ["a b c"]  # datasets calls it "validation"
    with pytest.raises(MLSAEError, match="could not load split 'bogus'"):
        list(iter_documents(f"hf:{folder}", "bogus"))
    with pytest.raises(MLSAEError, match="needs a token budget"):
        load_chunks(f"hf:{folder}", "train", tok, max_length=4)
    chunks = load_chunks(f"hf:{folder}", "train", tok, max_length=4, max_tokens=8)
    assert chunks.tolist() == [[ID[w] for w in "a b c <eos>".split()], [ID[w] for w in "d e <eos> f".split()]]


def test_folder_without_jsonl_goes_to_datasets(tmp_path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "train.csv").write_text("text,n\nhello there,1\ngeneral kenobi,2\n")
    assert list(iter_texts(str(folder), "train")) == ["hello there", "general kenobi"]


def test_unknown_hub_dataset(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MLSAEError, match="could not load the dataset 'someone/corpus'.*ConnectionError"):
        list(iter_documents("someone/corpus", "train"))


def test_embedded_alias(monkeypatch):
    monkeypatch.setenv("MLSAE_CACHE", str(SHARED_CACHE))
    docs = list(itertools.islice(iter_documents("brown", "test"), 3))
    assert all(d["meta"]["source"] == "brown" for d in docs)
    summary = describe("brown", "val")
    assert summary["documents"] >= 40 and len(summary["genres"]) >= 10
    with pytest.raises(MLSAEError, match=r"no split 'bogus'.*available splits: \['test', 'train', 'val'\]"):
        list(iter_documents("brown", "bogus"))


# ----------------------------------------------------------------------------------------------
# Tokenizing and packing


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def test_packing_is_exact(tok):
    chunks = tokenize_chunks(["a b c", "d e", "f g h i"], tok, max_length=5)
    assert chunks.dtype == torch.int64
    # a b c EOS d | e EOS f g h | i EOS (partial, dropped)
    assert chunks.tolist() == [ids("a b c <eos> d"), ids("e <eos> f g h")]
    assert tokenize_chunks(["a b c", "d e", "f g h i"], tok, max_length=4).tolist() == \
        [ids("a b c <eos>"), ids("d e <eos> f"), ids("g h i <eos>")]


def test_limit_tokens_stops_reading(tok):
    def endless():
        for i in itertools.count():
            yield "a b c"
            assert i < 100, "read far past the limit"

    chunks = tokenize_chunks(endless(), tok, max_length=3, limit_tokens=10)
    assert chunks.tolist() == [ids("a b c"), ids("<eos> a b"), ids("c <eos> a")]


def test_long_documents_are_not_truncated(capfd):
    tok = make_tokenizer(eos_token="<eos>")  # model_max_length=4, fresh so its one-time warning is armed
    chunks = tokenize_chunks(["a b c d e f g h i j k"], tok, max_length=6)
    assert chunks.tolist() == [ids("a b c d e f"), ids("g h i j k <eos>")]
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_bos_when_no_eos_and_error_when_neither():
    assert tokenize_chunks(["a b", "c"], make_tokenizer(bos_token="<bos>"), 5).tolist() == [ids("a b <bos> c <bos>")]
    with pytest.raises(MLSAEError, match="neither an EOS nor a BOS"):
        tokenize_chunks(["a b"], make_tokenizer(), 2)


def test_too_few_tokens(tok):
    with pytest.raises(MLSAEError, match="only 7 tokens, fewer than one chunk of 8"):
        tokenize_chunks(["a b", "c d e"], tok, max_length=8)
    with pytest.raises(MLSAEError, match="limit 3"):
        tokenize_chunks(["a b c d e"], tok, max_length=4, limit_tokens=3)


def test_load_chunks_caches(tmp_path, tmp_cache, tok, monkeypatch):
    path = write(tmp_path / "docs.jsonl.zst")
    first = load_chunks(str(path), "train", tok, max_length=4)
    files = list((tmp_cache / "tokens").glob("*.safetensors"))
    assert len(files) == 1 and first.tolist() == [ids("a b c <eos>"), ids("d e <eos> f"), ids("g h i <eos>")]

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_chunks", boom)
        assert torch.equal(load_chunks(str(path), "train", tok, max_length=4), first)

    assert load_chunks(str(path), "train", tok, max_length=3, max_tokens=6).shape == (2, 3)  # new key
    write(path, DOCS[:2] * 2)  # the file changed: tokenized again
    assert load_chunks(str(path), "train", tok, max_length=4).tolist() == \
        [ids("a b c <eos>"), ids("d e <eos> a"), ids("b c <eos> d")]
    other = make_tokenizer(eos_token="<bos>")  # another tokenizer: another key
    assert load_chunks(str(path), "train", other, max_length=4)[0].tolist() == ids("a b c <bos>")
    assert len(list((tmp_cache / "tokens").glob("*.safetensors"))) == 4
    assert not list((tmp_cache / "tokens").glob(".*"))  # no temporary files left


# ----------------------------------------------------------------------------------------------
# BOS: tokenizers that prepend it get it at the start of every chunk

BOS_TEXTS = ["The cat sat on the mat.", "Residual streams carry information between layers. 😀",
             "Numbers like 42 and 3.14 appear, as do names such as Paris.", "She opened the door."] * 3


def saved_and_loaded(tokenizer, path: Path):
    """The tokenizer as the library gets it: saved, then loaded back with AutoTokenizer."""
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """The tiny byte-level BPE with a separate ``<s>`` BOS that its encodings start with (as Llama-2)."""
    return saved_and_loaded(_train_tokenizer(bos=True), tmp_path_factory.mktemp("bos-tokenizer"))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """The same BPE as the tiny models have: one token for BOS, EOS and padding, none added."""
    return saved_and_loaded(_train_tokenizer(), tmp_path_factory.mktemp("plain-tokenizer"))


def eos_stream(tokenizer, texts: list[str]) -> list[int]:
    """The documents' ids joined (each followed) by EOS, with no special tokens of the tokenizer's own."""
    out: list[int] = []
    for text in texts:
        out += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def test_bos_tokenizer_is_real(bos_tok):
    bos = bos_tok.bos_token_id
    assert bos is not None and bos != bos_tok.eos_token_id
    assert bos_tok("x")["input_ids"][0] == bos and bos_tok("x", add_special_tokens=False)["input_ids"][0] != bos
    assert bos in bos_tok.all_special_ids  # so the library leaves BOS positions out of the SAE's data
    assert adds_bos(bos_tok)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_do_not_add_bos(tiny_model_dir, arch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(arch))
    assert tokenizer.bos_token_id == tokenizer.eos_token_id and not adds_bos(tokenizer)


def test_adds_bos_of_the_word_tokenizers(tok):
    assert not adds_bos(tok) and not adds_bos(make_tokenizer(eos_token="<eos>")) and not adds_bos(make_tokenizer())


@pytest.mark.parametrize("max_length", [2, 5, 16])
def test_every_chunk_starts_with_bos(bos_tok, max_length):
    chunks = tokenize_chunks(BOS_TEXTS, bos_tok, max_length=max_length)
    stream = eos_stream(bos_tok, BOS_TEXTS)
    body = max_length - 1
    assert chunks.dtype == torch.int64 and chunks.shape == (len(stream) // body, max_length)
    assert (chunks[:, 0] == bos_tok.bos_token_id).all()
    assert chunks[:, 1:].flatten().tolist() == stream[: len(chunks) * body]  # the stream runs on across chunks
    assert bos_tok.bos_token_id not in stream  # BOS only where a chunk starts


def test_bos_token_budget_counts_bos(bos_tok):
    chunks = tokenize_chunks(itertools.cycle(BOS_TEXTS), bos_tok, max_length=8, limit_tokens=43)
    assert chunks.shape == (5, 8)  # 43 // 8 chunks, each 1 BOS + 7 stream tokens
    assert chunks[:, 1:].flatten().tolist() == eos_stream(bos_tok, BOS_TEXTS)[:35]


def test_bos_needs_two_positions(bos_tok):
    with pytest.raises(MLSAEError, match="max_length must be at least 2.*adds BOS"):
        tokenize_chunks(BOS_TEXTS, bos_tok, max_length=1)
    with pytest.raises(MLSAEError, match="fewer than one chunk of 4 \\(BOS included\\) \\(limit 3\\)"):
        tokenize_chunks(BOS_TEXTS, bos_tok, max_length=4, limit_tokens=3)


@pytest.mark.parametrize("limit", [None, 40])
def test_without_bos_the_packing_is_unchanged(plain_tok, limit):
    stream = eos_stream(plain_tok, BOS_TEXTS)
    chunks = tokenize_chunks(BOS_TEXTS, plain_tok, max_length=8, limit_tokens=limit)
    n = min(len(stream), limit or len(stream)) // 8
    assert chunks.tolist() == torch.tensor(stream[: n * 8]).view(n, 8).tolist()


def test_cache_key_follows_bos(tmp_path, tmp_cache, bos_tok, monkeypatch):
    path = write(tmp_path / "docs.jsonl", [{"text": t} for t in BOS_TEXTS])
    with_bos = data._cache_key(path, bos_tok, 8, None)
    chunks = load_chunks(str(path), "train", bos_tok, max_length=8)
    assert (chunks[:, 0] == bos_tok.bos_token_id).all()
    assert [f.stem for f in (tmp_cache / "tokens").glob("*.safetensors")] == [with_bos]
    with monkeypatch.context() as m:  # the same tokenizer as if it added nothing: another key and chunks
        m.setattr(data, "adds_bos", lambda tokenizer: False)
        assert data._cache_key(path, bos_tok, 8, None) != with_bos
        old = load_chunks(str(path), "train", bos_tok, max_length=8)
        assert old.flatten().tolist() == eos_stream(bos_tok, BOS_TEXTS)[: old.numel()]
    assert torch.equal(load_chunks(str(path), "train", bos_tok, max_length=8), chunks)  # its own cache again
    assert len(list((tmp_cache / "tokens").glob("*.safetensors"))) == 2


def test_fingerprint_without_bos_is_unchanged(plain_tok):
    import hashlib

    probe = ["Hello, world!", " The quick brown fox.\n\nIt's 1961; naïve café — “quoted” 12345."]
    ident = {"name": str(plain_tok.name_or_path), "class": type(plain_tok).__name__, "vocab": len(plain_tok),
             "sep": plain_tok.eos_token_id, "enc": plain_tok(probe, add_special_tokens=False)["input_ids"]}
    old = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    assert data.tokenizer_fingerprint(plain_tok) == old  # caches of tokenizers without BOS stay valid


# ----------------------------------------------------------------------------------------------
# Batches


def rows(n: int = 23, length: int = 3) -> torch.Tensor:
    return torch.arange(n * length).view(n, length)


def take(loader: ChunkLoader, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(loader), n))


def test_loader_is_deterministic_and_seeded():
    a, b, c = (take(ChunkLoader(rows(), 4, seed=s), 12) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert a[0].shape == (4, 3)


def test_loader_epochs_are_permutations():
    loader = ChunkLoader(rows(), 4, seed=0)
    assert len(loader) == loader.batches_per_epoch == 5  # 23 // 4: 3 rows dropped per epoch
    batches = take(loader, 10)
    epoch0 = torch.cat(batches[:5])[:, 0] // 3
    epoch1 = torch.cat(batches[5:])[:, 0] // 3
    assert len(set(epoch0.tolist())) == 20 and len(set(epoch1.tolist())) == 20  # no repeats in an epoch
    assert epoch0.tolist() != epoch1.tolist()
    assert loader.state_dict() == {"epoch": 1, "index": 5}
    unshuffled = take(ChunkLoader(rows(), 4, shuffle=False), 6)
    assert unshuffled[0][:, 0].tolist() == [0, 3, 6, 9] and torch.equal(unshuffled[5], unshuffled[0])


@pytest.mark.parametrize("stop", [1, 4, 5, 6, 13])
def test_loader_resumes_exactly(stop):
    straight = take(ChunkLoader(rows(), 4, seed=3), 20)
    first = ChunkLoader(rows(), 4, seed=3)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = ChunkLoader(rows(), 4, seed=3)
    resumed.load_state_dict(state)
    tail = take(resumed, 20 - stop)
    assert all(torch.equal(x, y) for x, y in zip(head + tail, straight, strict=True))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_make_the_global_batch(world_size):
    n_steps, bs = 9, 2
    single = take(ChunkLoader(rows(), bs * world_size, seed=5), n_steps)
    shards = [take(ChunkLoader(rows(), bs, seed=5, rank=r, world_size=world_size), n_steps)
              for r in range(world_size)]
    for step in range(n_steps):
        parts = [shards[r][step] for r in range(world_size)]
        assert torch.equal(torch.cat(parts), single[step])
        seen = [tuple(row.tolist()) for part in parts for row in part]
        assert len(set(seen)) == bs * world_size  # disjoint


def test_uneven_tail_is_dropped_on_every_rank():
    # 23 rows, global batch 2 x 3 = 6: 3 batches per epoch, 5 rows skipped, identically on all ranks
    loaders = [ChunkLoader(rows(), 2, seed=1, rank=r, world_size=3) for r in range(3)]
    assert [len(loader) for loader in loaders] == [3, 3, 3]
    per_rank = [take(loader, 4) for loader in loaders]
    assert all(loader.state_dict() == {"epoch": 1, "index": 1} for loader in loaders)
    used = {tuple(row.tolist()) for batches in per_rank for b in batches[:3] for row in b}
    assert len(used) == 18
    with pytest.raises(MLSAEError, match="fewer than one global batch"):
        ChunkLoader(rows(5), 2, world_size=3)
    with pytest.raises(MLSAEError, match="outside world size"):
        ChunkLoader(rows(), 2, rank=3, world_size=3)
