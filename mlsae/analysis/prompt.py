"""Which layers each latent is active at for one prompt: ``python -m mlsae.analysis.prompt --sae R --prompt TEXT``.

The paper's prompt heatmaps: a latent's activations at each layer summed over the prompt's
positions (special tokens left out) give ``totals [L, F]``; latents that fired (activation >
dead_threshold at some layer and position) are kept, each normalised over layers (``probs``,
columns sum to 1) and sorted by centre of mass ``sum_l l probs[l]`` (l the MLSAE layer index).
Writes ``prompt.csv`` (long format: latent, layer, total, prob, centre).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from mlsae.analysis.common import load_pair, output_dir, parse
from mlsae.analysis.dists import DistsAccumulator
from mlsae.analysis.stream import encode_batch
from mlsae.model import MLSAE
from mlsae.transformer import Transformer
from mlsae.utils import MLSAEError, atomic_path, run_cli, sae_option


@dataclass
class PromptHeatmap:
    """Latents x layers for one prompt; columns are latents sorted by centre of mass."""

    tokens: list[str]  # the prompt's tokens (special ones included)
    layers: list[int]  # transformer layer of each row
    latents: Tensor  # [n] latent ids
    totals: Tensor  # [L, n] activation summed over positions
    probs: Tensor  # [L, n] totals normalised over layers
    centre: Tensor  # [n] centre of mass in layer index units

    def frame(self) -> pd.DataFrame:
        """Long format: one row per (latent, layer), latents in sorted order."""
        L, n = self.totals.shape
        return pd.DataFrame({
            "latent": self.latents.repeat_interleave(L).numpy(),
            "layer": torch.tensor(self.layers).repeat(n).numpy(),
            "total": self.totals.T.reshape(-1).numpy(),
            "prob": self.probs.T.reshape(-1).numpy(),
            "centre": self.centre.repeat_interleave(L).numpy(),
        })

    def matrix(self) -> pd.DataFrame:
        """``probs`` as a layers x latents table, ready for a heatmap."""
        return pd.DataFrame(self.probs.numpy(), index=self.layers, columns=self.latents.tolist())


def heatmap_from_topk(values: Tensor, indices: Tensor, n_latents: int,
                      threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(latents, totals, probs, centre) from TopK ``values, indices [L, N, k]`` of one prompt's positions."""
    L = values.shape[0]
    acc = DistsAccumulator(L, n_latents, threshold)
    acc.add(values.cpu(), indices.cpu())
    keep = (acc.counts.sum(0) > 0).nonzero().squeeze(1)
    totals = acc.totals[:, keep]
    probs = totals / totals.sum(0)
    centre = (torch.arange(L, dtype=torch.float64)[:, None] * probs).sum(0)
    order = centre.argsort(stable=True)
    return keep[order], totals[:, order].float(), probs[:, order].float(), centre[order].float()


@torch.no_grad()
def prompt_heatmap(sae: MLSAE, transformer: Transformer, prompt: str, layers: list[int] | None = None,
                   precision: str = "fp32") -> PromptHeatmap:
    """The heatmap of ``prompt`` (see the module docstring); ``layers`` defaults to the MLSAE's."""
    layers = layers or list(sae.config.layers or range(transformer.n_layers))
    ids = transformer.tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise MLSAEError("the prompt has no tokens")
    _, topk = encode_batch(sae, transformer, ids, layers, precision)
    latents, totals, probs, centre = heatmap_from_topk(topk.values, topk.indices, sae.config.n_latents,
                                                       sae.config.dead_threshold)
    tokens = transformer.tokenizer.batch_decode([[t] for t in ids[0].tolist()])
    return PromptHeatmap(tokens, layers, latents, totals, probs, centre)


@dataclass
class PromptOptions:
    sae: str = sae_option()
    prompt: str = "The cat sat on the mat."
    """The prompt."""
    model_name: str | None = None
    """Transformer (default: the one named in the MLSAE's config)."""
    precision: str = "fp32"
    """Autocast precision (auto, bf16 or fp32; mlsae.precision)."""
    device: str = "auto"
    """cpu, cuda, or auto."""
    out_dir: str | None = None
    """Output folder (default: out/analysis/<MLSAE name>)."""


def main(argv: list[str] | None = None) -> None:
    cfg = parse(PromptOptions, argv, __doc__.split("\n\n")[0])
    sae, transformer, layers = load_pair(cfg.sae, cfg.model_name, cfg.device)
    heat = prompt_heatmap(sae, transformer, cfg.prompt, layers, cfg.precision)
    out = output_dir(cfg.out_dir, cfg.sae)
    with atomic_path(out / "prompt.csv") as tmp:
        heat.frame().to_csv(tmp, index=False)
    print(f"{len(heat.latents)} latents fired over {len(heat.tokens)} tokens")
    print(out / "prompt.csv")


if __name__ == "__main__":
    run_cli(main)
