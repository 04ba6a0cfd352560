"""Decoder geometry of an MLSAE: ``python -m mlsae.analysis.decoder --sae R``.

With unit decoder directions w_f (rows of W_dec):

- **MMCS** (mean max cosine similarity within one SAE): the mean over latents f of
  ``max_{g != f} cos(w_f, w_g)``. Computed in row chunks of the [F, F] similarity matrix with
  each latent's own entry masked, so every chunk size gives the same pairs as the full matrix.
- **Pairs**: over every unordered pair {f, g} of latents that fired (with a layer_mean from
  ``dists``), cos(w_f, w_g) against |layer_mean_f - layer_mean_g|: a 2-D histogram, per-bin
  moments of the cosine, and the correlation; or a random sample of pairs.
- **Embeddings**: each latent's top cosine similarity with the rows of the transformer's
  input embedding and output embedding (unembedding) matrices, and the token it is attained at.

Files: ``decoder.csv`` (per latent), ``decoder.json`` (summary), ``decoder_pairs.csv`` (per
|delta layer_mean| bin) and ``decoder_pairs_hist.csv`` (the 2-D histogram, long format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mlsae.analysis.common import config_dict, load_sae, output_dir, parse, write_json
from mlsae.analysis.dists import Dists
from mlsae.train import pick_device
from mlsae.transformer import load_transformer
from mlsae.utils import MLSAEError, atomic_path, run_cli, sae_option


def unit(w: Tensor) -> Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cos_others(W: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For each row f of ``W [F, d]``: max over g != f of cos(w_f, w_g), and that g."""
    W = unit(W.float())
    F = len(W)
    values, partners = torch.empty(F, device=W.device), torch.empty(F, dtype=torch.long, device=W.device)
    for i in range(0, F, chunk):
        sims = W[i : i + chunk] @ W.T  # [c, F]
        rows = torch.arange(len(sims), device=W.device)
        sims[rows, rows + i] = float("-inf")
        values[i : i + chunk], partners[i : i + chunk] = sims.max(1)
    return values, partners


def mmcs(W: Tensor, chunk: int = 1024) -> float:
    """Mean max cosine similarity of each row of ``W`` with any other row (see the module docstring)."""
    return max_cos_others(W, chunk)[0].mean().item()


@torch.no_grad()
def top_cos_with(W: Tensor, E: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For each row of ``W [F, d]``: the max cosine similarity with any row of ``E [V, d]``, and that row."""
    W, E = unit(W.float()), unit(E.float().to(W.device))
    parts = [(W[i : i + chunk] @ E.T).max(1) for i in range(0, len(W), chunk)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


@dataclass
class PairStats:
    """cos(w_f, w_g) against |layer_mean_f - layer_mean_g| over all unordered pairs of the given latents."""

    cos_edges: Tensor  # [C + 1]
    delta_edges: Tensor  # [D + 1]
    hist: Tensor  # [D, C] pair counts
    cos_sum: Tensor  # [D] per delta bin
    cos_sq_sum: Tensor  # [D]
    n_pairs: int
    corr: float  # Pearson correlation of cos and delta over all pairs

    def frame(self) -> pd.DataFrame:
        n = self.hist.sum(1).double()
        mean = self.cos_sum / n.clamp_min(1)
        return pd.DataFrame({
            "delta_lo": self.delta_edges[:-1].numpy(), "delta_hi": self.delta_edges[1:].numpy(),
            "pairs": n.long().numpy(),
            "cos_mean": mean.where(n > 0, torch.nan).numpy(),
            "cos_std": (self.cos_sq_sum / n.clamp_min(1) - mean**2).clamp_min(0).sqrt().where(n > 0, torch.nan).numpy(),
        })

    def hist_frame(self) -> pd.DataFrame:
        D, C = self.hist.shape
        d, c = torch.meshgrid(torch.arange(D), torch.arange(C), indexing="ij")
        d, c = d.reshape(-1), c.reshape(-1)
        return pd.DataFrame({
            "delta_lo": self.delta_edges[d].numpy(), "delta_hi": self.delta_edges[d + 1].numpy(),
            "cos_lo": self.cos_edges[c].numpy(), "cos_hi": self.cos_edges[c + 1].numpy(),
            "pairs": self.hist.reshape(-1).numpy(),
        })


@torch.no_grad()
def pair_stats(W: Tensor, layer_mean: Tensor, n_layers: int, cos_bins: int = 40, delta_bins: int | None = None,
               chunk: int = 1024) -> PairStats:
    """Bin every unordered pair f < g of the rows of ``W [F, d]`` with ``layer_mean [F]`` (no NaNs).

    Bins: cos in [-1, 1] (``cos_bins`` equal bins), delta in [0, n_layers - 1] (one bin per layer
    step by default); values on an edge go to the upper bin, the maxima to the last.
    """
    W, m = unit(W.float()), layer_mean.double().to(W.device)
    D = delta_bins or max(n_layers - 1, 1)
    cos_edges = torch.linspace(-1, 1, cos_bins + 1, dtype=torch.float64)
    delta_edges = torch.linspace(0, max(n_layers - 1, 1), D + 1, dtype=torch.float64)
    hist = torch.zeros(D * cos_bins, dtype=torch.long)
    cos_sum, cos_sq = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    s = torch.zeros(5, dtype=torch.float64)  # sums of x, y, xx, yy, xy for the correlation
    F = len(W)
    for i in range(0, F, chunk):
        rows, cols = torch.arange(i, min(i + chunk, F), device=W.device), torch.arange(i, F, device=W.device)
        upper = rows[:, None] < cols[None]  # g > f: each pair once
        x = (W[rows] @ W[i:].T)[upper].double().cpu()
        y = (m[rows, None] - m[None, i:]).abs()[upper].cpu()
        cb = _bin(x, cos_edges, cos_bins)
        db = _bin(y, delta_edges, D)
        hist += torch.bincount(db * cos_bins + cb, minlength=D * cos_bins)
        cos_sum.index_add_(0, db, x)
        cos_sq.index_add_(0, db, x * x)
        s += torch.stack([x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
    n = F * (F - 1) // 2
    corr = float("nan")
    if n > 1:
        cov = s[4] / n - s[0] * s[1] / n**2
        vx, vy = s[2] / n - (s[0] / n) ** 2, s[3] / n - (s[1] / n) ** 2
        corr = (cov / (vx * vy).sqrt()).item() if vx > 0 and vy > 0 else float("nan")
    return PairStats(cos_edges.float(), delta_edges.float(), hist.view(D, cos_bins), cos_sum, cos_sq, n, corr)


def _bin(x: Tensor, edges: Tensor, n: int) -> Tensor:
    return (torch.bucketize(x, edges, right=True) - 1).clamp(0, n - 1)


@torch.no_grad()
def sample_pairs(W: Tensor, layer_mean: Tensor, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` random unordered pairs f != g (with replacement): latents, cos(w_f, w_g), |delta layer_mean|."""
    F = len(W)
    if F < 2:
        return pd.DataFrame({"a": [], "b": [], "cos": [], "delta": []})
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(F, (n,), generator=g)
    b = (a + torch.randint(1, F, (n,), generator=g)) % F  # uniform over g != f
    Wu = unit(W.float().cpu())
    cos = (Wu[a] * Wu[b]).sum(-1)
    delta = (layer_mean.cpu()[a] - layer_mean.cpu()[b]).abs()
    return pd.DataFrame({"a": a.numpy(), "b": b.numpy(), "cos": cos.numpy(), "delta": delta.numpy()})


# ----------------------------------------------------------------------------------------------
# CLI


@dataclass
class DecoderOptions:
    sae: str = sae_option()
    model_name: str | None = None
    """Transformer for the embedding similarities (default: the one named in the MLSAE's config)."""
    embeddings: bool = True
    """Compare latents with the transformer's input and output embeddings (loads the transformer)."""
    dists: str | None = None
    """dists.safetensors for the pair analysis (default: the one in out_dir; skipped if absent)."""
    cos_bins: int = 40
    """Bins of cosine similarity in [-1, 1] for the pair histogram."""
    chunk: int = 1024
    """Latents per block of the similarity matrices (memory only: the results do not depend on it)."""
    device: str = "auto"
    """cpu, cuda, or auto."""
    out_dir: str | None = None
    """Output folder (default: out/analysis/<MLSAE name>)."""

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.cos_bins < 1:
            raise MLSAEError("--chunk and --cos_bins must be positive")


def run(cfg: DecoderOptions) -> dict:
    """Compute and write ``decoder.csv``, ``decoder.json`` (and the pair tables); returns the summary."""
    device = pick_device(cfg.device)
    sae = load_sae(cfg.sae, device)
    out = output_dir(cfg.out_dir, cfg.sae)
    W = sae.W_dec.detach()
    max_cos, partner = max_cos_others(W, cfg.chunk)
    per_latent = pd.DataFrame({"latent": np.arange(len(W)), "max_cos": max_cos.cpu().numpy(),
                               "max_cos_latent": partner.cpu().numpy()})
    summary: dict = {"mmcs": max_cos.mean().item(), "n_latents": len(W)}
    if cfg.embeddings:
        name = cfg.model_name or sae.config.model_name
        if name is None:
            raise MLSAEError(f"{cfg.sae} does not name its transformer: pass --model_name or --no-embeddings")
        model, _ = load_transformer(name, device=device)
        for key, module in (("embed_in", model.get_input_embeddings()), ("embed_out", model.get_output_embeddings())):
            values, tokens = top_cos_with(W, module.weight.detach(), cfg.chunk)
            per_latent[f"{key}_cos"], per_latent[f"{key}_token"] = values.cpu().numpy(), tokens.cpu().numpy()
            summary[f"{key}_cos_mean"] = values.mean().item()
    dists_path = Path(cfg.dists) if cfg.dists else out / "dists.safetensors"
    if dists_path.exists() or cfg.dists:
        dists = Dists.load(dists_path)
        fired = dists.fired
        per_latent["layer_mean"] = dists.layer_mean.numpy()
        stats = pair_stats(W[fired.to(W.device)], dists.layer_mean[fired], dists.n_layers, cfg.cos_bins,
                           chunk=cfg.chunk)
        summary.update(pairs=stats.n_pairs, pairs_corr_cos_delta=stats.corr)
        with atomic_path(out / "decoder_pairs.csv") as tmp:
            stats.frame().to_csv(tmp, index=False)
        with atomic_path(out / "decoder_pairs_hist.csv") as tmp:
            stats.hist_frame().to_csv(tmp, index=False)
    with atomic_path(out / "decoder.csv") as tmp:
        per_latent.to_csv(tmp, index=False)
    write_json(out / "decoder.json", {**summary, "config": config_dict(cfg)})
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse(DecoderOptions, argv, __doc__.split("\n\n")[0])
    summary = run(cfg)
    print(json.dumps(summary, indent=2))
    if "pairs" not in summary:
        print("no dists.safetensors: the pair analysis was skipped (run python -m mlsae.analysis.dists first)")
    print(output_dir(cfg.out_dir, cfg.sae) / "decoder.json")


if __name__ == "__main__":
    run_cli(main)
