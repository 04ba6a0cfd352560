"""The Multi-Layer SAE: one TopK sparse autoencoder shared by the residual streams of many layers.

Every residual vector (of any layer) is encoded on its own: optionally standardized per
token, shifted by a pre-encoder bias, encoded with TopK then ReLU, decoded sparsely and
de-standardized. A per-layer SAE (the paper's baseline) is the same module with one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from mlsae.kernels import (Standardized, TopK, auxk_sq_error, project_rows_, scaled_error, sparse_decode, standardize,
                           topk_encode)
from mlsae.positions import PositionRule, rule_of
from mlsae.utils import MLSAEError

if TYPE_CHECKING:
    from mlsae.lens import TunedLens

STD_EPS = 1e-5  # added to the per-token std, as in the reference


@dataclass(kw_only=True)
class SAEOptions:
    """How an MLSAE learns and which positions it sees, beyond its size: declared once, for the
    saved ``SAEConfig`` and for ``mlsae.train``'s flags (the reference's names)."""

    auxk: int = 256
    """Dead latents in the auxiliary TopK loss (0 disables AuxK)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens_threshold: int = 100_000
    """A latent is dead once it has not fired for this many tokens (the reference: 10,000,000, for
    runs of a billion tokens)."""
    dead_threshold: float = 1e-3
    """Activation above which a latent counts as having fired (also the L0 threshold)."""
    standardize: bool = True
    """Standardize each input vector over its features (and de-standardize the reconstruction)."""
    skip_special_tokens: bool = PositionRule.skip_special_tokens
    """Leave positions holding special tokens (BOS, EOS, PAD) out of the data (mlsae.positions)."""
    skip_first: int = PositionRule.skip_first
    """Leave the first positions of every sequence out of the data (1 = the attention sink; 0 = none)."""
    max_norm_ratio: float | None = PositionRule.max_norm_ratio
    """Also leave out positions whose norm at some layer exceeds this multiple of the layer's median
    (None: off)."""

    def __post_init__(self) -> None:
        if self.auxk < 0:
            raise MLSAEError(f"auxk must be 0 (off) or positive, got {self.auxk}")
        rule_of(self)  # validates the position rule

    @property
    def positions(self) -> PositionRule:
        """Which positions are left out of the data (the same rule everywhere the MLSAE is used)."""
        return rule_of(self)

    def sae_options(self) -> dict:
        """These options alone, as keyword arguments (of ``SAEConfig``)."""
        return {f.name: getattr(self, f.name) for f in fields(SAEOptions)}


@dataclass
class SAEConfig(SAEOptions):
    """What defines an MLSAE; saved as config.json beside model.safetensors."""

    n_inputs: int
    """Size of each input vector (the transformer's d_model)."""
    n_latents: int
    """Number of latents (d_model x expansion factor)."""
    k: int = 32
    """Number of latents kept per vector (TopK)."""
    n_layers: int = 1
    """Number of transformer layers it reads (dead-latent statistics are kept per layer)."""
    layers: list[int] | None = None
    """The transformer layers it was trained on (None = all)."""
    model_name: str | None = None
    """The transformer it was trained on."""
    tuned_lens: bool = False
    """It reads residuals translated by a tuned lens (mlsae.lens) into the final layer's basis, and
    maps its reconstructions back; the translators are stored with its weights (lens_weight, lens_bias)."""
    format_version: int = 2
    """Version of this config/weights layout (2: the position rule is recorded)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_inputs < 1 or self.n_latents < 1:
            raise MLSAEError(f"n_inputs and n_latents must be positive, got {self.n_inputs}, {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise MLSAEError(f"k must be between 1 and the number of latents ({self.n_latents}), got {self.k}")
        if self.layers is not None and len(self.layers) != self.n_layers:
            raise MLSAEError(f"layers {self.layers} does not match n_layers={self.n_layers}")


class Loss(NamedTuple):
    loss: Tensor  # the objective: mean over layers of FVU, plus the weighted AuxK loss
    fvu: Tensor  # [L] per-layer fraction of variance unexplained in this batch (detached)
    auxk_loss: Tensor  # AuxK loss before its coefficient (differentiable, for tests)
    topk: TopK  # [L, N, k]
    recon: Tensor  # [L, N, d] (detached)


class MLSAE(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mlsae",
    tags=["mlsae", "sparse-autoencoder", "interpretability"],
    paper_url="https://arxiv.org/abs/2409.04185",
):
    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        d, n = config.n_inputs, config.n_latents
        W_enc = torch.empty(n, d)
        nn.init.kaiming_uniform_(W_enc, a=math.sqrt(5))  # nn.Linear's default init
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_enc.clone())  # rows are latents' decoder directions
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.normalize_decoder()
        # Tokens since each latent last fired, per layer; "dead" overall = silent at every layer.
        self.register_buffer("tokens_since_fired", torch.zeros(config.n_layers, n, dtype=torch.long))
        if config.tuned_lens:  # buffers, not parameters: the lens is fitted beforehand and stays fixed
            self.register_buffer("lens_weight", torch.zeros(config.n_layers, d, d))
            self.register_buffer("lens_bias", torch.zeros(config.n_layers, d))

    # ----- the space it works in -----

    def set_lens(self, lens: TunedLens) -> None:
        """Use ``lens``'s translators of this MLSAE's layers (every layer when ``config.layers`` is None)."""
        if not self.config.tuned_lens:
            raise MLSAEError("this MLSAE was made without a tuned lens (SAEConfig.tuned_lens)")
        weight, bias = lens.rows_of(self.config.layers or list(range(self.config.n_layers)))
        self.lens_weight.copy_(weight)
        self.lens_bias.copy_(bias)

    def to_sae_space(self, x: Tensor, rows: slice = slice(None)) -> Tensor:
        """Raw residuals ``[L, ..., d]`` (of its layers, or of the layers ``rows``) as the SAE reads them:
        through the tuned lens where it has one, else as they are."""
        if not self.config.tuned_lens:
            return x
        from mlsae.lens import translate  # here, not above: python -m mlsae.lens would import it twice

        return translate(x, self.lens_weight[rows], self.lens_bias[rows])

    def from_sae_space(self, y: Tensor, rows: slice = slice(None)) -> Tensor:
        """The inverse of ``to_sae_space``: reconstructions ``[L, ..., d]`` back in the raw residual space."""
        if not self.config.tuned_lens:
            return y
        from mlsae.lens import inverse

        return inverse(y, self.lens_weight[rows], self.lens_bias[rows])

    # ----- the autoencoder -----

    def standardize(self, x: Tensor) -> Standardized:
        if not self.config.standardize:
            return Standardized(x, 0.0, 1.0)
        return standardize(x, STD_EPS)[0]

    def encode(self, x: Tensor) -> TopK:
        """Latents of raw input vectors ``[..., d]`` (``[L, ..., d]`` with a tuned lens): TopK values
        (after ReLU) and indices ``[..., k]``."""
        return self.encode_standardized(self.standardize(self.to_sae_space(x)).x)

    def encode_standardized(self, z: Tensor) -> TopK:
        """Latents of vectors already standardized by ``standardize`` (its ``.x``)."""
        topk = topk_encode((z - self.b_pre).reshape(-1, z.shape[-1]), self.W_enc, self.config.k)
        return topk.reshape(*z.shape[:-1])

    def decode(self, topk: TopK, standardized: Standardized | None = None) -> Tensor:
        """Reconstruct from latents; de-standardize with the input's own mean and scale when given."""
        z = sparse_decode(topk, self.W_dec) + self.b_pre
        if standardized is None:
            return z
        return z * standardized.scale + standardized.mean

    def forward(self, x: Tensor) -> tuple[Tensor, TopK]:
        """Reconstruction and latents of raw input vectors ``[..., d]`` (``[L, ..., d]`` with a tuned lens)."""
        s = self.standardize(self.to_sae_space(x))
        topk = self.encode_standardized(s.x)
        return self.from_sae_space(self.decode(topk, s)), topk

    def loss(self, x: Tensor) -> Loss:
        """The training objective on ``x [L, N, d]`` (layer, vector, feature), in fp32.

        FVU per layer = MSE / variance of that layer's inputs (one scalar mean), averaged over
        layers, in the raw activation space. AuxK reconstructs the detached residual from the
        top ``auxk`` dead latents; both sides live in the raw space (the decoded residual is
        scaled by the per-token std, with no bias or mean), and its gradient reaches the encoder.
        """
        cfg = self.config
        L, N, d = x.shape
        x = self.to_sae_space(x.float()).reshape(L * N, d)  # with a tuned lens, FVU is in its space
        low = None  # the encoder's bf16 input, when the standardizing pass can make it too
        if cfg.standardize:
            s, sq_norm, low = standardize(x, STD_EPS, shift=self.b_pre.detach())
            scale, variance = s.scale, _layer_variance(s.mean, sq_norm, L, d)
        else:
            s, scale = Standardized(x, 0.0, 1.0), torch.ones(L * N, 1, device=x.device)
            variance = torch.stack([part.var(unbiased=False) for part in x.view(L, -1)])
        topk = topk_encode(s.x, self.W_enc, cfg.k, b=self.b_pre, x_low=low)
        mse, error, recon = scaled_error(sparse_decode(topk, self.W_dec), self.b_pre, s.x, scale, x, L)
        fvu = mse / variance.clamp_min(1e-12)
        loss = fvu.mean()
        auxk_loss = torch.zeros((), device=x.device)
        dead = self.dead_mask() if cfg.auxk else None
        if dead is not None and bool(dead.any()):  # the dead latents reconstruct x - recon = -error (detached)
            sq = mse.detach().sum() * (error.numel() // L)  # sum(error^2), from the per-layer MSE
            aux_sq = sq + auxk_sq_error(s.x, error, scale, self.W_enc, self.W_dec, self.b_pre, dead, cfg.auxk)
            centred = sq / error.numel() - _mean_square(error.mean(0))  # error's variance about its mean
            auxk_loss = torch.nan_to_num(aux_sq / error.numel() / centred.clamp_min(1e-12))
            loss = loss + cfg.auxk_coef * auxk_loss
        recon = recon.reshape(L, N, d)  # x + error = (decoded + b_pre) * scale + mean
        topk = topk.reshape(L, N)
        return Loss(loss, fvu.detach(), auxk_loss, topk, recon)

    # ----- initialisation and constraints -----

    @torch.no_grad()
    def init_pre_bias(self, x: Tensor) -> None:
        """Set the pre-encoder bias to the geometric median of ``x [..., d]`` in the space it is used in."""
        z = self.standardize(self.to_sae_space(x.float()).reshape(-1, x.shape[-1])).x
        self.b_pre.copy_(geometric_median(z))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row, so steps rotate it."""
        if self.W_dec.grad is not None:
            project_rows_(self.W_dec.grad, self.W_dec)

    # ----- dead latents, counted in tokens -----

    @torch.no_grad()
    def fired(self, topk: TopK) -> Tensor:
        """Which latents fired at each layer in ``topk [L, N, k]``: bool ``[L, F]``."""
        L = topk.indices.shape[0]
        active = (topk.values > self.config.dead_threshold).reshape(L, -1)
        out = torch.zeros(L, self.config.n_latents, dtype=torch.long, device=active.device)
        out.scatter_add_(1, topk.indices.reshape(L, -1), active.long())
        return out > 0

    @torch.no_grad()
    def update_dead(self, fired: Tensor, n_tokens: int) -> None:
        """Advance the silence counters by ``n_tokens`` and reset those of latents that fired."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    def dead_mask(self, per_layer: bool = False) -> Tensor:
        """Latents silent for at least ``dead_tokens_threshold`` tokens (overall: at every layer)."""
        counts = self.tokens_since_fired if per_layer else self.tokens_since_fired.min(0).values
        return counts >= self.config.dead_tokens_threshold

    # ----- formats -----

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, map_location: str = "cpu",
                        lens: str | Path | None = None, **hub_kwargs):
        """Load from a local folder or a hub repo id, in this project's or the reference's layout.

        ``lens``: a tuned lens (``mlsae.lens``) for a reference ``-lens`` checkpoint, whose
        translators are not stored with its weights. Replaces the mixin's loader, which would fall
        back to unpickling ``pytorch_model.bin``.
        """
        from mlsae.formats import load

        return load(str(pretrained_model_name_or_path), map_location, lens=lens, **hub_kwargs)


def _mean_square(x: Tensor) -> Tensor:
    """``x.pow(2).mean()`` in one pass each way (the norm's kernel, not an [N, d] square)."""
    return torch.linalg.vector_norm(x).square() / x.numel()


def _layer_variance(mean: Tensor, sq_norm: Tensor, n_layers: int, n_features: int) -> Tensor:
    """Variance of each layer's values (biased, over vectors and features) from per-token statistics.

    Law of total variance: mean within-token variance plus the variance of the token means
    (``mean, sq_norm [L*N, 1]``); no pass over the activations, and no cancellation.
    """
    mean, sq_norm = mean.double().view(n_layers, -1), sq_norm.double().view(n_layers, -1)
    return (sq_norm.mean(1) / n_features + mean.var(1, unbiased=False)).float()


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1 / (x - median).norm(dim=-1).clamp_min(1e-8)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() < tol:
            return new
        median = new
    return median
