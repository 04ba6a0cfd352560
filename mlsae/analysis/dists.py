"""How each latent's activation is distributed over layers: ``python -m mlsae.analysis.dists --sae R``.

Per (layer, latent), over the held-out tokens (special tokens left out):

- ``counts[l, f]``: tokens at which f was selected at layer l with activation > dead_threshold;
- ``totals[l, f]``: the sum of f's activations at layer l.

Derived per latent f, with l the MLSAE's layer index 0..L-1 (the transformer layer when the
MLSAE reads every layer):

- ``probs[:, f] = totals[:, f] / sum_l totals[l, f]``: the distribution of f's activation mass over layers;
- ``layer_mean = sum_l l p_l``, ``layer_var = sum_l l^2 p_l - layer_mean^2``, ``layer_std = sqrt(layer_var)``;
- ``layers_active(t)[f]``: the number of layers at which f was active at ``t`` tokens or more (the
  reference's later "number of layers" figure); ``multi_layer`` summarises it at a few thresholds.

The summary takes the mean, variance, standard deviation (both over n latents, ddof 0) and
standard error (std / sqrt(n)) of ``layer_std`` over the n latents that fired, absolute and
divided by L. (The reference divided the standard error by the number of all latents, dead ones
included.) Files: ``dists.safetensors`` (``counts``, ``totals`` float32 ``[L, F]``, as in the
reference), ``dists.csv`` (one row per latent) and ``dists.json`` (the summary).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlsae.analysis.common import PassOptions, config_dict, parse, write_json
from mlsae.analysis.stream import Batch, prepare, stream
from mlsae.utils import MLSAEError, atomic_path, run_cli


class DistsAccumulator:
    """Accumulates ``counts`` and ``totals`` ``[L, F]`` in float64 (exact for any token budget)."""

    def __init__(self, n_layers: int, n_latents: int, dead_threshold: float, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(n_layers, n_latents, dtype=torch.float64, device=device)
        self.totals = torch.zeros(n_layers, n_latents, dtype=torch.float64, device=device)
        self.dead_threshold = dead_threshold

    def update(self, batch: Batch) -> None:
        self.add(*batch.topk)

    def add(self, values: Tensor, indices: Tensor) -> None:
        """Add TopK ``values, indices [L, ..., k]`` (on this accumulator's device)."""
        L = values.shape[0]
        values, indices = values.reshape(L, -1).double(), indices.reshape(L, -1)
        self.counts.scatter_add_(1, indices, (values > self.dead_threshold).double())
        self.totals.scatter_add_(1, indices, values)

    def result(self, layers: list[int], tokens: int = 0) -> Dists:
        return Dists(self.counts.float().cpu(), self.totals.float().cpu(), layers, tokens)


@dataclass
class Dists:
    """Layer distributions of every latent (see the module docstring for the definitions)."""

    counts: Tensor  # [L, F]
    totals: Tensor  # [L, F]
    layers: list[int]  # transformer layer of each index
    tokens: int = 0  # tokens they were counted over

    @property
    def n_layers(self) -> int:
        return self.counts.shape[0]

    @cached_property
    def fired(self) -> Tensor:
        """[F] bool: activation above dead_threshold at some layer."""
        return self.counts.sum(0) > 0

    @cached_property
    def probs(self) -> Tensor:
        """[L, F] distribution over layers (NaN for latents with no activation mass)."""
        totals = self.totals.double()
        total = totals.sum(0)
        return (totals / total.where(total > 0, torch.nan)).float()

    @cached_property
    def _layer_moments(self) -> tuple[Tensor, Tensor]:
        return _moments(self.probs)

    @property
    def layer_mean(self) -> Tensor:
        return self._layer_moments[0]

    @property
    def layer_var(self) -> Tensor:
        return self._layer_moments[1]

    @cached_property
    def layer_std(self) -> Tensor:
        return self.layer_var.sqrt()

    def summary(self) -> dict:
        std = self.layer_std[self.fired].double()
        return {
            "n_layers": self.n_layers,
            "n_latents": self.counts.shape[1],
            "n_fired": int(self.fired.sum()),
            "tokens": self.tokens,
            "layer_std": _stats(std),
            "layer_std_rel": _stats(std / self.n_layers),
        }

    def frame(self) -> pd.DataFrame:
        """One row per latent: count, total, fired, layer_mean, layer_var, layer_std."""
        return pd.DataFrame({
            "latent": range(self.counts.shape[1]),
            "count": self.counts.sum(0).numpy(),
            "total": self.totals.sum(0).numpy(),
            "fired": self.fired.numpy(),
            "layer_mean": self.layer_mean.numpy(),
            "layer_var": self.layer_var.numpy(),
            "layer_std": self.layer_std.numpy(),
        })

    def save(self, out: Path, meta: dict | None = None) -> Path:
        """Write the three files; ``meta`` (e.g. ``{"config": ..., "pass": ...}``) goes into dists.json."""
        self.save_tensors(out / "dists.safetensors")
        with atomic_path(out / "dists.csv") as tmp:
            self.frame().to_csv(tmp, index=False)
        write_json(out / "dists.json", {**self.summary(), "layers": self.layers, **(meta or {})})
        return out / "dists.safetensors"

    def save_tensors(self, path: Path) -> Path:
        """``counts`` and ``totals`` alone, as one safetensors file (``Dists.load`` reads it)."""
        header = {"layers": json.dumps(self.layers), "tokens": str(self.tokens)}  # safetensors metadata: strings
        with atomic_path(path) as tmp:
            save_file({"counts": self.counts.float().contiguous(), "totals": self.totals.float().contiguous()},
                      tmp, metadata=header)
        return path

    def layers_active(self, threshold: int = 1) -> Tensor:
        """[F] the number of layers at which each latent was active at ``threshold`` tokens or more."""
        return (self.counts >= threshold).sum(0)

    def multi_layer(self, thresholds: Sequence[int]) -> pd.DataFrame:
        """Per threshold t (tokens): latents active at some layer at t tokens or more, the mean number
        of layers at which they are, that mean over the number of layers, and the share of them
        active at more than one layer."""
        rows = {}
        for t in thresholds:
            n = self.layers_active(t).numpy()
            n = pd.Series(n[n > 0], dtype=float)  # empty: NaN means
            rows[int(t)] = {"latents": len(n), "mean layers": n.mean(), "mean layers / layers": n.mean() / self.n_layers,
                            "share at several layers": (n > 1).mean()}
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("threshold")

    @classmethod
    def load(cls, path: str | Path) -> Dists:
        """From ``dists.safetensors`` (or a folder holding it); also reads the reference's files."""
        path = Path(path)
        if path.is_dir():
            path = path / "dists.safetensors"
        if not path.is_file():
            raise MLSAEError(f"no dists file at {path}: run python -m mlsae.analysis.dists (or .run) first")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            counts, totals = f.get_tensor("counts"), f.get_tensor("totals")
        layers = json.loads(meta["layers"]) if "layers" in meta else list(range(counts.shape[0]))
        return cls(counts, totals, layers, int(meta.get("tokens", 0)))


def _moments(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of the layer index under each column of ``probs [L, ...]``."""
    ell = torch.arange(probs.shape[0], dtype=torch.float64).view(-1, *[1] * (probs.ndim - 1))
    p = probs.double()
    mean = (ell * p).sum(0)
    var = ((ell**2 * p).sum(0) - mean**2).clamp_min(0)
    return mean.float(), var.float()


def _stats(x: Tensor) -> dict[str, float]:
    n = x.numel()
    if n == 0:
        return {"mean": float("nan"), "var": float("nan"), "std": float("nan"), "sem": float("nan")}
    var = x.var(unbiased=False).item()
    return {"mean": x.mean().item(), "var": var, "std": var**0.5, "sem": var**0.5 / n**0.5}


def main(argv: list[str] | None = None) -> None:
    cfg = parse(PassOptions, argv, __doc__.split("\n\n")[0])
    p = prepare(cfg)
    acc = DistsAccumulator(p.n_layers, p.n_latents, p.sae.config.dead_threshold, p.device)
    info = stream(p, [acc], cfg.data, desc="dists")
    dists = acc.result(p.layers, info["tokens"])
    path = dists.save(cfg.out, {"config": config_dict(cfg), "pass": info})
    print(json.dumps(dists.summary(), indent=2))
    print(path)


if __name__ == "__main__":
    run_cli(main)
