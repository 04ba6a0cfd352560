"""The Multi-Layer SAE: one TopK sparse autoencoder shared by the residual streams of many layers.

Every residual vector (of any layer) is encoded on its own: optionally standardized per
token, shifted by a pre-encoder bias, encoded with TopK then ReLU, decoded sparsely and
de-standardized. A per-layer SAE (the paper's baseline) is the same module with one layer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file
from torch import Tensor, nn

from mlsae import native
from mlsae.kernels import TopK, gemm_dtype, sparse_decode, topk_encode
from mlsae.positions import PositionRule, rule_of
from mlsae.utils import MLSAEError

STD_EPS = 1e-5  # added to the per-token std, as in the reference


@dataclass
class SAEConfig:
    """What defines an MLSAE; saved as config.json beside model.safetensors."""

    n_inputs: int
    """Size of each input vector (the transformer's d_model)."""
    n_latents: int
    """Number of latents (d_model x expansion factor)."""
    k: int = 32
    """Number of latents kept per vector (TopK)."""
    auxk: int | None = 256
    """Number of dead latents in the auxiliary TopK loss (None disables AuxK)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens_threshold: int = 10_000_000
    """A latent is dead once it has not fired for this many tokens."""
    dead_threshold: float = 1e-3
    """Activation above which a latent counts as having fired (also the L0 threshold)."""
    standardize: bool = True
    """Standardize each input vector over its features (and de-standardize the reconstruction)."""
    skip_special_tokens: bool = PositionRule.skip_special_tokens
    """Leave positions holding special tokens (BOS, EOS, PAD) out of the data (mlsae.positions)."""
    skip_first: int = PositionRule.skip_first
    """Leave the first positions of every sequence out of the data (1 = the attention sink)."""
    max_norm_ratio: float | None = PositionRule.max_norm_ratio
    """Also leave out positions whose norm exceeds this multiple of the layer's median (None: off)."""
    n_layers: int = 1
    """Number of transformer layers it reads (dead-latent statistics are kept per layer)."""
    layers: list[int] | None = None
    """The transformer layers it was trained on (None = all)."""
    model_name: str | None = None
    """The transformer it was trained on."""
    format_version: int = 2
    """Version of this config/weights layout (2: the position rule is recorded)."""

    def __post_init__(self) -> None:
        if self.n_inputs < 1 or self.n_latents < 1:
            raise MLSAEError(f"n_inputs and n_latents must be positive, got {self.n_inputs}, {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise MLSAEError(f"k must be between 1 and the number of latents ({self.n_latents}), got {self.k}")
        if self.auxk is not None and self.auxk < 1:
            raise MLSAEError(f"auxk must be positive or None, got {self.auxk}")
        if self.layers is not None and len(self.layers) != self.n_layers:
            raise MLSAEError(f"layers {self.layers} does not match n_layers={self.n_layers}")
        rule_of(self)  # validates the position rule

    @property
    def positions(self) -> PositionRule:
        """Which positions are left out of the data (the same rule everywhere the MLSAE is used)."""
        return rule_of(self)


class Standardized(NamedTuple):
    x: Tensor  # standardized input
    mean: Tensor | float
    scale: Tensor | float


class Loss(NamedTuple):
    loss: Tensor  # the objective: mean over layers of FVU, plus the weighted AuxK loss
    fvu: Tensor  # [L] per-layer fraction of variance unexplained in this batch (detached)
    auxk: Tensor  # AuxK loss before its coefficient (differentiable, for tests)
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

    # ----- the autoencoder -----

    def standardize(self, x: Tensor) -> Standardized:
        if not self.config.standardize:
            return Standardized(x, 0.0, 1.0)
        return _standardize(x)[0]

    def encode(self, x: Tensor) -> TopK:
        """Latents of raw input vectors ``[..., d]``: TopK values (after ReLU) and indices ``[..., k]``."""
        return self.encode_standardized(self.standardize(x).x)

    def encode_standardized(self, z: Tensor) -> TopK:
        """Latents of vectors already standardized by ``standardize`` (its ``.x``)."""
        topk, _ = topk_encode((z - self.b_pre).reshape(-1, z.shape[-1]), self.W_enc, self.config.k)
        return TopK(*(t.reshape(*z.shape[:-1], -1) for t in topk))

    def decode(self, topk: TopK, standardized: Standardized | None = None) -> Tensor:
        """Reconstruct from latents; de-standardize with the input's own mean and scale when given."""
        z = sparse_decode(topk, self.W_dec) + self.b_pre
        if standardized is None:
            return z
        return z * standardized.scale + standardized.mean

    def forward(self, x: Tensor) -> tuple[Tensor, TopK]:
        """Reconstruction and latents of raw input vectors ``[..., d]``."""
        s = self.standardize(x)
        topk = self.encode_standardized(s.x)
        return self.decode(topk, s), topk

    def loss(self, x: Tensor) -> Loss:
        """The training objective on ``x [L, N, d]`` (layer, vector, feature), in fp32.

        FVU per layer = MSE / variance of that layer's inputs (one scalar mean), averaged over
        layers, in the raw activation space. AuxK reconstructs the detached residual from the
        top ``auxk`` dead latents; both sides live in the raw space (the decoded residual is
        scaled by the per-token std, with no bias or mean), and its gradient reaches the encoder.
        """
        cfg = self.config
        L, N, d = x.shape
        x = x.float().reshape(L * N, d)
        low = None
        if cfg.standardize:
            shift = self.b_pre.detach() if gemm_dtype(x) == torch.bfloat16 and self.b_pre.dtype == x.dtype else None
            s, sq_norm, low = _standardize(x, shift)
            scale, variance = s.scale, _layer_variance(s.mean, sq_norm, L, d)
        else:
            s, scale = Standardized(x, 0.0, 1.0), torch.ones(L * N, 1, device=x.device)
            variance = torch.stack([part.var(unbiased=False) for part in x.view(L, -1)])
        dead = self.dead_mask() if cfg.auxk else None
        use_aux = dead is not None and bool(dead.any())
        topk, aux = topk_encode(s.x, self.W_enc, cfg.k, cfg.auxk or 0, dead if use_aux else None, b=self.b_pre,
                                x_low=low)
        mse, error, recon = _ScaledError.apply(sparse_decode(topk, self.W_dec), self.b_pre, s.x, scale, x, L)
        fvu = mse / variance.clamp_min(1e-12)
        loss = fvu.mean()
        auxk_loss = torch.zeros((), device=x.device)
        if aux is not None:
            residual = error.neg()  # x - recon, detached
            aux_recon = sparse_decode(aux, self.W_dec) * scale
            denom = (residual - residual.mean(0)).pow(2).mean().clamp_min(1e-12)
            auxk_loss = torch.nan_to_num((aux_recon - residual).pow(2).mean() / denom)
            loss = loss + cfg.auxk_coef * auxk_loss
        recon = recon.reshape(L, N, d)  # x + error = (decoded + b_pre) * scale + mean
        topk = TopK(*(t.reshape(L, N, -1) for t in topk))
        return Loss(loss, fvu.detach(), auxk_loss, topk, recon)

    # ----- initialisation and constraints -----

    @torch.no_grad()
    def init_pre_bias(self, x: Tensor) -> None:
        """Set the pre-encoder bias to the geometric median of ``x [..., d]`` in the space it is used in."""
        z = self.standardize(x.float().reshape(-1, x.shape[-1])).x
        self.b_pre.copy_(geometric_median(z))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row, so steps rotate it."""
        g, w = self.W_dec.grad, self.W_dec
        if g is None:
            return
        if g.dtype == w.dtype == torch.float32 and native.usable(g, w):
            native.project_rows(g, w)
        else:
            g.addcmul_(w, torch.linalg.vecdot(g, w).unsqueeze(-1), value=-1)

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
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, map_location: str = "cpu", **hub_kwargs):
        """Load from a local folder or a hub repo id, in this project's or the reference's layout.

        Replaces the mixin's loader, which would fall back to unpickling ``pytorch_model.bin``.
        """
        return load_folder(_resolve(str(pretrained_model_name_or_path), hub_kwargs), map_location)


def load_folder(folder: Path, map_location: str = "cpu") -> MLSAE:
    """Load an MLSAE from a folder in this project's layout or either of the reference's layouts."""
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise MLSAEError(f"{p} not found: an MLSAE folder holds config.json and model.safetensors")
    try:
        raw = json.loads(config_path.read_text())
        state = load_file(weights_path, device=str(map_location))
    except Exception as e:  # JSON, I/O, and safetensors' own error types
        raise MLSAEError(f"cannot read MLSAE weights in {folder}: {e}") from e
    if "W_enc" in state:
        known = {f.name for f in fields(SAEConfig)}
        raw.setdefault("skip_first", 0)  # format 1 predates the rule: those MLSAEs saw position 0
        model = MLSAE(SAEConfig(**{k: v for k, v in raw.items() if k in known}))
        model.load_state_dict(state)
    else:
        model = _from_reference(raw, state)
    return model.to(map_location).eval()


def _from_reference(raw: dict, state: dict[str, Tensor]) -> MLSAE:
    """Translate a checkpoint written by the reference implementation (plain or ``-tfm``)."""
    prefix = "autoencoder." if "autoencoder.encoder.weight" in state else ""
    if f"{prefix}encoder.weight" not in state:
        raise MLSAEError(f"unrecognised MLSAE checkpoint: tensors {sorted(state)[:5]}...")
    if raw.get("tuned_lens"):
        raise MLSAEError("reference checkpoints trained with tuned-lens transforms are not supported")
    W_enc = state[f"{prefix}encoder.weight"]
    n_latents, n_inputs = W_enc.shape
    layers = raw.get("layers")
    n_layers = len(layers) if layers else _count_blocks(state) or 1
    defaults = SAEConfig(n_inputs=n_inputs, n_latents=n_latents)
    config = SAEConfig(
        n_inputs=n_inputs,
        n_latents=n_latents,
        k=raw.get("k", defaults.k),
        auxk=raw.get("auxk", defaults.auxk),
        auxk_coef=raw.get("auxk_coef", defaults.auxk_coef),
        dead_tokens_threshold=raw.get("dead_tokens_threshold", defaults.dead_tokens_threshold),
        dead_threshold=raw.get("dead_threshold", defaults.dead_threshold),
        standardize=raw.get("standardize", defaults.standardize),
        skip_special_tokens=raw.get("skip_special_tokens", defaults.skip_special_tokens),
        skip_first=0,  # the reference trains on every non-special position
        n_layers=n_layers,
        layers=list(layers) if layers else None,
        model_name=raw.get("model_name"),
    )
    model = MLSAE(config)
    with torch.no_grad():
        model.W_enc.copy_(W_enc)
        model.W_dec.copy_(state[f"{prefix}decoder.weight"].T)
        model.b_pre.copy_(state[f"{prefix}pre_encoder_bias"])
    return model


def _count_blocks(state: dict[str, Tensor]) -> int:
    """Number of transformer blocks in a ``-tfm`` checkpoint (``...layers.{i}.`` keys)."""
    ids = {int(part) for key in state if key.startswith("transformer.")
           for prev, part in zip(key.split("."), key.split(".")[1:]) if prev in ("layers", "h") and part.isdigit()}
    return len(ids)


def _resolve(model_id: str, hub_kwargs: dict) -> Path:
    """A local folder as is; a hub repo id downloaded (config.json and model.safetensors only)."""
    if os.path.isdir(model_id):
        return Path(model_id)
    allowed = ("revision", "cache_dir", "force_download", "token", "local_files_only")
    opts = {k: v for k, v in hub_kwargs.items() if k in allowed}
    try:
        config = hf_hub_download(model_id, "config.json", **opts)
        hf_hub_download(model_id, "model.safetensors", **opts)
    except Exception as e:  # offline, unknown repo, no safetensors file (we never unpickle)
        raise MLSAEError(f"cannot load MLSAE '{model_id}': not a local folder, and from the hub: {e}") from e
    return Path(config).parent


def sae_name(sae: str) -> str:
    """``runs/default/mlsae-x-x8-k32/`` and ``owner/mlsae-x-x8-k32`` are both ``mlsae-x-x8-k32``."""
    return Path(str(sae).rstrip("/")).name


def mlsae_name(model_name: str, expansion_factor: int, k: int, *, tfm: bool = False, owner: str | None = None) -> str:
    """Hub repo id in the reference's naming: ``[owner/]mlsae-{model}-x{ef}-k{k}[-tfm]``."""
    name = f"mlsae-{model_name.rstrip('/').split('/')[-1]}-x{expansion_factor}-k{k}" + ("-tfm" if tfm else "")
    return f"{owner}/{name}" if owner else name


class _ScaledError(torch.autograd.Function):
    """Per-layer MSE in the raw space, ``mean(((decoded + b - z) * scale)^2)``, from standardized tensors.

    Returns the MSE [L], the raw-space error ``recon - x`` [M, d] and the reconstruction (both
    detached, for AuxK and the caller); one [M, d] pass forward and one backward, where autograd
    through the de-standardization would make about ten.
    """

    @staticmethod
    def forward(ctx, decoded: Tensor, b: Tensor, z: Tensor, scale: Tensor, x: Tensor, n_layers: int):
        ctx.native = _all_native(decoded, b, z, scale, x)
        if ctx.native:
            error, recon, per_row = native.scaled_error(decoded, b.detach(), z, scale, x)
            mse = per_row.view(n_layers, -1).sum(1) / (error.numel() // n_layers)
        else:
            error = torch.add(decoded, b).sub_(z).mul_(scale)
            recon = x + error
            mse = torch.linalg.vector_norm(error.view(n_layers, -1), dim=1).square_() / (error.numel() // n_layers)
        ctx.save_for_backward(error, scale)
        ctx.mark_non_differentiable(error, recon)
        ctx.set_materialize_grads(False)  # no [M, d] zeros for the two non-differentiable outputs
        ctx.n_layers = n_layers
        return mse, error, recon

    @staticmethod
    def backward(ctx, grad_mse: Tensor | None, _grad_error: None, _grad_recon: None):
        if grad_mse is None:
            return None, None, None, None, None, None
        error, scale = ctx.saved_tensors
        per_layer = grad_mse * (2 / (error.numel() // ctx.n_layers))
        row_weight = (scale.view(ctx.n_layers, -1) * per_layer[:, None]).reshape(-1)
        if ctx.native:
            grad, grad_b = native.scaled_error_backward(error, row_weight.float().contiguous())
        else:
            grad = error * row_weight[:, None]
            grad_b = grad.sum(0)
        return grad, grad_b if ctx.needs_input_grad[1] else None, None, None, None, None


def _all_native(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors) and native.usable(*tensors)


def _standardize(x: Tensor, shift: Tensor | None = None) -> tuple[Standardized, Tensor, Tensor | None]:
    """Per-token standardization of ``x [..., d]``, and each token's squared norm after centering.

    Two-pass std through a norm: PyTorch's var/std kernels run ~10x slower on CPU. With ``shift``
    and the C kernels, also ``bf16(z - shift)`` from the same pass (the encoder's input under bf16
    autocast), else None.
    """
    if x.dim() == 2 and x.dtype == torch.float32 and native.usable(x):
        z, mean, scale, sq_norm, low = native.standardize(x, STD_EPS, shift)
        return Standardized(z, mean, scale), sq_norm, low
    mean = x.mean(-1, keepdim=True)
    centered = x - mean
    sq_norm = torch.linalg.vector_norm(centered, dim=-1, keepdim=True).square_()
    scale = sq_norm.sqrt().div_(math.sqrt(max(x.shape[-1] - 1, 1))).add_(STD_EPS)
    return Standardized(centered.div_(scale), mean, scale), sq_norm, None


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
