"""Plotting helpers for the book: a plotly renderer that works both in Jupyter and in the built book.

Jupyter shows plotly's own mimetype; the book (Jupyter Book 1.x) shows the ``text/html`` part,
which draws with the ``plotly.min.js`` that the build copies into the book's ``_static`` folder
once (so pages stay small and need no network).
"""

from __future__ import annotations

from pathlib import Path

PLOTLY_JS = "plotly.min.js"


def plotly_js_path() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / PLOTLY_JS


def register_renderer() -> None:
    """Make ``fig.show()`` emit both plotly's mimetype and a script-light HTML fragment."""
    import plotly.io as pio
    from plotly.io._base_renderers import MimetypeRenderer

    class BookRenderer(MimetypeRenderer):
        def to_mimebundle(self, fig_dict):
            bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig_dict)
            height = (fig_dict.get("layout") or {}).get("height") or 450
            bundle["text/html"] = pio.to_html(
                fig_dict, include_plotlyjs=False, full_html=False, default_height=f"{height}px",
                default_width="100%", config={"displaylogo": False, "responsive": True}, validate=False,
            )
            return bundle

    pio.renderers["mlsae_book"] = BookRenderer()
    pio.renderers.default = "mlsae_book"
