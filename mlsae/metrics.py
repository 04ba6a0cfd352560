"""Evaluation metrics, accumulated exactly over many batches (float64 sums, no per-batch averaging).

Definitions (per layer l; "avg" columns average over layers):
- FVU: sum of squared reconstruction errors / sum of squared deviations of the inputs from
  their mean (one scalar mean over all elements of layer l, as in the reference).
- centred FVU: the same errors / sum of squared deviations from the layer's mean vector (one
  mean per feature). Where every token shares a large constant direction (Gemma's residual
  stream: the norm of the mean vector is most of every vector's norm), the reference's FVU counts
  that direction as variance explained; the centred FVU does not.
- MSE: mean squared reconstruction error per element.
- L0: mean number of latents per vector with activation > dead_threshold (at most k).
- L1: mean sum of latent activations per vector.
- dead: fraction of latents that never fired (activation > dead_threshold) in the window.
- delta CE: next-token cross-entropy with layer l's output replaced by its reconstruction,
  minus the clean cross-entropy (nats per token).
- KL: KL(p_clean || p_spliced) of the next-token distributions, mean per token (nats). (The
  reference summed KL(p_spliced || p_clean) over positions; we use the usual direction, per token.)
- logit MSE: mean squared difference between clean and spliced logits per element.
- excluded: positions the MLSAE's position rule left out (``mlsae.positions``), as a count and a
  share of all positions read, and per layer their share of the layer's variance over all
  positions (their squared deviations from the layer's mean, as in FVU's denominator, over the
  total); every other metric is over the kept positions only.
- zero CE: cross-entropy with layer l's output replaced by zeros (the scale of delta CE);
  CE recovered = (zero CE - spliced CE) / (zero CE - clean CE).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mlsae.kernels import TopK


def fvu(x: Tensor, recon: Tensor) -> Tensor:
    """FVU per leading index of ``x [L, ..., d]``: MSE over the variance of all elements of that slice."""
    dims = tuple(range(1, x.ndim))
    return (recon - x).pow(2).mean(dims) / x.var(dims, unbiased=False)


# Positions per chunk of the vocabulary-wide passes below: a chunk's fp32 logits (16 x 49k) stay in
# cache, where whole-batch ops stream [B, P, V] temporaries through memory (measured 3-6x slower).
ROWS = 16


def _chunks(n: int):
    return ((r, min(r + ROWS, n)) for r in range(0, n, ROWS))


def _next_token_nll(lse: Tensor, logits: Tensor, ids: Tensor) -> Tensor:
    """``-log softmax(logits)[next token]`` per predicted position ``[B, P-1]``, from the log-sum-exp ``[B, P]``."""
    return lse[:, :-1] - logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).float()


def cross_entropy(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy per predicted position ``[B, P-1]``."""
    flat = logits.reshape(-1, logits.shape[-1])
    lse = torch.cat([torch.logsumexp(flat[a:b].float(), -1) for a, b in _chunks(len(flat))])
    return _next_token_nll(lse.view(logits.shape[:-1]), logits, ids)

class ReconstructionMetrics:
    """Accumulates FVU, MSE, L0 and L1 per layer; dead latents from where latents fired (counted by the
    caller's ``mlsae.analysis.dists.DistsAccumulator``, which the evaluation keeps anyway)."""

    def __init__(self, n_layers: int, dead_threshold: float):
        z = lambda: torch.zeros(n_layers, dtype=torch.float64)  # noqa: E731
        self.sse, self.sum, self.sum_sq, self.elements = z(), z(), z(), z()
        self.l0, self.l1, self.vectors = z(), z(), z()
        self.feature_sum: Tensor | None = None  # [L, d], for the centred FVU's per-feature means
        self.dead_threshold = dead_threshold

    @torch.no_grad()
    def update(self, x: Tensor, recon: Tensor, topk: TopK) -> None:
        """``x, recon [L, N, d]``; ``topk [L, N, k]``."""
        x, recon = x.double(), recon.double()
        self.sse += (recon - x).pow(2).sum((1, 2)).cpu()
        self.sum += x.sum((1, 2)).cpu()
        feature_sum = x.sum(1).cpu()
        self.feature_sum = feature_sum if self.feature_sum is None else self.feature_sum + feature_sum
        self.sum_sq += x.pow(2).sum((1, 2)).cpu()
        self.elements += x[0].numel()
        active = topk.values > self.dead_threshold
        self.l0 += active.sum((1, 2)).double().cpu()
        self.l1 += topk.values.double().sum((1, 2)).cpu()
        self.vectors += x.shape[1]

    def compute(self, fired: Tensor) -> dict[str, Tensor]:
        """The metrics per layer; ``fired [L, F]``: whether each latent fired at each layer."""
        mean_sq = self.sum_sq / self.elements
        var = mean_sq - (self.sum / self.elements) ** 2
        centred_var = mean_sq - (self.feature_sum / self.vectors[:, None]).pow(2).mean(1)
        mse = self.sse / self.elements
        fired = fired.cpu()
        dead = (~fired).double().mean(1)
        return {
            "fvu": mse / var,
            "fvu_centred": mse / centred_var,
            "mse": mse,
            "l0": self.l0 / self.vectors,
            "l1": self.l1 / self.vectors,
            "dead": dead,
            "dead_overall": (~fired.any(0)).double().mean(),
        }


class CleanLogits(NamedTuple):
    """A batch's clean next-token distributions, computed once and compared with every spliced one."""

    logits: Tensor  # [N, V] float32, N = batch x positions
    probs: Tensor  # [N, V] float32
    lse: Tensor  # [N] log-sum-exp of the logits
    mass: Tensor  # [N] sum of probs: 1 up to rounding, kept so that the KL below is exact

    @classmethod
    def of(cls, logits: Tensor) -> CleanLogits:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        probs, lse = torch.empty_like(flat), flat.new_empty(len(flat))
        for a, b in _chunks(len(flat)):
            lse[a:b] = torch.logsumexp(flat[a:b], -1)
            torch.exp(flat[a:b] - lse[a:b, None], out=probs[a:b])
        return cls(flat, probs, lse, probs.sum(-1))


@torch.no_grad()
def compare(clean: CleanLogits, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``logits [..., V]`` against the clean ones, per position (flattened): their log-sum-exp ``[N]``,
    KL(p_clean || p) ``[N]``, and the summed squared logit difference (float64), in one read.

    With d = logits - clean logits, KL = (lse(logits) - lse(clean)) * sum(p_clean) - sum(p_clean * d),
    so no log-softmax of ``logits`` is ever stored."""
    flat = logits.reshape(-1, logits.shape[-1])
    lse, kl = clean.lse.new_empty(len(flat)), clean.lse.new_empty(len(flat))
    sse = torch.zeros((), dtype=torch.float64, device=flat.device)
    for a, b in _chunks(len(flat)):
        d = flat[a:b].to(torch.float32, copy=True)  # a copy: d is computed in place
        lse[a:b] = torch.logsumexp(d, -1)
        d.sub_(clean.logits[a:b])
        kl[a:b] = (lse[a:b] - clean.lse[a:b]) * clean.mass[a:b] - (clean.probs[a:b] * d).sum(-1)
        sse += d.view(-1).dot(d.view(-1)).double()
    return lse, kl, sse


class DownstreamMetrics:
    """Accumulates clean, spliced and zero-ablated cross-entropy, KL and logit MSE per layer.

    Each spliced batch is read once, in cache-sized chunks of positions (``compare``). Without
    ``update_zero`` there is no CE recovered.
    """

    def __init__(self, n_layers: int):
        z = lambda: torch.zeros(n_layers, dtype=torch.float64)  # noqa: E731
        self.ce_spliced, self.ce_zero, self.kl, self.logit_sse = z(), z(), z(), z()
        self.ce_clean = torch.zeros((), dtype=torch.float64)
        self.tokens = 0  # predicted next tokens (CE)
        self.positions = 0  # positions (KL)
        self.logit_elements = 0
        self.zero_layers = 0
        self._clean: CleanLogits | None = None

    @torch.no_grad()
    def update_clean(self, logits: Tensor, ids: Tensor, clean: CleanLogits | None = None) -> None:
        """A batch's clean logits (``clean``: their ``CleanLogits``, if already computed)."""
        self._clean = clean or CleanLogits.of(logits)
        self.ce_clean += _next_token_nll(self._clean.lse.view(ids.shape), logits, ids).double().sum().cpu()
        self.tokens += ids[:, 1:].numel()
        self.positions += ids.numel()
        self.logit_elements += logits.numel()

    @torch.no_grad()
    def update_layer(self, i: int, spliced: Tensor, ids: Tensor) -> None:
        """Layer ``i``'s spliced logits ``[B, P, V]``, after ``update_clean`` of the same batch's."""
        lse, kl, sse = compare(self._clean, spliced)
        self.ce_spliced[i] += _next_token_nll(lse.view(ids.shape), spliced, ids).double().sum().cpu()
        self.kl[i] += kl.double().sum().cpu()
        self.logit_sse[i] += sse.cpu()

    def update_zero(self, i: int, ce_sum: Tensor) -> None:
        """Layer ``i``'s summed cross-entropy with zeros spliced in, for the same batch."""
        self.ce_zero[i] += ce_sum
        self.zero_layers += 1

    def compute(self) -> dict[str, Tensor]:
        clean = self.ce_clean / self.tokens
        spliced = self.ce_spliced / self.tokens
        out = {
            "ce_clean": clean,
            "ce_spliced": spliced,
            "delta_ce": spliced - clean,
            "kl": self.kl / self.positions,
            "logit_mse": self.logit_sse / self.logit_elements,
        }
        if self.zero_layers:
            zero = self.ce_zero / self.tokens
            out.update(ce_zero=zero, ce_recovered=(zero - spliced) / (zero - clean))
        return out


class ExcludedShare:
    """Accumulates how many positions were left out and their share of each layer's variance."""

    def __init__(self, n_layers: int):
        z = lambda: torch.zeros(2, n_layers, dtype=torch.float64)  # noqa: E731  rows: all, left out
        self.sum, self.sum_sq, self.elements = z(), z(), z()
        self.positions, self.excluded = 0, 0

    @torch.no_grad()
    def update(self, acts: Tensor, keep: Tensor) -> None:
        """``acts [L, B, P, d]`` of every position; ``keep [B, P]`` the positions kept."""
        per_sum, per_sq = acts.float().sum(-1).double(), acts.float().pow(2).sum(-1).double()  # [L, B, P]
        out = ~keep
        for row, mask in ((0, torch.ones_like(keep)), (1, out)):
            self.sum[row] += per_sum[:, mask].sum(1).cpu()
            self.sum_sq[row] += per_sq[:, mask].sum(1).cpu()
            self.elements[row] += int(mask.sum()) * acts.shape[-1]
        self.positions += keep.numel()
        self.excluded += int(out.sum())

    def compute(self) -> dict[str, Tensor]:
        mean = self.sum[0] / self.elements[0]
        sq_dev = self.sum_sq - 2 * mean * self.sum + self.elements * mean**2  # about the all-positions mean
        return {
            "excluded_variance": sq_dev[1] / sq_dev[0],
            "excluded_tokens": torch.tensor(float(self.excluded)),
            "excluded_share": torch.tensor(self.excluded / max(self.positions, 1)),
        }
