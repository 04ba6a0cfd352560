"""Evaluate a trained MLSAE on held-out data: ``python -m mlsae.evaluate --sae PATH_OR_ID``.

Writes one CSV row with the reference's column names (``train/fvu/layer_0`` ...
``val/loss/delta/avg``) plus this project's extra columns, the same as JSON, and where each latent
fired over the evaluation tokens (``mlsae.analysis.dists``' counts and totals per layer and latent,
as ``test_{name}.dists.safetensors``). Definitions of every metric: see ``mlsae.metrics``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from simple_parsing import ArgumentParser
from simple_parsing import field as flag
from tqdm.auto import tqdm

from mlsae.analysis.dists import Dists, DistsAccumulator
from mlsae.data import DataOptions, load_chunks
from mlsae.formats import sae_name
from mlsae.metrics import DownstreamMetrics, ExcludedShare, ReconstructionMetrics
from mlsae.model import MLSAE
from mlsae.positions import PositionRule, read_residuals
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


def evaluate(cfg: EvalConfig) -> Evaluation:
    """All metrics of one MLSAE (over the positions its rule keeps)."""
    device = pick_device(cfg.device)
    sae = MLSAE.from_pretrained(cfg.sae).to(device)
    rule = position_rule(cfg, sae)
    transformer = transformer_for(sae, cfg.model_name, device, cfg.sae)
    layers = cfg.layers or sae.config.layers or list(range(transformer.n_layers))
    if not all(0 <= layer < transformer.n_layers for layer in layers):
        raise MLSAEError(f"--layers {layers}: the model has layers 0..{transformer.n_layers - 1}")
    if sae.config.tuned_lens and layers != (sae.config.layers or list(range(transformer.n_layers))):
        raise MLSAEError("--layers: an MLSAE with a tuned lens has translators for its own layers only")
    chunks = load_chunks(cfg.path, cfg.split, transformer.tokenizer, cfg.max_length, max_tokens=cfg.max_tokens)
    recon_metrics = ReconstructionMetrics(len(layers), sae.config.n_latents, sae.config.dead_threshold)
    down_metrics = DownstreamMetrics(len(layers))
    excluded = ExcludedShare(len(layers))
    dists = DistsAccumulator(len(layers), sae.config.n_latents, sae.config.dead_threshold)
    autocast = precision_autocast(cfg.precision, device)
    downstream_left = cfg.downstream_tokens
    with torch.no_grad(), autocast:
        for ids in tqdm(chunks.split(cfg.batch_size), desc="evaluate", unit="batch"):
            ids = ids.to(device)
            r = read_residuals(transformer, ids, layers, rule, logits=downstream_left > 0)
            excluded.update(r.acts, r.keep)
            x = r.kept
            recon, topk = sae(x)
            recon_metrics.update(x, recon, topk)
            dists.add(topk.values.cpu(), topk.indices.cpu())
            if r.logits is not None:
                downstream(transformer, ids, layers, r.acts, recon, r.keep, r.logits, down_metrics, cfg.zero_ablation)
                downstream_left -= ids.numel()
    down = down_metrics.compute() if down_metrics.tokens else None
    results = columns(layers, {**recon_metrics.compute(), **excluded.compute()}, down)
    return Evaluation(results, dists.result(layers, int(recon_metrics.vectors[0])))


def downstream(transformer: Transformer, ids, layers, acts, recon, keep, logits, metrics: DownstreamMetrics,
               zero_ablation: bool = True) -> None:
    """Splice each layer's reconstruction (and zeros) into the forward pass and compare the logits."""
    metrics.update_clean(logits, ids)
    for i, layer in enumerate(layers):
        spliced_acts = acts[i].clone()
        spliced_acts[keep] = recon[i].to(spliced_acts.dtype)
        spliced = transformer.logits_with_replacement(ids, layer, spliced_acts)
        zero = transformer.logits_with_replacement(ids, layer, torch.zeros_like(acts[i])) if zero_ablation else None
        metrics.update_layer(i, logits, spliced, zero, ids)


# Reference column prefixes for each metric; the rest are this project's additions.
COLUMNS = {
    "fvu": "train/fvu", "mse": "train/mse", "l1": "train/l1", "l0": "train/l0", "dead": "train/dead",
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
    evaluation = evaluate(cfg)
    path = write_results(evaluation, cfg, sae_name(cfg.sae))
    results = evaluation.results
    summary = {k: round(v, 4) for k, v in results.items() if k.endswith("/avg") or k == "train/dead/rel"}
    print(json.dumps(summary, indent=2))
    print(path)


if __name__ == "__main__":
    run_cli(main)
