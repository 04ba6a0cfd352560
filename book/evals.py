"""Evaluation results (``mlsae.evaluate``'s flat CSV columns) reshaped for the book's tables and plots."""

from __future__ import annotations

import pandas as pd

from mlsae.analysis.tables import PER_LAYER
from mlsae.evaluate import COLUMNS

LABELS = {"fvu": "FVU", "fvu_centred": "centred FVU", "mse": "MSE", "l0": "L0", "l1": "L1", "dead": "silent", "delta_ce": "ΔCE", "kl": "KL",
          "ce_recovered": "CE recovered", "ce_spliced": "CE spliced", "ce_zero": "CE zero-ablated",
          "excluded_variance": "variance left out"}
# metric -> (column prefix in mlsae.evaluate's results, label in the book)
METRICS = {metric: (COLUMNS[metric], label) for metric, label in LABELS.items()}

DEFINITIONS = {
    "FVU": "fraction of variance unexplained: sum of squared reconstruction errors over the sum of squared "
           "deviations of the layer's inputs from their mean (one scalar mean per layer)",
    "centred FVU": "the same squared errors over the sum of squared deviations from the layer's mean vector (one "
                   "mean per feature): a direction that every token shares (a large one in some models' residual "
                   "streams) counts as variance in FVU, not here",
    "MSE": "mean squared reconstruction error per element",
    "L0": "latents active per vector (activation above the dead threshold; at most k)",
    "L1": "sum of latent activations per vector",
    "silent": "fraction of latents that never fired at the layer on the evaluation tokens (per layer)",
    "dead": "fraction of latents that never fired at any layer on the evaluation tokens (the reference's "
            "and the paper's definition; a latent silent at some layers is specialised, not dead)",
    "ΔCE": "next-token cross-entropy (nats per token) with the layer's output replaced by its reconstruction, "
           "minus the clean cross-entropy",
    "KL": "KL(p_clean || p_spliced) of the next-token distributions, nats per token",
    "CE recovered": "(CE zero-ablated - CE spliced) / (CE zero-ablated - CE clean): 1 is a perfect "
                    "reconstruction, 0 no better than replacing the layer's output by zeros",
    "variance left out": "the share of the layer's variance (over every position) held by the positions "
                         "that the position rule leaves out",
}

# The default profile's targets for its main MLSAE: metric -> (results column, bound, "at most"/"at least").
# A dead latent fires at no layer (the reference's ``train/dead/rel``): a latent silent at one layer
# and active at others is the layer specialisation the book measures, not a wasted latent.
TARGETS = {
    "FVU (mean over layers)": ("train/fvu/avg", 0.10, "at most"),
    "CE recovered (mean over layers)": ("val/loss/recovered/avg", 0.92, "at least"),
    "dead latents (at no layer)": ("train/dead/rel", 0.02, "at most"),
}


def target_table(results: dict[str, float]) -> pd.DataFrame:
    """One row per target: the measured value, the bound and whether it is met."""
    rows = []
    for metric, (key, bound, sense) in TARGETS.items():
        value = results[key]
        met = value <= bound if sense == "at most" else value >= bound
        rows.append({"metric": metric, "value": value, "bound": sense, "target": bound, "met": "yes" if met else "no"})
    return pd.DataFrame(rows).set_index("metric")


def per_layer(results: dict[str, float], metrics=tuple(METRICS)) -> pd.DataFrame:
    """``[layer x metric]`` from one SAE's results (layers are transformer layers)."""
    metric_of = {METRICS[metric][0]: metric for metric in metrics}
    rows: dict[int, dict[str, float]] = {}
    for key, value in results.items():
        m = PER_LAYER.match(key)
        if m and m["metric"] in metric_of:
            rows.setdefault(int(m["layer"]), {})[metric_of[m["metric"]]] = value
    frame = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    frame = frame[[metric for metric in metrics if metric in frame.columns]]  # in the order asked for
    frame.index.name = "layer"
    return frame


def averages(results: dict[str, float]) -> dict[str, float]:
    """The ``/avg`` column of every metric (mean over layers), overall dead fraction and clean CE."""
    out = {m: results[f"{prefix}/avg"] for m, (prefix, _) in METRICS.items() if f"{prefix}/avg" in results}
    if "train/dead/rel" in results:
        out["dead_overall"] = results["train/dead/rel"]
    if "val/loss/clean" in results:
        out["ce_clean"] = results["val/loss/clean"]
    return out


def column(metric: str, which: str = "avg") -> str:
    """The results key of ``metric`` averaged (``avg``) or at a layer (an int)."""
    prefix = METRICS[metric][0]
    return f"{prefix}/avg" if which == "avg" else f"{prefix}/layer_{which}"


def trends(by_run: dict[tuple[int, int], dict[str, float]], metric: str) -> list[dict]:
    """Does ``metric`` fall as the expansion factor grows at fixed k, and as k grows at fixed
    expansion factor? One record per (direction, fixed value) with at least two runs: the number
    of pairs of runs (smaller, larger) and how many of them have a lower metric for the larger."""
    out = []
    efs = sorted({ef for ef, _ in by_run})
    ks = sorted({k for _, k in by_run})
    for along, fixed_values, key in (("ef", ks, lambda v, x: (x, v)), ("k", efs, lambda v, x: (v, x))):
        for fixed in fixed_values:
            xs = [x for x in (efs if along == "ef" else ks) if key(fixed, x) in by_run]
            pairs = [(a, b) for i, a in enumerate(xs) for b in xs[i + 1:]]
            if not pairs:
                continue
            agree = sum(by_run[key(fixed, b)][metric] < by_run[key(fixed, a)][metric] for a, b in pairs)
            out.append({"metric": metric, "along": along, "fixed": fixed, "pairs": len(pairs), "agree": agree})
    return out


def trend_lines(R, by_run: dict[tuple[int, int], dict[str, float]], metrics=("fvu", "delta_ce")) -> list[str]:
    """Markdown bullets stating, per metric and direction, whether the sweep agrees with the paper's
    trend (lower is better for every metric given), with the counts recorded in ``R``."""
    lines = []
    for metric in metrics:
        label = METRICS[metric][1]
        for t in trends(by_run, metric):
            other = "k" if t["along"] == "ef" else "expansion factor"
            along = "the expansion factor" if t["along"] == "ef" else "k"
            key = f"trend_{metric}_{t['along']}_{t['fixed']}"
            verdict = ("agrees with the paper" if t["agree"] == t["pairs"]
                       else "disagrees with the paper" if t["agree"] == 0 else "partly agrees with the paper")
            lines.append(f"- {label} falls as {along} grows at {other} {R.param(key + '_fixed', t['fixed'])}: "
                         f"{R.num(key + '_agree', t['agree'])} of {R.num(key + '_pairs', t['pairs'])} pairs — "
                         f"**{verdict}**.")
    if not lines:
        lines.append("- The sweep has a single MLSAE, so it cannot show how the metrics change with size or k.")
    return lines


# What makes two training runs the same recipe (all but the token budget and where they write).
RECIPE_KEYS = ("model_name", "path", "max_length", "tokens_per_step", "lr", "warmup_steps", "lr_schedule", "auxk",
               "auxk_coef", "dead_tokens_threshold", "dead_threshold", "standardize", "skip_special_tokens",
               "skip_first", "max_norm_ratio", "seed", "precision")


def same_recipe(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in RECIPE_KEYS)


def budget_curve(points: pd.DataFrame) -> pd.DataFrame:
    """For each target, a power law ``gap = exp(intercept) * tokens^slope`` fitted (least squares in
    log-log) to the points (``tokens`` and the results columns of TARGETS), where the gap to
    perfection is FVU, 1 - CE recovered or the dead fraction, and the token budget at which it
    reaches the target (NaN with fewer than two budgets or no decrease)."""
    import numpy as np

    rows = []
    for metric, (key, bound, sense) in TARGETS.items():
        flip = sense == "at least"  # CE recovered: its gap to 1 falls
        gap = (1 - points[key]) if flip else points[key]
        ok = (gap > 0) & (points["tokens"] > 0)
        needed, slope, intercept = float("nan"), float("nan"), float("nan")
        if points.loc[ok, "tokens"].nunique() >= 2:
            slope, intercept = np.polyfit(np.log(points.loc[ok, "tokens"]), np.log(gap[ok]), 1)
            goal = (1 - bound) if flip else bound
            if slope < 0:
                needed = float(np.exp((np.log(goal) - intercept) / slope))
        rows.append({"metric": metric, "slope": slope, "intercept": intercept, "tokens to reach the target": needed})
    return pd.DataFrame(rows).set_index("metric")


def at_budget(fit: pd.DataFrame, tokens: float) -> pd.Series:
    """Each target metric that ``budget_curve``'s power laws give after ``tokens`` training tokens."""
    import numpy as np

    gap = np.exp(fit["intercept"] + fit["slope"] * np.log(tokens))
    flip = pd.Series({metric: sense == "at least" for metric, (_, _, sense) in TARGETS.items()})
    return gap.where(~flip[gap.index], 1 - gap)


def budget_points(study: dict | None, cfg, results: dict[str, float]) -> pd.DataFrame:
    """The target metrics against training tokens for ``cfg``'s recipe: the recipe study's runs of
    that recipe (``book.perf.recipe_study``) and this build's main MLSAE (``results``, at the tokens
    it trained on, ``book.stages.trained_tokens``)."""
    from dataclasses import asdict

    from book.perf import recipe_points
    from book.stages import trained_tokens

    keys = [key for key, _, _ in TARGETS.values()]
    points = recipe_points(study["records"], asdict(cfg)) if study else pd.DataFrame(columns=["tokens", *keys, "source"])
    tokens = trained_tokens(cfg)
    this = pd.DataFrame([{"tokens": tokens, **{k: results[k] for k in keys}, "source": "this build"}])
    points = points[points["tokens"] != tokens]  # this build's run stands for its budget
    return pd.concat([points, this], ignore_index=True).sort_values("tokens", ignore_index=True)
