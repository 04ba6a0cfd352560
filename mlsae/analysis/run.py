"""dists, variances, examples and histograms from one pass over the data: ``python -m mlsae.analysis.run --sae R``.

Each batch costs one transformer forward (stopped after the deepest layer the MLSAE reads) and
one MLSAE encode, whatever the number of analyses. Writes the files of each module (see their
docstrings) and ``run.json`` to ``--out_dir``: each analysis's summary, ``config`` (the options
only, so a caller can tell whether outputs are up to date) and ``pass`` (tokens, positions,
seconds, and how they split between the model and the analyses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from simple_parsing import field

from mlsae.analysis import cards, dists, examples, variances
from mlsae.analysis.common import config_dict, finite, parse, write_json
from mlsae.analysis.stream import prepare, stream
from mlsae.utils import MLSAEError, run_cli

ANALYSES = ("dists", "variances", "examples", "histograms")


@dataclass
class RunOptions(examples.ExamplesOptions):
    analyses: list[str] = field(default_factory=lambda: list(ANALYSES))
    """Which analyses to run in the pass: any of dists, variances, examples, histograms."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.analyses) - set(ANALYSES))
        if unknown or not self.analyses:
            raise MLSAEError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")


def run(cfg: RunOptions) -> dict:
    """Run the selected analyses in one pass and write their files; returns their summaries."""
    p = prepare(cfg)
    accs = {}
    if "dists" in cfg.analyses:
        accs["dists"] = dists.DistsAccumulator(p.n_layers, p.n_latents, p.sae.config.dead_threshold, p.device)
    if "variances" in cfg.analyses:
        accs["variances"] = variances.VariancesAccumulator(p.n_layers, p.n_latents, p.device)
    if "examples" in cfg.analyses:
        accs["examples"] = examples.make(p, cfg)
    if "histograms" in cfg.analyses:
        accs["histograms"] = cards.HistogramsAccumulator(p.n_layers, p.n_latents, p.sae.config.dead_threshold, p.device)
    info = stream(p, list(accs.values()), cfg.data, desc="+".join(accs))
    meta = {"config": config_dict(cfg), "pass": info}
    out, summaries = cfg.out, {"pass": info}
    if "dists" in accs:
        d = accs["dists"].result(p.layers, info["tokens"])
        d.save(out, meta)
        summaries["dists"] = d.summary()
    if "variances" in accs:
        v = accs["variances"].result()
        v.save(out, meta)
        summaries["variances"] = v.summary
    if "examples" in accs:
        path = accs["examples"].save(out, p.chunks, p.layers, examples.meta(p, cfg, info))
        summaries["examples"] = str(path)
    if "histograms" in accs:
        summaries["histograms"] = str(accs["histograms"].result(p.layers, info["tokens"]).save(out))
    write_json(out / "run.json", {**summaries, "config": meta["config"]})
    return summaries


def main(argv: list[str] | None = None) -> None:
    cfg = parse(RunOptions, argv, __doc__.split("\n\n")[0])
    print(json.dumps(finite(run(cfg)), indent=2))
    print(cfg.out)


if __name__ == "__main__":
    run_cli(main)
