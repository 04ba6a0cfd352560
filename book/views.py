"""HTML views of the book: the choice of latents to show, and the explorer's views of a few prompts
precomputed as one self-contained HTML fragment (plotly.js inlined once), which a built book shows
without a kernel or a network."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from mlsae.explorer import Explorer, PromptRun
from mlsae.explorer import figures as figs
from mlsae.explorer.core import STEER_RANGE, THRESHOLD

HOW_TO_RUN_LIVE = """\
**Run the explorer live.** After `make all` has trained the default MLSAE, `make explore` serves
the explorer as a local web app (Voilà, bound to 127.0.0.1) and prints its address; open it in a
browser, type a prompt and press Submit. `make explore MODEL=<MLSAE folder or hub id>` explores
another MLSAE (its config names the transformer). In Jupyter, open `notebooks/explorer.ipynb` and
run it, or in any notebook:

```python
from mlsae.explorer.app import build_app
build_app("runs/default/mlsae-SmolLM2-135M-Instruct-x8-k32")
```

Click a token to select its position; the layer, latent, threshold and steering factor controls
update every view. Only the reconstruction and steering logits run the model again (from the
selected layer on); everything else reuses the prompt's cached forward pass.
"""


def pick_latents(frame: pd.DataFrame, n: int, min_count: int = 1) -> list[int]:
    """``n`` latents spread evenly over mean layer, among those active on at least ``min_count``
    tokens (``frame`` is ``Dists.frame()``); the most frequently active latent of each slice."""
    pool = frame[frame["fired"] & (frame["count"] >= min_count)].sort_values("layer_mean")
    if pool.empty or n < 1:
        return []
    slices = np.array_split(np.arange(len(pool)), min(n, len(pool)))
    return [int(pool.iloc[s].sort_values("count", ascending=False)["latent"].iloc[0]) for s in slices if len(s)]


# ----------------------------------------------------------------------------- the explorer's views


@dataclass
class View:
    title: str
    figure: go.Figure


def book_views(explorer: Explorer, prompts: Sequence[str], *, n_latents: int = 8, factor: float = 5.0,
               threshold: float = THRESHOLD) -> list[View]:
    """Precomputed interactive views of a few prompts, for the book's explorer chapter.

    Per prompt: the whole-prompt heatmap, the per-layer histograms, the top latents across layers and
    tokens (a dropdown picks the latent), the last position's active latents, and next-token logits
    at the last position: the model's, with each layer replaced by its reconstruction (a dropdown
    picks the layer), and steered by the prompt's strongest latent (a dropdown picks the factor).
    """
    views = []
    for prompt in prompts:
        run = explorer.submit(prompt)
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        views += _prompt_views(explorer, run, f"“{short}”", n_latents, factor, threshold)
    return views


def _prompt_views(ex: Explorer, run: PromptRun, name: str, n_latents: int, factor: float,
                  threshold: float) -> list[View]:
    last, mid = run.n_tokens - 1, ex.layers[len(ex.layers) // 2]
    top = _top_latents(ex, run, n_latents)
    return [
        View(f"{name}: prompt heatmap", figs.latent_layer_figure(ex.prompt_heatmap(run), "Latents of the whole prompt "
             "(activation summed over tokens, normalised over layers)", value_name="share")),
        View(f"{name}: histograms", figs.histogram_figure(ex.histograms(run), ex.layers)),
        View(f"{name}: top latents", _latent_dropdown_figure(ex, run, top)),
        View(f"{name}: last position", figs.latent_layer_figure(ex.position_view(run, last, threshold),
             f"Latents above {threshold:g} at the last token “{run.tokens[last]}”")),
        View(f"{name}: reconstruction logits", _recon_dropdown_figure(ex, run, last)),
        View(f"{name}: steering logits",
             _steer_dropdown_figure(ex, run, mid, ex.strongest_latent(run, mid, last), last, factor)),
    ]


def _top_latents(ex: Explorer, run: PromptRun, n: int) -> list[int]:
    """The prompt's latents with the largest total activation."""
    indices, values = run.topk.indices.reshape(-1).cpu(), run.topk.values.reshape(-1).float().cpu()
    totals = torch.zeros(ex.n_latents).scatter_add_(0, indices, values)
    return totals.topk(min(n, int((totals > 0).sum()) or 1)).indices.tolist()


def _dropdown(labels: Sequence[str]) -> dict:
    """A menu showing trace i alone when label i is picked (the traces were precomputed)."""
    buttons = [dict(label=label, method="update", args=[{"visible": [j == i for j in range(len(labels))]}])
               for i, label in enumerate(labels)]
    return dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.18, yanchor="top", showactive=True)


def _latent_dropdown_figure(ex: Explorer, run: PromptRun, latents: list[int]) -> go.Figure:
    fig = go.Figure()
    for i, f in enumerate(latents):
        trace = figs.latent_tokens_trace(ex.latent_acts(run, f), run.tokens, ex.layers)
        trace.visible = i == 0
        fig.add_trace(trace)
    fig.update_layout(**figs.heat_layout("The prompt's strongest latents at every layer and token", height=360),
                      updatemenus=[_dropdown([f"latent {f}" for f in latents])])
    figs.token_axis(fig, run.tokens)
    figs.layer_axis(fig, ex.layers)
    return fig


def _recon_dropdown_figure(ex: Explorer, run: PromptRun, position: int) -> go.Figure:
    clean = ex.logits_clean(run, position)
    fig = go.Figure()
    for i, layer in enumerate(ex.layers):
        trace = figs.logits_table({"model": clean, f"layer {layer} reconstructed": ex.logits_recon(run, layer, position)})
        trace.visible = i == 0
        fig.add_trace(trace)
    fig.update_layout(title=dict(text=f"Next token after “{run.tokens[position]}”: the model, and with one layer "
                                      "replaced by its reconstruction", font=dict(size=14)),
                      height=520, margin=dict(l=10, r=10, t=80, b=10),
                      updatemenus=[_dropdown([f"layer {layer}" for layer in ex.layers])])
    return fig


def _steer_dropdown_figure(ex: Explorer, run: PromptRun, layer: int, latent: int, position: int,
                           factor: float) -> go.Figure:
    factors = [-2 * factor, -factor, factor, 2 * factor]
    factors = [max(STEER_RANGE[0], min(STEER_RANGE[1], f)) for f in factors]
    clean = ex.logits_clean(run, position)
    fig = go.Figure()
    for i, f in enumerate(factors):
        trace = figs.logits_table({"model": clean, f"steered ×{f:g}": ex.logits_steered(run, layer, latent, f, position)})
        trace.visible = i == 0
        fig.add_trace(trace)
    fig.update_layout(title=dict(text=f"Next token after “{run.tokens[position]}”, steering latent {latent} at layer "
                                      f"{layer}", font=dict(size=14)),
                      height=520, margin=dict(l=10, r=10, t=80, b=10),
                      updatemenus=[_dropdown([f"factor {f:+g}" for f in factors])])
    return fig


def views_html(views: Sequence[View], *, include_plotlyjs: bool | str = True) -> str:
    """One HTML fragment of all views; plotly.js is inlined once so the page works offline."""
    parts = []
    for i, view in enumerate(views):
        div = view.figure.to_html(full_html=False, include_plotlyjs=include_plotlyjs if i == 0 else False,
                                  config={"displaylogo": False, "responsive": True})
        parts.append(f"<section><h4>{html.escape(view.title)}</h4>{div}</section>")
    return "\n".join(parts)
