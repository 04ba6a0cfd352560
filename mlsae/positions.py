"""Which positions of a sequence an MLSAE leaves out of its data: one rule for training,
evaluation, every analysis and the explorer, recorded in the MLSAE's config.

Why: a model's first position is often an attention sink whose residual vector is orders of
magnitude larger than the rest. On SmolLM2-135M its norm is about 24,000 at layers 11-27
against about 133 elsewhere, and it holds 99% of those layers' variance while being 1 token in
256: an SAE trained on it spends its capacity on one position, and an FVU computed with it
measures that position almost alone. Special tokens (BOS, EOS, PAD) are left out for the same
kind of reason, as in the reference implementation.

A position is left out when any of these holds:

- it holds a special token (``skip_special_tokens``);
- it is one of the first ``skip_first`` positions of its sequence (1 = the attention sink);
- ``max_norm_ratio`` is set and, at some layer read, its residual norm exceeds ``max_norm_ratio``
  times that layer's median norm over the batch's positions not already left out (a data-driven
  sink detector for models whose sinks are not at a fixed place).

Left-out positions stay in the sequence (the transformer sees them; they are context for the
examples) but are never encoded, never counted in a metric, and are left untouched when a
reconstruction is spliced into the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mlsae.utils import MLSAEError

if TYPE_CHECKING:
    from mlsae.transformer import Transformer


@dataclass(frozen=True)
class PositionRule:
    skip_special_tokens: bool = True
    skip_first: int = 1
    max_norm_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.skip_first < 0:
            raise MLSAEError(f"skip_first must be 0 or more, got {self.skip_first}")
        if self.max_norm_ratio is not None and self.max_norm_ratio <= 1:
            raise MLSAEError(f"max_norm_ratio must be above 1 (a multiple of the median norm), got {self.max_norm_ratio}")

    @property
    def needs_residuals(self) -> bool:
        return self.max_norm_ratio is not None

    def describe(self) -> str:
        parts = (["special tokens"] if self.skip_special_tokens else []) + (
            [f"the first {self.skip_first} position(s)"] if self.skip_first else []) + (
            [f"norms above {self.max_norm_ratio:g}x the layer's median"] if self.max_norm_ratio else [])
        return "left out: " + (", ".join(parts) if parts else "nothing")

    def keep(self, special: Tensor, acts: Tensor | None = None) -> Tensor:
        """Bool ``[B, P]``: positions kept, from the special-token mask ``[B, P]`` and, for the
        norm rule, the residuals ``[L, B, P, d]`` of the layers read."""
        keep = ~special if self.skip_special_tokens else torch.ones_like(special)
        if self.skip_first:
            keep[:, : self.skip_first] = False
        if self.max_norm_ratio is not None:
            if acts is None:
                raise ValueError("the norm rule needs the residuals")
            keep &= ~self._outliers(acts.float().norm(dim=-1), keep)
        return keep

    def _outliers(self, norms: Tensor, keep: Tensor) -> Tensor:
        """Positions whose norm exceeds the ratio times their layer's median at any layer."""
        if not keep.any():
            return torch.zeros_like(keep)
        medians = torch.stack([layer[keep].median() for layer in norms])  # [L]
        return (norms > self.max_norm_ratio * medians[:, None, None]).any(0)


@dataclass
class Residuals:
    """One batch's residual vectors and the positions an MLSAE's rule keeps."""

    acts: Tensor  # [L, B, P, d] every position, in the transformer's dtype
    keep: Tensor  # [B, P] bool
    logits: Tensor | None = None  # [B, P, V] clean logits, when asked for

    @property
    def kept(self) -> Tensor:
        """``[L, N, d]`` float32: the kept positions, the MLSAE's input."""
        return self.kept_in(slice(None))

    def kept_in(self, sequences: slice) -> Tensor:
        """``kept`` of some of the batch's sequences."""
        return self.acts[:, sequences][:, self.keep[sequences]].float()


def read_residuals(transformer: Transformer, ids: Tensor, layers: Sequence[int], rule: PositionRule, *,
                   logits: bool = False) -> Residuals:
    """The residuals of ``layers`` at every position of ``ids [B, P]`` and which ones ``rule`` keeps:
    the one way training, evaluation, the analyses and the explorer read an MLSAE's data."""
    if logits:
        acts, out = transformer.run_with_residuals(ids, list(layers))
    else:
        acts, out = transformer.residuals(ids, list(layers)), None
    return Residuals(acts, rule.keep(transformer.special_mask(ids), acts), out)


def rule_of(config) -> PositionRule:
    """The rule recorded in an ``SAEConfig`` (or any object with the three fields)."""
    return PositionRule(config.skip_special_tokens, config.skip_first, config.max_norm_ratio)
