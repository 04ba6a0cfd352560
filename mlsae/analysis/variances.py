"""Per-token versus aggregated spread of latents over layers: ``python -m mlsae.analysis.variances --sae R``.

The paper's claim: a latent is usually active at one layer for a given token, but which layer
varies between tokens, so the variance of its layer distribution is about two orders of
magnitude larger aggregated over tokens than for a single token. Definitions (a_l(t, f) is
latent f's activation at MLSAE layer index l = 0..L-1 for token t; a pair (t, f) is *active*
when sum_l a_l(t, f) > 0):

- per-token distribution ``p(l|t,f) = a_l(t,f) / sum_l' a_l'(t,f)`` of an active pair;
- its variance ``var_tf = sum_l l^2 p(l|t,f) - (sum_l l p(l|t,f))^2``;
- ``exp_var_l_tf``: the mean of var_tf over all active (token, latent) pairs;
- token-averaged distribution ``p(l|f) = mean of p(l|t,f) over the tokens t active for f``,
  ``var_f`` its variance, and ``exp_var_l_f``: the mean of var_f over latents active at all;
- ``rel_var = exp_var_l_tf / exp_var_l_f`` (small when latents are layer-specific per token
  but not across tokens; "two orders of magnitude" means about 0.01).

Also given, weighting every latent equally on both sides: ``exp_var_l_tf_by_latent`` (the mean
over latents of their mean var_tf) and ``rel_var_by_latent``, which by the law of total
variance is at most 1. ``reference`` repeats the reference implementation's formulas: per batch
of T tokens, the per-token variances averaged over all T x F pairs (inactive ones count as 0),
the token average taken over all T tokens (so it is not a distribution) and its "variance"
averaged over all F latents; the ratio averaged over batches. Files: ``variances.json``
(summary) and ``variances.csv`` (per latent: active tokens, mean var_tf, var_f).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from mlsae.analysis.common import PassOptions, config_dict, parse, write_json
from mlsae.analysis.stream import Batch, prepare, stream
from mlsae.utils import atomic_path, run_cli


@dataclass
class PairMoments:
    """Per active (token, latent) pair of one batch, and per entry of the batch's TopK."""

    latent: Tensor  # [n_pairs] latent of each active pair
    var: Tensor  # [n_pairs] var_tf
    entry_layer: Tensor  # [n_entries] layer index of each TopK entry
    entry_latent: Tensor  # [n_entries]
    entry_prob: Tensor  # [n_entries] p(l|t,f) of the entry (0 for inactive pairs)


def pair_moments(values: Tensor, indices: Tensor, n_latents: int) -> PairMoments:
    """Group the entries of ``values, indices [L, T, k]`` by (token, latent), sparsely.

    Never builds a dense [T, F] tensor: one sort of the keys t * F + f puts each pair's
    entries (at most one per layer) next to each other.
    """
    L, T, k = values.shape
    key = (torch.arange(T, device=values.device).view(1, T, 1) * n_latents + indices).reshape(-1)
    key, order = key.sort()
    val = values.reshape(-1)[order].double()
    ell = order.div(T * k, rounding_mode="floor").double()  # flat index = (l * T + t) * k + j
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]
    group = starts.cumsum(0) - 1
    n = int(group[-1]) + 1 if len(group) else 0
    mass = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, group, val)
    prob = val / mass[group].clamp_min(torch.finfo(torch.float64).tiny)
    m1 = torch.zeros_like(mass).index_add_(0, group, prob * ell)
    m2 = torch.zeros_like(mass).index_add_(0, group, prob * ell * ell)
    active = mass > 0
    var = (m2 - m1**2).clamp_min(0)[active]
    return PairMoments(key[starts][active] % n_latents, var, ell.long(), key % n_latents, prob)


def _variance_over_layers(p: Tensor) -> Tensor:
    """``sum_l l^2 p_l - (sum_l l p_l)^2`` of each column of ``p [L, F]`` (p need not sum to 1)."""
    ell = torch.arange(p.shape[0], dtype=p.dtype, device=p.device)[:, None]
    return (ell**2 * p).sum(0) - (ell * p).sum(0) ** 2


class VariancesAccumulator:
    """Streams the sums behind every quantity of the module docstring (float64)."""

    def __init__(self, n_layers: int, n_latents: int, device: torch.device | str = "cpu"):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.n_layers, self.n_latents = n_layers, n_latents
        self.prob_sum = z(n_layers, n_latents)  # sum over active tokens of p(l|t,f)
        self.var_sum = z(n_latents)  # sum over active tokens of var_tf
        self.active = z(n_latents)  # active tokens per latent
        self.ref_tf, self.ref_f, self.ref_ratio = [], [], []  # per batch, the reference's way

    def update(self, batch: Batch) -> None:
        values, indices = batch.topk
        values, indices = values[:, batch.keep], indices[:, batch.keep]  # [L, T, k] kept tokens only
        T = values.shape[1]
        if T == 0:
            return
        m = pair_moments(values, indices, self.n_latents)
        prob = torch.zeros_like(self.prob_sum)
        prob.view(-1).index_add_(0, m.entry_layer * self.n_latents + m.entry_latent, m.entry_prob)
        self.prob_sum += prob
        self.var_sum.index_add_(0, m.latent, m.var)
        self.active.index_add_(0, m.latent, torch.ones_like(m.var))
        ref_tf = m.var.sum() / (T * self.n_latents)
        ref_f = _variance_over_layers(prob / T).mean()
        self.ref_tf.append(ref_tf.item())
        self.ref_f.append(ref_f.item())
        self.ref_ratio.append((ref_tf / ref_f).item())

    def result(self) -> Variances:
        on = self.active > 0
        n_active = self.active.clamp_min(1)
        var_f = _variance_over_layers(self.prob_sum / n_active).clamp_min(0)
        var_tf = self.var_sum / n_active
        nan = float("nan")
        exp_f = var_f[on].mean().item() if on.any() else nan
        exp_tf = (self.var_sum.sum() / self.active.sum()).item() if on.any() else nan
        exp_tf_latent = var_tf[on].mean().item() if on.any() else nan
        mean = lambda xs: sum(xs) / len(xs) if xs else nan  # noqa: E731
        summary = {
            "exp_var_l_tf": exp_tf,
            "exp_var_l_f": exp_f,
            "rel_var": _ratio(exp_tf, exp_f),
            "exp_var_l_tf_by_latent": exp_tf_latent,
            "rel_var_by_latent": _ratio(exp_tf_latent, exp_f),
            "n_pairs": int(self.active.sum().item()),
            "n_latents_active": int(on.sum().item()),
            "reference": {"exp_var_l_tf": mean(self.ref_tf), "exp_var_l_f": mean(self.ref_f),
                          "rel_var_t": mean(self.ref_ratio), "batches": len(self.ref_ratio)},
        }
        per_latent = pd.DataFrame({
            "latent": range(self.n_latents),
            "active_tokens": self.active.long().cpu().numpy(),
            "var_tf_mean": var_tf.where(on, nan).cpu().numpy(),
            "var_f": var_f.where(on, nan).cpu().numpy(),
        })
        return Variances(summary, per_latent)


@dataclass
class Variances:
    summary: dict  # the quantities of the module docstring
    per_latent: pd.DataFrame  # latent, active_tokens, var_tf_mean, var_f

    def save(self, out: Path, meta: dict | None = None) -> Path:
        """Write both files; ``meta`` (e.g. ``{"config": ..., "pass": ...}``) goes into variances.json."""
        with atomic_path(out / "variances.csv") as tmp:
            self.per_latent.to_csv(tmp, index=False)
        return write_json(out / "variances.json", {**self.summary, **(meta or {})})


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def main(argv: list[str] | None = None) -> None:
    cfg = parse(PassOptions, argv, __doc__.split("\n\n")[0])
    p = prepare(cfg)
    acc = VariancesAccumulator(p.n_layers, p.n_latents, p.device)
    info = stream(p, [acc], cfg.data, desc="variances")
    result = acc.result()
    path = result.save(cfg.out, {"config": config_dict(cfg), "pass": info})
    print(json.dumps(result.summary, indent=2))
    print(path)


if __name__ == "__main__":
    run_cli(main)
