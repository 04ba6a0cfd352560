"""The prompt explorer: the values behind every view against the SAE and transformer, bad inputs,
the widgets driven directly, and the Voilà app in a real browser (Debian's chromium + Playwright)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from mlsae.explorer.core import (
    Explorer,
    ExplorerInputError,
    find_default_sae,
    find_examples,
    token_texts,
    visible,
)
from mlsae.model import MLSAE, STD_EPS, SAEConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The cat sat on the mat.\n\tIt was a sunny day, and the children played in the garden."


def _sae(transformer, n_latents: int = 256, k: int = 8, seed: int = 0, **kw) -> MLSAE:
    torch.manual_seed(seed)
    sae = MLSAE(SAEConfig(n_inputs=transformer.d_model, n_latents=n_latents, k=k, n_layers=transformer.n_layers,
                          model_name=transformer.name, **kw))
    with torch.no_grad():  # a non-zero pre-bias, so the decode path is exercised fully
        sae.b_pre.normal_(0, 0.1)
    return sae.eval()


@pytest.fixture
def explorer(tiny_llama) -> Explorer:
    return Explorer(_sae(tiny_llama), tiny_llama)


def _ids(tf, prompt: str = PROMPT) -> torch.Tensor:
    return torch.tensor(tf.tokenizer(prompt)["input_ids"])


def _dense(sae: MLSAE, resid: torch.Tensor) -> torch.Tensor:
    """Latent activations ``[L, P, F]`` computed from scratch (PROMPT has no special tokens, so the
    position rule leaves out only the first ``skip_first`` positions)."""
    _, topk = sae(resid)
    out = torch.zeros(*resid.shape[:-1], sae.config.n_latents)
    out = out.scatter(-1, topk.indices, topk.values)
    out[:, : sae.config.skip_first] = 0
    return out


# ----------------------------------------------------------------------------- values behind the views


def test_forward_is_cached_per_prompt(explorer, monkeypatch):
    calls = []
    original = explorer.transformer.run_with_residuals
    monkeypatch.setattr(explorer.transformer, "run_with_residuals", lambda *a, **k: calls.append(1) or original(*a, **k))
    run = explorer.submit(PROMPT)
    assert explorer.submit(PROMPT) is run
    assert len(calls) == 1
    explorer.submit(PROMPT + " More.")
    assert len(calls) == 2


def test_activations_match_sae_on_residuals(explorer):
    tf, sae = explorer.transformer, explorer.sae
    run = explorer.submit(PROMPT)
    ids = _ids(tf)
    assert run.input_ids.tolist() == ids.tolist()
    resid = tf.residuals(ids[None])[:, 0].float()
    torch.testing.assert_close(run.resid, resid)
    dense = _dense(sae, resid)
    for latent in {int(run.topk.indices[1, 3, 0]), int(run.topk.indices[2, -1, 0]), 0}:
        torch.testing.assert_close(explorer.latent_acts(run, latent), dense[..., latent])
        for layer in explorer.layers:
            torch.testing.assert_close(explorer.token_strip(run, layer, latent), dense[layer, :, latent])
    recon, _ = sae(resid)
    recon[:, : sae.config.skip_first] = resid[:, : sae.config.skip_first]  # left out by the position rule
    torch.testing.assert_close(run.recon, recon)


def test_strongest_latent_is_the_argmax(explorer):
    run = explorer.submit(PROMPT)
    dense = _dense(explorer.sae, run.resid)
    assert explorer.strongest_latent(run, 1, 4) == int(dense[1, 4].argmax())


def test_tokens_are_exact_and_visible(explorer):
    run = explorer.submit(PROMPT)
    assert "".join(run.texts) == PROMPT
    assert all(t and not any(c.isspace() for c in t) for t in run.tokens)
    assert "↵" in "".join(run.tokens) and "⇥" in "".join(run.tokens) and "␣" in "".join(run.tokens)


def test_unicode_and_emoji(explorer):
    prompt = "Café – naïve 😀 日本語 \u200b end"
    run = explorer.submit(prompt)
    tok = explorer.transformer.tokenizer
    assert tok.decode(run.input_ids.tolist()) == prompt
    # Whole characters come out as themselves; bytes of a character split across tokens as \xNN.
    joined = "".join(run.texts)
    assert "Caf" in joined and ("😀" in joined or "\\xf0" in joined)
    assert all(run.tokens)
    assert visible("\u200b") == "[ZWSP]" and visible("") == "∅" and visible(" \n\t") == "␣↵⇥"
    assert "".join(token_texts(tok, tok("a plain sentence")["input_ids"])) == "a plain sentence"


def test_histograms_count_fired_latents(explorer):
    run = explorer.submit(PROMPT)
    h = explorer.histograms(run, bins=16)
    assert h.counts.shape == (len(explorer.layers), 16) and h.edges.shape == (17,)
    fired = (run.topk.values > explorer.sae.config.dead_threshold).sum(dim=(1, 2)).float()
    torch.testing.assert_close(h.counts.sum(1), fired)


def test_position_view_matches_dense(explorer):
    run = explorer.submit(PROMPT)
    dense = _dense(explorer.sae, run.resid)
    p, threshold = 5, 0.5
    m = explorer.position_view(run, p, threshold)
    expected = set(torch.nonzero((dense[:, p] > threshold).any(0)).flatten().tolist())
    assert set(m.latents) == expected and len(m.latents) == len(expected)
    for row, f in enumerate(m.latents):
        torch.testing.assert_close(m.values[row], dense[:, p, f])
        mean = (dense[:, p, f] * torch.arange(3.0)).sum() / dense[:, p, f].sum()
        torch.testing.assert_close(m.mean_layer[row], mean)
    assert m.mean_layer.tolist() == sorted(m.mean_layer.tolist())
    assert explorer.position_view(run, p, 1e9).latents == []


def test_prompt_heatmap_is_normalised_over_layers(explorer):
    run = explorer.submit(PROMPT)
    dense = _dense(explorer.sae, run.resid)
    totals = dense.sum(1)  # [L, F]
    m = explorer.prompt_heatmap(run)
    fired = (dense > explorer.sae.config.dead_threshold).any(1).any(0)
    assert set(m.latents) == set(torch.nonzero(fired).flatten().tolist())
    torch.testing.assert_close(m.values.sum(1), torch.ones(len(m.latents)))
    f = m.latents[len(m.latents) // 2]
    torch.testing.assert_close(m.values[m.latents.index(f)], totals[:, f] / totals[:, f].sum())
    assert m.mean_layer.tolist() == sorted(m.mean_layer.tolist())


def test_clean_logits_are_the_models(explorer):
    run = explorer.submit(PROMPT)
    logits = explorer.transformer.logits(run.input_ids[None])[0]
    torch.testing.assert_close(run.logits, logits.float())
    top = explorer.logits_clean(run, 4).top
    assert len(top) == 16 and [t.token_id for t in top] == logits[4].topk(16).indices.tolist()
    assert top[0].prob == pytest.approx(float(logits[4].softmax(-1).max()), rel=1e-5)


def test_reconstruction_logits(explorer):
    tf, sae = explorer.transformer, explorer.sae
    run = explorer.submit(PROMPT)
    ids = run.input_ids[None]
    for layer in explorer.layers:
        h = tf.residuals(ids, [layer])[0, 0].float()
        recon, _ = sae(h)
        recon[: sae.config.skip_first] = h[: sae.config.skip_first]  # left out by the position rule
        expected = tf.logits_with_edit(ids, layer, lambda h, r=recon: r[None])[0]
        torch.testing.assert_close(explorer.recon_logits(run, layer), expected.float(), rtol=1e-4, atol=1e-4)
    lists = explorer.logits_recon(run, 1, 6)
    change = explorer.recon_logits(run, 1)[6] - run.logits[6]
    assert [t.token_id for t in lists.increases] == change.topk(16).indices.tolist()
    assert [t.token_id for t in lists.decreases] == change.topk(16, largest=False).indices.tolist()
    assert lists.increases[0].value == pytest.approx(float(change.max()), rel=1e-5)


def test_steering_is_in_the_models_own_scale(explorer):
    tf, sae = explorer.transformer, explorer.sae
    run = explorer.submit(PROMPT)
    ids, layer, latent, factor = run.input_ids[None], 1, 17, 4.0
    h = tf.residuals(ids, [layer])[0, 0].float()
    std = (h - h.mean(-1, keepdim=True)).std(-1, keepdim=True) + STD_EPS  # the SAE's per-token scale
    steered = h + factor * std * sae.W_dec[latent].detach()
    steered[: sae.config.skip_first] = h[: sae.config.skip_first]  # left out by the position rule
    expected = tf.logits_with_edit(ids, layer, lambda _: steered[None])[0]
    torch.testing.assert_close(explorer.steered_logits(run, layer, latent, factor), expected.float(), rtol=1e-4, atol=1e-4)
    step = explorer.steered_resid(run, layer, latent, factor) - run.resid[layer]
    kept = slice(sae.config.skip_first, None)
    torch.testing.assert_close(step[kept].norm(dim=-1), factor * std[kept, 0], rtol=1e-4, atol=1e-5)  # unit decoder rows
    # One unit of steering is worth one unit of the latent: encoding moves by about the factor.
    assert explorer.steered_logits(run, layer, latent, 0.0) is run.logits
    lists = explorer.logits_steered(run, layer, latent, factor, 3)
    change = expected[3].float() - run.logits[3]
    assert [t.token_id for t in lists.increases][:3] == change.topk(3).indices.tolist()


def test_tuned_lens_mlsae_in_the_explorer(tiny_llama):
    """With a tuned lens, the explorer shows the MLSAE's own latents and raw-space reconstruction, and
    steers in the lens's space: the steered residual, translated, is the translated one plus the step."""
    from mlsae.lens import TunedLens

    torch.manual_seed(3)
    lens = TunedLens(list(range(tiny_llama.n_layers)), tiny_llama.d_model)
    with torch.no_grad():
        lens.weight.normal_(std=0.05)
        lens.bias.normal_(std=0.1)
    sae = _sae(tiny_llama, tuned_lens=True)
    sae.set_lens(lens)
    ex = Explorer(sae, tiny_llama)
    run = ex.submit(PROMPT)
    resid = tiny_llama.residuals(_ids(tiny_llama)[None])[:, 0].float()
    recon, topk = sae(resid)
    kept = slice(sae.config.skip_first, None)
    torch.testing.assert_close(run.recon[:, kept], recon[:, kept], rtol=1e-4, atol=1e-4)
    assert torch.equal(run.topk.indices[:, kept], topk.indices[:, kept])
    layer, latent, factor = 1, 17, 4.0
    rows = slice(layer, layer + 1)
    step = sae.to_sae_space(ex.steered_resid(run, layer, latent, factor)[None], rows)[0] - sae.to_sae_space(
        run.resid[rows], rows)[0]
    expected = factor * run.scale[layer] * sae.W_dec[latent].detach()
    torch.testing.assert_close(step[kept], expected[kept], rtol=1e-3, atol=1e-4)

@pytest.mark.gpu
def test_explorer_on_cuda_matches_cpu(tiny_model_dir, tiny_llama):
    """Every view's values from an explorer on CUDA (fp32) as on the CPU."""
    from mlsae.explorer.core import load_explorer

    cpu, gpu = (load_explorer(_sae(tiny_llama), tiny_model_dir("llama"), device=device, precision="fp32")
                for device in ("cpu", "cuda"))  # an MLSAE each (same seed): .to() moves a module in place
    a, b = cpu.submit(PROMPT), gpu.submit(PROMPT)
    assert torch.equal(b.topk.indices.cpu(), a.topk.indices)
    for name in ("resid", "recon", "logits"):
        torch.testing.assert_close(getattr(b, name).cpu(), getattr(a, name), rtol=1e-4, atol=1e-4)
    for view in (lambda ex, run: ex.recon_logits(run, 1), lambda ex, run: ex.steered_logits(run, 1, 17, 4.0),
                 lambda ex, run: ex.latent_acts(run, int(a.topk.indices[1, 3, 0]))):
        torch.testing.assert_close(view(gpu, b).cpu(), view(cpu, a), rtol=1e-4, atol=1e-4)
    assert [t.token_id for t in gpu.logits_recon(b, 1, 6).increases] == [t.token_id for t in cpu.logits_recon(a, 1, 6).increases]


def test_edited_logits_are_cached(explorer, monkeypatch):
    run = explorer.submit(PROMPT)
    calls = []
    original = explorer.transformer.logits_with_replacement
    monkeypatch.setattr(explorer.transformer, "logits_with_replacement", lambda *a, **k: calls.append(1) or original(*a, **k))
    for position in range(3):
        explorer.logits_recon(run, 2, position)
        explorer.logits_steered(run, 2, 5, -3.0, position)
    assert len(calls) == 2


def test_excluded_positions_are_not_encoded(explorer):
    """Special tokens and the first position (the MLSAE's position rule) are left as they are."""
    eos = explorer.transformer.tokenizer.eos_token
    run = explorer.submit(f"Hello there.{eos}Next document")
    eos_at = run.input_ids == explorer.transformer.tokenizer.eos_token_id
    assert eos_at.any() and not eos_at[0]
    assert (run.excluded == (eos_at | (torch.arange(run.n_tokens) < explorer.sae.config.skip_first))).all()
    assert run.excluded[0] and explorer.sae.config.skip_first == 1
    assert (run.topk.values[:, run.excluded] == 0).all()
    assert (run.topk.values[:, ~run.excluded] > 0).any()
    torch.testing.assert_close(run.recon[:, run.excluded], run.resid[:, run.excluded])
    step = explorer.steered_resid(run, 0, 3, 5.0) - run.resid[0]
    assert (step[run.excluded] == 0).all() and (step[~run.excluded] != 0).any()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, message", [
    (lambda ex, run: ex.submit(""), "empty"),
    (lambda ex, run: ex.submit("   \n "), "empty"),
    (lambda ex, run: ex.submit(None), "empty"),
    (lambda ex, run: ex.token_strip(run, 3, 0), "layer 3 is out of range"),
    (lambda ex, run: ex.token_strip(run, -1, 0), "layer -1 is out of range"),
    (lambda ex, run: ex.token_strip(run, 0, 256), "latent 256 is out of range"),
    (lambda ex, run: ex.token_strip(run, 0, -5), "latent -5 is out of range"),
    (lambda ex, run: ex.token_strip(run, 0, 2.5), "not a whole number"),
    (lambda ex, run: ex.token_strip(run, "x", 1), "not a whole number"),
    (lambda ex, run: ex.position_view(run, 10_000), "position 10000 is out of range"),
    (lambda ex, run: ex.position_view(run, 0, -1), "non-negative"),
    (lambda ex, run: ex.position_view(run, 0, float("nan")), "non-negative"),
    (lambda ex, run: ex.logits_steered(run, 0, 1, 11, 0), "out of range -10..10"),
    (lambda ex, run: ex.logits_steered(run, 0, 1, "big", 0), "not a number"),
])
def test_bad_inputs_raise_clear_messages(explorer, call, message):
    run = explorer.submit(PROMPT)
    with pytest.raises(ExplorerInputError, match=message):
        call(explorer, run)


def test_long_prompt_is_truncated(tiny_llama):
    ex = Explorer(_sae(tiny_llama), tiny_llama, max_tokens=32)
    run = ex.submit(PROMPT * 10)
    assert run.n_tokens == 32 and run.truncated and run.n_tokens_in > 32
    big = Explorer(_sae(tiny_llama), tiny_llama, max_tokens=10**6)
    assert big.max_tokens == tiny_llama.model.config.max_position_embeddings  # the model's context caps it


def test_mismatched_sae_is_refused(tiny_llama):
    sae = MLSAE(SAEConfig(n_inputs=32, n_latents=64, k=4, n_layers=3))
    with pytest.raises(Exception, match="d_model"):
        Explorer(sae, tiny_llama)


# ----------------------------------------------------------------------------- examples and discovery


def _examples_table(tf, latent: int, layer: int) -> pa.Table:
    ids = tf.tokenizer("the cat sat on the mat")["input_ids"][:6]
    return pa.table({
        "latent": pa.array([latent, latent], pa.int32()), "layer": pa.array([layer, layer], pa.int16()),
        "rank": pa.array([0, 1], pa.int16()), "activation": pa.array([2.0, 1.0], pa.float32()),
        "token_ids": pa.array([ids, ids], pa.list_(pa.int32())),
        "acts": pa.array([[0, 0.5, 2.0, 0, 0, 0][: len(ids)], [0, 1.0, 0, 0, 0, 0][: len(ids)]], pa.list_(pa.float32())),
        "center": pa.array([2, 1], pa.int8()),
    })


def test_examples_store(tiny_llama, tmp_path):
    import pyarrow.parquet as pq

    from mlsae.explorer.figures import examples_html

    pq.write_table(_examples_table(tiny_llama, 7, 1), tmp_path / "examples.parquet")
    ex = Explorer(_sae(tiny_llama), tiny_llama, examples=tmp_path)
    table, why = ex.examples_table(7, 1)
    assert why == "" and len(table) == 2 and table["activation"].tolist() == [2.0, 1.0]
    page = examples_html(table, tiny_llama.tokenizer)
    ids = tiny_llama.tokenizer("the cat sat on the mat")["input_ids"][:6]
    assert all(f">{visible(t)}</span>" in page for t in token_texts(tiny_llama.tokenizer, ids))
    assert page.count("outline:2px") == 2  # each example's own token
    assert ex.examples_table(8, 1)[0] is None and "no stored examples" in ex.examples_table(8, 1)[1]
    missing = Explorer(_sae(tiny_llama), tiny_llama, examples=tmp_path / "nope")
    assert missing.examples_table(7, 1) == (None, f"no examples store found at {tmp_path / 'nope'}")
    assert "no examples store found" in Explorer(_sae(tiny_llama), tiny_llama).examples_table(7, 1)[1]


def test_find_default_sae_and_examples(tmp_path, tiny_llama):
    assert find_default_sae(tmp_path) is None
    for name in ("mlsae-b-x8-k32", "mlsae-a-x8-k32"):
        _sae(tiny_llama).save_pretrained(tmp_path / "runs" / "default" / name)
    (tmp_path / "runs" / "default" / "checkpoint").mkdir()
    assert find_default_sae(tmp_path) == tmp_path / "runs" / "default" / "mlsae-a-x8-k32"
    sae_dir = find_default_sae(tmp_path)
    assert find_examples(sae_dir, tmp_path) is None
    store = tmp_path / "out" / "analysis" / sae_dir.name
    store.mkdir(parents=True)
    (store / "examples.parquet").write_bytes(b"")
    assert find_examples(sae_dir, tmp_path) == store
    book = tmp_path / "out" / "default" / "analysis" / sae_dir.name  # where the book's analyses go
    book.mkdir(parents=True)
    (book / "examples.parquet").write_bytes(b"")
    assert find_examples(sae_dir, tmp_path) == book


# ----------------------------------------------------------------------------- the widgets


@pytest.fixture
def app(explorer):
    from mlsae.explorer.app import ExplorerApp

    return ExplorerApp(explorer)


def _message(app) -> str:
    return app.message.value


def _plotly_array(value):
    """A plotly JSON array (a list, or a typed array as base64) as numpy."""
    import base64

    import numpy as np

    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value)


def _figure(app, slot) -> dict:
    """The plotly figure (JSON) a figure slot shows, checked against what went to the page."""
    spec = app.figure_specs[slot]
    page = slot.outputs[0]["data"]["text/html"]
    assert "Plotly.newPlot" in page and json.dumps(spec["layout"]["shapes"]) in page
    return spec


def test_app_submit_shows_every_view(app):
    app.submit(PROMPT)
    run = app.run
    assert [b.description for b in app.strip.children] == run.tokens
    assert app.position == run.n_tokens - 1 and app.position_box.value == app.position
    assert app.latent == app.ex.strongest_latent(run, app.layer, app.position)
    for slot in (app.latent_fig, app.hist_fig, app.position_fig, app.heatmap_fig):
        assert len(slot.outputs) == 1 and _figure(app, slot)["data"]
    heat = _figure(app, app.heatmap_fig)
    latents = app.ex.prompt_heatmap(run).latents
    assert _plotly_array(heat["data"][1]["customdata"]).tolist() == latents  # hover names each latent
    assert heat["layout"]["shapes"][0]["x0"] == app.ex.prompt_heatmap(run).latents.index(app.latent) - 0.5
    assert "top 16" in app.logits_html.value and "SAE reconstruction" in app.logits_html.value
    assert "no examples store found" in app.examples_html.value
    assert "error" not in _message(app)


def test_app_latent_buttons_select_and_show_the_card(explorer, tmp_path):
    """The latents at the selected layer and position are buttons; a click selects one and shows its card."""
    import pyarrow.parquet as pq

    from mlsae.explorer.app import ExplorerApp

    pq.write_table(_examples_table(explorer.transformer, 7, 1), tmp_path / "examples.parquet")
    app = ExplorerApp(Explorer(explorer.sae, explorer.transformer, examples=tmp_path))
    app.submit(PROMPT)
    picks = app.ex.top_latents(app.run, app.layer, app.position)
    i = app.ex.layer_index(app.layer)
    assert sorted(f for f, _ in picks) == sorted(app.run.topk.indices[i, app.position][app.run.topk.values[i, app.position] > 0].tolist())
    assert [b.description.split(" ·")[0] for b in app.picks.children] == [str(f) for f, _ in picks]
    assert f"Latent {app.latent}" in app.card_html.value  # the strongest latent, selected on submit
    app.picks.children[1].click()
    assert app.latent == picks[1][0] and app.latent_box.value == picks[1][0]
    assert f"Latent {picks[1][0]}" in app.card_html.value and "promotes" in app.card_html.value
    assert "layer distributions" in app.card_html.value  # the folder holds examples only: said, not hidden
    app.select(latent=7)
    assert "top contexts at layer 1" in app.card_html.value


def test_app_controls_redraw_without_new_forwards(app, monkeypatch):
    app.submit(PROMPT)
    tf = app.ex.transformer
    counts = {"full": 0, "edit": 0}
    full, edit = tf.run_with_residuals, tf.logits_with_replacement
    monkeypatch.setattr(tf, "run_with_residuals", lambda *a, **k: counts.__setitem__("full", counts["full"] + 1) or full(*a, **k))
    monkeypatch.setattr(tf, "logits_with_replacement", lambda *a, **k: counts.__setitem__("edit", counts["edit"] + 1) or edit(*a, **k))
    colours = [b.style.button_color for b in app.strip.children]
    app.latent_box.value = app.ex.strongest_latent(app.run, 1, 2)
    app.position_box.value = 2
    app.threshold_box.value = 0.3
    assert counts == {"full": 0, "edit": 0}
    assert app.strip.children[2].layout.border.startswith("2px")
    assert _figure(app, app.position_fig)["layout"]["title"]["text"].startswith("Latents above 0.3 at position 2")
    assert _figure(app, app.hist_fig)["layout"]["shapes"][0]["y0"] == app.layer - 0.5
    app.layer_box.value = 0
    assert counts == {"full": 0, "edit": 1}  # the reconstruction at the new layer only
    assert _figure(app, app.hist_fig)["layout"]["shapes"][0]["y0"] == -0.5
    assert "layer 0 → SAE reconstruction" in app.logits_html.value
    assert len(colours) == len(app.strip.children)
    app.factor_slider.value = 3.0
    assert counts["edit"] == 2 and "steer latent" in app.logits_html.value
    app.submit(PROMPT)  # the same prompt again: cached
    assert counts["full"] == 0
    app._buttons[4].click()
    assert app.position == 4 and app.position_box.value == 4


def test_app_strip_shading_follows_the_latent(app):
    app.submit(PROMPT)
    acts = app.ex.latent_acts(app.run, app.latent)
    values = acts[app.ex.layer_index(app.layer)]
    strongest = int(values.argmax())
    assert app.strip.children[strongest].style.button_color == "#ff7f0e" or float(values.max()) < float(acts.max())
    quiet = [i for i, v in enumerate(values.tolist()) if v == 0]
    assert all(app.strip.children[i].style.button_color == "#ffffff" for i in quiet)


def test_app_bad_inputs_show_messages_and_stay_alive(app):
    app.submit("")
    assert "empty" in _message(app) and not app.views.children
    app.layer_box.value = 5  # before any prompt: a message, not a crash
    assert "out of range" in _message(app)
    app.submit(PROMPT)
    for box, value, text in ((app.layer_box, 99, "layer 99 is out of range"), (app.latent_box, 10**6, "latent 1000000"),
                             (app.position_box, -3, "position -3 is out of range")):
        box.value = value
        assert text in _message(app) and "Traceback" not in _message(app)
    assert app.layer in app.ex.layers and 0 <= app.latent < 256  # the last good selection is kept
    assert (app.layer_box.value, app.latent_box.value, app.position_box.value) == (app.layer, app.latent, app.position)
    app.latent_box.value = 3
    assert app.latent == 3 and "mlsae-error" not in _message(app)
    app.submit("😀🎉 ünïcödé")
    assert "mlsae-error" not in _message(app) and app.strip.children
    long = Explorer(app.ex.sae, app.ex.transformer, max_tokens=16)
    from mlsae.explorer.app import ExplorerApp

    small = ExplorerApp(long)
    small.submit(PROMPT * 3)
    assert "reads only the first 16" in small.message.value and len(small.strip.children) == 16


def test_app_survives_unexpected_errors(app, monkeypatch):
    app.submit(PROMPT)
    monkeypatch.setattr(app.ex, "histograms", lambda *a, **k: 1 / 0)
    app.submit(PROMPT + " again")
    assert "ZeroDivisionError" in _message(app) and not app.submit_button.disabled
    monkeypatch.undo()
    app.submit(PROMPT)
    assert "mlsae-error" not in _message(app)


def test_build_app_reports_load_errors(tmp_path, monkeypatch):
    from mlsae.explorer.app import build_app

    widget = build_app(str(tmp_path / "missing"))
    assert "could not start" in widget.value and "missing" in widget.value
    monkeypatch.delenv("MLSAE_EXPLORER_SAE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert "make all" in build_app().value


def test_build_app_from_a_folder(tiny_model_dir, tmp_path):
    from mlsae.explorer.app import build_app

    model_dir = tiny_model_dir("llama")
    from mlsae.transformer import Transformer

    tf = Transformer.from_pretrained(model_dir)
    sae = _sae(tf)
    sae.config.model_name = str(model_dir)
    sae.save_pretrained(tmp_path / "sae")
    widget = build_app(str(tmp_path / "sae"), prompt="Hello world")
    assert "mlsae-explorer" in widget._dom_classes and "MLSAE prompt explorer" in widget.children[1].value


# ----------------------------------------------------------------------------- the book


def test_book_views(explorer):
    from book.views import HOW_TO_RUN_LIVE, book_views, views_html

    views = book_views(explorer, ["The cat sat on the mat.", "Paris 😀"], n_latents=3)
    assert len(views) == 12
    titles = " ".join(v.title for v in views)
    assert "prompt heatmap" in titles and "steering logits" in titles
    page = views_html(views)
    assert page.count("<section>") == 12 and page.count("Plotly.newPlot") == 12
    assert len(page) > 1_000_000  # plotly.js is inlined (once): the book works offline
    assert views_html(views, include_plotlyjs=False).count("plotly.js v") == 0
    assert "make explore" in HOW_TO_RUN_LIVE


# ----------------------------------------------------------------------------- a real browser

CHROMIUM = os.environ.get("MLSAE_CHROMIUM", "/usr/bin/chromium")  # make test installs it
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"voila exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"voila did not listen on port {port} in {timeout} s")


@pytest.fixture
def voila_app(tiny_model_dir, tmp_path):
    """Voilà serving notebooks/explorer.ipynb on the smoke model, on a free loopback port."""
    model_dir = tiny_model_dir("llama")
    from mlsae.transformer import Transformer

    sae = _sae(Transformer.from_pretrained(model_dir))
    sae.config.model_name = str(model_dir)
    sae.save_pretrained(tmp_path / "sae")
    port = _free_port()
    env = {**os.environ, "MLSAE_EXPLORER_SAE": str(tmp_path / "sae"), "MLSAE_EXPLORER_EXAMPLES": "",
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", str(ROOT / "notebooks" / "explorer.ipynb"), "--no-browser",
         "--Voila.ip=127.0.0.1", f"--port={port}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for_port(port, proc, 120)
        yield f"http://127.0.0.1:{port}/", tmp_path / "voila.log"
    finally:
        with _suppress():
            os.killpg(proc.pid, signal.SIGTERM)  # voila and the kernel it started (its own session)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def _artifact(name: str) -> Path:
    folder = Path(os.environ.get("MLSAE_ARTIFACTS", Path(tempfile.gettempdir()) / "mlsae-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_browser_explorer(voila_app, tiny_model_dir, tmp_path):
    """Type a prompt, Submit, see the token strip and heatmap, change the layer, see the update."""
    if not os.path.exists(CHROMIUM):  # make test installs it (or says what to install): never a skip
        pytest.fail(f"{CHROMIUM} is missing: run make test, or apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    from transformers import AutoTokenizer

    url, log = voila_app
    prompt = "The cat sat on the mat 😀"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    expected = [visible(t) for t in token_texts(tok, tok(prompt)["input_ids"])]
    profile = tmp_path / "chromium-profile"
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True,
            viewport={"width": 1280, "height": 3000},
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # Only this machine's server: the Voila template also links a font CDN, which is blocked here.
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")) else route.abort())
            page.goto(url, timeout=180_000)
            try:
                page.wait_for_selector(".mlsae-prompt textarea", timeout=180_000)
            except Exception:
                pytest.fail(f"the explorer did not appear; voila log:\n{log.read_text()[-3000:]}")
            page.fill(".mlsae-prompt textarea", prompt)
            page.click(".mlsae-submit")
            page.wait_for_selector(".mlsae-token", timeout=60_000)
            page.wait_for_selector(".mlsae-heatmap-fig .js-plotly-plot", timeout=60_000)
            page.wait_for_function(f"document.querySelectorAll('.mlsae-token').length == {len(expected)}", timeout=30_000)
            tokens = [t.strip() for t in page.locator(".mlsae-token").all_inner_texts()]
            assert tokens == expected
            assert page.locator(".mlsae-heatmap-fig .js-plotly-plot .hm, .mlsae-heatmap-fig .js-plotly-plot image").count() > 0
            assert "layer 1 → SAE reconstruction" in page.inner_text(".mlsae-logits")
            shot = _artifact("explorer-before-layer-change.png")
            page.screenshot(path=str(shot))
            page.fill(".mlsae-layer input", "0")
            page.press(".mlsae-layer input", "Enter")
            page.wait_for_function(
                "document.querySelector('.mlsae-logits').innerText.includes('layer 0 → SAE reconstruction')",
                timeout=30_000)
            assert "steer latent" in page.inner_text(".mlsae-logits")
            page.fill(".mlsae-latent input", "100000")
            page.press(".mlsae-latent input", "Enter")
            page.wait_for_selector(".mlsae-message .mlsae-error", timeout=30_000)
            assert "out of range" in page.inner_text(".mlsae-message")
            latent = page.input_value(".mlsae-latent input")
            assert latent != "100000"  # the control went back to the selected latent
            page.locator(".mlsae-token").nth(1).click()
            page.wait_for_function("document.querySelector('.mlsae-position input').value == '1'", timeout=30_000)
            page.wait_for_function("document.querySelector('.mlsae-position-fig').innerText.includes('at position 1 (')",
                                   timeout=30_000)
            page.wait_for_function("!document.querySelector('.mlsae-message .mlsae-error')", timeout=30_000)
            assert f"“{expected[1]}”" in page.inner_text(".mlsae-logits")
            pick = page.locator(".mlsae-pick").nth(1)
            latent = pick.inner_text().split(" ·")[0].strip()
            pick.click()
            page.wait_for_function(f"document.querySelector('.mlsae-latent input').value == '{latent}'", timeout=30_000)
            page.wait_for_function(
                f"document.querySelector('.mlsae-card-view').innerText.includes('Latent {latent}')", timeout=30_000)
            shot = _artifact("explorer-browser.png")
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            assert not errors, errors
        finally:
            browser.close()
    shutil.rmtree(profile, ignore_errors=True)
