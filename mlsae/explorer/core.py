"""The prompt explorer's logic: one cached forward pass per prompt, and the values behind every view.

No widget code lives here (that is ``mlsae.explorer.app``), so the numbers each view shows can be
tested directly against the SAE and the transformer, and reused by the book's static figures.

A prompt costs one transformer forward (residuals of every SAE layer and the clean logits) and one
SAE forward; after that, changing the layer, latent, position or threshold is array indexing. Only
the reconstruction and steering logits need new forwards, from the selected layer on, and those are
cached per (layer) and per (layer, latent, factor).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mlsae.kernels import TopK
from mlsae.model import MLSAE
from mlsae.positions import read_residuals
from mlsae.precision import autocast as precision_autocast
from mlsae.precision import resolve as resolve_precision
from mlsae.transformer import Transformer
from mlsae.utils import MLSAEError

if TYPE_CHECKING:
    import pandas as pd

N_LOGITS = 16  # as many next-token logits as the reference app shows
MAX_TOKENS = 512  # the explorer's own prompt limit (a model's context may be larger)
THRESHOLD = 0.05  # the reference app's default for "active at this position"
STEER_RANGE = (-10.0, 10.0)
HIST_BINS = 64

# How whitespace and invisible characters are drawn in token strips.
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍", "\u00a0": "⍽", "\u200b": "[ZWSP]", "\ufeff": "[BOM]"}


class ExplorerInputError(MLSAEError):
    """Bad input from the person using the explorer; its message is shown in the page as is."""


# ----------------------------------------------------------------------------- tokens as text


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table, used by every byte-level BPE tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The exact text of each token; bytes of a character split across tokens shown as ``\\xNN``.

    Decoding tokens one by one would turn every piece of a split emoji into the same replacement
    character, which hides what the model actually sees.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    special = set(getattr(tokenizer, "all_special_tokens", []))
    decoder = _byte_decoder()
    out = []
    for i, piece in zip(ids, pieces):
        if piece is None:
            out.append(f"<{i}>")
        elif piece in special:
            out.append(piece)
        elif all(c in decoder for c in piece):
            out.append(bytes(decoder[c] for c in piece).decode("utf-8", errors="backslashreplace"))
        else:  # SentencePiece-style vocabularies
            out.append(tokenizer.decode([i]) if "▁" not in piece else piece.replace("▁", " "))
    return out


def visible(text: str) -> str:
    """Whitespace and invisible characters drawn as symbols, so every token has a visible label."""
    out = []
    for c in text:
        if c in _VISIBLE:
            out.append(_VISIBLE[c])
        elif not c.isprintable() and not c.startswith("\\"):
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out) or "∅"


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Logit:
    token_id: int
    token: str  # visible text
    value: float  # logit, or logit change
    prob: float | None = None  # softmax probability (None for changes)


@dataclass(frozen=True)
class LogitLists:
    """Next-token logits at one position: the top ones and, for an edited model, the largest changes."""

    top: list[Logit]
    increases: list[Logit]
    decreases: list[Logit]


@dataclass(frozen=True)
class Histograms:
    edges: Tensor  # [bins + 1] shared by all layers
    counts: Tensor  # [L, bins] activations above the SAE's firing threshold


@dataclass(frozen=True)
class LatentLayerMatrix:
    """Latents x layers values (position view and prompt heatmap), rows sorted by mean layer."""

    latents: list[int]
    values: Tensor  # [n, L]
    mean_layer: Tensor  # [n] activation-weighted mean of the (transformer) layer numbers
    layers: list[int]


@dataclass
class PromptRun:
    """Everything the views need about one prompt, from one transformer and one SAE forward."""

    prompt: str
    input_ids: Tensor  # [P]
    texts: list[str]  # exact text of each token
    excluded: Tensor  # [P] bool: positions the MLSAE's position rule leaves out are not encoded
    n_tokens_in: int  # tokens before truncation
    resid: Tensor  # [L, P, d] float32, the SAE's layers only
    topk: TopK  # [L, P, k] on the CPU; zeros at excluded positions
    recon: Tensor  # [L, P, d]
    scale: Tensor  # [L, P, 1] per-token std the SAE standardizes by (1 without standardization)
    logits: Tensor  # [P, V] clean
    key: Hashable = None  # identifies the prompt in the explorer's caches

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def truncated(self) -> bool:
        return self.n_tokens_in > self.n_tokens

    @functools.cached_property
    def tokens(self) -> list[str]:
        """Token labels with whitespace made visible."""
        return [visible(t) for t in self.texts]


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


# ----------------------------------------------------------------------------- the explorer


class Explorer:
    """The explorer's state-free logic: ``submit(prompt)`` once, then query views of the result.

    ``layer`` arguments are transformer layer numbers (those the SAE was trained on), ``latent``
    is an SAE latent index and ``position`` a token index; all are validated with messages meant
    for the page.
    """

    def __init__(
        self,
        sae: MLSAE,
        transformer: Transformer,
        examples: Any = None,
        *,
        max_tokens: int = MAX_TOKENS,
        n_logits: int = N_LOGITS,
        cache_size: int = 8,
        precision: str = "fp32",
    ):
        if transformer.d_model != sae.config.n_inputs:
            raise MLSAEError(
                f"{transformer.name} has d_model {transformer.d_model}, the MLSAE expects {sae.config.n_inputs}"
            )
        self.sae = sae.eval()
        self.transformer = transformer
        self.layers: list[int] = list(sae.config.layers or range(transformer.n_layers))
        if max(self.layers) >= transformer.n_layers or len(self.layers) != sae.config.n_layers:
            raise MLSAEError(f"the MLSAE's layers {self.layers} do not fit {transformer.name} "
                             f"({transformer.n_layers} layers)")
        self.examples, self.examples_message = open_examples(examples)
        self.max_tokens = min(max_tokens, context_length(transformer))
        self.n_logits = n_logits
        self.precision = resolve_precision(precision, transformer.device)  # of the transformer's forwards
        self._runs: _LRU = _LRU(cache_size)
        self._edited: _LRU = _LRU(4 * cache_size)

    # -- sizes and validation ---------------------------------------------------------------

    @property
    def n_latents(self) -> int:
        return self.sae.config.n_latents

    def layer_index(self, layer: int) -> int:
        """Index into the SAE's layers of transformer layer ``layer``."""
        try:
            return self.layers.index(_as_int(layer, "layer"))
        except ValueError:
            lo, hi = self.layers[0], self.layers[-1]
            contiguous = self.layers == list(range(lo, hi + 1))
            allowed = f"{lo}..{hi}" if contiguous else ", ".join(map(str, self.layers))
            raise ExplorerInputError(f"layer {layer} is out of range: this MLSAE reads layers {allowed}") from None

    def check_latent(self, latent: int) -> int:
        latent = _as_int(latent, "latent")
        if not 0 <= latent < self.n_latents:
            raise ExplorerInputError(f"latent {latent} is out of range: this MLSAE has latents 0..{self.n_latents - 1}")
        return latent

    @staticmethod
    def check_position(run: PromptRun, position: int) -> int:
        position = _as_int(position, "position")
        if not 0 <= position < run.n_tokens:
            raise ExplorerInputError(
                f"position {position} is out of range: the prompt has positions 0..{run.n_tokens - 1}")
        return position

    # -- the forward pass, cached per prompt ------------------------------------------------

    def tokenize(self, prompt: str) -> tuple[Tensor, int]:
        """Token ids (truncated to ``max_tokens``) and the untruncated count."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ExplorerInputError("enter a prompt first: it is empty")
        ids = self.transformer.tokenizer(prompt, verbose=False)["input_ids"]
        if not ids:
            raise ExplorerInputError("the prompt has no tokens")
        return torch.tensor(ids[: self.max_tokens], dtype=torch.long), len(ids)

    def submit(self, prompt: str) -> PromptRun:
        """Run (or fetch from the cache) the forward pass for ``prompt``."""
        ids, n_in = self.tokenize(prompt)
        key = (tuple(ids.tolist()), n_in)
        return self._runs.get_or(key, lambda: self._run(prompt, ids, n_in, key))

    @torch.no_grad()
    def _run(self, prompt: str, ids: Tensor, n_in: int, key: tuple) -> PromptRun:
        tf, sae = self.transformer, self.sae
        with self._autocast():
            r = read_residuals(tf, ids[None], self.layers, sae.config.positions, logits=True)
        resid, logits = r.acts[:, 0].float(), r.logits
        excluded = ~r.keep[0].cpu()
        s = sae.standardize(sae.to_sae_space(resid))
        topk = sae.encode_standardized(s.x)
        recon = sae.from_sae_space(sae.decode(topk, s))  # = sae(resid), keeping the standardization for its scale
        values = topk.values.masked_fill(excluded.to(topk.values.device)[None, :, None], 0.0)
        recon = torch.where(excluded.to(resid.device)[None, :, None], resid, recon)
        scale = s.scale if isinstance(s.scale, Tensor) else torch.ones_like(resid[..., :1])
        texts = token_texts(tf.tokenizer, ids.tolist())
        if n_in > len(ids):
            prompt = tf.tokenizer.decode(ids.tolist())
        topk = TopK(values.cpu(), topk.indices.cpu())  # small; every view indexes it on the CPU
        return PromptRun(prompt, ids, texts, excluded, n_in, resid, topk, recon, scale, logits[0].float(),
                         key=key)

    # -- activations --------------------------------------------------------------------------

    def latent_acts(self, run: PromptRun, latent: int) -> Tensor:
        """Activation of ``latent`` at every (layer, position): ``[L, P]``."""
        latent = self.check_latent(latent)
        hit = run.topk.indices == latent
        return (run.topk.values * hit).sum(-1)

    def token_strip(self, run: PromptRun, layer: int, latent: int) -> Tensor:
        """The selected latent's activation at the selected layer for each token: ``[P]``."""
        return self.latent_acts(run, latent)[self.layer_index(layer)]

    def strongest_latent(self, run: PromptRun, layer: int, position: int) -> int:
        """The latent with the largest activation at (layer, position): a sensible default selection."""
        i, p = self.layer_index(layer), self.check_position(run, position)
        j = int(run.topk.values[i, p].argmax())
        return int(run.topk.indices[i, p, j])

    def histograms(self, run: PromptRun, bins: int = HIST_BINS) -> Histograms:
        """Per-layer histograms of the prompt's latent activations (those above the firing threshold)."""
        values = run.topk.values
        top = float(values.max()) if values.numel() else 0.0
        edges = torch.linspace(0.0, max(top, 1e-6), bins + 1)
        fired = self.sae.config.dead_threshold
        counts = torch.stack([torch.histc(v[v > fired], bins=bins, min=0.0, max=float(edges[-1])) for v in values])
        return Histograms(edges, counts)

    def position_view(self, run: PromptRun, position: int, threshold: float = THRESHOLD) -> LatentLayerMatrix:
        """Every latent above ``threshold`` at any layer at ``position``: latent x layer values."""
        p = self.check_position(run, position)
        threshold = check_threshold(threshold)
        L = len(self.layers)
        values, indices = run.topk.values[:, p], run.topk.indices[:, p]  # [L, k]
        keep = values > threshold
        chosen = torch.unique(indices[keep])  # sorted
        hit = torch.isin(indices, chosen) & (values > 0)
        matrix = torch.zeros(len(chosen), L)
        rows = torch.searchsorted(chosen, indices[hit])
        cols = torch.arange(L)[:, None].expand_as(indices)[hit]
        matrix[rows, cols] = values[hit].float()
        latents = chosen.tolist()
        return _sorted_by_mean_layer(latents, matrix, self.layers)

    def prompt_heatmap(self, run: PromptRun) -> LatentLayerMatrix:
        """The whole prompt, as the paper's prompt heatmaps (``mlsae.analysis.prompt``): activations
        summed over positions, latents that fired kept, normalised over layers, sorted by centre of mass.
        """
        from mlsae.analysis.prompt import heatmap_from_topk

        latents, _, probs, _ = heatmap_from_topk(run.topk.values, run.topk.indices, self.n_latents,
                                                 self.sae.config.dead_threshold)
        values = probs.T.contiguous()  # [n, L]
        mean = (values * torch.tensor(self.layers, dtype=values.dtype)).sum(-1)
        return LatentLayerMatrix(latents.tolist(), values, mean, list(self.layers))

    # -- next-token logits ----------------------------------------------------------------------

    def logits_clean(self, run: PromptRun, position: int) -> LogitLists:
        """The model's own top next-token logits at ``position``."""
        p = self.check_position(run, position)
        return LogitLists(self._top(run.logits[p]), [], [])

    def recon_logits(self, run: PromptRun, layer: int) -> Tensor:
        """Logits ``[P, V]`` with layer ``layer`` replaced by its reconstruction (cached)."""
        i = self.layer_index(layer)
        key = ("recon", run.key, layer)
        return self._edited.get_or(key, lambda: self._replaced(run, layer, run.recon[i]))

    def steered_logits(self, run: PromptRun, layer: int, latent: int, factor: float) -> Tensor:
        """Logits ``[P, V]`` with ``factor x`` the latent's decoder direction added at ``layer`` (cached).

        The SAE standardizes each token, so one unit of a latent moves a raw residual vector by the
        decoder direction times that token's std: the step is scaled by it, so a factor means the
        same thing at every layer and token. Special-token positions are left alone.
        """
        i, latent = self.layer_index(layer), self.check_latent(latent)
        factor = check_factor(factor)
        if factor == 0:
            return run.logits
        key = ("steer", run.key, layer, latent, factor)
        return self._edited.get_or(key, lambda: self._replaced(run, layer, self.steered_resid(run, i, latent, factor)))

    def steered_resid(self, run: PromptRun, layer_index: int, latent: int, factor: float) -> Tensor:
        """Residual ``[P, d]`` of SAE layer ``layer_index`` plus the scaled steering vector."""
        direction = self.sae.W_dec[latent].detach().float().to(run.resid.device)
        step = factor * run.scale[layer_index] * direction * (~run.excluded).to(direction.device)[:, None]
        if not self.sae.config.tuned_lens:
            return run.resid[layer_index] + step
        rows = slice(layer_index, layer_index + 1)  # the step is taken in the lens's space
        return self.sae.from_sae_space(self.sae.to_sae_space(run.resid[rows], rows) + step, rows)[0]

    def logits_recon(self, run: PromptRun, layer: int, position: int) -> LogitLists:
        p = self.check_position(run, position)
        return self._compare(run.logits[p], self.recon_logits(run, layer)[p])

    def logits_steered(self, run: PromptRun, layer: int, latent: int, factor: float, position: int) -> LogitLists:
        p = self.check_position(run, position)
        return self._compare(run.logits[p], self.steered_logits(run, layer, latent, factor)[p])

    @torch.no_grad()
    def _replaced(self, run: PromptRun, layer: int, hidden: Tensor) -> Tensor:
        tf = self.transformer
        replacement = hidden[None].to(device=tf.device, dtype=tf.dtype)
        with self._autocast():
            return tf.logits_with_replacement(run.input_ids[None], layer, replacement)[0].float()

    def _autocast(self) -> torch.autocast:
        return precision_autocast(self.precision, self.transformer.device)

    def _top(self, logits: Tensor) -> list[Logit]:
        probs = logits.float().softmax(-1)
        top = logits.topk(min(self.n_logits, logits.numel()))
        return self._logits(top.indices, top.values, probs)

    def _compare(self, before: Tensor, after: Tensor) -> LogitLists:
        change = after.float() - before.float()
        n = min(self.n_logits, change.numel())
        up, down = change.topk(n), change.topk(n, largest=False)
        return LogitLists(self._top(after), self._logits(up.indices, up.values),
                          self._logits(down.indices, down.values))

    def _logits(self, ids: Tensor, values: Tensor, probs: Tensor | None = None) -> list[Logit]:
        return logit_items(self.transformer.tokenizer, ids, values, probs)

    # -- max-activating examples and latent cards ---------------------------------------------

    @functools.cached_property
    def cards(self):
        """Latent cards from the examples store's analysis folder (its dists and histograms)."""
        from mlsae.analysis.cards import Cards

        return Cards(self.sae, self.transformer, getattr(self.examples, "folder", None), examples=self.examples)

    def card(self, latent: int):
        """``latent``'s card (``mlsae.analysis.cards.LatentCard``), as the book's examples chapter shows it."""
        return self.cards.card(self.check_latent(latent))

    def top_latents(self, run: PromptRun, layer: int, position: int) -> list[tuple[int, float]]:
        """(latent, activation) of the latents active at ``layer`` and ``position``, strongest first."""
        i, p = self.layer_index(layer), self.check_position(run, position)
        values, indices = run.topk.values[i, p], run.topk.indices[i, p]
        order = values.argsort(descending=True)
        return [(int(indices[j]), float(values[j])) for j in order if values[j] > 0]

    def examples_table(self, latent: int, layer: int, n: int = 32) -> tuple[pd.DataFrame | None, str]:
        """Top examples of (latent, layer) from the examples store, or None and why there are none."""
        self.check_latent(latent)
        self.layer_index(layer)
        if self.examples is None:
            return None, self.examples_message
        try:
            table = self.examples.top(latent, layer, n)
        except Exception as e:  # noqa: BLE001 - a broken or partial store must not break the page
            return None, f"the examples store could not be read: {e}"
        if table is None or len(table) == 0:
            return None, f"no stored examples for latent {latent} at layer {layer}"
        return table, ""


def logit_items(tokenizer, ids: Tensor, values: Tensor, probs: Tensor | None = None) -> list[Logit]:
    """``Logit`` rows of token ``ids`` with their ``values`` (and softmax ``probs`` over the vocabulary)."""
    ids_list = ids.tolist()
    return [Logit(i, visible(t), float(v), None if probs is None else float(probs[i]))
            for i, t, v in zip(ids_list, token_texts(tokenizer, ids_list), values.tolist())]


def _sorted_by_mean_layer(latents: list[int], values: Tensor, layers: list[int]) -> LatentLayerMatrix:
    """Rows (``latents`` ascending) sorted by activation-weighted mean layer; ties keep latent order."""
    layer_t = torch.tensor(layers, dtype=torch.float32)
    mean = (values * layer_t).sum(-1) / values.sum(-1).clamp_min(1e-12)
    order = mean.argsort(stable=True)
    return LatentLayerMatrix([latents[r] for r in order.tolist()], values[order], mean[order], list(layers))


def _as_int(value: Any, what: str) -> int:
    """``value`` as an int if it is a whole number (3, 3.0, numpy ints), else a message for the page."""
    try:
        as_int = int(value)
        if as_int == value and not isinstance(value, bool):
            return as_int
    except (TypeError, ValueError, OverflowError):
        pass
    raise ExplorerInputError(f"{what} {value!r} is not a whole number")


def check_threshold(threshold: float) -> float:
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ExplorerInputError(f"threshold {threshold!r} is not a number") from None
    if not threshold >= 0 or threshold == float("inf"):
        raise ExplorerInputError(f"threshold {threshold} must be a non-negative number")
    return threshold


def check_factor(factor: float) -> float:
    try:
        factor = float(factor)
    except (TypeError, ValueError):
        raise ExplorerInputError(f"steering factor {factor!r} is not a number") from None
    lo, hi = STEER_RANGE
    if not lo <= factor <= hi:
        raise ExplorerInputError(f"steering factor {factor} is out of range {lo:g}..{hi:g}")
    return factor


def context_length(transformer: Transformer) -> int:
    """The model's context in tokens (the config's position limit; the tokenizer's if it has none)."""
    config = getattr(transformer.model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(transformer.tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else MAX_TOKENS


# ----------------------------------------------------------------------------- loading


def open_examples(examples: Any) -> tuple[Any, str]:
    """An examples store from an object, a folder or None; otherwise None and a message for the page."""
    if examples is None:
        return None, "no examples store found: build one with mlsae.analysis.examples and pass its folder"
    if hasattr(examples, "top"):
        return examples, ""
    folder = Path(examples)
    if not folder.exists():
        return None, f"no examples store found at {folder}"
    try:
        from mlsae.analysis.examples import load_examples
    except ImportError:
        return None, "no examples store found: mlsae.analysis.examples is not available"
    try:
        return load_examples(folder), ""
    except Exception as e:  # noqa: BLE001 - the explorer works without examples
        return None, f"no examples store found: cannot read {folder}: {e}"


def find_default_sae(root: str | os.PathLike = ".") -> Path | None:
    """The MLSAE ``make all`` trained (``runs/default/sweep/mlsae-*``, else any profile's).

    Among several, the one the book analysed (it has an examples store) comes first.
    """
    root = Path(root)
    for profile in ("default", "*"):
        found = sorted(p.parent for pattern in (f"runs/{profile}/mlsae-*/config.json",
                                                f"runs/{profile}/sweep*/mlsae-*/config.json")
                       for p in root.glob(pattern) if (p.parent / "model.safetensors").is_file())
        if found:
            return min(found, key=lambda p: (find_examples(p, root) is None, str(p)))
    return None


def find_examples(sae_path: str | os.PathLike, root: str | os.PathLike = ".") -> Path | None:
    """The folder holding ``examples.parquet`` for the MLSAE at ``sae_path``, where the analyses write it.

    The book writes ``out/<profile>/analysis/<MLSAE name>/`` for ``runs/<profile>/<MLSAE name>``,
    ``python -m mlsae.analysis.examples`` ``out/analysis/<MLSAE name>/``; a store beside the MLSAE
    itself is found too.
    """
    sae_path, root = Path(sae_path), Path(root)
    name, profile = sae_path.name, sae_path.parent.name
    candidates = [root / "out" / profile / "analysis" / name, sae_path, sae_path / "examples",
                  root / "out" / "analysis" / name, *sorted(root.glob(f"out/*/analysis/{name}"))]
    return next((c for c in candidates if (c / "examples.parquet").is_file()), None)


def load_explorer(
    sae: str | os.PathLike | MLSAE,
    transformer: str | os.PathLike | Transformer | None = None,
    examples: Any = None,
    *,
    device: str = "cpu",
    **kwargs,
) -> Explorer:
    """An Explorer from an MLSAE (path, hub id or object) and its transformer (default: the one it names)."""
    if not isinstance(sae, MLSAE):
        sae = MLSAE.from_pretrained(str(sae))
    sae = sae.to(device)
    if transformer is None:
        if not sae.config.model_name:
            raise MLSAEError("this MLSAE does not name its transformer: pass one")
        transformer = sae.config.model_name
    if not isinstance(transformer, Transformer):
        transformer = Transformer.from_pretrained(transformer, device=device)
    return Explorer(sae, transformer, examples, **kwargs)
