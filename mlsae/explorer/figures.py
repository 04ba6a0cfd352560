"""Plotly figures and HTML fragments for the explorer's views, shared by the live app and the book.

Every builder takes the plain values an ``Explorer`` computes, so the live widgets and the book's
precomputed pages (``book.views``) draw the same pictures.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor

from mlsae.explorer.core import (
    Histograms,
    LatentLayerMatrix,
    Logit,
    LogitLists,
    token_texts,
    visible,
)

ACCENT = "#1565c0"  # selection outlines
SHADE = (255, 127, 14)  # activation shading (plotly's orange)
_FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"


def intensity(value: float, top: float) -> float:
    """``value`` on a 0..``top`` scale, clipped to [0, 1] (0 when ``top`` is not positive)."""
    return 0.0 if top <= 0 else max(0.0, min(1.0, value / top))


def shade(value: float, top: float) -> str:
    """A background colour from white to orange for ``value`` on a 0..``top`` scale (hex, for widgets)."""
    a = intensity(value, top)
    r, g, b = (round(255 + (c - 255) * a) for c in SHADE)
    return f"#{r:02x}{g:02x}{b:02x}"


def _np(t: Tensor):
    """A CPU numpy array (plotly serialises these compactly)."""
    return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def layer_axis(fig: go.Figure, layers: Sequence[int]) -> None:
    """A y axis of whole layer numbers (every layer labelled while they fit)."""
    fig.update_yaxes(title_text="layer", dtick=1 if len(layers) <= 16 else None)
    fig.update_layout(height=max(320, 110 + 10 * len(layers)))  # rows stay readable with many layers


def heat_layout(title: str, height: int = 320) -> dict:
    """No template here: the live app sets one per widget once (templates are slow to copy)."""
    return dict(title=dict(text=title, font=dict(size=14)), height=height, margin=dict(l=60, r=20, t=40, b=50))


# ----------------------------------------------------------------------------- selection marks


def layer_band(layer: int) -> dict:
    """An outline around one layer's row."""
    return dict(type="rect", xref="paper", x0=0, x1=1, y0=layer - 0.5, y1=layer + 0.5, line=dict(color=ACCENT, width=2))


def latent_band(m: LatentLayerMatrix, latent: int | None) -> list[dict]:
    """An outline around a latent's column of a latent x layer figure, if it is there."""
    if latent is None or latent not in m.latents:
        return []
    return [dict(type="rect", yref="paper", y0=0, y1=1, x0=m.latents.index(latent) - 0.5,
                 x1=m.latents.index(latent) + 0.5, line=dict(color=ACCENT, width=2))]


# ----------------------------------------------------------------------------- figures


def latent_layer_figure(
    m: LatentLayerMatrix, title: str, *, value_name: str = "activation"
) -> go.Figure:
    """Latents (sorted by mean layer) along x, layers along y, with each latent's mean layer marked.

    The paper draws its prompt heatmaps this way round, so a drift of latents to deeper layers
    reads left to right. x is the latent's rank (a numeric axis stays fast with thousands of
    latents); hovering names the latent, and the axis names them while they fit.
    """
    n = len(m.latents)
    ranks = np.arange(n)
    ids = np.asarray(m.latents, dtype=np.int32)
    fig = go.Figure(go.Heatmap(
        x=ranks, y=m.layers, z=_np(m.values.T) if n else [[]], colorscale="Viridis", zmin=0,
        customdata=np.broadcast_to(ids, (len(m.layers), n)) if n else None,
        hovertemplate="latent %{customdata}<br>layer %{y}<br>" + value_name + " %{z:.3g}<extra></extra>",
        colorbar=dict(title=dict(text=value_name, side="right"), thickness=12),
    ))
    fig.add_trace(go.Scatter(
        x=ranks, y=_np(m.mean_layer), customdata=ids, mode="markers", showlegend=False,
        marker=dict(size=4, color="white", line=dict(width=0.5)),
        hovertemplate="latent %{customdata}: mean layer %{y:.2f}<extra></extra>",
    ))
    fig.update_layout(**heat_layout(title))
    layer_axis(fig, m.layers)
    few = n <= 40
    fig.update_xaxes(title_text=f"{n} latents, sorted by mean layer", showticklabels=few,
                     tickmode="array" if few else "auto", tickvals=ranks if few else None,
                     ticktext=[str(f) for f in m.latents] if few else None)
    if not n:
        fig.add_annotation(text="no latent above the threshold here", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    return fig


def histogram_figure(h: Histograms, layers: Sequence[int]) -> go.Figure:
    """Per-layer histograms of the prompt's activations as one layer x activation heatmap (log counts)."""
    centres = _np((h.edges[1:] + h.edges[:-1]) / 2)
    fig = go.Figure(go.Heatmap(
        x=centres, y=list(layers), z=_np(torch.log10(1 + h.counts)), colorscale="Blues",
        customdata=_np(h.counts.long()),
        hovertemplate="layer %{y}<br>activation %{x:.3g}<br>%{customdata} latents<extra></extra>",
        colorbar=dict(title=dict(text="log10(1+count)", side="right"), thickness=12),
    ))
    fig.update_layout(**heat_layout("Latent activations per layer (histograms)"))
    layer_axis(fig, layers)
    fig.update_xaxes(title_text="activation")
    return fig


def latent_tokens_figure(
    acts: Tensor, tokens: Sequence[str], layers: Sequence[int], latent: int
) -> go.Figure:
    """One latent's activation at every (layer, token): where in depth and in the prompt it fires."""
    fig = go.Figure(latent_tokens_trace(acts, tokens, layers))
    fig.update_layout(**heat_layout(f"Latent {latent} at every layer and token"))
    layer_axis(fig, layers)
    token_axis(fig, tokens)
    return fig


def latent_tokens_trace(acts: Tensor, tokens: Sequence[str], layers: Sequence[int]) -> go.Heatmap:
    return go.Heatmap(
        x=list(range(len(tokens))), y=list(layers), z=_np(acts), colorscale="Oranges", zmin=0,
        customdata=[list(tokens)] * len(layers),
        hovertemplate="token %{x} %{customdata}<br>layer %{y}<br>activation %{z:.3g}<extra></extra>",
        colorbar=dict(title=dict(text="activation", side="right"), thickness=12),
    )


def token_axis(fig: go.Figure, tokens: Sequence[str]) -> None:
    """Token positions along x, labelled with the tokens while they fit."""
    few = len(tokens) <= 48
    fig.update_xaxes(title_text="token", tickmode="array", tickvals=list(range(len(tokens))) if few else None,
                     ticktext=list(tokens) if few else None, tickangle=-60)


def logits_table(lists: dict[str, LogitLists]) -> go.Table:
    """A plotly table of next-token logit lists (for the book, where there are no widgets)."""
    header, columns = [], []
    for name, ll in lists.items():
        header += [f"{name}: top", "logit", "p"]
        columns += [[t.token for t in ll.top], [f"{t.value:.2f}" for t in ll.top],
                    [f"{t.prob:.3f}" if t.prob is not None else "" for t in ll.top]]
        if ll.increases:
            header += ["increases", "Δ", "decreases", "Δ"]
            columns += [[t.token for t in ll.increases], [f"{t.value:+.2f}" for t in ll.increases],
                        [t.token for t in ll.decreases], [f"{t.value:+.2f}" for t in ll.decreases]]
    return go.Table(
        header=dict(values=header, font=dict(size=11), align="left"),
        cells=dict(values=columns, font=dict(family=_FONT, size=11), align="left", height=20),
    )


# ----------------------------------------------------------------------------- HTML fragments


def token_strip_html(tokens: Sequence[str], values: Sequence[float], top: float, selected: int | None = None) -> str:
    """Tokens as shaded spans (used for examples and the book; the live strip is clickable buttons)."""
    spans = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        border = f"outline:2px solid {ACCENT};" if i == selected else ""
        spans.append(
            f'<span title="{v:.3g}" style="background:{shade(v, top)};{border}padding:1px 2px;margin:1px;'
            f'border-radius:3px;white-space:pre">{html.escape(t)}</span>'
        )
    return f'<div style="font-family:{_FONT};font-size:13px;line-height:1.9">{"".join(spans)}</div>'


def examples_html(table, tokenizer, n: int = 32) -> str:
    """Max-activating examples as rows of shaded tokens, the example's own token outlined."""
    rows = []
    for _, row in table.head(n).iterrows():
        tokens = [visible(t) for t in token_texts(tokenizer, list(row["token_ids"]))]
        acts = [float(a) for a in row["acts"]]
        strip = token_strip_html(tokens, acts, max(acts, default=0.0), selected=int(row["center"]))
        rows.append(
            f'<tr><td style="padding-right:8px;color:#555">{int(row["rank"]) + 1}</td>'
            f'<td style="padding-right:8px;font-family:{_FONT}">{float(row["activation"]):.3f}</td><td>{strip}</td></tr>'
        )
    return f'<table style="border-collapse:collapse;margin:0"><tr><th>#</th><th>act</th><th>context</th></tr>{"".join(rows)}</table>'


def _logit_rows(items: Sequence[Logit], signed: bool) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    rows = []
    for t in items:
        prob = "" if t.prob is None else f"<td style='color:#555'>{t.prob:.3f}</td>"
        rows.append(f"<tr><td style='font-family:{_FONT};white-space:pre'>{html.escape(t.token)}</td>"
                    f"<td style='text-align:right'>{fmt.format(t.value)}</td>{prob}</tr>")
    return "".join(rows)


def logit_table_html(title: str, items: Sequence[Logit], signed: bool = False) -> str:
    head = "<th>token</th><th>Δ logit</th>" if signed else "<th>token</th><th>logit</th><th>p</th>"
    return (f"<div style='margin:0 12px 8px 0'><div style='font-weight:600'>{html.escape(title)}</div>"
            f"<table style='font-size:12px;border-collapse:collapse;margin:0'><tr>{head}</tr>{_logit_rows(items, signed)}</table></div>")


def logits_html(panels: dict[str, LogitLists | str]) -> str:
    """Panels of logit tables side by side; a panel given as a string is a message instead."""
    parts = []
    for name, ll in panels.items():
        if isinstance(ll, str):
            body = f"<div style='color:#a00'>{html.escape(ll)}</div>"
        else:
            body = logit_table_html(f"top {len(ll.top)}", ll.top)
            if ll.increases or ll.decreases:
                body += logit_table_html("largest increases", ll.increases, signed=True)
                body += logit_table_html("largest decreases", ll.decreases, signed=True)
        parts.append(f"<div style='margin:0 24px 12px 0'><div style='font-weight:700;margin-bottom:4px'>"
                     f"{html.escape(name)}</div><div style='display:flex;flex-wrap:wrap'>{body}</div></div>")
    return f"<div style='display:flex;flex-wrap:wrap'>{''.join(parts)}</div>"


# ----------------------------------------------------------------------------- latent cards

_SVG_TEXT = "font-size:10px;fill:#555;font-family:system-ui,sans-serif"


def _svg(width: int, height: int, body: str, title: str) -> str:
    return (f"<div style='margin:0 16px 8px 0'><div style='font-weight:600;font-size:13px'>{html.escape(title)}</div>"
            f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>{body}</svg></div>")


def _text(x: float, y: float, s: str, anchor: str = "middle") -> str:
    return f"<text x='{x:.1f}' y='{y:.1f}' text-anchor='{anchor}' style='{_SVG_TEXT}'>{html.escape(s)}</text>"


def layer_bars_svg(values: Sequence[float], layers: Sequence[int], title: str, width: int = 280, height: int = 120) -> str:
    """A bar per layer (hover a bar for its value), the layer on the x axis."""
    left, bottom, top_pad = 30, 16, 6
    plot_w, plot_h = width - left - 4, height - bottom - top_pad
    top = max(max(values, default=0.0), 1e-12)
    bw = plot_w / max(len(values), 1)
    bars = [f"<rect x='{left + i * bw:.1f}' y='{top_pad + plot_h * (1 - v / top):.1f}' width='{max(bw - 1, 1):.1f}' "
            f"height='{plot_h * v / top:.1f}' fill='{ACCENT}'><title>layer {l}: {v:.3g}</title></rect>"
            for i, (l, v) in enumerate(zip(layers, values))]
    ticks = sorted({0, len(layers) // 2, len(layers) - 1}) if layers else []
    labels = [_text(left + (i + 0.5) * bw, height - 4, str(layers[i])) for i in ticks]
    axis = [_text(left - 3, top_pad + 8, f"{top:.2g}", "end"), _text(left - 3, top_pad + plot_h, "0", "end")]
    return _svg(width, height, "".join(bars + labels + axis), title)


def histogram_svg(hist: Tensor, edges: Tensor, layers: Sequence[int], title: str, width: int = 280,
                  height: int = 150) -> str:
    """Tokens per (layer, activation bin) as shaded cells, layer 0 at the top and log-spaced bins
    (only the range of bins with any token) along x; the shade is log(1 + count)."""
    left, bottom = 30, 16
    nonzero = hist.sum(0).nonzero().flatten().tolist()
    if not nonzero:
        return _svg(width, 30, _text(4, 16, "never active", "start"), title)
    b0, b1 = nonzero[0], nonzero[-1] + 1
    h = hist[:, b0:b1].double()
    cw, ch = (width - left - 4) / (b1 - b0), (height - bottom) / len(layers)
    top = float(h.max().log1p())
    cells = []
    for i, row in enumerate(h.tolist()):
        for j, c in enumerate(row):
            if c:
                lo, hi = float(edges[b0 + j]), float(edges[b0 + j + 1])
                cells.append(f"<rect x='{left + j * cw:.1f}' y='{i * ch:.1f}' width='{cw + 0.2:.1f}' height='{ch + 0.2:.1f}' "
                             f"fill='{shade(float(np.log1p(c)), top)}'><title>layer {layers[i]}, activation "
                             f"{lo:.3g}–{hi:.3g}: {int(c)} tokens</title></rect>")
    frame = f"<rect x='{left}' y='0' width='{width - left - 4}' height='{height - bottom}' fill='none' stroke='#ddd'/>"
    labels = [_text(left, height - 4, f"{float(edges[b0]):.2g}", "start"),
              _text(width - 4, height - 4, f"{float(edges[b1]):.2g}", "end"),
              _text((left + width) / 2, height - 4, "activation (log)"),
              _text(left - 3, ch / 2 + 4, str(layers[0]), "end"), _text(left - 3, height - bottom, str(layers[-1]), "end")]
    return _svg(width, height, frame + "".join(cells + labels), title)


def card_html(card, tokenizer, n_examples: int = 5) -> str:
    """One latent's card (``mlsae.analysis.cards.LatentCard``) as HTML with inline SVG: no scripts,
    so it shows the same in the book, a widget and a saved page."""
    head = f"<div style='font-size:16px;font-weight:700'>Latent {card.latent}</div>"
    if card.probs is not None:
        active = int(card.counts.sum())
        mean_layer = np.interp(card.layer_mean, range(len(card.layers)), card.layers)
        head += (f"<div style='color:#555;font-size:13px'>mean layer {mean_layer:.1f} · layer std {card.layer_std:.2f} · "
                 f"active on {active} token-layer pairs of {card.tokens} tokens × {len(card.layers)} layers</div>")
    panels = []
    if card.probs is not None:
        panels.append(layer_bars_svg(torch.nan_to_num(card.probs).tolist(), card.layers, "share of activation per layer, p(l | f)"))
    if card.hist is not None:
        panels.append(histogram_svg(card.hist, card.edges, card.layers, "activations per layer (rows: layers, shade: log tokens)"))
    panels.append(logit_table_html("promotes (direct logit effect)", card.promoted, signed=True))
    panels.append(logit_table_html("suppresses", card.suppressed, signed=True))
    parts = [head, f"<div style='display:flex;flex-wrap:wrap;align-items:flex-start;margin-top:6px'>{''.join(panels)}</div>"]
    for layer, df in card.contexts.items():
        i = card.layers.index(layer)
        share = "" if card.probs is None else f" · {float(torch.nan_to_num(card.probs[i])):.0%} of its activation"
        count = "" if card.counts is None else f" · active on {int(card.counts[i])} tokens"
        parts.append(f"<div style='font-weight:600;font-size:13px;margin-top:8px'>top contexts at layer {layer}{share}{count}</div>"
                     + examples_html(df, tokenizer, n_examples))
    if card.missing:
        parts.append(f"<div style='color:#888;font-size:12px;margin-top:6px'>not shown (the analysis folder lacks it): "
                     f"{html.escape(', '.join(card.missing))}</div>")
    return (f"<div class='mlsae-card' id='latent-{card.latent}' style='border:1px solid #ddd;border-radius:6px;"
            f"padding:10px 14px;margin:10px 0'>{''.join(parts)}</div>")
