"""Evaluate a trained MLSAE on held-out data: ``python -m mlsae.evaluate --sae PATH_OR_ID``.

Writes one CSV row with the reference's column names (``train/fvu/layer_0`` ...
``val/loss/delta/avg``) plus this project's extra columns, the same as JSON, and where each latent
fired over the evaluation tokens (``mlsae.analysis.dists``' counts and totals per layer and latent,
as ``test_{name}.dists.safetensors``). Definitions of every metric: see ``mlsae.metrics``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
import torch
from simple_parsing import ArgumentParser
from simple_parsing import field as flag
from tqdm.auto import tqdm

from mlsae import native
from mlsae.analysis.dists import Dists, DistsAccumulator
from mlsae.data import DataOptions, load_chunks
from mlsae.formats import sae_name
from mlsae.metrics import CleanLogits, DownstreamMetrics, ExcludedShare, ReconstructionMetrics, cross_entropy
from mlsae.model import MLSAE
from mlsae.positions import PositionRule, Residuals
from mlsae.precision import autocast as precision_autocast
from mlsae.precision import resolve as resolve_precision
from mlsae.train import pick_device
from mlsae.transformer import Transformer, transformer_for
from mlsae.utils import MLSAEError, atomic_path, check_out_dir, run_cli, sae_option


@dataclass(kw_only=True)
class EvalConfig(DataOptions):
    """Options of ``python -m mlsae.evaluate``: the data options (``max_tokens`` for the
    reconstruction metrics: FVU, MSE, L0, L1, dead latents) and these."""

    sae: str = sae_option()
    model_name: str | None = None
    """Transformer (default: the one named in the MLSAE's config)."""
    layers: list[int] | None = flag(default=None, nargs="*")
    """Transformer layers to evaluate at (default: the MLSAE's own). A per-layer SAE evaluated at other
    layers measures how far its dictionary transfers."""
    downstream_tokens: int = 8_192
    """Tokens (the first of the above) for the metrics that splice reconstructions into the model."""
    zero_ablation: bool = True
    """Also splice zeros in at each layer, the scale of CE recovered (off: no CE recovered, a third
    less time for the spliced metrics)."""
    skip_special_tokens: bool | None = None
    """Override the MLSAE's position rule: leave special tokens out (default: as the MLSAE was trained)."""
    skip_first: int | None = None
    """Override the MLSAE's position rule: leading positions left out (default: as the MLSAE was trained)."""
    out_dir: str = "out"
    """Where test_{name}.csv and .json go."""


def position_rule(cfg: EvalConfig, sae: MLSAE) -> PositionRule:
    """The MLSAE's own rule, with this evaluation's overrides."""
    overrides = {k: getattr(cfg, k) for k in ("skip_special_tokens", "skip_first") if getattr(cfg, k) is not None}
    return replace(sae.config.positions, **overrides)


@dataclass
class Evaluation:
    results: dict[str, float]  # the flat CSV columns
    dists: Dists  # where each latent fired, per layer, over the kept positions
    seconds: float = 0.0  # its share of the wall time of the pass that computed it


@dataclass
class _Member:
    """One evaluation of a joint pass: its SAE, the rows of the pass's layers it reads, its accumulators."""

    cfg: EvalConfig
    sae: MLSAE
    rule: PositionRule
    layers: list[int]
    rows: list[int] = field(default_factory=list)
    downstream_left: int = 0

    def __post_init__(self) -> None:
        n, latents = len(self.layers), self.sae.config.n_latents
        self.recon = ReconstructionMetrics(n, self.sae.config.dead_threshold)
        self.down = DownstreamMetrics(n)
        self.excluded = ExcludedShare(n)
        self.dists = DistsAccumulator(n, latents, self.sae.config.dead_threshold)
        self.downstream_left = self.cfg.downstream_tokens

    def result(self, seconds: float) -> Evaluation:
        down = self.down.compute() if self.down.tokens else None
        fired = self.dists.counts > 0
        results = columns(self.layers, {**self.recon.compute(fired), **self.excluded.compute()}, down)
        return Evaluation(results, self.dists.result(self.layers, int(self.recon.vectors[0])), seconds)


def evaluate(cfg: EvalConfig) -> Evaluation:
    """All metrics of one MLSAE (over the positions its rule keeps)."""
    return evaluate_many([cfg])[0]


def evaluate_many(cfgs: list[EvalConfig]) -> list[Evaluation]:
    """The evaluations of ``cfgs``, each what ``evaluate`` of it alone gives, from as few passes as
    possible: those that read the same data with the same transformer share one pass, where the
    transformer runs once per batch (at the union of their layers) and the zero-ablated forward
    passes, which do not depend on the SAE, run once per layer and batch."""
    members = [_member(cfg) for cfg in cfgs]
    groups: dict[tuple, list[_Member]] = {}
    for m in members:
        groups.setdefault(_pass_key(m), []).append(m)
    seconds = {}
    for group in groups.values():
        start = time.perf_counter()
        _evaluate_pass(group)
        for m in group:
            seconds[id(m)] = (time.perf_counter() - start) / len(group)
    return [m.result(seconds[id(m)]) for m in members]


def _member(cfg: EvalConfig) -> _Member:
    device = pick_device(cfg.device)
    sae = MLSAE.from_pretrained(cfg.sae).to(device)
    own = sae.config.layers or list(range(sae.config.n_layers))
    layers = cfg.layers or own
    if sae.config.tuned_lens and layers != own:
        raise MLSAEError("--layers: an MLSAE with a tuned lens has translators for its own layers only")
    return _Member(cfg, sae, position_rule(cfg, sae), layers)


def _pass_key(m: _Member) -> tuple:
    """What evaluations must share to share a pass: the transformer and every data option."""
    data = {f.name: getattr(m.cfg, f.name) for f in fields(DataOptions)}
    return (m.cfg.model_name or m.sae.config.model_name, json.dumps(data, sort_keys=True))


def _evaluate_pass(group: list[_Member]) -> None:
    cfg, device = group[0].cfg, pick_device(group[0].cfg.device)
    transformer = transformer_for(group[0].sae, cfg.model_name, device, cfg.sae)
    for m in group[1:]:
        if transformer.d_model != m.sae.config.n_inputs:
            raise MLSAEError(f"{transformer.name} has d_model {transformer.d_model}, {m.cfg.sae} expects {m.sae.config.n_inputs}")
    layers = sorted({layer for m in group for layer in m.layers})
    if not all(0 <= layer < transformer.n_layers for layer in layers):
        raise MLSAEError(f"--layers {layers}: the model has layers 0..{transformer.n_layers - 1}")
    for m in group:
        m.rows = [layers.index(layer) for layer in m.layers]
    chunks = load_chunks(cfg.path, cfg.split, transformer.tokenizer, cfg.max_length, max_tokens=cfg.max_tokens)
    with torch.no_grad(), precision_autocast(cfg.precision, device), transformer.weights_for(cfg.precision):
        for ids in tqdm(chunks.split(cfg.batch_size), desc=f"evaluate {len(group)} SAE(s)", unit="batch"):
            ids = ids.to(device)
            spliced = [m for m in group if m.downstream_left > 0]
            if spliced:
                acts, logits = transformer.run_with_residuals(ids, layers)
            else:
                acts, logits = transformer.residuals(ids, layers), None
            special = transformer.special_mask(ids)
            recons = {}
            for m in group:
                r = Residuals(acts[m.rows], m.rule.keep(special, acts[m.rows]), logits)
                m.excluded.update(r.acts, r.keep)
                x = r.kept
                recon, topk = m.sae(x)
                m.recon.update(x, recon, topk)
                m.dists.add(topk.values.cpu(), topk.indices.cpu())
                recons[id(m)] = (r, recon)
            if spliced:
                downstream(transformer, ids, layers, logits, spliced, recons)
                for m in spliced:
                    m.downstream_left -= ids.numel()


def downstream(transformer: Transformer, ids, layers: list[int], logits, members: list[_Member], recons: dict) -> None:
    """Splice each member's reconstruction of each of its layers into the forward pass and compare the
    logits; zeros are spliced in once per layer for all the members that ask for CE recovered."""
    clean = CleanLogits.of(logits)
    for m in members:
        m.down.update_clean(logits, ids, clean)
    for row, layer in enumerate(layers):
        zero_ce = None
        for m in members:
            if row not in m.rows:
                continue
            i = m.rows.index(row)
            r, recon = recons[id(m)]
            spliced_acts = r.acts[i].clone()
            spliced_acts[r.keep] = recon[i].to(spliced_acts.dtype)
            m.down.update_layer(i, transformer.logits_with_replacement(ids, layer, spliced_acts), ids)
            if m.cfg.zero_ablation:
                if zero_ce is None:
                    zero = transformer.logits_with_replacement(ids, layer, torch.zeros_like(r.acts[i]))
                    zero_ce = cross_entropy(zero, ids).double().sum().cpu()
                m.down.update_zero(i, zero_ce)


# Reference column prefixes for each metric; the rest are this project's additions.
COLUMNS = {
    "fvu": "train/fvu", "fvu_centred": "train/fvu_centred", "mse": "train/mse", "l1": "train/l1", "l0": "train/l0", "dead": "train/dead",
    "delta_ce": "val/loss/delta", "kl": "val/logit/kldiv", "logit_mse": "val/logit/mse",
    "ce_spliced": "val/loss/spliced", "ce_zero": "val/loss/zero", "ce_recovered": "val/loss/recovered",
    "excluded_variance": "excluded/variance",
}


def columns(layers: list[int], recon: dict, down: dict | None) -> dict[str, float]:
    out: dict[str, float] = {}
    values = {**recon, **(down or {})}
    for key, prefix in COLUMNS.items():
        if key not in values:
            continue
        for i, layer in enumerate(layers):
            out[f"{prefix}/layer_{layer}"] = values[key][i].item()
        out[f"{prefix}/avg"] = values[key].mean().item()
    out["train/dead/rel"] = recon["dead_overall"].item()
    if "excluded_tokens" in recon:
        out["excluded/tokens"] = recon["excluded_tokens"].item()
        out["excluded/share"] = recon["excluded_share"].item()
    if down:
        out["val/loss/clean"] = down["ce_clean"].item()
    return out


def write_results(evaluation: Evaluation, cfg: EvalConfig, name: str, extra: dict | None = None) -> Path:
    """``test_<name>.csv`` (one row), ``test_<name>.json`` (config, results and ``extra``) and
    ``test_<name>.dists.safetensors``."""
    out, results = Path(cfg.out_dir), evaluation.results
    evaluation.dists.save_tensors(out / f"test_{name}.dists.safetensors")
    with atomic_path(out / f"test_{name}.csv") as tmp:
        pd.DataFrame([results]).to_csv(tmp, index=False)
    with atomic_path(out / f"test_{name}.json") as tmp:
        precision = resolve_precision(cfg.precision, pick_device(cfg.device))
        tmp.write_text(json.dumps({"config": asdict(cfg), "precision": precision, "results": results, **(extra or {})},
                                  indent=2))
    return out / f"test_{name}.csv"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_config_path_arg=False)
    parser.add_arguments(EvalConfig, dest="cfg")
    cfg = parser.parse_args(argv).cfg
    check_out_dir(cfg.out_dir)
    native.tune_malloc()  # as python -m mlsae.train does
    evaluation = evaluate(cfg)
    path = write_results(evaluation, cfg, sae_name(cfg.sae))
    results = evaluation.results
    summary = {k: round(v, 4) for k, v in results.items() if k.endswith("/avg") or k == "train/dead/rel"}
    print(json.dumps(summary, indent=2))
    print(path)


if __name__ == "__main__":
    run_cli(main)
