"""A tuned lens (Belrose et al. 2023) for any model: ``python -m mlsae.lens --help``.

Each layer l read gets an affine translator into the final layer's basis, fitted so that the
model's own final norm and unembedding read the translated residual as the model's next-token
distribution:

    translate_l(h) = h + A_l h + b_l        (A_l = 0 and b_l = 0 at the start: the logit lens)
    inverse_l(t)   = (I + A_l)^-1 (t - b_l)

The fit minimises the sum over layers of KL(p_final || p_lens,l), averaged over the positions the
position rule keeps (``mlsae.positions``), in one pass over ``max_tokens`` tokens of the training
split, learning rate ``lr`` decayed linearly to 0. The tuned-lens paper starts from the identity
and uses SGD with Nesterov momentum 0.9, learning rate 1.0 and weight decay 1e-3
(``--start identity --optimizer sgd --lr 1``). Its gradients scale with the squared residual norm,
and on SmolLM2 (norms near 130, not Pythia's few tens) that learning rate diverges, so the default
starts from the least-squares affine map of each layer's residual onto the last layer's
(``--start lstsq``: exact, from ``lstsq_tokens`` tokens, cheap next to the KL steps, which need the
LM head at every layer) and fine-tunes it with Adam (``--optimizer adam``, scale-free). The last
layer's translator stays the identity. An MLSAE trained on translated residuals sees every
layer in the final layer's basis (the paper's ``-lens`` variant, claim 4); its reconstructions map
back through the inverse. Saved as ``lens.safetensors`` (``weight [L, d, d]``, ``bias [L, d]``;
metadata: the layers and the model), with ``lens.json``: the options, the KL per layer of the
identity and the tuned lens on held-out text, the condition number and smallest singular value of each
``I + A_l`` and the seconds the fit took.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from simple_parsing import ArgumentParser
from simple_parsing import field as flag
from torch import Tensor, nn
from tqdm.auto import tqdm

from mlsae import native
from mlsae.data import DataOptions, load_chunks
from mlsae.fetch import DEFAULT_MODEL
from mlsae.metrics import CleanLogits, compare
from mlsae.positions import PositionRule, read_residuals
from mlsae.precision import autocast as precision_autocast
from mlsae.transformer import Transformer, load_transformer
from mlsae.utils import MLSAEError, atomic_path, check_out_dir, run_cli

FILE = "lens.safetensors"


class TunedLens(nn.Module):
    """Per-layer affine translators ``h -> h + A h + b`` for the transformer ``layers``."""

    def __init__(self, layers: list[int], d_model: int, model_name: str | None = None):
        super().__init__()
        self.layers = list(layers)
        self.model_name = model_name
        self.weight = nn.Parameter(torch.zeros(len(layers), d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(len(layers), d_model))

    def translate(self, x: Tensor, rows: slice = slice(None)) -> Tensor:
        """``x [L, ..., d]`` (one slice per layer of the lens, or of its ``rows``) in the final layer's basis."""
        return translate(x, self.weight[rows], self.bias[rows])

    def inverse(self, t: Tensor, rows: slice = slice(None)) -> Tensor:
        """The residuals ``[L, ..., d]`` whose translations are ``t``."""
        return inverse(t, self.weight[rows], self.bias[rows])

    @torch.no_grad()
    def singular_values(self) -> Tensor:
        """The singular values of each ``I + A_l``, largest first ``[L, d]``."""
        eye = torch.eye(self.weight.shape[-1], dtype=torch.float64, device=self.weight.device)
        return torch.linalg.svdvals(eye + self.weight.double())

    def condition_numbers(self) -> Tensor:
        """The 2-norm condition number of each ``I + A_l``: how much the inverse can magnify an error
        made in the translated space (an MLSAE's reconstruction error, mapped back to the raw space)."""
        s = self.singular_values()
        return s[..., 0] / s[..., -1]

    def smallest_singular_values(self) -> Tensor:
        """The smallest singular value of each ``I + A_l``: the inverse magnifies an error's size at most
        one over it."""
        return self.singular_values()[..., -1]

    def rows_of(self, layers: list[int]) -> tuple[Tensor, Tensor]:
        """The translators (weight, bias) of these transformer ``layers``, which the lens must have."""
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise MLSAEError(f"the tuned lens has no translator for layers {missing} (it has {self.layers})")
        index = torch.tensor([self.layers.index(layer) for layer in layers])
        return self.weight.detach()[index], self.bias.detach()[index]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        meta = {"layers": json.dumps(self.layers), "model_name": self.model_name or ""}
        with atomic_path(path) as tmp:
            save_file({"weight": self.weight.detach().contiguous(), "bias": self.bias.detach().contiguous()}, tmp,
                      metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        """From ``lens.safetensors`` or a folder holding it."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE
        if not path.is_file():
            raise MLSAEError(f"no tuned lens at {path}: fit one with python -m mlsae.lens")
        try:
            with safe_open(str(path), "pt") as f:
                meta, weight, bias = f.metadata() or {}, f.get_tensor("weight"), f.get_tensor("bias")
        except Exception as e:  # safetensors' own error types
            raise MLSAEError(f"cannot read the tuned lens {path}: {e}") from e
        layers = json.loads(meta.get("layers", "null")) or list(range(weight.shape[0]))
        if weight.shape != (len(layers), bias.shape[-1], bias.shape[-1]) or bias.shape[0] != len(layers):
            raise MLSAEError(f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match "
                             f"{len(layers)} layers")
        lens = cls(layers, bias.shape[-1], meta.get("model_name") or None)
        lens.load_state_dict({"weight": weight, "bias": bias})
        return lens


def translate(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``h + A h + b`` for each slice of ``x [L, ..., d]`` with its translator ``weight [L, d, d]``
    (A) and ``bias [L, d]``, in fp32 under any autocast (cheap; bf16 would round the residual)."""
    if x.shape[0] != weight.shape[0]:
        raise MLSAEError(f"{x.shape[0]} layers of residuals for a tuned lens of {weight.shape[0]} layers")
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(weight.dtype)
    with torch.autocast(flat.device.type, enabled=False):
        return torch.baddbmm(bias[:, None], flat, weight.transpose(1, 2)).add_(flat).reshape(x.shape)


def inverse(t: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The ``h`` whose translation is ``t [L, ..., d]``: ``(I + A)^-1 (t - b)``, solved in fp64."""
    if t.shape[0] != weight.shape[0]:
        raise MLSAEError(f"{t.shape[0]} layers of residuals for a tuned lens of {weight.shape[0]} layers")
    flat = t.reshape(t.shape[0], -1, t.shape[-1]).double() - bias.double()[:, None]
    eye = torch.eye(weight.shape[-1], dtype=torch.float64, device=flat.device)
    matrices = (eye + weight.double()).transpose(1, 2)  # y M^T = t - b  =>  y = (t - b) M^-T
    return torch.linalg.solve(matrices, flat, left=False).to(t.dtype).reshape(t.shape)


def lens_logits(transformer: Transformer, h: Tensor) -> Tensor:
    """The model's own readout of residuals ``h [..., d]``: final norm, then unembedding."""
    return transformer.lm_head(transformer.final_norm(h))


def kl_to_final(transformer: Transformer, h: Tensor, log_p: Tensor) -> Tensor:
    """KL(p_final || p_readout(h)) summed over positions, from ``log_p [N, V]`` and ``h [N, d]``."""
    log_q = lens_logits(transformer, h).float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum()


@dataclass(kw_only=True)
class LensConfig(DataOptions):
    """Options of ``python -m mlsae.lens``: the data options (the training split by default) and these."""

    model_name: str = DEFAULT_MODEL
    """Transformer: hub id, local folder or .gguf file."""
    split: str = "train"
    """Split to fit on."""
    max_tokens: int = 16_384
    """Tokens to fit on (one pass)."""
    tokens_per_step: int = 1_024
    """Tokens per optimizer step."""
    start: str = "lstsq"
    """Where the translators start: lstsq (least squares onto the last layer's residual) or identity."""
    lstsq_tokens: int = 32_768
    """Training tokens of the least-squares start."""
    fine_tune: bool = True
    """Fine-tune by the KL after the start (False: the least-squares map alone)."""
    max_condition: float | None = 100.0
    """Bound on the condition number of each translator I + A (its singular values raised to at least the
    largest over this): the inverse, which maps a tuned-lens MLSAE's reconstructions back to the raw space,
    then magnifies an error at most this much (the least-squares maps alone reach 1e4-1e6 on SmolLM2, at
    almost no KL cost when bounded at 100). None: no bound."""
    min_singular: float | None = None
    """Floor on the singular values of each translator I + A: the inverse then magnifies an error at most
    1 / this, whatever the largest singular value (a model whose last layer holds directions hundreds of
    times larger than its early layers', like Gemma 3, needs translators that expand those, and a bound on
    the condition number then distorts every other direction). None: no floor."""
    optimizer: str = "adam"
    """adam, or sgd (Nesterov momentum 0.9, the tuned-lens paper's, with --lr 1)."""
    lr: float = 1e-4
    """Peak learning rate, decayed linearly to 0."""
    weight_decay: float = 1e-3
    eval_split: str = "val"
    """Held-out split on which lens.json reports the KL per layer of the identity and the tuned lens."""
    eval_tokens: int = 4_096
    layers: list[int] | None = flag(default=None, nargs="*")
    """Transformer layers to translate (default: all)."""
    out_dir: str = "runs/lens"
    """Where lens.safetensors and lens.json go."""

    def __post_init__(self) -> None:
        DataOptions.__post_init__(self)
        if self.tokens_per_step % (self.batch_size * self.max_length):
            raise MLSAEError(f"tokens_per_step ({self.tokens_per_step}) must be a multiple of batch_size x max_length "
                             f"({self.batch_size * self.max_length})")
        if self.max_tokens < self.tokens_per_step:
            raise MLSAEError(f"--max_tokens ({self.max_tokens}) is less than one step ({self.tokens_per_step} tokens)")
        if self.min_singular is not None and self.min_singular <= 0:
            raise MLSAEError(f"--min_singular must be positive, got {self.min_singular}")
        if self.start not in ("lstsq", "identity") or self.optimizer not in ("adam", "sgd"):
            raise MLSAEError(f"--start must be lstsq or identity and --optimizer adam or sgd, got {self.start!r} "
                             f"and {self.optimizer!r}")


def _batches(cfg: LensConfig, transformer: Transformer, split: str, max_tokens: int) -> list[Tensor]:
    chunks = load_chunks(cfg.path, split, transformer.tokenizer, cfg.max_length, max_tokens=max_tokens)
    return list(chunks.split(cfg.batch_size))


def _read(transformer: Transformer, ids: Tensor, layers: list[int], rule: PositionRule) -> tuple[Tensor, Tensor]:
    """Residuals ``[L, N, d]`` (fp32) of the kept positions and the final log-probabilities ``[N, V]``."""
    r = read_residuals(transformer, ids, layers, rule, logits=True)
    return r.kept, r.logits[r.keep].float().log_softmax(-1)


def fit(cfg: LensConfig, transformer: Transformer, rule: PositionRule = PositionRule()) -> TunedLens:
    """A tuned lens for ``transformer``, fitted as the module docstring says."""
    device = transformer.device
    layers = list(cfg.layers) if cfg.layers else list(range(transformer.n_layers))
    lens = TunedLens(layers, transformer.d_model, cfg.model_name).to(device)
    transformer.requires_grad_(False)
    if cfg.start == "lstsq":
        weight, bias = least_squares(transformer, _batches(cfg, transformer, cfg.split, cfg.lstsq_tokens), layers, rule,
                                     cfg.precision, max_condition=cfg.max_condition, min_singular=cfg.min_singular)
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
    if not cfg.fine_tune:
        return lens.eval()
    batches = _batches(cfg, transformer, cfg.split, cfg.max_tokens)
    per_step = cfg.tokens_per_step // (cfg.batch_size * cfg.max_length)
    steps = max(len(batches) // per_step, 1)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(lens.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(lens.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    frozen = _is_last(layers, transformer)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    autocast = precision_autocast(cfg.precision, device)
    for step in tqdm(range(steps), desc="tuned lens", unit="step"):
        micro = batches[step * per_step : (step + 1) * per_step]
        with torch.no_grad(), autocast:
            reads = [_read(transformer, ids.to(device), layers, rule) for ids in micro]
        n = sum(log_p.shape[0] for _, log_p in reads)
        for h, log_p in reads:
            for i in range(len(layers)):  # one layer's [N, V] graph at a time
                with autocast:
                    translated = lens.translate(h[i : i + 1], slice(i, i + 1))[0]
                    loss = kl_to_final(transformer, translated, log_p) / n
                loss.backward()
        lens.weight.grad[frozen], lens.bias.grad[frozen] = 0, 0  # the last layer's readout is the model's own
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    if cfg.max_condition is not None or cfg.min_singular is not None:
        with torch.no_grad():
            lens.weight.copy_(bound_singular_values(lens.weight.double(), cfg.max_condition, cfg.min_singular).float())
    return lens.eval()


def _is_last(layers: list[int], transformer: Transformer) -> Tensor:
    """Which of ``layers`` is the last one, whose translator is the identity (its readout is the model's)."""
    return torch.tensor([layer == transformer.n_layers - 1 for layer in layers], device=transformer.device)


def bound_singular_values(weight: Tensor, max_condition: float | None = None,
                          min_singular: float | None = None) -> Tensor:
    """``A [L, d, d]`` with the singular values of each ``I + A`` raised to at least the largest over
    ``max_condition`` and to at least ``min_singular`` (the nearest map, in every unitarily invariant
    norm, that meets both bounds)."""
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
    u, s, vh = torch.linalg.svd(eye + weight)
    if max_condition is not None:
        s = torch.maximum(s, s[..., :1] / max_condition)
    if min_singular is not None:
        s = s.clamp(min=min_singular)
    return u @ torch.diag_embed(s) @ vh - eye


@torch.no_grad()
def least_squares(transformer: Transformer, batches: list[Tensor], layers: list[int], rule: PositionRule,
                  precision: str = "auto", ridge: float = 1e-6,
                  max_condition: float | None = None, min_singular: float | None = None) -> tuple[Tensor, Tensor]:
    """Translators ``(A [L, d, d], b [L, d])`` with ``h + A h + b`` the least-squares fit of the last
    layer's residual from layer l's over the kept positions (fp64 normal equations; ``ridge`` times
    the mean diagonal keeps them solvable). The last layer's own is the identity. With
    ``max_condition`` or ``min_singular``, each ``I + A`` is bounded (``bound_singular_values``) and
    ``b`` refitted to it (so the translated mean still equals the last layer's)."""
    last, d = transformer.n_layers - 1, transformer.d_model
    read = sorted(set(layers) | {last})
    device = transformer.device
    xtx = torch.zeros(len(layers), d + 1, d + 1, dtype=torch.float64, device=device)
    xty = torch.zeros(len(layers), d + 1, d, dtype=torch.float64, device=device)
    for ids in tqdm(batches, desc="tuned lens: least squares", unit="batch"):
        with precision_autocast(precision, device):
            kept = read_residuals(transformer, ids.to(device), read, rule).kept
        x = torch.cat([kept[[read.index(layer) for layer in layers]], kept.new_ones(len(layers), kept.shape[1], 1)], -1)
        xtx += (x.transpose(1, 2) @ x).double()
        xty += (x.transpose(1, 2) @ kept[read.index(last)]).double()
    scale = xtx.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
    w = torch.linalg.solve(xtx + ridge * scale * torch.eye(d + 1, dtype=torch.float64, device=device), xty)
    eye = torch.eye(d, dtype=torch.float64, device=device)
    weight, bias = w[:, :d].transpose(1, 2) - eye, w[:, d]  # y = h W[:d] + W[d] = h + h A^T + b
    if max_condition is not None or min_singular is not None:
        n = xtx[:, d, d][:, None]  # the constant column: sums of h and y sit beside it
        mean_h, mean_y = xtx[:, d, :d] / n, xty[:, d] / n
        weight = bound_singular_values(weight, max_condition, min_singular)
        bias = mean_y - mean_h - (weight @ mean_h[..., None])[..., 0]
    is_last = _is_last(layers, transformer)
    return weight.where(~is_last[:, None, None], 0).float(), bias.where(~is_last[:, None], 0).float()


@torch.no_grad()
def kl_per_layer(transformer: Transformer, lens: TunedLens, batches: list[Tensor], rule: PositionRule,
                 precision: str = "auto", identity: bool = False) -> Tensor:
    """KL(p_final || p_lens,l) per layer of ``lens``, mean over the kept positions (nats); with
    ``identity``, of the logit lens (no translation) at the same layers."""
    device = transformer.device
    autocast = precision_autocast(precision, device)
    total, n = torch.zeros(len(lens.layers), dtype=torch.float64), 0
    for ids in batches:
        with autocast:
            r = read_residuals(transformer, ids.to(device), lens.layers, rule, logits=True)
            clean = CleanLogits.of(r.logits[r.keep])
            h = r.kept if identity else lens.translate(r.kept)
            for i in range(len(lens.layers)):
                total[i] += compare(clean, lens_logits(transformer, h[i]))[1].double().sum().item()
        n += len(clean.lse)
    return total / max(n, 1)


def run(cfg: LensConfig) -> dict:
    """Fit a lens (``fit``), report the KL per layer of the identity and of the lens on held-out text, and
    write ``lens.safetensors`` and ``lens.json`` to ``cfg.out_dir``; returns the report."""
    from mlsae.train import pick_device  # mlsae.train imports mlsae.model, which imports this module

    out = check_out_dir(cfg.out_dir)
    start = time.perf_counter()
    device = pick_device(cfg.device)
    model, tokenizer = load_transformer(cfg.model_name, device=device)
    transformer = Transformer(model, tokenizer)
    if cfg.layers and not all(0 <= layer < transformer.n_layers for layer in cfg.layers):
        raise MLSAEError(f"--layers {cfg.layers}: the model has layers 0..{transformer.n_layers - 1}")
    rule = PositionRule()
    held_out = _batches(cfg, transformer, cfg.eval_split, cfg.eval_tokens)
    with transformer.weights_for(cfg.precision):
        lens = fit(cfg, transformer, rule)
        kl_identity = kl_per_layer(transformer, lens, held_out, rule, cfg.precision, identity=True)
        kl_tuned = kl_per_layer(transformer, lens, held_out, rule, cfg.precision)
    report = {"config": asdict(cfg), "layers": lens.layers, "position_rule": asdict(rule),
              "kl_identity": kl_identity.tolist(), "kl_tuned": kl_tuned.tolist(),
              "condition_numbers": lens.condition_numbers().tolist(),
              "smallest_singular_values": lens.smallest_singular_values().tolist(), "seconds": time.perf_counter() - start}
    lens.save(out)
    with atomic_path(out / "lens.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_config_path_arg=False)
    parser.add_arguments(LensConfig, dest="cfg")
    cfg = parser.parse_args(argv).cfg
    native.tune_malloc()  # as python -m mlsae.train does
    report = run(cfg)
    print(json.dumps({k: [round(v, 4) for v in report[k]] for k in ("kl_identity", "kl_tuned")}))
    print(Path(cfg.out_dir) / FILE)


if __name__ == "__main__":
    run_cli(main)
