"""Every number the book shows goes through a ``Results`` recorder.

A notebook formats each number it displays with ``R.num`` (computed), ``R.param`` (a parameter
of the run) or ``R.paper`` (a claim or setting of the paper, quoted), and shows tables with
``R.table``; the recorder keeps the exact text shown in ``<out>/results/<notebook>.json``.
``book.check`` then reads the built HTML and fails on any number it cannot find there, so
no result can be typed into the book by hand. A number may name the file (and keys) it was read
from (``source=``), and the check verifies it against that file too.
"""

from __future__ import annotations

import json
import math
import re
from numbers import Number
from pathlib import Path
from typing import Any

from mlsae.utils import atomic_write_text

# The paper's claims and settings the book quotes (arXiv 2409.04185); they are not results of this build.
PAPER: dict[str, tuple[Any, str]] = {
    "arxiv": ("2409.04185", "arXiv identifier of the paper"),
    "year": (2025, "ICLR year"),
    "variance_ratio": (100, "aggregated over tokens vs single-token variance of a latent's layer distribution, "
                            "'about two orders of magnitude'"),
    "paper_ef": (64, "expansion factor of the paper's main MLSAEs"),
    "paper_k": (32, "k of the paper's main MLSAEs"),
    "paper_lr": (1e-4, "Adam learning rate of the paper"),
    "paper_context": (2048, "context length of the paper"),
    "paper_tokens_per_step": (131_072, "tokens per optimizer step in the paper"),
    "paper_tokens": ("1B", "training tokens of the paper"),
}

# A number as written in text: digits with optional thousands commas, decimals and exponent, not
# glued to a word on its left ("x8", "layer_3", "SmolLM2") or its right ("135M"), except a
# multiplier suffix "x" ("100x").
NUMBER = re.compile(r"(?<![A-Za-z0-9_.])\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?(?:x(?![A-Za-z0-9_]))?(?![A-Za-z0-9_])")


def number_tokens(text: str) -> list[str]:
    """The numbers in ``text``, normalised (no thousands commas, no sign, no 'x' suffix)."""
    return [normalise(m.group(0)) for m in NUMBER.finditer(text)]


def normalise(token: str) -> str:
    return token.replace(",", "").rstrip("x")


def fmt_number(value: Any, fmt: str | None = None) -> str:
    """Format a number as the book shows it: ``fmt`` if given, else ints with thousands commas
    and floats with 3 significant digits (no thousands commas below 10,000)."""
    text = _fmt(value, fmt)
    return text[1:] if re.fullmatch(r"-[0.,]+%?", text) else text  # no "-0.000"


def _fmt(value: Any, fmt: str | None) -> str:
    if isinstance(value, str):
        return value
    if hasattr(value, "item"):
        value = value.item()
    if fmt is not None:
        return format(value, fmt)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (Number, str, bool)) or value is None else str(value)


class Results:
    """The numbers one notebook shows, saved as ``<out_dir>/results/<name>.json`` at every call."""

    def __init__(self, name: str, out_dir: str | Path):
        self.name = name
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "results" / f"{name}.json"
        self.items: dict[str, dict] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.save()

    # ----- recording

    def _record(self, key: str, value: Any, text: str, kind: str, **extra: Any) -> str:
        base, n = key, 1
        while key in self.items and self.items[key]["text"] != text:  # never lose a number already shown
            n += 1
            key = f"{base}#{n}"
        self.items[key] = {"value": _plain(value), "text": text, "kind": kind,
                           **{k: v for k, v in extra.items() if v is not None}}
        self.save()
        return text

    def num(self, key: str, value: Any, fmt: str | None = None, *, source: tuple[str, list[str]] | None = None,
            headline: str | None = None) -> str:
        """Record a computed number and return its text. ``source=(file, keys)``: the JSON file
        (relative to the output folder) and key path it was read from; ``headline``: a label under
        which the introduction lists it."""
        src = {"file": str(source[0]), "keys": list(source[1])} if source else None
        return self._record(key, value, fmt_number(value, fmt), "computed", source=src, headline=headline)

    def param(self, key: str, value: Any, fmt: str | None = None) -> str:
        """Record a parameter of this run (a token budget, k, a layer index) and return its text."""
        if isinstance(value, (list, tuple)):
            return self._record(key, list(value), ", ".join(fmt_number(v, fmt) for v in value), "parameter")
        return self._record(key, value, fmt_number(value, fmt), "parameter")

    def paper(self, key: str, fmt: str | None = None) -> str:
        """Record and return a quoted claim or setting of the paper (``PAPER``)."""
        value, what = PAPER[key]
        return self._record(f"paper/{key}", value, fmt_number(value, fmt), "paper", what=what)

    def verdict(self, key: str, claim: str, verdict: str) -> str:
        """Record how this build's result compares with one of the paper's claims (listed in the
        book's introduction) and return the verdict."""
        self._record(f"verdict/{key}", verdict, verdict, "verdict", claim=claim)
        return verdict

    def text(self, key: str, value: str) -> str:
        """Record a label that may contain digits (a model name, a date, a path) and return it."""
        return self._record(key, str(value), str(value), "text")

    def save(self) -> None:
        payload = {"notebook": self.name, "items": self.items, "tables": self.tables}
        atomic_write_text(self.path, json.dumps(payload, indent=1, default=str))

    # ----- showing

    def md(self, text: str) -> None:
        """Show Markdown (its numbers must come from ``num``/``param``/``paper``/``text``)."""
        from IPython.display import Markdown, display

        display(Markdown(text))

    def table(self, key: str, df, fmt: str | dict | None = None, *, caption: str | None = None,
              index: bool = True, show: bool = True):
        """Show a DataFrame with its numbers formatted (``fmt``: one format for every number, or
        one per column) and record every cell (returns nothing, so a cell ending with it shows
        the table once)."""
        import numpy as np
        import pandas as pd
        from IPython.display import HTML, display

        def cell(value, col):
            spec = fmt.get(col) if isinstance(fmt, dict) else fmt
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return ""
            if isinstance(value, Number) or hasattr(value, "item"):
                return fmt_number(value, spec)
            return str(value)

        out = pd.DataFrame({col: [cell(v, col) for v in df[col]] for col in df.columns}, index=df.index)
        # integer labels (layers, latent indices) as plain digits; other numbers formatted
        out.index = [str(i) if isinstance(i, (int, np.integer)) else fmt_number(i) if isinstance(i, Number) else str(i)
                     for i in out.index]
        out.columns = [str(c) for c in out.columns]
        out.index.name = None if df.index.name is None else str(df.index.name)
        rows = [[str(c) for c in out.columns]]
        rows += [[str(i), *row] for i, row in zip(out.index, out.values.tolist())]
        if out.index.name:
            rows.append([out.index.name])
        if caption:
            rows.append([caption])
        self.tables[key] = rows
        self.save()
        if show:
            html = out.to_html(index=index, escape=True, border=0, classes="mlsae-table")
            if caption:
                html = html.replace(">\n  <thead>", f">\n  <caption>{_escape(caption)}</caption>\n  <thead>", 1)
            display(HTML(html))

    def view(self, key: str, fragment: str) -> None:
        """Show an HTML view that package code computed (a latent card) and record its visible text,
        so its numbers, all measured by that code, pass the build's check like a table's cells."""
        from bs4 import BeautifulSoup
        from IPython.display import HTML, display

        self.tables[key] = [[" ".join(BeautifulSoup(fragment, "html.parser").get_text(" ").split())]]
        self.save()
        display(HTML(fragment))

    # ----- reading back

    @staticmethod
    def allowed(results_dir: str | Path) -> set[str]:
        """Every number token any notebook of a build recorded (the check's whitelist)."""
        tokens: set[str] = set()
        for path in Path(results_dir).glob("*.json"):
            data = json.loads(path.read_text())
            for item in data.get("items", {}).values():
                tokens.update(number_tokens(item["text"]))
                tokens.update(number_tokens(str(item.get("claim", ""))))
            for rows in data.get("tables", {}).values():
                for row in rows:
                    for c in row:
                        tokens.update(number_tokens(c))
        for value, _ in PAPER.values():
            tokens.update(number_tokens(fmt_number(value)))
        return tokens


def _escape(text: str) -> str:
    import html

    return html.escape(text)
