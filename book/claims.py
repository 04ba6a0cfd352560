"""Verdicts on the paper's claims, computed from this build's numbers (worded without digits, so
every number beside them comes from the recorder)."""

from __future__ import annotations

import math


def ratio_verdict(ratio: float, paper: float, tolerance_decades: float = 0.5) -> str:
    """Compare a measured ratio with the paper's on a log scale.

    Reproduced when the two are within ``tolerance_decades`` orders of magnitude (half a decade,
    a factor of about three, by default); otherwise say in which direction it differs.
    """
    if not math.isfinite(ratio) or ratio <= 0:
        return "the ratio is undefined here, so the claim cannot be tested."
    gap = math.log10(ratio) - math.log10(paper)
    if abs(gap) <= tolerance_decades:
        return "the paper's claim is reproduced (the ratio is within half an order of magnitude of the paper's)."
    if ratio <= 1:
        return ("the paper's claim is not reproduced: aggregating over tokens does not make latents' layer "
                "distributions wider than they are for single tokens.")
    if gap < 0:
        return ("the direction of the paper's claim is reproduced (latents spread over more layers across tokens "
                "than for a single token), but the ratio is smaller than the paper's by more than half an order "
                "of magnitude.")
    return ("the direction of the paper's claim is reproduced, and the ratio is larger than the paper's by more "
            "than half an order of magnitude.")


def spread_vs_similarity(latents, resid, layers):
    """Per pair of adjacent layers (l, l+1): the centred cosine similarity of their residual
    vectors (``resid``, indexed by layer, column ``cos_next``) and the mean layer std of the
    latents whose mean layer lies in [l, l+1) (``latents``: ``Dists.frame()`` of latents that
    fired; mean layers are in MLSAE layer-index units, ``layers`` maps them to transformer layers).

    Returns the table and the Spearman rank correlation of the two columns over the pairs
    that have latents (NaN when fewer than three)."""
    import numpy as np
    import pandas as pd

    rows = []
    for i in range(len(layers) - 1):
        sel = latents[(latents["layer_mean"] >= i) & (latents["layer_mean"] < i + 1)]
        cos = resid["cos_next"].get(layers[i], np.nan) if layers[i] in resid.index else np.nan
        rows.append({"layer": layers[i], "centred cosine with the next layer": cos, "latents": len(sel),
                     "mean layer std of these latents": sel["layer_std"].mean() if len(sel) else np.nan})
    table = pd.DataFrame(rows).set_index("layer")
    ok = table.dropna()
    ok = ok[ok["latents"] > 0]
    rho = float("nan")
    if len(ok) >= 3:
        a, b = ok.iloc[:, 0].rank(), ok.iloc[:, 2].rank()
        rho = float(a.corr(b))
    return table, rho


# Findings compared between an MLSAE and its tuned-lens copy (the paper's claim 4): name -> (statistic,
# the test a value passes, in words).
LENS_FINDINGS = {
    "latents are specific to a few layers": (
        "layer std / layers", lambda v, uniform: v < uniform / 2,
        "mean layer std relative to depth below half that of a latent spread evenly over every layer"),
    "aggregated over tokens, layer distributions are wider than per token": (
        "aggregated / per-token variance", lambda v, uniform: v > 1,
        "aggregated / per-token variance of layer distributions above 1"),
}
# How far apart the two MLSAEs' mean relative layer std may be and still count as similar.
LENS_STD_FACTOR = 2.0


def lens_comparison(stats: dict[str, dict[str, float]], uniform_std_rel: float):
    """Whether the MLSAE's findings hold alike for its tuned-lens copy.

    ``stats``: per MLSAE (e.g. ``{"plain": ..., "tuned lens": ...}``, the plain one first) the statistics
    named in ``LENS_FINDINGS``; ``uniform_std_rel``: the layer std relative to depth of a latent spread
    evenly over every layer. Qualitatively similar means: every finding holds for both or for neither,
    and their mean relative layer std are within ``LENS_STD_FACTOR`` of each other.

    Returns a table (finding x MLSAE: holds or not) and whether they are similar.
    """
    import pandas as pd

    table = pd.DataFrame({name: {finding: bool(test(values[stat], uniform_std_rel))
                                 for finding, (stat, test, _) in LENS_FINDINGS.items()}
                          for name, values in stats.items()})
    agree = bool((table.nunique(axis=1) == 1).all())
    stds = [values["layer std / layers"] for values in stats.values()]
    close = max(stds) <= LENS_STD_FACTOR * min(stds) if min(stds) > 0 else False
    return table, agree and close
