"""The prompt explorer as an ipywidgets app: works in Jupyter, and ``make explore`` serves it with Voilà.

All numbers come from ``mlsae.explorer.core.Explorer``; this module only wires controls to views. Each
control redraws only the views that depend on it, and every callback turns errors into a message in
the page, so a bad input never shows a traceback or leaves a dead widget.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from mlsae.explorer import figures as figs
from mlsae.explorer.core import (
    STEER_RANGE,
    THRESHOLD,
    Explorer,
    ExplorerInputError,
    PromptRun,
    check_factor,
    check_threshold,
    find_default_sae,
    find_examples,
    load_explorer,
)
from mlsae.utils import MLSAEError, quiet_hf_progress

log = logging.getLogger(__name__)

ENV_SAE = "MLSAE_EXPLORER_SAE"  # set by `make explore MODEL=...`
ENV_EXAMPLES = "MLSAE_EXPLORER_EXAMPLES"
_STYLES = {"info": ("#eef5ff", "#1a3d6d"), "warning": ("#fff6e0", "#6d4a00"), "error": ("#fdecea", "#8a1c1c")}
_BLANK = "#ffffff"


def _guarded(method: Callable) -> Callable:
    """Run a callback; show any error as a message in the page instead of a traceback."""

    @functools.wraps(method)
    def wrapper(self: ExplorerApp, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except MLSAEError as e:
            self.say(str(e), "error")
        except Exception as e:  # noqa: BLE001 - the page must stay alive whatever happens
            log.exception("explorer callback failed")
            self.say(f"something went wrong ({type(e).__name__}: {e}); the explorer is still usable", "error")
        finally:
            self.submit_button.disabled = False

    return wrapper


class ExplorerApp:
    """The widgets around an ``Explorer``; ``app.widget`` is what a notebook displays."""

    def __init__(self, explorer: Explorer, prompt: str = "", *, figure_width: int | None = None):
        self.ex = explorer
        self.figure_width = figure_width
        self.run: PromptRun | None = None
        self.layer = explorer.layers[len(explorer.layers) // 2]
        self.latent = 0
        self.position = 0
        self.threshold = THRESHOLD
        self.factor = 0.0
        self.timings: dict[str, float] = {}
        self._quiet = False  # set while controls are changed by the app itself
        self._figures: dict[int, tuple] = {}  # figure slot -> (key of its data, plotly JSON, marks shown)
        self.figure_specs: dict[W.Output, dict] = {}  # what each figure slot shows (plotly JSON)
        self._matrices: dict[str, tuple] = {}
        self._build(prompt)

    # -- layout -------------------------------------------------------------------------------

    def _build(self, prompt: str) -> None:
        self.header = W.HTML(self._header_html())
        self.prompt_box = W.Textarea(value=prompt, placeholder="Type a prompt, then press Submit",
                                     layout=W.Layout(width="100%", height="70px"))
        self.prompt_box.add_class("mlsae-prompt")
        self.submit_button = W.Button(description="Submit", button_style="primary")
        self.submit_button.add_class("mlsae-submit")
        self.message = W.HTML()
        self.message.add_class("mlsae-message")
        self.strip = W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", width="100%"))
        self.strip.add_class("mlsae-strip")
        self._buttons: list[W.Button] = []
        narrow = W.Layout(width="190px")
        style = {"description_width": "70px"}
        self.layer_box = W.IntText(value=self.layer, description="layer", layout=narrow, style=style)
        self.latent_box = W.IntText(value=0, description="latent", layout=narrow, style=style)
        self.position_box = W.IntText(value=0, description="position", layout=narrow, style=style)
        self.threshold_box = W.BoundedFloatText(value=THRESHOLD, min=0.0, max=1e6, step=0.01, description="threshold",
                                                layout=narrow, style=style)
        self.factor_slider = W.FloatSlider(value=0.0, min=STEER_RANGE[0], max=STEER_RANGE[1], step=0.5,
                                           description="steer ×", continuous_update=False, style=style,
                                           layout=W.Layout(width="320px"))
        self.strongest_button = W.Button(description="strongest latent here", tooltip=(
            "select the latent with the largest activation at this layer and position"))
        for box, name in ((self.layer_box, "layer"), (self.latent_box, "latent"), (self.position_box, "position")):
            box.add_class(f"mlsae-{name}")
        self.latent_fig, self.hist_fig, self.position_fig, self.heatmap_fig = (
            W.Output(layout=W.Layout(width="100%")) for _ in range(4))
        for slot, name in ((self.latent_fig, "latent-fig"), (self.hist_fig, "hist-fig"),
                           (self.position_fig, "position-fig"), (self.heatmap_fig, "heatmap-fig")):
            slot.add_class(f"mlsae-{name}")
        self.examples_html = W.HTML()
        self.picks = W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", width="100%"))
        self.picks.add_class("mlsae-picks")
        self._pick_buttons: list[W.Button] = []
        self._picks: list[tuple[int, float]] = []  # (latent, activation) of each shown button
        self.card_html = W.HTML()
        self.card_html.add_class("mlsae-card-view")
        self.logits_html = W.HTML()
        self.logits_html.add_class("mlsae-logits")
        controls = W.HBox([self.layer_box, self.latent_box, self.position_box, self.threshold_box,
                           self.factor_slider, self.strongest_button], layout=W.Layout(flex_flow="row wrap"))
        self._view_children = [
            _section("Tokens (shaded by the latent at the layer; click one to select its position)"), self.strip,
            controls,
            _section("Latents active at the selected layer and position (click one for its card)"), self.picks,
            _section("Next-token logits at the selected position"), self.logits_html,
            self.latent_fig,
            _section("Active latents at the selected position"), self.position_fig,
            _section("The whole prompt (hover a cell for its latent)"), self.heatmap_fig,
            self.hist_fig,
            _section("Max-activating examples of the latent at the layer"), self.examples_html,
            _section("The latent's card (as in the book's examples chapter)"), self.card_html,
        ]
        self.views = W.VBox([], layout=W.Layout(width="100%"))  # filled by the first good prompt
        self.widget = W.VBox([plotly_loader(), self.header, self.prompt_box, self.submit_button, self.message, self.views],
                             layout=W.Layout(width="100%"))
        self.widget.add_class("mlsae-explorer")
        self._wire()

    def _header_html(self) -> str:
        ex, cfg = self.ex, self.ex.sae.config
        return (f"<h3 style='margin:4px 0'>MLSAE prompt explorer</h3><div style='color:#555'>"
                f"{html.escape(ex.transformer.name)} · layers {ex.layers[0]}..{ex.layers[-1]} · {cfg.n_latents} latents"
                f" · k={cfg.k} · prompts up to {ex.max_tokens} tokens</div>")

    def _wire(self) -> None:
        self.submit_button.on_click(lambda _: self.submit())
        self.strongest_button.on_click(lambda _: self.select_strongest())
        for box, handler in ((self.layer_box, self.set_layer), (self.latent_box, self.set_latent),
                             (self.position_box, self.set_position), (self.threshold_box, self.set_threshold),
                             (self.factor_slider, self.set_factor)):
            box.observe(functools.partial(self._on_change, handler), names="value")

    def _on_change(self, handler: Callable[[Any], None], change: dict) -> None:
        """Apply a control's new value; the controls then show what the views show (a bad value is
        named in the message and the control goes back to the last good one)."""
        if not self._quiet:
            handler(change["new"])
            self._set_controls()

    # -- messages -----------------------------------------------------------------------------

    def say(self, text: str, kind: str = "info") -> None:
        if not text:
            self.message.value = ""
            return
        bg, fg = _STYLES[kind]
        self.message.value = (f"<div class='mlsae-{kind}' style='background:{bg};color:{fg};padding:6px 10px;"
                              f"border-radius:4px;margin:4px 0'>{html.escape(text)}</div>")

    # -- actions (public so tests and notebooks can drive the app without a browser) -----------

    @_guarded
    def submit(self, prompt: str | None = None) -> None:
        """Run the prompt (cached) and redraw everything."""
        if prompt is not None:
            self.prompt_box.value = prompt
        self.submit_button.disabled = True
        self.say("running the model…")
        start = time.perf_counter()
        run = self.ex.submit(self.prompt_box.value)
        self.run = run
        self.position = run.n_tokens - 1
        self.latent = self.ex.strongest_latent(run, self.layer, self.position)
        self._set_controls()
        self._draw_strip_buttons()
        self._redraw({"strip", "picks", "latent", "hist", "position", "heatmap", "examples", "card", "logits"})
        if not self.views.children:
            self.views.children = self._view_children
        self.timings["submit"] = time.perf_counter() - start
        self._notice(f"{run.n_tokens} tokens in {self.timings['submit']:.2f} s")

    @_guarded
    def set_layer(self, layer: int) -> None:
        self.ex.layer_index(layer)
        self.layer = int(layer)
        self._timed("layer", {"strip", "picks", "latent", "hist", "examples", "card", "logits"})

    @_guarded
    def set_latent(self, latent: int) -> None:
        self.latent = self.ex.check_latent(latent)
        self._timed("latent", {"strip", "latent", "position", "heatmap", "examples", "card", "logits"})

    @_guarded
    def set_position(self, position: int) -> None:
        if self.run is None:
            raise ExplorerInputError("submit a prompt first")
        self.position = self.ex.check_position(self.run, position)
        self._timed("position", {"strip_outline", "picks", "position", "logits"})

    @_guarded
    def set_threshold(self, threshold: float) -> None:
        self.threshold = check_threshold(threshold)
        self._timed("threshold", {"position"})

    @_guarded
    def set_factor(self, factor: float) -> None:
        self.factor = check_factor(factor)
        self._timed("factor", {"logits"})

    @_guarded
    def select_strongest(self) -> None:
        if self.run is None:
            raise ExplorerInputError("submit a prompt first")
        self.latent = self.ex.strongest_latent(self.run, self.layer, self.position)
        self._set_controls()
        self._timed("latent", {"strip", "latent", "position", "heatmap", "examples", "card", "logits"})

    @_guarded
    def select(self, latent: int | None = None, layer: int | None = None) -> None:
        """Select a latent (and layer) at once, e.g. from a notebook cell."""
        if layer is not None:
            self.ex.layer_index(layer)
            self.layer = int(layer)
        if latent is not None:
            self.latent = self.ex.check_latent(latent)
        self._set_controls()
        self._timed("select", {"strip", "picks", "latent", "hist", "position", "heatmap", "examples", "card", "logits"})

    # -- drawing ------------------------------------------------------------------------------

    def _timed(self, name: str, parts: set[str]) -> None:
        if self.run is None:
            self.say("submit a prompt first", "warning")
            return
        start = time.perf_counter()
        self._redraw(parts)
        self.timings[name] = time.perf_counter() - start
        self._notice()

    def _notice(self, extra: str = "") -> None:
        """The standing message: truncation notice if any, else a short status line."""
        run = self.run
        if run is not None and run.truncated:
            self.say(f"the prompt has {run.n_tokens_in} tokens; the explorer reads only the first {run.n_tokens} "
                     f"(its limit is {self.ex.max_tokens})", "warning")
        else:
            self.say(extra, "info") if extra else self.say("")

    def _set_controls(self) -> None:
        self._quiet = True
        try:
            self.layer_box.value = self.layer
            self.latent_box.value = self.latent
            self.position_box.value = self.position
            self.threshold_box.value = self.threshold
            self.factor_slider.value = self.factor
        finally:
            self._quiet = False

    def _redraw(self, parts: set[str]) -> None:
        draw = {
            "strip": self._draw_strip, "strip_outline": self._draw_outline, "latent": self._draw_latent,
            "hist": self._draw_hist, "position": self._draw_position, "heatmap": self._draw_heatmap,
            "examples": self._draw_examples, "logits": self._draw_logits, "picks": self._draw_picks,
            "card": self._draw_card,
        }
        for name in ("strip", "strip_outline", "picks", "latent", "hist", "position", "heatmap", "examples", "card",
                     "logits"):
            if name in parts:
                draw[name]()
                if name == "strip":
                    parts.discard("strip_outline")

    def _draw_strip_buttons(self) -> None:
        """One button per token (reused between prompts); a click selects that position."""
        run = self.run
        while len(self._buttons) < run.n_tokens:
            i = len(self._buttons)
            b = W.Button(layout=W.Layout(width="auto", height="28px", margin="1px", padding="0 4px"),
                         style=W.ButtonStyle(font_family="monospace", button_color=_BLANK))
            b.add_class("mlsae-token")
            b.on_click(functools.partial(self._click_token, i))
            self._buttons.append(b)
        for b, label in zip(self._buttons, run.tokens):
            b.description = label
        self.strip.children = tuple(self._buttons[: run.n_tokens])

    def _click_token(self, i: int, _button: W.Button) -> None:
        self._quiet = True
        self.position_box.value = i
        self._quiet = False
        self.set_position(i)

    def _draw_strip(self) -> None:
        run, ex = self.run, self.ex
        acts = ex.latent_acts(run, self.latent)
        values = acts[ex.layer_index(self.layer)].tolist()
        top = float(acts.max())  # one scale for all layers, so layers compare at a glance
        excluded, ids = run.excluded.tolist(), run.input_ids.tolist()
        for i, (b, v) in enumerate(zip(self._buttons, values)):
            b.style.button_color = _BLANK if excluded[i] else figs.shade(v, top)
            b.tooltip = f"position {i} · token id {ids[i]} · activation {v:.3f}"
        self._draw_outline()

    def _draw_outline(self) -> None:
        """Outline the selected position's token (a position change redraws only this)."""
        for i, b in enumerate(self._buttons[: self.run.n_tokens]):
            b.layout.border = f"2px solid {figs.ACCENT}" if i == self.position else "1px solid #ddd"

    def _draw_latent(self) -> None:
        """The latent at every layer and token (the strip above outlines the position: no redraw for it)."""
        run, ex = self.run, self.ex
        shapes = [figs.layer_band(self.layer)]
        self._show(self.latent_fig, (run.key, self.latent), shapes, lambda: figs.latent_tokens_figure(
            ex.latent_acts(run, self.latent), run.tokens, ex.layers, self.latent))

    def _draw_hist(self) -> None:
        run, ex = self.run, self.ex
        self._show(self.hist_fig, run.key, [figs.layer_band(self.layer)],
                   lambda: figs.histogram_figure(ex.histograms(run), ex.layers))

    def _draw_position(self) -> None:
        run, ex = self.run, self.ex
        m = self._matrix("position", (run.key, self.position, self.threshold),
                         lambda: ex.position_view(run, self.position, self.threshold))
        title = (f"Latents above {self.threshold:g} at position {self.position} "
                 f"(“{run.tokens[self.position]}”): {len(m.latents)} latents")
        self._show(self.position_fig, (run.key, self.position, self.threshold), figs.latent_band(m, self.latent),
                   lambda: figs.latent_layer_figure(m, title))

    def _draw_heatmap(self) -> None:
        run, ex = self.run, self.ex
        m = self._matrix("heatmap", run.key, lambda: ex.prompt_heatmap(run))
        title = f"Whole prompt: {len(m.latents)} latents fired (summed over tokens, normalised over layers)"
        self._show(self.heatmap_fig, run.key, figs.latent_band(m, self.latent),
                   lambda: figs.latent_layer_figure(m, title, value_name="share"))

    def _matrix(self, name: str, key, make: Callable):
        """A latent x layer matrix, recomputed only when its inputs change."""
        if self._matrices.get(name, (None,))[0] != key:
            self._matrices[name] = (key, make())
        return self._matrices[name][1]

    def _show(self, slot: W.Output, key, shapes: list[dict], make: Callable[[], go.Figure]) -> None:
        """Draw a figure; it is rebuilt only when its data (``key``) changed, else only the marks move.

        A figure goes out as a small HTML snippet that draws it with the plotly.js the app loaded
        once (``plotly_loader``). Not FigureWidgets: each carries its own 5 MB copy of plotly.js to
        the browser. Not plotly's mime renderer either: it draws every figure three times (react,
        redraw, and a PNG export for the notebook file), which made every update slow.
        """
        cached = self._figures.get(id(slot))
        if cached is not None and cached[0] == key and cached[2] == shapes:
            return  # the page already shows exactly this
        if cached is None or cached[0] != key:
            fig = make()
            fig.update_layout(template="plotly_white", width=self.figure_width)
            cached = (key, json.loads(fig.to_json()))
        self._figures[id(slot)] = (*cached[:2], shapes)
        spec = {"data": cached[1]["data"], "layout": {**cached[1]["layout"], "shapes": shapes},
                "config": {"displaylogo": False, "responsive": True}}
        self.figure_specs[slot] = spec
        slot.outputs = ({"output_type": "display_data", "metadata": {},
                         "data": {"text/html": figure_html(spec), "text/plain": _title(spec)}},)

    def _draw_picks(self) -> None:
        """A button per latent active at the selected layer and position; a click selects it."""
        self._picks = self.ex.top_latents(self.run, self.layer, self.position)
        while len(self._pick_buttons) < len(self._picks):
            b = W.Button(layout=W.Layout(width="auto", height="26px", margin="1px", padding="0 6px"))
            b.add_class("mlsae-pick")
            b.on_click(functools.partial(self._click_pick, len(self._pick_buttons)))
            self._pick_buttons.append(b)
        for b, (latent, value) in zip(self._pick_buttons, self._picks):
            b.description, b.tooltip = f"{latent} · {value:.2f}", f"latent {latent}: activation {value:.3f}"
        self.picks.children = tuple(self._pick_buttons[: len(self._picks)])

    def _click_pick(self, i: int, _button: W.Button) -> None:
        self.select(latent=self._picks[i][0])

    def _draw_card(self) -> None:
        self.card_html.value = figs.card_html(self.ex.card(self.latent), self.ex.transformer.tokenizer)

    def _draw_examples(self) -> None:
        table, why = self.ex.examples_table(self.latent, self.layer)
        if table is None:
            self.examples_html.value = f"<div style='color:#666'>{html.escape(why)}</div>"
        else:
            self.examples_html.value = figs.examples_html(table, self.ex.transformer.tokenizer)

    def _draw_logits(self) -> None:
        run, ex, p = self.run, self.ex, self.position
        panels: dict[str, Any] = {f"model, after “{run.tokens[p]}”": ex.logits_clean(run, p)}
        panels[f"layer {self.layer} → SAE reconstruction"] = ex.logits_recon(run, self.layer, p)
        name = f"steer latent {self.latent} ×{self.factor:g} at layer {self.layer}"
        panels[name] = (ex.logits_steered(run, self.layer, self.latent, self.factor, p) if self.factor
                        else "set a non-zero steering factor to steer")
        self.logits_html.value = figs.logits_html(panels)


@functools.lru_cache(maxsize=1)
def _plotly_js() -> str:
    """plotly.js from the plotly package, made to define ``window.Plotly`` even where an AMD loader exists."""
    from plotly.offline import get_plotlyjs

    return "(function(){var define, module, exports;\n" + get_plotlyjs() + "\n})();"


def plotly_loader() -> W.Output:
    """An invisible output that loads plotly.js into the page once, for every figure of the app."""
    out = W.Output(layout=W.Layout(display="none"))
    script = f"<script type='text/javascript'>if (!window.Plotly) {{ {_plotly_js()} }}</script>"
    out.outputs = ({"output_type": "display_data", "metadata": {}, "data": {"text/html": script, "text/plain": ""}},)
    return out


def figure_html(spec: dict) -> str:
    """A div and a script drawing ``spec`` with the page's plotly.js (waiting for it if it is still loading)."""
    div = f"mlsae-{uuid.uuid4().hex}"
    height = spec["layout"].get("height", 320)
    payload = json.dumps(spec).replace("<", "\\u003c")  # no "</script>" or "<!--" inside the script
    return (f'<div id="{div}" class="mlsae-plot" style="height:{height}px;width:100%"></div>'
            f'<script type="text/javascript">(function draw(tries){{var el=document.getElementById("{div}");'
            f'if(!el)return;if(!window.Plotly){{if(tries<600)setTimeout(function(){{draw(tries+1)}},50);return;}}'
            f'var s={payload};window.Plotly.newPlot(el,s.data,s.layout,s.config);}})(0);</script>')


def _title(spec: dict) -> str:
    title = spec["layout"].get("title")
    return title.get("text", "figure") if isinstance(title, dict) else str(title or "figure")


def _section(title: str) -> W.HTML:
    return W.HTML(f"<div style='font-weight:700;margin:10px 0 4px'>{html.escape(title)}</div>")


# ----------------------------------------------------------------------------- building it


def repo_root(start: str | os.PathLike = ".") -> Path:
    """The checkout this runs in (the folder with pyproject.toml), so relative paths mean the same from notebooks/."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "mlsae").is_dir():
            return folder
    return here


def resolve_sae(sae: str | os.PathLike | None, root: Path) -> str:
    """The MLSAE to explore: the argument, else ``$MLSAE_EXPLORER_SAE``, else ``make all``'s."""
    chosen = sae or os.environ.get(ENV_SAE) or None
    if chosen:
        return str(chosen)
    found = find_default_sae(root)
    if found is None:
        raise MLSAEError("no trained MLSAE found under runs/: run `make all` first, or pass one "
                         "(`make explore MODEL=<MLSAE folder or hub id>`)")
    return str(found)


def build_app(
    sae: Any = None,
    transformer: Any = None,
    examples: Any = None,
    *,
    device: str = "cpu",
    prompt: str = "",
    threads: int | None = None,
    **explorer_kwargs,
) -> W.Widget:
    """The explorer widget for an MLSAE (path, hub id, ``MLSAE`` or ``Explorer``); display it to use it.

    Arguments left as None come from ``$MLSAE_EXPLORER_SAE`` / ``$MLSAE_EXPLORER_EXAMPLES``, then from
    the runs ``make all`` wrote. Whatever goes wrong while loading becomes a message widget, never a
    traceback. With ``prompt``, that prompt is submitted at once. ``threads`` sets torch's thread
    count for this process: 1 keeps the app responsive when other jobs share the CPU (two threads
    that must wait for busy cores make each forward several times slower).
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        with quiet_hf_progress():
            app = make_app(sae, transformer, examples, device=device, **explorer_kwargs)
    except MLSAEError as e:
        return _error_widget(str(e))
    except Exception as e:  # noqa: BLE001
        log.exception("cannot build the explorer")
        return _error_widget(f"cannot start the explorer ({type(e).__name__}: {e})")
    if prompt:
        app.submit(prompt)
    return app.widget


def make_app(sae: Any = None, transformer: Any = None, examples: Any = None, *, device: str = "cpu",
             **explorer_kwargs) -> ExplorerApp:
    """Like ``build_app`` but returns the ``ExplorerApp`` (for tests and scripting) and raises errors."""
    if isinstance(sae, Explorer):
        return ExplorerApp(sae)
    root = repo_root()
    if sae is None or isinstance(sae, (str, os.PathLike)):
        sae = resolve_sae(sae, root)
    if examples is None:
        examples = os.environ.get(ENV_EXAMPLES) or (find_examples(sae, root) if isinstance(sae, str) else None)
    return ExplorerApp(load_explorer(sae, transformer, examples, device=device, **explorer_kwargs))


def _error_widget(text: str) -> W.HTML:
    bg, fg = _STYLES["error"]
    widget = W.HTML(f"<div class='mlsae-error' style='background:{bg};color:{fg};padding:8px 12px;border-radius:4px'>"
                    f"<b>The explorer could not start.</b> {html.escape(text)}</div>")
    widget.add_class("mlsae-explorer")
    return widget
