"""Corpora to token chunks: read documents, join them with EOS, pack them into fixed-length rows.

A data ``path`` is one of:

- a local ``.jsonl`` or ``.jsonl.zst`` file of ``{"text": ..., "meta": ...}`` lines (the Pile's
  ``data/test.jsonl.zst`` format); the split is then the file itself;
- a local folder holding ``<split>.jsonl[.zst]`` files;
- an embedded corpus, ``brown`` or ``nlp-corpus`` (fetched on demand, see ``mlsae.fetch``);
- a Hugging Face dataset id such as ``monology/pile-uncopyrighted``, streamed with ``datasets``
  (``hf:<path>`` forces this for anything ``datasets.load_dataset`` accepts, e.g. a local folder).

As in the reference, documents are joined with EOS, tokenized, cut into ``max_length`` chunks and the
last partial chunk is dropped. Where the tokenizer prepends BOS to its encodings (Llama-2, Gemma),
each chunk is BOS then the next ``max_length - 1`` tokens of the stream, so that every row starts as
the model's training sequences did. Local sources are tokenized once and cached as safetensors.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file, save_file
from simple_parsing import field as flag
from tqdm.auto import tqdm

from mlsae.fetch import CORPORA, fetch_corpus
from mlsae.precision import PRECISIONS
from mlsae.utils import MLSAEError, atomic_path, cache_dir

SPLIT_SYNONYMS = {"val": "validation", "validation": "val", "valid": "val", "dev": "val"}
TOKENS_FORMAT = 1  # bump when the chunking changes, to invalidate cached token files


@dataclass
class DataOptions:
    """The data a pass reads and how it runs: declared once, for training (``mlsae.train``, with
    its own defaults), the evaluation and the analyses."""

    path: str = "brown"
    """Data: a .jsonl[.zst] file, a folder of splits, 'brown', or a hub dataset id."""
    split: str = "test"
    """Split of the data."""
    max_length: int = 256
    """Tokens per sequence."""
    batch_size: int = 4
    """Sequences per forward pass."""
    max_tokens: int = 65_536
    """Tokens to read (the positions that the MLSAE's position rule leaves out are then ignored)."""
    precision: str = flag(default="auto", choices=["auto", *PRECISIONS])
    """Autocast precision of the transformer and the encoder product (auto, bf16 or fp32; mlsae.precision)."""
    device: str = "auto"
    """cpu, cuda, or auto."""

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise MLSAEError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.precision not in ("auto", *PRECISIONS):
            raise MLSAEError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")


# ----------------------------------------------------------------------------------------------
# Where documents come from


@dataclass(frozen=True)
class Source:
    """A resolved data source: a local JSON-lines file, or a dataset for ``datasets`` to stream."""

    kind: str  # "file" or "hf"
    location: str  # file path, or dataset id / path for load_dataset
    split: str


def _looks_like_file(path: str) -> bool:
    return path.endswith((".jsonl", ".zst", ".json")) or path.startswith(("/", "./", "../", "~"))


def _split_file(folder: Path, split: str) -> Path:
    """Find ``<split>.jsonl[.zst]`` in ``folder`` (accepting val/validation as one split)."""
    for name in (split, SPLIT_SYNONYMS.get(split)):
        for ext in (".jsonl.zst", ".jsonl"):
            if name and (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    found = sorted({p.name.split(".")[0] for p in folder.glob("*.jsonl*")})
    raise MLSAEError(f"no split {split!r} in {folder} (expected {split}.jsonl.zst or {split}.jsonl); "
                     f"available splits: {found or 'none'}")


def resolve(path: str, split: str = "train") -> Source:
    """Decide what ``path`` names; fetches an embedded corpus if needed."""
    if path.startswith("hf:"):
        return Source("hf", path[3:], split)
    if path in CORPORA:
        return Source("file", str(_split_file(fetch_corpus(path), split)), split)
    local = Path(path).expanduser()
    if local.is_file():
        return Source("file", str(local.resolve()), split)
    if local.is_dir():
        if any(local.glob("*.jsonl")) or any(local.glob("*.jsonl.zst")):
            return Source("file", str(_split_file(local, split).resolve()), split)
        return Source("hf", str(local), split)  # e.g. a folder of parquet files
    if _looks_like_file(path):
        raise MLSAEError(f"no such file or folder: {path}")
    return Source("hf", path, split)


# ----------------------------------------------------------------------------------------------
# Reading documents


def _zst_blocks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-frame) .zst file; truncation is an error, not an EOF."""
    dctx = zstandard.ZstdDecompressor()
    dobj, pending = dctx.decompressobj(), False
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                while block:
                    out = dobj.decompress(block)
                    pending = not dobj.eof
                    if out:
                        yield out
                    block = dobj.unused_data if dobj.eof else b""
                    if dobj.eof:
                        dobj = dctx.decompressobj()
    except zstandard.ZstdError as e:
        raise MLSAEError(f"{path} is corrupt (zstd: {e}); delete it and fetch or copy it again") from None
    if pending:
        raise MLSAEError(f"{path} is truncated (its zstd stream ends mid-frame); fetch or copy it again")


def _lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        rest = b""
        for block in _zst_blocks(path):
            *lines, rest = (rest + block).split(b"\n")
            yield from lines
        if rest:
            yield rest
    else:
        with open(path, "rb") as fh:
            yield from fh


def _iter_file(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise MLSAEError(f"no such file: {path}")
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise MLSAEError(f"{path}, line {lineno}: invalid JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise MLSAEError(f"{path}, line {lineno}: expected an object with a string field 'text'")
        yield doc


def _load_hf(name: str, split: str):
    """``datasets.load_dataset(name, split=split, streaming=True)``, trying val <-> validation too."""
    import datasets

    candidates = [split] + ([SPLIT_SYNONYMS[split]] if split in SPLIT_SYNONYMS else [])
    for i, candidate in enumerate(candidates):
        try:
            return datasets.load_dataset(name, split=candidate, streaming=True)
        except ValueError as e:
            if "split" in str(e).lower() and i + 1 < len(candidates):
                continue  # an unknown split name: try the synonym
            raise MLSAEError(f"could not load split {split!r} of the dataset {name!r}: {e}") from None
        except Exception as e:  # network, missing dataset, bad files: all need the user's action
            raise MLSAEError(
                f"could not load the dataset {name!r} (split {split!r}) with `datasets`: "
                f"{type(e).__name__}: {e}. It is not a local file or folder; for a hub dataset check "
                f"the connection to the Hub, or use a local .jsonl[.zst] file or an embedded corpus "
                f"({', '.join(sorted(CORPORA))})") from None


def _iter_hf(name: str, split: str) -> Iterator[dict]:
    for row in _load_hf(name, split):
        if not isinstance(row.get("text"), str):
            raise MLSAEError(f"the dataset {name!r} has no string column 'text' (columns: {sorted(row)})")
        yield {"text": row["text"], "meta": row.get("meta") or {}}


def iter_documents(path: str, split: str = "train") -> Iterator[dict]:
    """Yield ``{"text": str, "meta": ...}`` documents in file/stream order; errors if there are none."""
    source = resolve(path, split)
    docs = _iter_file(Path(source.location)) if source.kind == "file" else _iter_hf(source.location, split)
    n = 0
    for n, doc in enumerate(docs, 1):
        yield doc
    if n == 0:
        raise MLSAEError(f"{source.location} (split {split!r}) has no documents")


def iter_texts(path: str, split: str = "train") -> Iterator[str]:
    for doc in iter_documents(path, split):
        yield doc["text"]


def describe(path: str, split: str = "train") -> dict:
    """Counts for a quick look at a corpus: documents, characters, and documents per genre if any."""
    docs, chars, genres = 0, 0, {}
    for doc in iter_documents(path, split):
        docs, chars = docs + 1, chars + len(doc["text"])
        meta = doc.get("meta")
        genre = meta.get("genre_name") if isinstance(meta, dict) else None
        if genre:
            genres[genre] = genres.get(genre, 0) + 1
    return {"documents": docs, "characters": chars, "genres": dict(sorted(genres.items()))}


# ----------------------------------------------------------------------------------------------
# Tokenizing


def separator_id(tokenizer) -> int:
    """The token that ends every document: EOS, else BOS (some tokenizers only have one)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    raise MLSAEError(f"the tokenizer {tokenizer.name_or_path!r} has neither an EOS nor a BOS token "
                     f"to separate documents")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encodings start with BOS, as those of Llama-2 and Gemma do.

    Decided by encoding a probe rather than by flags like ``add_bos_token``, which not every
    tokenizer class has or honours: the post-processor is what the model's training data went
    through. Tokenizers whose BOS is also their EOS (GPT-2, Pythia, SmolLM2) add nothing: False.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return full[:1] == [bos] and plain[:1] != [bos]


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _token_stream(texts: Iterable[str], tokenizer, limit: int | None,
                  batch_size: int) -> tuple[list[np.ndarray], int]:
    """The documents' ids, each followed by the separator, and their total; stops once ``limit`` are read."""
    sep = separator_id(tokenizer)
    pieces, total = [], 0
    with tqdm(total=limit, unit="tok", unit_scale=True, desc="tokenizing", disable=None) as bar:
        for batch in _batched((t for t in texts if t), batch_size):
            ids = tokenizer(batch, add_special_tokens=False, truncation=False, verbose=False,
                            return_attention_mask=False)["input_ids"]
            for seq in ids:
                pieces.append(np.asarray(seq + [sep], dtype=np.int64))
                total += len(seq) + 1
            bar.update(sum(len(seq) + 1 for seq in ids))
            if limit is not None and total >= limit:
                break
    return pieces, total


def tokenize_chunks(
    texts: Iterable[str],
    tokenizer,
    max_length: int,
    limit_tokens: int | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Tokenize ``texts`` (each followed by EOS) and pack them into an int64 ``[n_chunks, max_length]``.

    The tokenizer adds no special tokens inside the stream and never truncates, so long documents
    continue into the next chunk. If it prepends BOS to its encodings (``adds_bos``), every chunk is
    BOS then ``max_length - 1`` stream tokens, as the model saw its training sequences. At most
    ``limit_tokens`` tokens are returned (BOS included); reading stops once they are in hand (needed
    for streams).
    """
    if max_length < 1:
        raise MLSAEError(f"max_length must be positive, got {max_length}")
    bos = int(tokenizer.bos_token_id) if adds_bos(tokenizer) else None
    if bos is not None and max_length < 2:
        raise MLSAEError(f"max_length must be at least 2, got {max_length}: the tokenizer "
                         f"{tokenizer.name_or_path!r} adds BOS, which starts every chunk")
    body = max_length if bos is None else max_length - 1  # stream tokens per chunk
    stream_limit = limit_tokens if limit_tokens is None or bos is None else limit_tokens // max_length * body
    pieces, total = _token_stream(texts, tokenizer, stream_limit, batch_size)
    n_chunks = (total if stream_limit is None else min(total, stream_limit)) // body
    if n_chunks == 0:
        raise MLSAEError(f"the texts give only {total} tokens, fewer than one chunk of {max_length}"
                         + (" (BOS included)" if bos is not None else "")
                         + (f" (limit {limit_tokens})" if limit_tokens is not None else ""))
    flat = torch.from_numpy(np.concatenate(pieces)[: n_chunks * body]).view(n_chunks, body)
    if bos is None:
        return flat
    return torch.cat([torch.full((n_chunks, 1), bos, dtype=torch.int64), flat], dim=1)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash that changes whenever the tokenizer would produce different ids or chunks.

    The BOS that starts every chunk (``adds_bos``) enters only where it is added: tokenizers without
    it keep their old keys (their chunks are unchanged, so their caches stay valid), while chunks cut
    without BOS for a tokenizer that adds it (token format 1) are never reused.
    """
    probe = ["Hello, world!", " The quick brown fox.\n\nIt's 1961; naïve café — “quoted” 12345."]
    enc = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ident = {"name": str(tokenizer.name_or_path), "class": type(tokenizer).__name__,
             "vocab": len(tokenizer), "sep": separator_id(tokenizer), "enc": enc}
    if adds_bos(tokenizer):
        ident["bos"] = int(tokenizer.bos_token_id)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _cache_key(file: Path, tokenizer, max_length: int, max_tokens: int | None) -> str:
    stat = file.stat()
    key = {"file": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
           "max_tokens": max_tokens, "format": TOKENS_FORMAT}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def load_chunks(
    path: str,
    split: str,
    tokenizer,
    max_length: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Token chunks ``[n_chunks, max_length]`` of a data source (see the module docstring).

    Local files and embedded corpora are tokenized once and cached in ``<cache>/tokens/``, keyed by
    the file (path, size, mtime), the tokenizer (BOS handling included), ``max_length`` and
    ``max_tokens``. Hub datasets are streamed and need ``max_tokens``.
    """
    source = resolve(path, split)
    if source.kind == "hf":
        if max_tokens is None:
            raise MLSAEError(f"streaming the dataset {source.location!r} needs a token budget: "
                             f"pass max_tokens")
        return tokenize_chunks(iter_texts(f"hf:{source.location}", split), tokenizer, max_length, max_tokens)

    file = Path(source.location)
    cached = cache_dir() / "tokens" / f"{_cache_key(file, tokenizer, max_length, max_tokens)}.safetensors"
    if cached.is_file():
        try:
            return load_file(cached)["chunks"]
        except Exception:  # unreadable: tokenize again and overwrite it
            pass
    chunks = tokenize_chunks(iter_texts(str(file), split), tokenizer, max_length, max_tokens)
    meta = {"file": str(file), "split": split, "tokenizer": str(tokenizer.name_or_path),
            "max_length": str(max_length), "max_tokens": str(max_tokens), "bos": str(adds_bos(tokenizer))}
    with atomic_path(cached) as tmp:
        save_file({"chunks": chunks}, tmp, metadata=meta)
    return chunks


# ----------------------------------------------------------------------------------------------
# Batches


class ChunkLoader:
    """Deterministic, resumable, shardable batches of rows of a chunk tensor.

    Epoch ``e`` visits the rows in the order ``randperm(n, seed + e)``, in global batches of
    ``batch_size * world_size`` rows; rank ``r`` gets rows ``[r * batch_size, (r + 1) * batch_size)``
    of each global batch, so the ranks together see exactly what one process with the global batch
    would. Rows left over after the last full global batch are skipped on every rank alike.

    Iterating is an endless stream across epochs; ``len()`` is the number of batches per epoch.
    ``state_dict()`` after receiving a batch resumes with the batch after it.
    """

    def __init__(self, chunks: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise MLSAEError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise MLSAEError(f"batch_size must be positive, got {batch_size}")
        self.chunks, self.batch_size, self.seed, self.shuffle = chunks, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if len(chunks) < self.global_batch:
            raise MLSAEError(f"{len(chunks)} chunks are fewer than one global batch of {self.global_batch} "
                             f"({batch_size} per process x {world_size}); use more data or smaller batches")
        self.epoch, self.index = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.chunks) // self.global_batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The row order of ``epoch`` (the same on every rank)."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.chunks)
            perm = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
                    if self.shuffle else torch.arange(n))
            self._order = (epoch, perm)
        return self._order[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            if self.index >= self.batches_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
            start = self.index * self.global_batch + self.rank * self.batch_size
            rows = self.order(self.epoch)[start:start + self.batch_size]
            self.index += 1  # before yielding, so a checkpoint taken now resumes after this batch
            yield self.chunks[rows]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
