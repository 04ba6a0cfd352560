"""HTML views of the book: maximally activating examples as highlighted text."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from mlsae.book.figures import highlighted_tokens


def pick_latents(frame: pd.DataFrame, n: int, min_count: int = 1) -> list[int]:
    """``n`` latents spread evenly over mean layer, among those active on at least ``min_count``
    tokens (``frame`` is ``Dists.frame()``); the most frequently active latent of each slice."""
    pool = frame[frame["fired"] & (frame["count"] >= min_count)].sort_values("layer_mean")
    if pool.empty or n < 1:
        return []
    slices = np.array_split(np.arange(len(pool)), min(n, len(pool)))
    return [int(pool.iloc[s].sort_values("count", ascending=False)["latent"].iloc[0]) for s in slices if len(s)]


def examples_block(R, key: str, df: pd.DataFrame) -> str:
    """One latent's examples (``Examples.top(..., tokens=True)``) as an HTML table: rank,
    activation (recorded in ``R``) and the context window shaded by activation, the example's own
    token outlined. Shading is relative to the strongest activation in the block."""
    top = float(max((max(a) for a in df["acts"]), default=0.0))
    rows = []
    for _, row in df.iterrows():
        tokens = [t.replace("\n", "⏎") for t in row["tokens"]]
        act = R.num(f"{key}_rank{int(row['rank'])}", float(row["activation"]), ".2f")
        strip = highlighted_tokens(tokens, row["acts"], top, center=int(row["center"]))
        rows.append(f'<tr><td style="padding:2px 10px 2px 0;color:#555;text-align:right">{html.escape(act)}</td>'
                    f'<td style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;'
                    f'line-height:1.9;white-space:nowrap">{strip}</td></tr>')
    head = ('<tr><th style="text-align:right;padding-right:10px">activation</th>'
            '<th style="text-align:left">context (the example token outlined; hover a token for its activation)</th></tr>')
    return f'<table class="mlsae-examples" style="border-collapse:collapse">{head}{"".join(rows)}</table>'
