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


# The tuned-lens copy tests claim 4 only while it still reconstructs the raw residuals: its FVU after
# the inverse translation below this, i.e. better than predicting every element by its layer's mean.
# An ill-conditioned lens (Gemma 3 270M's least-squares translators reach condition numbers near 1e7)
# magnifies the copy's errors past it, and the statistics of such an MLSAE describe latents that no
# longer preserve the model.
LENS_MAX_RAW_FVU = 1.0


def lens_verdict(findings, similar: bool, raw_fvu: float) -> str:
    """The tuned-lens chapter's verdict: ``findings`` and ``similar`` from ``lens_comparison``,
    ``raw_fvu``: the copy's FVU in the raw space (mean over layers)."""
    if not raw_fvu < LENS_MAX_RAW_FVU:
        return ("not tested: the tuned-lens copy does not reconstruct the raw residuals (after the inverse "
                "translation it does worse than predicting every element by its layer's mean), so its statistics "
                "are no test of the claim")
    return f"{'agrees' if similar else 'differs'}: " + "; ".join(
        f"{finding.lower()} {'for both' if row.all() else 'for neither' if not row.any() else 'for one only'}"
        for finding, row in findings.iterrows())


# The paper's claim 3 across models: the statistics it reports as larger in larger models (a
# ModelSide.statistics key starts with one of these; the multi-layer ones come per threshold).
SIZE_SPREAD = ("share at several layers", "mean layers / layers", "layer std / layers")
SIZE_SIMILARITY = "adjacent-layer similarity"
SIZE_DECIMALS = 3  # values equal to this many decimals (as the book shows them) count as equal


def size_comparison(stats: dict[str, dict[str, float]], sizes: dict[str, float]):
    """How two models compare on the paper's model-size claim.

    ``stats``: per model, its statistics (``book.models.ModelSide.statistics``); ``sizes``: per model, its
    parameter count. Returns a table (statistic x model, the smaller first, and whether the larger
    model's value is higher, lower or the same) and the findings: which model is larger, how many
    measures of spread over layers are higher / lower / the same in it, whether its adjacent layers
    are more similar, and the same counts for the paper's explanation (the model with more similar
    adjacent layers has latents spread over more layers), which does not depend on which is larger.
    """
    import numpy as np
    import pandas as pd

    if len(stats) != 2 or set(stats) != set(sizes):
        raise ValueError("size_comparison compares exactly two models, each with a size")
    small, large = sorted(stats, key=lambda name: sizes[name])
    table = pd.DataFrame(stats)[[small, large]]
    sign = np.sign(table[large].round(SIZE_DECIMALS) - table[small].round(SIZE_DECIMALS)).astype(int)
    table["in the larger model"] = sign.map({1: "higher", -1: "lower", 0: "the same"})
    spread = sign[[str(i).startswith(SIZE_SPREAD) for i in table.index]]
    similar = int(sign[SIZE_SIMILARITY])

    def counts(signs) -> dict[str, int]:
        return {"higher": int((signs > 0).sum()), "lower": int((signs < 0).sum()), "same": int((signs == 0).sum())}

    findings = {"larger": large, "spread": counts(spread), "similarity": similar,
                "explanation": counts(spread * similar) if similar else None}
    return table, findings


def size_verdict(findings: dict) -> str:
    """The model-size verdict in words (no digits), from ``size_comparison``'s findings."""
    c = findings["spread"]
    every = "by every measure" if not c["same"] else "by every measure that differs"
    if c["higher"] and c["lower"]:
        spread = "latents spread over more layers by some measures and over fewer by others"
    elif c["higher"] or c["lower"]:
        spread = f"latents spread over {'more' if c['higher'] else 'fewer'} layers {every}"
    else:
        spread = "latents spread over as many layers by every measure"
    similar = {1: "more", -1: "less", 0: "equally"}[findings["similarity"]]
    c = findings["explanation"]
    if c is None:
        explanation = "says nothing of the paper's explanation, as adjacent layers are equally similar in both"
    else:
        word = ("consistent with" if c["higher"] and not c["lower"] else "against" if c["lower"] and not c["higher"]
                else "partly consistent with" if c["higher"] else "neutral on")
        explanation = f"is {word} the paper's explanation (the model with more similar adjacent layers spreads its latents over more layers)"
    return (f"the larger model has {spread}, and {similar} similar adjacent layers; across the two models this "
            f"{explanation}; two models of different families are a weak test of a size trend")
