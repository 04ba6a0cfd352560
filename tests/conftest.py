"""Shared fixtures: tiny random-weight models of three families, built once per test session.

The models have 3 decoder blocks (first, middle and last differ in what touches them: the
embedding, nothing, the final norm), d_model 64 and a 512-token byte-level BPE vocabulary.
Treat the session-scoped ``Transformer`` objects as read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mlsae.tiny import make_tiny
from mlsae.transformer import Transformer, load_transformer

TINY_ARCHS = ("llama", "gpt_neox", "gpt2")
TINY_LAYERS = 3

_TEXTS = (
    "The cat sat on the mat. It was a sunny day, and the children played in the garden.",
    "Residual streams carry information between layers; sparse autoencoders read them. 😀",
    "Numbers like 42 and 3.14 appear, as do names such as Paris, Ishmael and January.",
    "She opened the door and smiled. The flowers were red, yellow and blue.",
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``(arch="llama", n_layers=3, d_model=64, seed=0) -> Path`` of a saved tiny model.

    Each distinct spec is built once per session (``make_tiny`` reuses a finished directory).
    """
    root = tmp_path_factory.mktemp("tiny-models")

    def get(arch: str = "llama", n_layers: int = TINY_LAYERS, d_model: int = 64, seed: int = 0) -> Path:
        path = root / f"{arch}-{n_layers}l-d{d_model}-s{seed}"
        return make_tiny(arch, path, n_layers=n_layers, d_model=d_model, seed=seed)

    return get


def _tiny(tiny_model_dir, arch: str) -> Transformer:
    path = tiny_model_dir(arch)
    model, tokenizer = load_transformer(path)
    return Transformer(model, tokenizer, name=f"tiny-{arch}")


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> Transformer:
    return _tiny(tiny_model_dir, "llama")


@pytest.fixture(scope="session")
def tiny_neox(tiny_model_dir) -> Transformer:
    return _tiny(tiny_model_dir, "gpt_neox")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_model_dir) -> Transformer:
    return _tiny(tiny_model_dir, "gpt2")


_FIXTURE_OF = {"llama": "tiny_llama", "gpt_neox": "tiny_neox", "gpt2": "tiny_gpt2"}


@pytest.fixture(params=TINY_ARCHS)
def tiny_transformer(request) -> Transformer:
    """Each of the three tiny families in turn."""
    return request.getfixturevalue(_FIXTURE_OF[request.param])


@pytest.fixture(scope="session")
def make_input_ids() -> Callable[..., torch.Tensor]:
    """Factory ``(transformer, batch=2, length=24) -> LongTensor [batch, length]`` of real text.

    Documents are joined with EOS and cut into packed chunks, as the data pipeline does, so
    some positions hold a special token.
    """

    def make(transformer: Transformer, batch: int = 2, length: int = 24) -> torch.Tensor:
        tok = transformer.tokenizer
        ids: list[int] = []
        while len(ids) < batch * length:
            for text in _TEXTS:
                ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return torch.tensor(ids[: batch * length]).view(batch, length)

    return make
