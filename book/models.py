"""The model-size chapter's data: for each profile, its transformer's facts and the statistics the
paper relates to model size, read from that profile's own cached stages (the same stages its own
book runs, so they are computed only where that book has not run yet)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from book import stages
from book.evals import averages
from book.profile import Profile, load_profile
from mlsae.analysis.dists import Dists
from mlsae.utils import MLSAEError


@dataclass
class ModelSide:
    """One profile's transformer and its main MLSAE (the analysed member of its sweep)."""

    profile: str
    model: str
    sae: Path
    facts: dict  # layers, d_model, vocabulary, parameter counts (model_facts)
    metrics: dict[str, float]  # the MLSAE's evaluation averaged over layers (book.evals.averages)
    eval_dists: Dists  # where its latents fired, per layer, on the evaluation tokens
    dists: Dists  # its latents' layer distributions on the analysis pass's tokens
    resid: pd.DataFrame  # residual geometry per layer (index: layer; cos_next, ...)

    def statistics(self, thresholds: Sequence[int]) -> dict[str, float]:
        """The statistics the paper relates to model size (defined in the chapter)."""
        multi = self.eval_dists.multi_layer(thresholds)
        out = {}
        for t in thresholds:
            out[f"share at several layers (t = {t})"] = float(multi.loc[t, "share at several layers"])
            out[f"mean layers / layers (t = {t})"] = float(multi.loc[t, "mean layers / layers"])
        out["layer std / layers"] = float(self.dists.summary()["layer_std_rel"]["mean"])
        out["adjacent-layer similarity"] = float(self.resid["cos_next"].mean())
        return out


def compared_profiles(P: Profile, compare: Sequence[str] | None = None) -> list[str]:
    """The profiles whose models the chapter sets beside ``P``'s: ``compare``, else the profile's
    ``compare: profiles:``."""
    names = list(compare) if compare is not None else list(P.section("compare").get("profiles") or [])
    if not names:
        raise MLSAEError(f"profile {P.name} names no model to compare with (a 'compare:' section with 'profiles: [...]')")
    return names


def model_side(profile: str | Path, out_dir: str | Path | None = None, runs_dir: str | Path | None = None) -> ModelSide:
    """``profile``'s model and main MLSAE: trained, evaluated and analysed as that profile's book does
    (cached stages: nothing is recomputed where the book already ran)."""
    P = load_profile(profile)
    out = P.out_dir(out_dir)
    A = P.analysis()
    cfg = P.train_config(runs_dir=runs_dir)
    if cfg.tuned_lens:  # its sweep trains a lens copy, on this lens
        stages.ensure_lens(P.lens_config(cfg))
    stages.ensure_trained(cfg)
    main = stages.main_run(cfg, A)
    results, _ = stages.ensure_evaluated(P.eval_config(main, out / "eval"))
    stages.ensure_analysis_pass(main, out, A)
    resid, _, _ = stages.ensure_resid(cfg.model_name, out, A, lens=cfg.tuned_lens)
    return ModelSide(profile=P.name, model=cfg.model_name, sae=main, facts=model_facts(cfg.model_name),
                     metrics=averages(results), eval_dists=Dists.load(stages.eval_dists_path(out / "eval", main)),
                     dists=Dists.load(stages.analysis_dir(out, main)), resid=resid.set_index("layer"))


def model_facts(model_name: str) -> dict:
    """Decoder blocks, width, vocabulary and parameters of a transformer. *Embedding* parameters are
    the token embedding, plus the unembedding where it is not tied to it."""
    from mlsae.transformer import Transformer

    t = Transformer.from_pretrained(model_name)
    total = sum(p.numel() for p in t.model.parameters())  # a tied unembedding is counted once
    embedding = {id(m.weight): m.weight.numel() for m in (t.model.get_input_embeddings(), t.model.get_output_embeddings())
                 if m is not None}
    return {"layers": t.n_layers, "d_model": t.d_model, "vocabulary": t.vocab_size, "parameters": total,
            "embedding parameters": sum(embedding.values()), "non-embedding parameters": total - sum(embedding.values())}


def relative_depth(layers: Sequence[int], n_layers: int) -> np.ndarray:
    """Layer indices as a fraction of the depth (0 at the first block, 1 at the last), so that
    models of different depth share one axis."""
    return np.asarray(layers, dtype=float) / max(n_layers - 1, 1)
