"""Maximally activating examples of every (latent, layer): ``python -m mlsae.analysis.examples --sae R``.

An example is a token at which latent f, read at layer l, has activation > dead_threshold;
the top ``n_examples`` per (latent, layer) are kept with the context window from ``n_tokens``
before to ``n_tokens - 1`` after (clipped to the sequence; special tokens are context but
never examples) and the same latent's activations at the same layer over the window.

The search streams: a running ``[L * F, N]`` buffer of the best activations (sorted) and their
token ids is merged with each batch's candidates in a few tensor ops (no per-example inserts),
so the result equals a global sort. Only entries above a row's current N-th best are
candidates, so the work shrinks as the buffer fills; windows are read from the batch only for
entries that got in, and written into the slots of the entries they pushed out.

``examples.parquet`` has one row per example, sorted by (latent, layer, rank): latent int32,
layer int16 (the transformer layer), rank int16 (0 = strongest), activation float32,
token_ids list<int32>, acts list<float32>, center int8 (index of the example token in the
window), chunk int32 and position int32 (where the example token is in the held-out chunks).
Read it with ``load_examples(folder).top(latent, layer)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from mlsae.analysis.common import PassOptions, config_dict, parse
from mlsae.analysis.stream import Batch, prepare, stream
from mlsae.transformer import load_tokenizer
from mlsae.utils import MLSAEError, atomic_path, run_cli

FORMAT = 1
NEG = float("-inf")


class TopExamples:
    """Streaming top-N activations per (layer, latent), with their token ids and activation windows."""

    def __init__(self, n_layers: int, n_latents: int, n_examples: int = 32, n_tokens: int = 4,
                 threshold: float = 1e-3, device: torch.device | str = "cpu"):
        rows, N, W = n_layers * n_latents, n_examples, 2 * n_tokens
        self.n_layers, self.n_latents, self.n, self.n_tokens = n_layers, n_latents, N, n_tokens
        self.threshold = threshold
        self.values = torch.full((rows, N), NEG, device=device)  # row l * F + f, sorted descending
        self.tokens = torch.full((rows, N), -1, dtype=torch.long, device=device)  # chunk * P + position
        # Windows (acts at offsets -n_tokens .. n_tokens - 1) stay in place; entries point at them, so
        # a merge writes only the windows of entries that got in.
        self.slots = torch.arange(rows * N, device=device).view(rows, N)
        self.windows = torch.zeros(rows * N, W, device=device)
        self.length: int | None = None  # P, the chunk length

    def update(self, batch: Batch) -> None:
        values, indices = batch.topk
        L, B, P, k = values.shape
        self.length = P
        values, indices = values.float().reshape(L, B * P, k), indices.reshape(L, B * P, k)
        cand = self._candidates(values, indices)
        if len(cand[0]):
            self._merge(*cand, values, indices, batch.start * P)

    def _candidates(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(row, rank in row, value, batch token) of the entries that may enter the buffer: above the threshold
        and the row's current N-th best, at most N per row, sorted by row then value descending."""
        L, T, k = values.shape
        row = (torch.arange(L, device=values.device).view(L, 1, 1) * self.n_latents + indices).reshape(-1)
        tok = torch.arange(T, device=values.device).view(1, T, 1).expand(L, T, k).reshape(-1)
        val = values.reshape(-1)
        ok = (val > self.threshold) & (val > self.values[row, -1])
        row, val, tok = row[ok], val[ok], tok[ok]
        # One sort by (row, value descending): positive floats order like their bit patterns.
        order = (row * 2**31 + (2**31 - 1 - val.view(torch.int32))).argsort()
        row, val, tok = row[order], val[order], tok[order]
        rank = _rank_in_group(row)
        keep = rank < self.n
        return row[keep], rank[keep], val[keep], tok[keep]

    def _merge(self, row: Tensor, rank: Tensor, val: Tensor, tok: Tensor, values: Tensor, indices: Tensor,
               offset: int) -> None:
        """Merge the candidates into their rows' buffers; windows of entries that got in are read from the batch."""
        N = self.n
        rows, inv = torch.unique_consecutive(row, return_inverse=True)
        new_v = torch.full((len(rows), N), NEG, device=val.device)
        new_t = torch.full((len(rows), N), -1, dtype=torch.long, device=val.device)
        new_v[inv, rank], new_t[inv, rank] = val, tok + offset
        top_v, sel = torch.cat([self.values[rows], new_v], 1).topk(N, dim=1)
        top_t = torch.cat([self.tokens[rows], new_t], 1).gather(1, sel)
        # Entries that got in take the slots of those pushed out, row by row in the same order.
        old_slots, is_new = self.slots[rows], sel >= N
        kept = torch.zeros(len(rows), N + 1, dtype=torch.bool, device=sel.device)
        kept.scatter_(1, torch.where(is_new, N, sel), True)
        slots = old_slots.gather(1, sel.clamp(max=N - 1))
        slots[is_new] = old_slots[~kept[:, :N]]
        r, c = (is_new & (top_v > NEG)).nonzero(as_tuple=True)
        layer, latent = rows[r] // self.n_latents, rows[r] % self.n_latents
        self.windows[slots[r, c]] = window_acts(values, indices, self.n_latents, layer, latent, top_t[r, c] - offset,
                                                self.length, self.n_tokens)
        self.values[rows], self.tokens[rows], self.slots[rows] = top_v, top_t, slots

    def table(self, chunks: Tensor, layers: list[int]) -> pa.Table:
        """The examples as an Arrow table sorted by (latent, layer, rank); see the module docstring."""
        L, F, N, n = self.n_layers, self.n_latents, self.n, self.n_tokens
        P = chunks.shape[1]
        by_latent = lambda t: t.reshape(L, F, N, *t.shape[2:]).transpose(0, 1).cpu()  # noqa: E731
        values, tokens, slots = by_latent(self.values), by_latent(self.tokens), by_latent(self.slots)
        f, li, r = (values > self.threshold).nonzero(as_tuple=True)  # lexicographic: (latent, layer, rank)
        windows = self.windows[slots[f, li, r].to(self.windows.device)].cpu()
        chunk, pos = tokens[f, li, r] // P, tokens[f, li, r] % P
        wpos = pos[:, None] + torch.arange(-n, n)
        inside = (wpos >= 0) & (wpos < P)
        ids = chunks.cpu()[chunk[:, None], wpos.clamp(0, P - 1)]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(1).cumsum(0)]).int().numpy()
        def lists(x: Tensor, dtype) -> pa.ListArray:
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(x[inside].numpy().astype(dtype)))

        return pa.table({
            "latent": pa.array(f.numpy().astype(np.int32)),
            "layer": pa.array(torch.tensor(layers)[li].numpy().astype(np.int16)),
            "rank": pa.array(r.numpy().astype(np.int16)),
            "activation": pa.array(values[f, li, r].numpy().astype(np.float32)),
            "token_ids": lists(ids, np.int32),
            "acts": lists(windows, np.float32),
            "center": pa.array(pos.clamp(max=n).numpy().astype(np.int8)),
            "chunk": pa.array(chunk.numpy().astype(np.int32)),
            "position": pa.array(pos.numpy().astype(np.int32)),
        })

    def save(self, out: Path, chunks: Tensor, layers: list[int], meta: dict) -> Path:
        table = self.table(chunks, layers)
        meta = {**meta, "format": FORMAT, "layers": layers, "n_examples": self.n, "n_tokens": self.n_tokens,
                "threshold": self.threshold}
        table = table.replace_schema_metadata({"mlsae": json.dumps(meta)})
        with atomic_path(out / "examples.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return out / "examples.parquet"


def _rank_in_group(sorted_keys: Tensor) -> Tensor:
    """0, 1, 2, ... within each run of equal values of a sorted tensor."""
    i = torch.arange(len(sorted_keys), device=sorted_keys.device)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return i - torch.where(starts, i, 0).cummax(0).values


def window_acts(values: Tensor, indices: Tensor, n_latents: int, layer: Tensor, latent: Tensor, tok: Tensor,
                length: int, n_tokens: int) -> Tensor:
    """Activation of ``latent`` at ``layer`` over the window of each batch token ``tok`` ([n, 2 n_tokens]).

    ``values, indices [L, T, k]`` are the batch's TopK (tokens t = b * length + p). Looked up by
    binary search in the keys ``(l * T + t) * F + f`` of the batch's entries, sorted by sorting
    each token's k latents (much cheaper than one global sort); offsets outside the token's own
    sequence read 0.
    """
    L, T, F = *values.shape[:2], n_latents
    base = torch.arange(L * T, device=values.device).view(L, T, 1)
    latents, order = indices.sort(dim=-1)
    keys = (base * F + latents).reshape(-1)
    vals = values.gather(-1, order).reshape(-1)
    t = tok[:, None] + torch.arange(-n_tokens, n_tokens, device=tok.device)
    same = (t >= 0) & (t < T) & (t.div(length, rounding_mode="floor") == (tok // length)[:, None])
    query = (layer[:, None] * T + t.clamp(0, T - 1)) * F + latent[:, None]
    at = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
    hit = same & (keys[at] == query)
    return torch.where(hit, vals[at], torch.zeros((), device=vals.device))


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class Examples:
    """The examples of one MLSAE: ``top(latent, layer)`` as a DataFrame, ``decode`` for token strings."""

    table: pa.Table
    meta: dict = field(default_factory=dict)
    tokenizer: object | None = None  # loaded from meta["model_name"] on first decode if None
    folder: Path | None = None  # the analysis folder it was read from (its dists and histograms are there too)

    @cached_property
    def _keys(self) -> np.ndarray:
        latent = self.table.column("latent").to_numpy().astype(np.int64)
        layer = self.table.column("layer").to_numpy().astype(np.int64)
        return latent * (1 << 16) + layer

    def top(self, latent: int, layer: int, n: int = 32, *, tokens: bool = False) -> pd.DataFrame:
        """The ``n`` strongest examples of ``latent`` at transformer layer ``layer`` (empty if none).

        With ``tokens`` a column of token strings (one per id of ``token_ids``) is added.
        """
        key = int(latent) * (1 << 16) + int(layer)
        lo, hi = np.searchsorted(self._keys, [key, key + 1])
        df = self.table.slice(lo, min(hi - lo, max(n, 0))).to_pandas()
        if tokens:
            df["tokens"] = [self.decode(ids) for ids in df["token_ids"]]
        return df

    def latents(self) -> pd.DataFrame:
        """(latent, layer, n, max activation) of every (latent, layer) with examples."""
        keys = self.table.select(["latent", "layer", "activation"]).to_pandas()
        return keys.groupby(["latent", "layer"], as_index=False).agg(n=("activation", "size"),
                                                                     max_activation=("activation", "max"))

    @cached_property
    def _vocab(self) -> np.ndarray:
        tok = self.tokenizer
        if tok is None:
            name = self.meta.get("model_name")
            if not name:
                raise MLSAEError("the examples do not name their transformer: pass tokenizer= to load_examples")
            tok = self.tokenizer = load_tokenizer(name)
        return token_strings(tok)

    def decode(self, token_ids) -> list[str]:
        """Each token id as its own string (e.g. ``[' the', ' cat']``)."""
        return self._vocab[np.asarray(token_ids, dtype=np.int64)].tolist()


def token_strings(tokenizer) -> np.ndarray:
    """Every token id of the vocabulary as its own string (object array, indexed by id)."""
    return np.array(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]), dtype=object)


def load_examples(folder: str | Path, tokenizer=None) -> Examples:
    """Read ``examples.parquet`` from ``folder`` (or that file itself)."""
    path = Path(folder)
    if path.is_dir():
        path = path / "examples.parquet"
    if not path.is_file():
        raise MLSAEError(f"no examples at {path}: run python -m mlsae.analysis.examples (or .run) first")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(b"mlsae")
    return Examples(table, json.loads(raw) if raw else {}, tokenizer, path.parent)


# ----------------------------------------------------------------------------------------------
# CLI


@dataclass
class ExamplesOptions(PassOptions):
    n_examples: int = 32
    """Examples kept per (latent, layer)."""
    n_tokens: int = 4
    """Context: this many tokens before the example token and one fewer after it."""

    def __post_init__(self) -> None:
        if not 1 <= self.n_examples <= 32767:
            raise MLSAEError(f"--n_examples must be between 1 and 32767, got {self.n_examples}")
        if not 1 <= self.n_tokens <= 127:
            raise MLSAEError(f"--n_tokens must be between 1 and 127, got {self.n_tokens}")


def make(p, cfg: ExamplesOptions) -> TopExamples:
    return TopExamples(p.n_layers, p.n_latents, cfg.n_examples, cfg.n_tokens, p.sae.config.dead_threshold, p.device)


def meta(p, cfg: PassOptions, info: dict) -> dict:
    return {"sae": cfg.sae, "model_name": cfg.model_name or p.sae.config.model_name or p.transformer.name,
            "tokens": info["tokens"], "config": config_dict(cfg), "pass": info}


def main(argv: list[str] | None = None) -> None:
    cfg = parse(ExamplesOptions, argv, __doc__.split("\n\n")[0])
    p = prepare(cfg)
    acc = make(p, cfg)
    info = stream(p, [acc], cfg.data, desc="examples")
    path = acc.save(cfg.out, p.chunks, p.layers, meta(p, cfg, info))
    print(path)


if __name__ == "__main__":
    run_cli(main)
