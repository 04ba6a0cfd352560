"""Latent cards, dashboards with the layer dimension: ``python -m mlsae.analysis.cards --sae R --latents 1 2``.

A card shows one latent f of an MLSAE:

- its layer distribution p(l | f) and mean layer (``dists``);
- its activation histogram at each layer: held-out tokens (kept by the position rule) at which f
  is active above ``dead_threshold`` per log-spaced activation bin (``histograms``, from the same
  analysis pass; a row sums to ``dists.counts[l, f]``);
- its strongest contexts at the layers where most of its activation is (``examples``);
- its direct logit effect: the final norm and the LM head applied to its decoder direction alone,
  minus the same applied to a zero vector (a norm's bias), so the tokens it promotes and suppresses
  when it is written into the residual stream, ignoring every later block. It is the same at every
  layer (one decoder); for a tuned-lens MLSAE the direction is in the lens's final-layer basis,
  where the LM head reads.

``histograms.safetensors`` holds ``counts`` int32 ``[L, F, B]`` and ``edges`` float32 ``[B + 1]``
(the first bin also counts activations below ``edges[0]``, the last those above ``edges[-1]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlsae.analysis.common import load_pair, output_dir, parse
from mlsae.analysis.dists import Dists
from mlsae.analysis.stream import Batch
from mlsae.explorer.core import Logit, logit_items
from mlsae.formats import sae_name
from mlsae.model import MLSAE
from mlsae.transformer import Transformer
from mlsae.utils import MLSAEError, atomic_path, atomic_write_text, check_out_dir, run_cli, sae_option

EDGES = torch.logspace(-2, 2, 25)  # 24 bins, six per decade from 0.01 to 100
FILE = "histograms.safetensors"


class HistogramsAccumulator:
    """Per (layer, latent), how many tokens fall in each activation bin (int64 while counting)."""

    def __init__(self, n_layers: int, n_latents: int, dead_threshold: float, device: torch.device | str = "cpu"):
        self.edges = EDGES.to(device)
        self.n_bins = len(EDGES) - 1
        self.counts = torch.zeros(n_layers * n_latents * self.n_bins, dtype=torch.long, device=device)
        self.shape = (n_layers, n_latents, self.n_bins)
        self.dead_threshold = dead_threshold

    def update(self, batch: Batch) -> None:
        values, indices = batch.topk
        L, F, B = self.shape
        values, indices = values.float().reshape(L, -1), indices.reshape(L, -1)
        active = values > self.dead_threshold
        bins = torch.bucketize(values[active], self.edges[1:-1])
        rows = (torch.arange(L, device=values.device)[:, None] * F + indices)[active]
        self.counts.scatter_add_(0, rows * B + bins, torch.ones_like(bins))

    def result(self, layers: list[int], tokens: int = 0) -> Histograms:
        return Histograms(self.counts.view(self.shape).int().cpu(), self.edges.cpu(), layers, tokens)


@dataclass
class Histograms:
    counts: Tensor  # [L, F, B]
    edges: Tensor  # [B + 1]
    layers: list[int]
    tokens: int = 0

    def save(self, out: Path) -> Path:
        header = {"layers": json.dumps(self.layers), "tokens": str(self.tokens)}
        with atomic_path(out / FILE) as tmp:
            save_file({"counts": self.counts.contiguous(), "edges": self.edges.contiguous()}, tmp, metadata=header)
        return out / FILE

    @classmethod
    def load(cls, path: str | Path) -> Histograms:
        path = Path(path)
        path = path / FILE if path.is_dir() else path
        if not path.is_file():
            raise MLSAEError(f"no histograms at {path}: run python -m mlsae.analysis.run first")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            counts, edges = f.get_tensor("counts"), f.get_tensor("edges")
        return cls(counts, edges, json.loads(meta.get("layers", "[]")), int(meta.get("tokens", 0)))


@dataclass
class LatentCard:
    """What one card shows (see the module docstring); parts the analysis folder lacks are None."""

    latent: int
    layers: list[int]  # transformer layer of each index
    promoted: list[Logit]  # direct logit effect, largest first
    suppressed: list[Logit]  # most negative first
    probs: Tensor | None = None  # [L] p(l | f)
    counts: Tensor | None = None  # [L] tokens active at each layer
    layer_mean: float | None = None  # in layer-index units
    layer_std: float | None = None
    tokens: int = 0  # held-out tokens the statistics were counted over
    hist: Tensor | None = None  # [L, B]
    edges: Tensor | None = None  # [B + 1]
    contexts: dict[int, pd.DataFrame] = field(default_factory=dict)  # layer -> top examples (with ``tokens``)
    missing: list[str] = field(default_factory=list)  # what the analysis folder did not hold


class Cards:
    """Builds cards of one MLSAE from its analysis folder (dists, histograms, examples; each optional)."""

    def __init__(self, sae: MLSAE, transformer: Transformer, folder: str | Path | None = None, examples=None):
        self.sae, self.transformer = sae, transformer
        self.missing: list[str] = [] if folder is not None else ["the analysis pass (no analysis folder)"]
        self.dists = self._load("layer distributions", lambda: Dists.load(folder), folder)
        self.hists = self._load("activation histograms", lambda: Histograms.load(folder), folder)
        if examples is None:
            from mlsae.analysis.examples import load_examples

            examples = self._load("examples", lambda: load_examples(folder), folder)
        self.examples = examples

    def _load(self, what: str, load, folder):
        try:
            return load() if folder is not None else None
        except MLSAEError:
            self.missing.append(what)
            return None

    def card(self, latent: int, *, n_layers: int = 3, n_examples: int = 5, n_logits: int = 10) -> LatentCard:
        """The card of ``latent``: contexts at (up to) the ``n_layers`` layers holding most of its activation."""
        latent = int(latent)
        if not 0 <= latent < self.sae.config.n_latents:
            raise MLSAEError(f"latent {latent} is out of range: this MLSAE has latents 0..{self.sae.config.n_latents - 1}")
        effect = direct_logit_effect(self.sae, self.transformer, [latent])[0]
        card = LatentCard(latent, self.layers, *self._logits(effect, n_logits), missing=list(self.missing))
        if self.dists is not None:
            d = self.dists
            card.probs, card.counts, card.tokens = d.probs[:, latent], d.counts[:, latent], d.tokens
            card.layer_mean, card.layer_std = float(d.layer_mean[latent]), float(d.layer_std[latent])
        if self.hists is not None:
            card.hist, card.edges = self.hists.counts[:, latent], self.hists.edges
        if self.examples is not None:
            for index in self._context_layers(card, n_layers):
                layer = self.layers[index]
                df = self.examples.top(latent, layer, n_examples)
                if len(df):
                    card.contexts[layer] = df
        return card

    @property
    def layers(self) -> list[int]:
        layers = self.sae.config.layers
        return list(layers) if layers else list(range(self.sae.config.n_layers))

    def _context_layers(self, card: LatentCard, n: int) -> list[int]:
        """Layer indices (in order) of the ``n`` with the most activation; all layers without dists."""
        if card.probs is None:
            return list(range(len(self.layers)))[:n]
        mass = torch.nan_to_num(card.probs, nan=0.0)
        top = [int(i) for i in mass.argsort(descending=True)[:n] if mass[i] > 0]
        return sorted(top)

    def _logits(self, effect: Tensor, n: int) -> tuple[list[Logit], list[Logit]]:
        up, down = effect.topk(n), effect.topk(n, largest=False)
        tok = self.transformer.tokenizer
        return logit_items(tok, up.indices, up.values), logit_items(tok, down.indices, down.values)


@torch.no_grad()
def direct_logit_effect(sae: MLSAE, transformer: Transformer, latents: list[int]) -> Tensor:
    """``[len(latents), vocab]``: the final norm and LM head on each decoder direction, minus on zero."""
    head, norm = transformer.lm_head, transformer.final_norm
    p = next(head.parameters())
    x = torch.cat([sae.W_dec[latents].detach(), torch.zeros(1, sae.config.n_inputs, device=sae.W_dec.device)])
    x = x.to(p.device, p.dtype)
    logits = head(norm(x) if norm is not None else x).float()
    return logits[:-1] - logits[-1:]


def cards_page(cards: list[LatentCard], tokenizer, title: str) -> str:
    """A standalone HTML page of cards (no scripts, no network)."""
    from mlsae.explorer.figures import card_html

    body = "".join(card_html(c, tokenizer) for c in cards)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body style='font-family:system-ui,sans-serif;margin:16px'><h2>{title}</h2>{body}</body></html>")


# ----------------------------------------------------------------------------------------------
# CLI


@dataclass
class CardsOptions:
    sae: str = sae_option()
    latents: list[int] = field(default_factory=list)
    """Latents to show (at least one)."""
    analysis_dir: str | None = None
    """Folder of the MLSAE's analysis pass (default: out/analysis/<MLSAE name>); without one the cards
    show the direct logit effect only."""
    out: str = "cards.html"
    """The HTML page to write."""
    n_layers: int = 3
    """Contexts are shown at this many layers (those with the most activation)."""
    n_examples: int = 5
    """Contexts shown per layer."""
    device: str = "auto"


def main(argv: list[str] | None = None) -> None:
    cfg = parse(CardsOptions, argv, __doc__.split("\n\n")[0])
    if not cfg.latents:
        raise MLSAEError("name the latents to show: --latents 3 17 ...")
    check_out_dir(Path(cfg.out).parent)
    sae, transformer, _ = load_pair(cfg.sae, device=cfg.device)
    folder = Path(cfg.analysis_dir) if cfg.analysis_dir else output_dir(None, cfg.sae)
    if cfg.analysis_dir and not folder.is_dir():
        raise MLSAEError(f"--analysis_dir {folder} is not a folder")
    source = Cards(sae, transformer, folder if folder.is_dir() else None)
    cards = [source.card(f, n_layers=cfg.n_layers, n_examples=cfg.n_examples) for f in cfg.latents]
    atomic_write_text(Path(cfg.out), cards_page(cards, transformer.tokenizer, f"Latent cards of {sae_name(cfg.sae)}"))
    print(cfg.out)


if __name__ == "__main__":
    run_cli(main)
