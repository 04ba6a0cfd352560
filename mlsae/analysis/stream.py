"""The shared pass: one transformer forward and one MLSAE encode per batch feed every accumulator.

``dists``, ``variances`` and ``examples`` only need each token's TopK latents at every layer,
so they run together over the data once (``python -m mlsae.analysis.run``). Positions that the
MLSAE's position rule leaves out (``mlsae.positions``: special tokens, the attention sink) keep
their place in the batch (the examples' context windows need them) but their activations are
zeroed, so no analysis counts them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.common import DataOptions, PassOptions, load_pair
from mlsae.data import load_chunks
from mlsae.kernels import TopK
from mlsae.model import MLSAE
from mlsae.positions import read_residuals
from mlsae.precision import autocast as precision_autocast
from mlsae.transformer import Transformer


@dataclass
class Batch:
    """What an accumulator sees of one batch."""

    ids: Tensor  # [B, P] token ids
    keep: Tensor  # [B, P] False where the position rule leaves a position out
    topk: TopK  # [L, B, P, k] float32 values (0 where keep is False) and latent indices
    start: int  # row of ids[0] in the chunk tensor, so (start + b, p) names a token globally


class Accumulator(Protocol):
    def update(self, batch: Batch) -> None: ...


@dataclass
class Pass:
    """An MLSAE with its transformer and the held-out chunks it will read."""

    sae: MLSAE
    transformer: Transformer
    layers: list[int]  # transformer layer of each MLSAE layer index
    chunks: Tensor  # [n, max_length]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_latents(self) -> int:
        return self.sae.config.n_latents

    @property
    def device(self) -> torch.device:
        return self.transformer.device


def prepare(cfg: PassOptions) -> Pass:
    sae, transformer, layers = load_pair(cfg.sae, cfg.model_name, cfg.data.device)
    d = cfg.data
    chunks = load_chunks(d.path, d.split, transformer.tokenizer, d.max_length, max_tokens=d.max_tokens)
    return Pass(sae, transformer, layers, chunks)


@torch.no_grad()
def encode_batch(sae: MLSAE, transformer: Transformer, ids: Tensor, layers: Sequence[int],
                 precision: str = "auto") -> tuple[Tensor, TopK]:
    """``keep [B, P]`` (the MLSAE's position rule) and the TopK latents ``[L, B, P, k]`` of every
    position, zeroed where not kept."""
    device = transformer.device
    ids = ids.to(device)
    with precision_autocast(precision, device):
        r = read_residuals(transformer, ids, layers, sae.config.positions)
        topk = sae.encode(r.acts.float())
    values = topk.values.float() * r.keep[..., None]
    return r.keep, TopK(values, topk.indices)


@torch.no_grad()
def stream(p: Pass, accumulators: Sequence[Accumulator], data: DataOptions, desc: str = "analysis") -> dict:
    """Feed every batch of ``p.chunks`` to each accumulator; returns token counts and where the time went."""
    n, started, in_model = 0, time.perf_counter(), 0.0
    with p.transformer.weights_for(data.precision):
        for start in tqdm(range(0, len(p.chunks), data.batch_size), desc=desc, unit="batch"):
            t0 = time.perf_counter()
            ids = p.chunks[start : start + data.batch_size].to(p.device)
            keep, topk = encode_batch(p.sae, p.transformer, ids, p.layers, data.precision)
            n += int(keep.sum())  # also waits for the device, so the split of the time below is honest
            in_model += time.perf_counter() - t0
            batch = Batch(ids, keep, topk, start)
            for acc in accumulators:
                acc.update(batch)
    seconds = time.perf_counter() - started
    return {"tokens": n, "positions": p.chunks.numel(), "seconds": round(seconds, 2),
            "seconds_model": round(in_model, 2), "seconds_analyses": round(seconds - in_model, 2)}
