"""Residual stream geometry of a transformer (no SAE): ``python -m mlsae.analysis.resid --model_name M``.

Over the held-out tokens (the positions that the position rule of ``mlsae.positions`` leaves out
excluded: by default special tokens and the first position), per layer l (block outputs, as the
MLSAE reads them):

- L2 norms of the residual vectors x_l(t): mean, std (ddof 0), min, 5/50/95% quantiles, max;
- ``mean_norm``: the norm of the layer's dataset mean m_l (large when one direction dominates);
- ``cos_next``: the mean over tokens of cos(x_l(t) - m_l, x_l'(t) - m_l'), l' the next layer
  read, with each layer centred by its own dataset mean (the paper's measure of how similar
  adjacent layers are; plain cosines are dominated by the mean direction), and its std;
- ``cos_next_raw``: the same without centring;
- with a tuned lens (``--tuned_lens``), ``cos_next_lens`` and ``cos_next_raw_lens``: the same two of
  the residuals translated into the final layer's basis (``mlsae.lens``), as a tuned-lens MLSAE reads them;
- why the first position is left out: ``norm_first``, the mean norm at the first position of a
  sequence (special or not: where the tokenizer adds a BOS, that BOS), ``norm_rest``, the mean norm
  at the other non-special positions, ``first_variance_share``, the first positions' share of the
  variance of those positions together (their squared deviations from the scalar mean over the
  total, as in FVU's denominator), and ``first_special``, the share of sequences whose first
  position holds a special token (the same at every layer).

The means must be known before any centred cosine is taken, so the data is read twice (means and
norms, then cosines): exact, at twice the cost of one forward pass. Files: ``resid.csv`` (one
row per layer) and ``resid.json`` (mean of cos_next over adjacent pairs, options).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from simple_parsing import field as flag
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.common import DataOptions, config_dict, output_dir, parse, write_json
from mlsae.data import load_chunks
from mlsae.fetch import DEFAULT_MODEL
from mlsae.lens import TunedLens, translate
from mlsae.metrics import ExcludedShare
from mlsae.positions import PositionRule
from mlsae.precision import autocast as precision_autocast
from mlsae.train import pick_device
from mlsae.transformer import Transformer, load_transformer
from mlsae.utils import atomic_path, run_cli

EPS = 1e-12


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of ``a, b [..., d]`` (0 where either is the zero vector)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(EPS)


class ResidMoments:
    """First pass: per-layer sums (float64) for the means, every token's norm, uncentred cosines."""

    def __init__(self, n_layers: int, d_model: int):
        self.sum = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.n = 0
        self.norms: list[Tensor] = []  # [L, N] per batch
        self.cos_raw = torch.zeros(max(n_layers - 1, 0), dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """``x [L, N, d]``: the residual vectors of N tokens at every layer."""
        self.sum += x.double().sum(1).cpu()
        self.n += x.shape[1]
        self.norms.append(x.float().norm(dim=-1).cpu())
        self.cos_raw += cosine(x[:-1].double(), x[1:].double()).sum(1).cpu()

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.n, 1)


class CentredCosines:
    """Second pass: mean and mean square of the centred cosine between adjacent layers."""

    def __init__(self, mean: Tensor):
        self.mean = mean  # [L, d] float64
        self.sum = torch.zeros(max(len(mean) - 1, 0), dtype=torch.float64)
        self.sum_sq = torch.zeros_like(self.sum)
        self.n = 0

    def update(self, x: Tensor) -> None:
        c = x.double() - self.mean.to(x.device)[:, None]
        cos = cosine(c[:-1], c[1:]).cpu()
        self.sum += cos.sum(1)
        self.sum_sq += cos.pow(2).sum(1)
        self.n += x.shape[1]


class FirstPosition:
    """Norms at the first position (special or not) against the other non-special positions, and its
    share of their variance."""

    def __init__(self, n_layers: int):
        self.share = ExcludedShare(n_layers)
        self.norm_sum = torch.zeros(2, n_layers, dtype=torch.float64)  # first, rest
        self.count = torch.zeros(2, dtype=torch.float64)
        self.first_special = 0

    def update(self, acts: Tensor, special: Tensor) -> None:
        """``acts [L, B, P, d]`` of every position, ``special [B, P]``."""
        first = torch.zeros_like(special)
        first[:, 0] = True
        counted = first | ~special
        norms = acts.float().norm(dim=-1)
        for row, mask in ((0, first), (1, counted & ~first)):
            self.norm_sum[row] += norms[:, mask].double().sum(1).cpu()
            self.count[row] += int(mask.sum())
        self.share.update(acts[:, counted][:, None], ~first[counted][None])
        self.first_special += int(special[:, 0].sum())

    def columns(self) -> dict[str, Tensor]:
        means = self.norm_sum / self.count.clamp_min(1)[:, None]
        return {"norm_first": means[0], "norm_rest": means[1],
                "first_variance_share": self.share.compute()["excluded_variance"],
                "first_special": torch.full_like(means[0], self.first_special / max(self.count[0].item(), 1))}


def frame(layers: list[int], moments: ResidMoments, centred: CentredCosines) -> pd.DataFrame:
    norms = torch.cat(moments.norms, 1).double() if moments.norms else torch.zeros(len(layers), 0)
    q = norms.quantile(torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=1)
    pad = lambda t: torch.cat([t, torch.tensor([float("nan")], dtype=t.dtype)]).numpy()  # noqa: E731
    n = max(centred.n, 1)
    cos_mean = centred.sum / n
    return pd.DataFrame({
        "layer": layers,
        "norm_mean": norms.mean(1).numpy(),
        "norm_std": norms.std(1, unbiased=False).numpy(),
        "norm_min": norms.min(1).values.numpy(),
        "norm_q05": q[0].numpy(),
        "norm_q50": q[1].numpy(),
        "norm_q95": q[2].numpy(),
        "norm_max": norms.max(1).values.numpy(),
        "mean_norm": moments.mean.norm(dim=-1).numpy(),
        "cos_next": pad(cos_mean),
        "cos_next_std": pad((centred.sum_sq / n - cos_mean**2).clamp_min(0).sqrt()),
        "cos_next_raw": pad(moments.cos_raw / max(moments.n, 1)),
    })


@torch.no_grad()
def resid_stats(transformer: Transformer, chunks: Tensor, layers: list[int], batch_size: int = 4,
                precision: str = "auto", rule: PositionRule = PositionRule(),
                lens: TunedLens | None = None) -> tuple[pd.DataFrame, int]:
    """The per-layer table of the module docstring and the token count, from two passes over ``chunks``
    (with ``lens``, the cosines of the translated residuals too, from the same passes)."""
    device = transformer.device
    autocast = precision_autocast(precision, device)
    spaces = {"": lambda x: x}
    if lens is not None:
        weight, bias = (t.to(device) for t in lens.rows_of(layers))
        spaces["_lens"] = lambda x: translate(x, weight, bias)

    def batches(desc: str):
        for start in tqdm(range(0, len(chunks), batch_size), desc=desc, unit="batch"):
            ids = chunks[start : start + batch_size].to(device)
            with autocast:
                acts = transformer.residuals(ids, layers)
            special = transformer.special_mask(ids)
            yield acts, special, rule.keep(special, acts)

    with transformer.weights_for(precision):  # both passes
        moments = {suffix: ResidMoments(len(layers), transformer.d_model) for suffix in spaces}
        first = FirstPosition(len(layers))
        for acts, special, keep in batches("resid: means"):
            for suffix, space in spaces.items():
                moments[suffix].update(space(acts[:, keep].float()))
            first.update(acts, special)
        centred = {suffix: CentredCosines(m.mean) for suffix, m in moments.items()}
        for acts, _, keep in batches("resid: cosines"):
            for suffix, space in spaces.items():
                centred[suffix].update(space(acts[:, keep].float()))
    df = frame(layers, moments[""], centred[""])
    for name, values in first.columns().items():
        df[name] = values.numpy()
    if lens is not None:
        lensed = frame(layers, moments["_lens"], centred["_lens"])
        for name in ("cos_next", "cos_next_std", "cos_next_raw"):
            df[f"{name}_lens"] = lensed[name]
    return df, moments[""].n


@dataclass
class ResidOptions:
    model_name: str = DEFAULT_MODEL
    """Transformer: hub id, local folder or .gguf file."""
    layers: list[int] | None = flag(default=None, nargs="*")
    """Layers to read (default: all); cosines compare each with the next one listed."""
    data: DataOptions = field(default_factory=DataOptions)
    """Held-out data."""
    positions: PositionRule = field(default_factory=PositionRule)
    """Which positions are left out (as an MLSAE trained with the same rule would see the data)."""
    tuned_lens: str | None = None
    """A tuned lens (folder or lens.safetensors): also the cosines of the translated residuals."""
    out_dir: str | None = None
    """Output folder (default: out/analysis/<model name>)."""


def run(cfg: ResidOptions) -> tuple[pd.DataFrame, dict]:
    """Compute and write ``resid.csv`` and ``resid.json``; returns the table and the summary."""
    device = pick_device(cfg.data.device)
    transformer = Transformer(*load_transformer(cfg.model_name, device=device))
    layers = transformer._check_layers(cfg.layers)
    d = cfg.data
    chunks = load_chunks(d.path, d.split, transformer.tokenizer, d.max_length, max_tokens=d.max_tokens)
    lens = TunedLens.load(cfg.tuned_lens) if cfg.tuned_lens else None
    df, tokens = resid_stats(transformer, chunks, layers, d.batch_size, d.precision, cfg.positions, lens)
    out = output_dir(cfg.out_dir, cfg.model_name)
    with atomic_path(out / "resid.csv") as tmp:
        df.to_csv(tmp, index=False)
    summary = {"cos_next_mean": df["cos_next"].mean(), "cos_next_raw_mean": df["cos_next_raw"].mean(), "tokens": tokens,
               **({"cos_next_lens_mean": df["cos_next_lens"].mean()} if lens is not None else {}),
               "positions": cfg.positions.describe(),
               "layers": layers, "config": config_dict(cfg)}
    write_json(out / "resid.json", summary)
    return df, summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse(ResidOptions, argv, __doc__.split("\n\n")[0])
    df, _ = run(cfg)
    print(df.to_string(index=False))
    print(output_dir(cfg.out_dir, cfg.model_name) / "resid.csv")


if __name__ == "__main__":
    run_cli(main)
